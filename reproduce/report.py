"""The reproduction report: a run's numbers beside the published ones.

    write_run_report(run_dir) -> Path     report.md, built only from the files of the run directory
    summarize(run_dir) -> RunSummary      the same facts as data (tools/report.py tabulates many runs)
    PUBLISHED                             the published rows, in the order of the published tables

A run directory holds everything the report needs: config.yaml (the resolved recipe; its
`expected:` section holds the published numbers), env.json (command line, versions, commit, world
size, GPUs, derived values such as the global batch), metrics.jsonl (one row per epoch, plus
derived rows such as `{"row": "checkpoint averaging", ...}`) and eval.json (eval-only runs).

Which measurement a published number is compared with is a fact of the published row, not of
the run: the released classification weights are an average of checkpoints (`averaged`), the
tuning-table rows 1-4 are last epochs (`last`), torchvision's low-res detector is the epoch-23
checkpoint of a 26-epoch run (`epoch 23`), and so on (`PublishedRow.measure`, reproduce/published.py);
a row that evaluates another row's weights again (the blog's 23.0 before RPN tuning, the low-res
segmentation rows) measures that row's checkpoint (`weights_of`). A run is matched
to its published row by the recipe path on its command line (env.json `argv`), else by its task
and its recipe's published values.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from engine.checkpoint import atomic_write_text
from engine.rundir import OPERATIONAL
from reproduce.published import (INFO_METRICS, SCRIPT_TASKS, TASK_METRICS, TOLERANCE_TEXT, Metric, PublishedRow,
                                 match_row)
from reproduce.published import EPS as _EPS
from reproduce.published import num as _num

# ============================================================================ one run as data


@dataclasses.dataclass
class Line:
    """One measurement of a run: an epoch, an averaging row, an eval-only result."""

    label: str
    kind: str                   # "last" | "best" | "epoch" | "averaged" | "eval" | "derived"
    values: dict[str, float]
    epoch: int | None = None
    rule: str | None = None


@dataclasses.dataclass
class Comparison:
    metric: Metric
    measured: float | None
    published: float | None
    difference: float | None
    verdict: str                # "within ±0.2" | "below (outside ±0.2)" | "above (...)" | ...
    within: bool | None


@dataclasses.dataclass
class RunSummary:
    run_dir: Path
    task: str | None
    recipe: str | None
    row: PublishedRow | None
    expected: dict[str, Any]
    lines: list[Line]
    compared: Line | None       # the line the published number measures (None: pending or nothing yet)
    status: str                 # the run's verdict in words
    pending: str | None         # why nothing is compared yet ("not averaged yet", "epoch 23 not reached yet")
    notes: list[str]            # comparability and matching notes
    provenance: list[tuple[str, str]]

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return TASK_METRICS.get(self.task or "", ())

    def published(self, metric: Metric) -> float | None:
        return _num(self.expected.get(metric.expected))

    def compare(self, line: Line) -> list[Comparison]:
        return [compare_value(m, line.values.get(m.key), self.published(m)) for m in self.metrics]


def compare_value(metric: Metric, measured: Any, published: Any) -> Comparison:
    measured, published = _num(measured), _num(published)
    if published is None:
        return Comparison(metric, measured, None, None, "no published number", None)
    if measured is None:
        return Comparison(metric, None, published, None, "not measured", None)
    diff = measured - published
    if abs(diff) <= metric.tolerance + _EPS:
        return Comparison(metric, measured, published, diff, f"within ±{metric.tolerance:g}", True)
    side = "above" if diff > 0 else "below"
    return Comparison(metric, measured, published, diff, f"{side} (outside ±{metric.tolerance:g})", False)


# Command-line overrides that do not change what is measured: the run directory's operational keys, the
# weights an eval-only run evaluates, speed-only switches, and accumulation (the global batch is checked).
NEUTRAL_OVERRIDES = tuple(sorted(OPERATIONAL)) + ("run.divergence_factor", "model.weights", "train.compile",
                                                  "train.channels_last", "train.accumulate", "expected.source")


def summarize(run_dir: str | Path) -> RunSummary:
    run_dir = Path(run_dir)
    config = _read_yaml(run_dir / "config.yaml")
    env = _read_json(run_dir / "env.json")
    ev = _read_json(run_dir / "eval.json")
    rows, unreadable = read_rows(run_dir / "metrics.jsonl")
    argv = [str(a) for a in env.get("argv") or []]
    recipe = _recipe_from_argv(argv)
    expected = dict(config.get("expected") or ev.get("expected") or {})
    eval_values = _flat_metrics(ev)
    task = _task(argv, rows, eval_values, expected)
    row = match_row(recipe, task, expected)
    if task is None and row is not None:
        task = row.task
    notes: list[str] = [f"metrics.jsonl: {unreadable} unreadable line(s) skipped"] if unreadable else []
    if row is not None:
        differ = {k: (expected.get(k), v) for k, v in row.values.items()
                  if _num(expected.get(k)) is None or abs(_num(expected.get(k)) - v) > _EPS}
        if differ:
            notes.append("this run's `expected:` differs from the published row: " + ", ".join(
                f"expected.{k} {a} (published {b:g})" for k, (a, b) in differ.items()) + "; the report uses the run's")

    metrics = TASK_METRICS.get(task or "", ())
    headline = metrics[0].key if metrics else None
    lines = _lines(rows, ev, eval_values, row, headline)
    planned = _num((config.get("schedule") or {}).get("epochs"))
    compared, pending = _pick(lines, row, planned)
    summary = RunSummary(run_dir, task, recipe, row, expected, lines, compared, "", pending, notes, [])
    summary.notes += _comparability(config, env, argv, lines, planned, row, ev.get("weights"))
    summary.status = _status(summary)
    summary.provenance = _provenance(run_dir, config, env, argv, recipe, lines, planned)
    return summary


def _lines(rows: list[dict], ev: dict, eval_values: dict, row: PublishedRow | None, headline: str | None) -> list[Line]:
    by_epoch: dict[int, dict] = {}
    for r in rows:
        if "row" not in r and isinstance(r.get("epoch"), int):
            by_epoch[r["epoch"]] = r  # a re-written epoch (resume) replaces the earlier line
    lines: list[Line] = []
    if eval_values:
        weights = ev.get("weights")
        lines.append(Line("eval-only" + (f": {weights}" if weights else ""), "eval", eval_values))
    if by_epoch:
        last = max(by_epoch)
        lines.append(Line(f"last epoch ({last})", "last", _numbers(by_epoch[last]), last))
        want = _measure_epoch(row)
        if want is not None and want in by_epoch and want != last:
            lines.append(Line(f"epoch {want}", "epoch", _numbers(by_epoch[want]), want))
        if headline is not None:
            scored = [e for e in by_epoch if _num(by_epoch[e].get(headline)) is not None]
            if scored:
                best = max(scored, key=lambda e: (by_epoch[e][headline], e))
                if best != last and best != want:
                    lines.append(Line(f"best epoch ({best})", "best", _numbers(by_epoch[best]), best))
    for r in rows:
        if "row" in r:
            name = str(r["row"])
            if name == "checkpoint averaging":
                epochs = r.get("averaged_epochs") or []
                label = f"checkpoint averaging: {r.get('rule', '?')}, epochs {', '.join(map(str, epochs))}"
                lines.append(Line(label, "averaged", _numbers(r), r.get("epoch"), r.get("rule")))
            elif name != "recipe change":  # accepted recipe changes are listed under Comparability
                lines.append(Line(name, "derived", _numbers(r), r.get("epoch")))
    return lines


def _measure_epoch(row: PublishedRow | None) -> int | None:
    if row is not None and row.measure.startswith("epoch "):
        return int(row.measure.split()[1])
    return None


def measure_text(measure: str, row: PublishedRow | None = None) -> str:
    if measure == "averaged":
        text = "averaged weights (average_checkpoints.py --eval: the last 3 checkpoints that improved Acc@1)"
    elif measure == "last":
        text = "the last epoch"
    elif measure == "final":
        text = "the final evaluation (an eval-only run, else the last epoch)"
    else:
        text = f"{measure} (0-based, as in metrics.jsonl; a shorter run stands in with its last epoch)"
    if row is not None and row.weights_of:
        text = (f"the weights of the row \"{row.weights_of}\", {text}, evaluated again with "
                + " ".join(f"`{v}`" for v in row.variant) + " (an eval-only run of that checkpoint)")
    return text


def averaging_command(run_dir: Path) -> str:
    return (f"python average_checkpoints.py --run {run_dir} --select last-improved:3 --metric acc1 "
            f"--out {run_dir / 'averaged.pt'} --eval --export")


def _pick(lines: list[Line], row: PublishedRow | None, planned: float | None) -> tuple[Line | None, str | None]:
    """The line the published number measures, or why there is none yet."""
    by_kind: dict[str, list[Line]] = {}
    for line in lines:
        by_kind.setdefault(line.kind, []).append(line)
    last = (by_kind.get("last") or [None])[0]
    evaluated = (by_kind.get("eval") or [None])[0]
    if not lines:
        return None, None
    if evaluated is not None and last is None:
        return evaluated, None  # an eval-only run measures given weights: that is the comparison
    measure = row.measure if row is not None else "final"
    if measure == "averaged":
        averaged = by_kind.get("averaged") or []
        preferred = [a for a in averaged if (a.rule or "").startswith("last-improved:3 ")]
        if preferred or averaged:
            return (preferred or averaged)[-1], None
        return None, "not averaged yet"
    if measure.startswith("epoch "):
        want = int(measure.split()[1])
        for line in lines:
            if line.epoch == want and line.kind in ("last", "epoch"):
                return line, None
        if planned is not None and planned <= want and last is not None:
            return last, None  # this (shorter) run never has that epoch: its last one stands in
        return None, f"epoch {want} not reached yet"
    if measure == "final" and evaluated is not None:
        return evaluated, None
    return last, None


def _status(s: RunSummary) -> str:
    if not s.metrics:
        return "unknown task: no metric to compare"
    if not s.lines:
        return "nothing measured yet"
    if s.pending is not None:
        return "pending"
    head = s.compare(s.compared)[0]
    return head.verdict


def _comparability(config: dict, env: dict, argv: list[str], lines: list[Line], planned: float | None,
                   row: PublishedRow | None = None, weights: str | None = None) -> list[str]:
    notes = []
    evaluated = re.search(r"epoch_(\d+)\.pt$", str(weights or ""))
    if row is not None and row.measure.startswith("epoch ") and evaluated \
            and int(evaluated.group(1)) != int(row.measure.split()[1]):
        notes.append(f"evaluated {Path(str(weights)).name}; the published number is of the {row.measure} "
                     "checkpoint")
    run_cfg, train = config.get("run") or {}, config.get("train") or {}
    derived = env.get("derived") or {}
    batch = (config.get("data") or {}).get("batch_size")
    recipe_world = run_cfg.get("world_size")
    recipe_global = run_cfg.get("global_batch") or (recipe_world * batch if recipe_world and batch else None)
    world = env.get("world_size")
    global_batch = derived.get("global_batch")
    accumulate = derived.get("accumulate")
    how = f" ({world} x {batch} x accumulate {accumulate})" if accumulate and world and batch else ""
    if recipe_global and global_batch and global_batch != recipe_global:
        notes.append(f"global batch {global_batch}{how}, the recipe's is {recipe_global}")
    elif recipe_world and world and world != recipe_world:
        notes.append(f"{world} process(es) instead of the recipe's {recipe_world}; global batch {global_batch or '?'}"
                     f"{how} as in the recipe")
    if train.get("amp") not in (None, "none"):
        notes.append(f"train.amp={train['amp']}: the published runs were fp32")
    if train.get("tf32") is True and str(env.get("device", "")).startswith("cuda"):
        notes.append("train.tf32=true: convolutions and matmuls ran in TF32 on this GPU, not in the published "
                     "runs' fp32")
    changed = [o for o in _overrides(argv) if o.split("=", 1)[0] not in NEUTRAL_OVERRIDES
               and not o.startswith("expected.") and (row is None or o not in row.variant)]
    if changed:
        notes.append("command-line overrides that change the recipe: " + " ".join(f"`{o}`" for o in changed))
    epochs = [line.epoch for line in lines if line.kind == "last"]
    if planned is not None and epochs and epochs[0] + 1 < planned:
        notes.append(f"incomplete: {epochs[0] + 1} of {int(planned)} epochs done")
    return notes


def _provenance(run_dir: Path, config: dict, env: dict, argv: list[str], recipe: str | None,
                lines: list[Line], planned: float | None) -> list[tuple[str, str]]:
    run_cfg, train, data = config.get("run") or {}, config.get("train") or {}, config.get("data") or {}
    derived = env.get("derived") or {}
    out: list[tuple[str, str]] = [("run directory", str(run_dir))]
    if argv:
        out.append(("command", " ".join(argv)))
    out.append(("recipe", recipe or "(not recorded)"))
    world = env.get("world_size")
    out.append(("world size", f"{world if world is not None else '?'} (recipe: {run_cfg.get('world_size', '?')})"))
    recipe_global = run_cfg.get("global_batch")
    out.append(("global batch", f"{derived.get('global_batch', '?')} (recipe: {recipe_global or '?'}); "
                                f"per-process batch {data.get('batch_size', '?')}"))
    if derived:
        out.append(("derived", ", ".join(f"{k} {v}" for k, v in derived.items())))
    tf32 = train.get("tf32", "not set (PyTorch's default: TF32 convolutions on Ampere and newer GPUs)")
    tf32 = str(tf32).lower() if isinstance(tf32, bool) else tf32
    out.append(("precision", f"amp {train.get('amp', '?')}, tf32 {tf32}"))
    done = [line.epoch for line in lines if line.kind == "last"]
    out.append(("epochs", f"{done[0] + 1 if done else 0} done of {int(planned) if planned is not None else '?'}"))
    out.append(("seed", str(run_cfg.get("seed", "?"))))
    gpus = env.get("gpus")
    device = str(env.get("device", "?"))
    if gpus:
        device += " (" + ", ".join(f"{n} x {name}" for name, n in Counter(gpus).items()) + ")"
    out.append(("device", device))
    versions = [f"{k} {env[k]}" for k in ("python", "torch", "torchvision", "cuda", "timm") if env.get(k)]
    out.append(("versions", ", ".join(versions) or "?"))
    dirty = " (uncommitted changes)" if env.get("git_dirty") else ""
    out.append(("commit", str(env.get("git_commit") or "?") + dirty))
    host = env.get("hostname")
    if host:
        out.append(("host", host + (f", SLURM job {env['slurm_job_id']}" if env.get("slurm_job_id") else "")))
    return out


# ============================================================================ report.md


def render(s: RunSummary) -> str:
    title = s.row.name if s.row is not None else "no published row"
    out = [f"# Reproduction report: {title}", ""]
    table = f" ({s.row.table})" if s.row is not None else ""
    out.append(f"Recipe `{s.recipe or '?'}`, task {s.task or 'unknown'}{table}.  ")
    source = s.expected.get("source") or (s.row.source if s.row is not None else "")
    if source:
        out.append(f"Published source: {source}.")
    out.append("")
    out.append(f"**Verdict: {s.status}**" + _status_detail(s))
    out.append("")
    if s.row is not None:
        out += [f"The published number is of {measure_text(s.row.measure, s.row)}; the line marked (compared) "
                "is the one it is compared with.", ""]
    out.append("| measured on | metric | measured | published | difference | verdict |")
    out.append("|---|---|---:|---:|---:|---|")
    for line in s.lines:
        for c in s.compare(line):
            if c.published is None:
                verdict = c.verdict
            elif line is s.compared:
                verdict = f"**{c.verdict}** (compared)"
            else:
                verdict = "not compared"
            published = c.metric.published_text(c.published)
            out.append(f"| {line.label} | {c.metric.label} | {_fmt(c.measured)} | {published} | "
                       f"{_signed(c.difference)} | {verdict} |")
        for key, label in INFO_METRICS.get(s.task or "", ()):
            if key in line.values:
                out.append(f"| {line.label} | {label} | {_fmt(line.values[key])} | - | - | not published |")
    if not s.lines:
        out.append("| (nothing measured yet) | | | | | |")
    out.append("")
    notes = [s.row.note] if s.row is not None and s.row.note else []
    if s.pending == "not averaged yet":
        notes.append("pending: the published number is of averaged weights; average the last 3 checkpoints that "
                     f"improved Acc@1 and evaluate them (this report is rewritten): `{averaging_command(s.run_dir)}`")
    elif s.pending:
        notes.append(f"pending: {s.pending}")
    if s.row is None and not s.metrics:
        notes.append("the task was not recognised (env.json argv, metric names and expected keys)")
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    out += ["## Comparability", ""]
    out += [f"- {n}" for n in s.notes] if s.notes else ["- the run's setting is the recipe's (no result-changing "
                                                        "override, same global batch, fp32)"]
    out += ["", "## Tolerance", "", TOLERANCE_TEXT, "", "## Provenance", "", "| | |", "|---|---|"]
    out += [f"| {k} | {_cell(v)} |" for k, v in s.provenance]
    written = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out += [f"| report written | {written} |", ""]
    return "\n".join(out)


def _status_detail(s: RunSummary) -> str:
    if s.pending is not None:
        return f": {s.pending}"
    if s.compared is None or not s.metrics:
        return ""
    c = s.compare(s.compared)[0]
    if c.published is None:
        return f": {c.metric.label} {_fmt(c.measured)} measured on {s.compared.label}"
    return (f": {c.metric.label} {_fmt(c.measured)} vs published {c.metric.published_text(c.published)} "
            f"({_signed(c.difference)}), "
            f"measured on {s.compared.label}")


def write_run_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.md from the run directory's files; return its path."""
    run_dir = Path(run_dir)
    path = run_dir / "report.md"
    atomic_write_text(path, render(summarize(run_dir)))
    return path


# ============================================================================ helpers


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_rows(path: Path) -> tuple[list[dict], int]:
    """metrics.jsonl's rows, and how many lines could not be read (a run killed mid-write)."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return [], 0
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, len(lines) - len(rows)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _recipe_from_argv(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--recipe" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--recipe="):
            return arg.split("=", 1)[1]
    return None


def _overrides(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg == "--recipe":
            skip = True
        elif not arg.startswith("-") and "=" in arg:
            out.append(arg)
    return out


def _task(argv: list[str], rows: list[dict], eval_values: dict, expected: dict) -> str | None:
    if argv and Path(argv[0]).name in SCRIPT_TASKS:
        return SCRIPT_TASKS[Path(argv[0]).name]
    keys = set(eval_values).union(*(set(r) for r in rows)) if rows else set(eval_values)
    for key, task in (("int8_acc1", "qat"), ("bbox_map", "detection"), ("miou", "segmentation"),
                      ("acc1", "classification")):
        if key in keys:
            return task
    for key, task in (("bbox_map", "detection"), ("miou", "segmentation"), ("acc1", "classification")):
        if _num(expected.get(key)) is not None:
            return task
    return None


def _flat_metrics(ev: dict) -> dict[str, float]:
    source = ev.get("metrics") if isinstance(ev.get("metrics"), dict) else ev
    return _numbers(source)


def _numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if _num(v) is not None and k not in ("epoch",)}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v:+.3f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")
