"""A table as steps: each row's training, checkpoint averaging and evaluations, then the combined report.

    rows(table, options) -> list[RowSpec]     the table's rows (published: from reproduce.published)
    steps(table, options) -> list[Step]       in dependency order; rows that share a training run share it

A step is one command of the same grammar a person types (`train_*.py --recipe ... key=value`,
`average_checkpoints.py`, `tools/report.py`) writing into its own run directory under `--out`. Whether
it is finished is read from that directory, never from a side file: a training run has its final
epoch's row in metrics.jsonl, an eval-only run its eval.json, an averaging its weights file and its row
in metrics.jsonl, the report its files, newer than every run it gathers.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import yaml

from reproduce.published import PUBLISHED, TABLE_NAMES, PublishedRow, recipes_by_row, row_by_name
from reproduce.report import read_rows

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"classification": "train_classification.py", "qat": "train_qat.py",
           "detection": "train_detection.py", "segmentation": "train_segmentation.py"}
DATASET = {"classification": "imagenet", "qat": "imagenet", "detection": "coco", "segmentation": "coco"}
TABLES = {**TABLE_NAMES, "toy": "Toy data: every task"}
TASKS = tuple(SCRIPTS)


@dataclasses.dataclass(frozen=True)
class Options:
    data: Path                              # holds imagenet/ and coco/ (as tools/make_toy_data.py writes them)
    out: Path                               # run directories, logs/ and reports/
    overrides: tuple[str, ...] = ()         # [TASK:]key=value, for every step of that task (all when no TASK)
    float_weights: str | None = None        # QAT/PTQ start (default: the recipe's, torchvision's float file)
    backbone_weights: str | None = None     # detection/segmentation backbone (default: the recipe's)


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One row to reproduce: its training (or its re-evaluation of another row's weights)."""

    key: str                                # short name: run directory and job name
    name: str                               # as in the report
    task: str
    recipe: str
    measure: str = "last"                   # "last" | "averaged" | "epoch N" | "final" (see PublishedRow)
    weights_of: str = ""                    # key of the row whose training run this row evaluates again
    variant: tuple[str, ...] = ()           # with weights_of: overrides of the eval-only run
    overrides: tuple[str, ...] = ()         # of its command (expected.* of a row matched by its values)
    starts_from: str = ""                   # key of the row whose weights it starts from ("" = options/recipe)
    trained_by: str = ""                    # key of an earlier row with the same training (its run is measured)
    select: str = "last-improved:3"         # the averaging rule (measure "averaged")


@dataclasses.dataclass
class Step:
    name: str                               # unique in a table: "<row key>.<kind>"; also the job name's tail
    kind: str                               # "data" (toy) | "train" | "average" | "eval" | "report"
    task: str | None                        # the script's task (None: average, report)
    command: list[str]                      # script (relative to the repository) and its arguments
    run_dir: Path
    deps: tuple[str, ...] = ()
    outputs: tuple[Path, ...] = ()          # report: its files; average: the averaged weights
    single: bool = False                    # one process even where training uses many (PTQ)

    def gpus(self, per_node: int) -> int:
        """GPUs per node it uses: all for training and evaluation, one for averaging (it evaluates), none
        for the report."""
        return per_node if self.distributed else min(per_node, 1) if self.kind in ("average", "eval") else 0

    @property
    def distributed(self) -> bool:
        """One process per GPU (training and evaluation) or a single process (averaging, the report)."""
        return self.kind in ("train", "eval") and not self.single

    def done(self, steps: dict[str, Step] | None = None) -> bool:
        if self.kind == "data":  # data given, or written by an earlier run: taken as it is
            return (self.run_dir / "imagenet").is_dir() and (self.run_dir / "coco").is_dir()
        if self.kind == "eval":
            return (self.run_dir / "eval.json").is_file()
        if self.kind == "train":
            return final_epoch_done(self.run_dir)
        if self.kind == "average":
            return self.outputs[0].is_file() and any(r.get("row") == "checkpoint averaging"
                                                     for r in read_rows(self.run_dir / "metrics.jsonl")[0])
        newest = max((marker(steps[d]) for d in self.deps), default=0.0) if steps else 0.0
        return all(p.is_file() and p.stat().st_mtime >= newest for p in self.outputs)


def final_epoch_done(run_dir: Path) -> bool:
    """The run's recipe (config.yaml) says how many epochs; metrics.jsonl has the last one's row."""
    try:
        epochs = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {})["schedule"]["epochs"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return False
    return any(r.get("epoch") == epochs - 1 and "row" not in r for r in read_rows(run_dir / "metrics.jsonl")[0])


def marker(step: Step) -> float:
    """When a finished step last changed what the report reads (0 when unknown)."""
    files = [step.run_dir / "metrics.jsonl", step.run_dir / "eval.json", *step.outputs]
    return max((p.stat().st_mtime for p in files if p.is_file()), default=0.0)


# ============================================================================ the rows of a table


# The toy table: every task and every kind of step on the toy data (tools/make_toy_data.py), as
# tools/demo.py and the tests train them: classification, its average, QAT and PTQ from the average,
# detection and segmentation from its backbone, each evaluated again in a variant as the published rows.
TOY_ROWS = (
    RowSpec("toy_classification", "toy classification", "classification", "recipes/toy/classification.yaml",
            "averaged", select="last:2"),
    RowSpec("toy_qat", "toy QAT, int8", "qat", "recipes/toy/qat.yaml", starts_from="toy_classification"),
    RowSpec("toy_ptq", "toy PTQ, int8", "qat", "recipes/toy/qat.yaml", "final", overrides=("qat.mode=ptq",),
            starts_from="toy_classification"),
    RowSpec("toy_detection", "toy detection", "detection", "recipes/toy/detection.yaml",
            starts_from="toy_classification"),
    RowSpec("toy_detection_rpn1000", "toy detection, test-time RPN top-n 1000", "detection",
            "recipes/toy/detection.yaml", weights_of="toy_detection",
            variant=("model.rpn_pre_nms_top_n_test=1000", "model.rpn_post_nms_top_n_test=1000")),
    RowSpec("toy_segmentation", "toy segmentation", "segmentation", "recipes/toy/segmentation.yaml",
            starts_from="toy_classification"),
    RowSpec("toy_segmentation_low", "toy segmentation, low-res eval", "segmentation",
            "recipes/toy/segmentation.yaml", weights_of="toy_segmentation", variant=("data.eval_size=128",)),
)


def rows(table: str) -> list[RowSpec]:
    """The table's rows, with the rows whose weights they evaluate again (the 22.8 row of the RPN table)."""
    if table == "toy":
        return list(TOY_ROWS)
    title = TABLES[table]
    wanted = [r for r in PUBLISHED if r.table == title]
    bases = [row_by_name(r.weights_of) for r in wanted if r.weights_of]
    wanted = [r for r in bases if r not in wanted] + wanted
    found = recipes_by_row(ROOT)
    return _share_training([_spec(r, found) for r in wanted])


def _share_training(specs: list[RowSpec]) -> list[RowSpec]:
    """Rows whose recipes train the same thing share one training run: tuning rows 4 and 5 are one
    recipe's training (row 5 averages its checkpoints), and so is the released Large row. A later row is
    an evaluation of the first one's run, measured its own way (its last epoch, an epoch, an average)."""
    first: dict[str, str] = {}
    out = []
    for spec in specs:
        if not (spec.weights_of or spec.measure == "final" or spec.overrides or spec.starts_from):
            key = first.setdefault(_training(spec.recipe), spec.key)
            if key != spec.key:
                spec = dataclasses.replace(spec, trained_by=key)
        out.append(spec)
    return out


def _training(recipe: str) -> str:
    """What a recipe trains: everything but where it writes and the published numbers it is compared with."""
    cfg = yaml.safe_load((ROOT / recipe).read_text()) or {}
    cfg.pop("expected", None)
    (cfg.get("run") or {}).pop("output_dir", None)
    return json.dumps(cfg, sort_keys=True, default=str)


def _spec(row: PublishedRow, found: dict[str, list[str]]) -> RowSpec:
    expected = tuple(f"expected.{k}={v}" for k, v in row.values.items())
    if row.weights_of:
        base = _spec(row_by_name(row.weights_of), found)
        recipe, variant = row.variant[0], row.variant[1:]
        key = Path(recipe).stem if recipe != base.recipe else base.key + "_" + _slug(variant)
        return RowSpec(key, row.name, row.task, recipe, row.measure, base.key, variant, expected)
    recipes = list(row.recipes) or found.get(row.name) or []
    if not recipes:
        raise KeyError(f"no recipe reproduces the published row {row.name!r}")
    recipe = recipes[0]
    return RowSpec(_recipe_dir(recipe), row.name, row.task, recipe, row.measure)


def _recipe_dir(recipe: str) -> str:
    """The recipe's own run.output_dir below runs/ (runs/ablation/1_baseline -> ablation/1_baseline)."""
    out = ((yaml.safe_load((ROOT / recipe).read_text()) or {}).get("run") or {}).get("output_dir")
    return Path(out).relative_to("runs").as_posix() if out and Path(out).parts[0] == "runs" else Path(recipe).stem


def _name(key: str) -> str:
    return key.replace("/", "-")


def _slug(overrides: tuple[str, ...]) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9]+", "", o.split(".")[-1]) for o in overrides) or "eval"


# ============================================================================ the steps of a table


def steps(table: str, opts: Options) -> list[Step]:
    """The table's steps in dependency order (each after the steps it needs); the report is last."""
    specs = rows(table)
    by_key = {s.key: s for s in specs}
    out: dict[str, Step] = {}

    def add(step: Step) -> None:  # rows that share a training run share its step
        out.setdefault(step.name, step)

    def trained(spec: RowSpec) -> Path:
        return opts.out / spec.key

    def weights(spec: RowSpec) -> tuple[str, str]:
        """(file, step that makes it) of the weights a row measures or starts from."""
        run = trained(spec)
        if spec.measure == "averaged":
            return str(run / "averaged.pt"), f"{_name(spec.key)}.average"
        epoch = int(spec.measure.split()[1]) if spec.measure.startswith("epoch ") else None
        if epoch is not None and epoch < _planned_epochs(spec, opts):
            return str(run / "checkpoints" / f"epoch_{epoch:03d}.pt"), f"{_name(spec.key)}.train"
        return str(run / "checkpoints" / "last.pt"), f"{_name(spec.key)}.train"  # a shorter run: its last, as
        # the report compares it

    for spec in specs:
        if spec.trained_by:  # an earlier row's training run, measured this row's way, evaluated with its recipe
            base = by_key[spec.trained_by]
            measured = dataclasses.replace(base, measure=spec.measure, select=spec.select)
            file, dep = weights(measured)
            if dep.endswith(".average"):
                add(_average_step(measured, trained(base)))
            cmd = _script_command(spec, opts, opts.out / spec.key, ["run.eval_only=true", f"model.weights={file}"])
            add(Step(f"{_name(spec.key)}.eval", "eval", spec.task, cmd, opts.out / spec.key, (dep,)))
            continue
        if spec.weights_of:  # the base row's training run (and averaging), its weights evaluated again
            base = by_key[spec.weights_of]
            add(_train_step(base, opts, trained(base), *_start(base, by_key, weights, opts)))
            file, dep = weights(base)
            if dep.endswith(".average"):
                add(_average_step(base, trained(base)))
            cmd = _script_command(spec, opts, opts.out / spec.key,
                                  [*spec.variant, *spec.overrides, "run.eval_only=true", f"model.weights={file}"])
            add(Step(f"{_name(spec.key)}.eval", "eval", spec.task, cmd, opts.out / spec.key, (dep,)))
            continue
        start, start_deps = _start(spec, by_key, weights, opts)
        if spec.measure == "final":  # PTQ: calibration and int8 evaluation, in one process
            cmd = _script_command(spec, opts, trained(spec), [*spec.overrides, *start])
            add(Step(f"{_name(spec.key)}.eval", "eval", spec.task, cmd, trained(spec), start_deps, single=True))
            continue
        add(_train_step(spec, opts, trained(spec), start, start_deps))
        if spec.measure == "averaged":
            add(_average_step(spec, trained(spec)))
    if table == "toy":  # on a fresh machine the toy data is written first (tools/make_toy_data.py)
        make = Step("toy_data.make", "data", None, ["tools/make_toy_data.py", "--out", str(opts.data)], opts.data)
        for step in out.values():
            step.deps = step.deps or (make.name,)
        out = {make.name: make, **out}
    report_dir = opts.out / "reports"
    md, png = report_dir / f"{table}.md", report_dir / f"{table}.png"
    runs = sorted({str(s.run_dir) for s in out.values() if s.kind != "data"})
    shown = [t for t in TABLE_NAMES if t == table or any(TABLE_NAMES[t] == r.table for r in PUBLISHED
                                                       if r.name in {s.name for s in specs})] or ["none"]
    cmd = ["tools/report.py", *runs, "--tables", *shown, "--out", str(md), "--plot", str(png)]
    out[f"report-{table}"] = Step(f"report-{table}", "report", None, cmd, report_dir, tuple(out), outputs=(md, png))
    return list(out.values())


def _start(spec: RowSpec, by_key: dict[str, RowSpec], weights, opts: Options) -> tuple[list[str], tuple[str, ...]]:
    """The overrides naming the weights a training run starts from, and the steps that make them."""
    key = {"qat": "model.weights", "detection": "model.backbone_weights",
           "segmentation": "model.backbone_weights"}.get(spec.task)
    if key is None:
        return [], ()
    if spec.starts_from:
        file, dep = weights(by_key[spec.starts_from])
        if spec.task != "qat":  # a backbone: the classification run's last checkpoint, not its average
            file, dep = str(opts.out / spec.starts_from / "checkpoints" / "last.pt"), f"{_name(spec.starts_from)}.train"
        return [f"{key}={file}"], (dep,)
    given = opts.float_weights if spec.task == "qat" else opts.backbone_weights
    return ([f"{key}={given}"] if given else []), ()


def _planned_epochs(spec: RowSpec, opts: Options) -> int:
    epochs = ((yaml.safe_load((ROOT / spec.recipe).read_text()) or {}).get("schedule") or {}).get("epochs", 0)
    for o in _task_overrides(spec.task, opts):
        if o.startswith("schedule.epochs="):
            epochs = int(o.split("=", 1)[1])
    return epochs


def _train_step(spec: RowSpec, opts: Options, run_dir: Path, start: list[str], deps: tuple[str, ...]) -> Step:
    cmd = _script_command(spec, opts, run_dir, [*spec.overrides, *start])
    return Step(f"{_name(spec.key)}.train", "train", spec.task, cmd, run_dir, deps)


def _average_step(spec: RowSpec, run_dir: Path) -> Step:
    out = run_dir / "averaged.pt"
    cmd = ["average_checkpoints.py", "--run", str(run_dir), "--select", spec.select, "--metric", "acc1",
           "--out", str(out), "--eval"]
    return Step(f"{_name(spec.key)}.average", "average", None, cmd, run_dir, (f"{_name(spec.key)}.train",),
                outputs=(out,))


def _script_command(spec: RowSpec, opts: Options, run_dir: Path, extra: list[str]) -> list[str]:
    mine = _task_overrides(spec.task, opts)
    if spec.task == "segmentation" and spec.recipe.startswith("recipes/toy/"):  # the recipe's toy_data/...
        mine.insert(0, f"data.mask_cache={opts.data / 'voc_mask_cache'}")
    return [SCRIPTS[spec.task], "--recipe", spec.recipe, f"data.root={opts.data / DATASET[spec.task]}", *mine,
            *extra, f"run.output_dir={run_dir}", "run.resume=auto"]


def order(all_steps: list[Step]) -> list[Step]:
    """Dependency order (each step after those it needs), stable otherwise."""
    by_name = {s.name: s for s in all_steps}
    seen: dict[str, Step] = {}

    def visit(s: Step) -> None:
        if s.name not in seen:
            for d in s.deps:
                visit(by_name[d])
            seen[s.name] = s

    for s in all_steps:
        visit(s)
    return list(seen.values())


def _task_overrides(task: str, opts: Options) -> list[str]:
    """The --set overrides for a task: `TASK:key=value` of that task, and every `key=value`."""
    return [o.split(":", 1)[1] if ":" in o.split("=", 1)[0] else o for o in opts.overrides
            if ":" not in o.split("=", 1)[0] or o.split(":", 1)[0] == task]
