"""Average model weights of several checkpoints, with the selection rule made explicit.

    python average_checkpoints.py --inputs A.pt B.pt C.pt --out avg.pt
    python average_checkpoints.py --run RUN_DIR --select last-improved:3 --metric acc1 --out avg.pt [--eval] [--export]

Selection rules (over the run's per-epoch metrics, metrics.jsonl):
  last-improved:K  the last K epochs whose metric beat every earlier epoch's (ties do not count);
                   the rule behind torchvision's released MobileNetV3 weights
  top:K            the K best epochs (--mode max|min); among equal values the later epoch wins
  last:K           the last K epochs
Arithmetic: floating tensors are summed in float64 and the mean cast back to their dtype; integer
buffers (BatchNorm num_batches_tracked) are summed as int64 and floor-divided, as torchvision's
reference tool does, so they stay integer. At most two state dicts are in memory (the running sum
and the one being added; checkpoint files are memory-mapped, so optimizer state is never read).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import re
from pathlib import Path

import torch

from engine import checkpoint, rundir
from engine.checkpoint import file_sha256
from engine.config import ConfigError, load_config_dict
from engine.errors import UserError
from engine.runlog import improved, read_metrics
from reproduce.report import write_run_report

RULES = ("last-improved", "top", "last")


class SelectionError(ValueError):
    pass


# ============================================================================ selection


def parse_rule(text: str) -> tuple[str, int]:
    name, _, k = text.partition(":")
    if name not in RULES or not k.isdigit() or int(k) < 1:
        raise SelectionError(f"--select {text!r}: expected one of {', '.join(r + ':K' for r in RULES)} with K >= 1")
    return name, int(k)


def select(history: list[dict], rule: str, k: int, metric: str, mode: str = "max") -> list[dict]:
    """Rows of `history` (each with "epoch" and `metric`) chosen by the rule, in epoch order."""
    rows = sorted((r for r in history if metric in r and "row" not in r),  # "row": a derived line, not an epoch
                  key=lambda r: r["epoch"])
    if not rows:
        raise SelectionError(f"no epoch in the run's history has the metric {metric!r}")
    if rule == "last":
        chosen = rows[-k:]
    elif rule == "top":
        sign = 1 if mode == "max" else -1
        chosen = sorted(rows, key=lambda r: (sign * r[metric], r["epoch"]), reverse=True)[:k]
    else:  # last-improved
        chosen = improved(rows, metric, mode)[-k:]
    if len(chosen) < k:
        what = "improved" if rule == "last-improved" else "are recorded"
        raise SelectionError(f"{rule}:{k} needs {k} epochs but only {len(chosen)} {what} "
                             f"({metric}, mode {mode}); ask for {len(chosen)} or fewer")
    return sorted(chosen, key=lambda r: r["epoch"])


# ============================================================================ averaging


def _model_state(obj: dict, key: str, path: Path) -> dict[str, torch.Tensor]:
    if key not in obj:
        raise ValueError(f"{path}: has no {key!r} weights (--weights {'ema' if key == 'model_ema' else 'model'})")
    return {k.removeprefix("module."): v for k, v in obj[key].items()}


def average(paths: list[Path], key: str = "model") -> tuple[dict[str, torch.Tensor], dict | None]:
    """Mean of the `key` weights of `paths`; refuses different keys, shapes, dtypes or model configs."""
    if not paths:
        raise ValueError("nothing to average")
    total: dict[str, torch.Tensor] = {}
    ref_meta, ref_model_cfg, first = None, None, paths[0]
    for i, path in enumerate(paths):
        obj = checkpoint.load(path, mmap=True)  # only the weights are ever read from disk
        state = _model_state(obj, key, path)
        model_cfg = (obj.get("config") or {}).get("model")
        if i == 0:
            ref_meta = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
            ref_model_cfg = model_cfg
            total = {k: v.to(torch.float64 if v.is_floating_point() else torch.int64, copy=True)
                     for k, v in state.items()}
        else:
            _check_same(first, ref_meta, ref_model_cfg, path, state, model_cfg)
            _accumulate(total, state)
        del obj, state  # unmaps the file: no tensor of it survives this iteration
    n = len(paths)
    out = {}
    for k, (dtype, _) in ref_meta.items():  # each sum is released as soon as its mean exists
        acc = total.pop(k)
        out[k] = acc.div_(n).to(dtype) if dtype.is_floating_point else acc.floor_divide_(n).to(dtype)
    return out, ref_model_cfg


def _accumulate(total: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    for k, v in state.items():
        total[k].add_(v)  # in place, promoted to the accumulator's float64 / int64


def _check_same(first: Path, ref_meta: dict, ref_cfg: dict | None, path: Path, state: dict,
                model_cfg: dict | None) -> None:
    missing = sorted(set(ref_meta) - set(state))
    extra = sorted(set(state) - set(ref_meta))
    if missing or extra:
        raise ValueError(f"{path}: its keys differ from {first}'s: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in state.items():
        if (v.dtype, tuple(v.shape)) != ref_meta[k]:
            raise ValueError(f"{path}: {k} is {v.dtype} {tuple(v.shape)} but {ref_meta[k][0]} {ref_meta[k][1]} "
                             f"in {first}")
    if ref_cfg is not None and model_cfg is not None:
        ignore = {"weights"}  # where a run's initial weights came from does not change its architecture
        diff = {k for k in set(ref_cfg) | set(model_cfg) if k not in ignore and ref_cfg.get(k) != model_cfg.get(k)}
        if diff:
            details = ", ".join(f"model.{k}: {ref_cfg.get(k)!r} vs {model_cfg.get(k)!r}" for k in sorted(diff))
            raise ValueError(f"{path}: trained with a different model config than {first} ({details})")


def export_state_dict(state: dict[str, torch.Tensor], out: Path) -> Path:
    """A plain state-dict file named <name>-<first 8 hex of its sha256>.pth (torch.hub's check_hash)."""
    tmp = out.with_name(f".{out.stem}.export.tmp")
    checkpoint.save(state, tmp)
    digest = file_sha256(tmp)
    final = out.with_name(f"{out.stem}-{digest[:8]}.pth")
    tmp.replace(final)
    return final


# ============================================================================ evaluation


def check_eval(run_dir: Path, out: Path) -> None:
    """--eval runs train_classification.py on the run's resolved recipe: refuse (before any averaging) a
    run without one, or a run of another script, saying how to evaluate the average instead."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: --eval needs the run's resolved recipe")
    try:
        raw = load_config_dict(config)
    except ConfigError as exc:
        raise SelectionError(f"--eval: {exc}") from None
    name = str((raw.get("model") or {}).get("name", ""))
    script = ("train_qat.py" if "qat" in raw else "train_detection.py" if name.startswith("fasterrcnn")
              else "train_classification.py" if name.startswith("mobilenet_v3") else "train_segmentation.py")
    if script != "train_classification.py":
        raise SelectionError(
            f"--eval evaluates classification runs; {run_dir} is a run of {script}. Average without --eval, then "
            f"evaluate: python {script} --recipe {config} run.eval_only=true model.weights={out}")


def evaluate_in_run(run_dir: Path, weights: Path) -> dict:
    """Evaluate `weights` with the run's resolved recipe through train_classification.py's eval-only mode."""
    config = run_dir / "config.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(Path(__file__).with_name("train_classification.py")), "--recipe", str(config),
               "run.eval_only=true", f"model.weights={weights}", f"run.output_dir={tmp}", "run.resume=null"]
        proc = subprocess.run(cmd, text=True, capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"evaluation failed:\n{proc.stderr.strip()}")
        print(proc.stdout.strip())
        return json.loads((Path(tmp) / "eval.json").read_text())


# ============================================================================ CLI


def _check_out(out: Path, inputs: list[Path]) -> None:
    """--out must not overwrite an input or any training checkpoint (epoch_NNN.pt, last.pt of a run), and
    must be writable where it is (checked before the averaging work)."""
    target = out.resolve()
    blocker = next((p for p in target.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise SelectionError(f"--out {out}: {blocker} is a file, not a directory; choose another path")
    if out.is_dir():
        raise SelectionError(f"--out {out} is a directory; give a file name (e.g. {out / 'averaged.pt'})")
    for p in inputs:
        if Path(p).resolve() == target or (out.exists() and Path(p).exists() and out.samefile(p)):
            raise SelectionError(f"--out {out} is one of the checkpoints being averaged; choose another path "
                                 "(e.g. RUN/averaged.pt)")
    if target.parent.name == "checkpoints" and (target.name == "last.pt" or
                                                re.fullmatch(r"epoch_\d+\.pt", target.name)):
        raise SelectionError(f"--out {out} would overwrite a training checkpoint; choose a path outside "
                             "checkpoints/ (e.g. RUN/averaged.pt)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--inputs", nargs="+", type=Path, help="checkpoint or state-dict files to average")
    src.add_argument("--run", type=Path, help="a run directory (metrics.jsonl + checkpoints/epoch_NNN.pt)")
    ap.add_argument("--select", help="with --run: last-improved:K | top:K | last:K")
    ap.add_argument("--metric", default="acc1", help="with --run: the metric the rule reads (default acc1)")
    ap.add_argument("--mode", choices=("max", "min"), default="max")
    ap.add_argument("--weights", choices=("model", "ema"), default="model", help="average raw or EMA weights")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--export", action="store_true", help="also write <name>-<sha256[:8]>.pth (plain state dict)")
    ap.add_argument("--eval", action="store_true",
                    help="with --run: evaluate, record in metrics.jsonl, rewrite report.md")
    args = ap.parse_args(argv)
    if args.run is not None and args.select is None:
        ap.error("--run needs --select")
    if args.eval and args.run is None:
        ap.error("--eval needs --run (it uses the run's recipe)")
    if not args.eval:
        return _average(args)
    check_eval(args.run, args.out)
    held = rundir.lock_dir(args.run)  # --eval rewrites metrics.jsonl: never beside a run still writing it
    try:
        return _average(args)
    finally:
        held.close()


def _average(args: argparse.Namespace) -> dict:
    key = "model_ema" if args.weights == "ema" else "model"

    if args.run is not None:
        rule, k = parse_rule(args.select)
        history = read_metrics(args.run)
        if not history:
            raise SelectionError(f"{args.run / 'metrics.jsonl'}: no metrics recorded")
        chosen = select(history, rule, k, args.metric, args.mode)
        paths = [args.run / "checkpoints" / f"epoch_{r['epoch']:03d}.pt" for r in chosen]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: selected by {args.select} but missing (was it pruned? "
                                        "set run.keep_checkpoints: null to keep every epoch)")
        sources = [{"path": str(p), "epoch": r["epoch"], args.metric: r[args.metric]} for p, r in zip(paths, chosen)]
        print(f"{args.select} on {args.metric} ({args.mode}) selects:")
        for s in sources:
            print(f"  epoch {s['epoch']:>4}  {args.metric} {s[args.metric]:.3f}  {s['path']}")
        rule_text = f"{args.select} on {args.metric} ({args.mode})"
    else:
        paths, rule_text = list(args.inputs), "explicit --inputs"
        sources = [{"path": str(p)} for p in paths]
        print("averaging:\n" + "\n".join(f"  {p}" for p in paths))

    _check_out(args.out, paths)
    state, model_cfg = average(paths, key)
    digest = checkpoint.state_sha256(state)
    epochs = [s["epoch"] for s in sources if "epoch" in s]
    ckpt = checkpoint.new(state, averaged_from=sources, rule=rule_text, weights=args.weights, sha256=digest,
                          epoch=max(epochs) if epochs else None)
    if model_cfg is not None:
        ckpt["config"] = {"model": model_cfg}
    checkpoint.save(ckpt, args.out)
    print(f"wrote {args.out} ({len(paths)} checkpoints, weights sha256 {digest[:16]}...)")
    result = {"out": str(args.out), "sha256": digest, "sources": sources}
    if args.export:
        exported = export_state_dict(state, args.out)
        print(f"exported {exported}")
        result["export"] = str(exported)
    if args.eval:
        metrics = evaluate_in_run(args.run, args.out)
        row = {"epoch": max(epochs), "row": "checkpoint averaging", "acc1": metrics["acc1"], "acc5": metrics["acc5"],
               "averaged_epochs": epochs, "rule": rule_text, "weights_file": str(args.out)}
        # one row per rule: running the same averaging again replaces its row
        kept = [r for r in history if not (r.get("row") == row["row"] and r.get("rule") == rule_text)]
        checkpoint.atomic_write_text(args.run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept + [row]))
        result["metrics"] = metrics
        result["report"] = str(write_run_report(args.run))  # the averaging row beside the published numbers
        print(f"wrote {result['report']}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (SelectionError, ValueError, FileNotFoundError, RuntimeError, UserError) as exc:
        print(f"average_checkpoints.py: error: {exc}", file=sys.stderr)
        sys.exit(1)
