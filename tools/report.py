"""Gather run directories of any task into one Markdown table beside the published numbers.

    python tools/report.py runs/mobilenet_v3_large runs/mobilenet_v3_small
    python tools/report.py runs --out runs/report.md --plot runs/report.png

Each argument is a run directory, or a folder searched (3 levels deep) for run directories, so
`python tools/report.py runs` gathers every run. Rows come in the order of the published tables
(classification tuning rows, released weights, QAT/PTQ, detection high/low res and the RPN tuning
row, segmentation and its low-res table); a published row with no run yet says so. A run is
placed by the recipe on its command line (env.json), else by its task and published values; runs
of no published row (toy runs) come last. Each run contributes its last epoch, the epoch its
published row measures, its eval-only result and each checkpoint-averaging row, one line each; the
verdict is given on the line the published number measures (reproduce/report.py explains the rule
and the tolerance). --plot draws measured against published (matplotlib).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.checkpoint import atomic_write_text  # noqa: E402
from reproduce.published import (PUBLISHED, TABLE_NAMES, TABLES, TASK_METRICS, TOLERANCE_TEXT,  # noqa: E402
                                 comparison_rows, recipe_key, recipes_by_row)
from reproduce.report import RunSummary, summarize  # noqa: E402

RUN_FILES = ("config.yaml", "env.json", "metrics.jsonl", "eval.json")
NOT_RUNS = {"checkpoints", "tensorboard", "detections", "export"}
SHOWN = ("eval", "last", "epoch", "averaged", "derived")  # line kinds in the table (report.md adds the best epoch)
OTHER = "Other runs (no published row)"
HEADER = ("| published row | recipe | metric | published | run | measured on | measured | difference | verdict |\n"
          "|---|---|---|---:|---|---|---:|---:|---|")


class ReportError(Exception):
    status = 1


class UsageError(ReportError):
    status = 2  # a bad option value, as argparse's own errors


MARKDOWN = (".md", ".markdown", ".txt")


def check_outputs(out: Path | None, plot: Path | None) -> None:
    """Refuse an --out or --plot that cannot be written, before any run is read."""
    for option, path in (("--out", out), ("--plot", plot)):
        if path is None:
            continue
        if path.is_dir():
            raise UsageError(f"{option} {path}: is a directory; give a file name")
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise UsageError(f"{option} {path}: {blocker} is a file, not a directory")
    if out is not None and out.suffix.lower() not in MARKDOWN:
        raise UsageError(f"--out {out}: the report is Markdown; expected a file ending in {', '.join(MARKDOWN)}")
    if plot is not None:
        formats = plot_formats()
        if plot.suffix.lower().lstrip(".") not in formats:
            raise UsageError(f"--plot {plot}: unknown image format {plot.suffix or '(no suffix)'}; expected one of "
                             + ", ".join(f".{f}" for f in formats))


def plot_formats() -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return sorted(FigureCanvasAgg.get_supported_filetypes())


def find_runs(paths: list[Path], depth: int = 3) -> list[Path]:
    """The run directories named, or found under the folders named (a run: any of RUN_FILES)."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise ReportError(f"{path}: not a directory")
        runs = _search(path, depth)
        if not runs:
            raise ReportError(f"{path}: no run directory here (none of {', '.join(RUN_FILES)}) "
                              f"nor {depth} levels below")
        found += [r for r in runs if r not in found]
    return found


def _search(path: Path, depth: int) -> list[Path]:
    if any((path / f).is_file() for f in RUN_FILES):
        return [path]
    if depth == 0:
        return []
    out = []
    for child in sorted(p for p in path.iterdir() if p.is_dir() and p.name not in NOT_RUNS):
        out += _search(child, depth - 1)
    return out


def table(summaries: list[RunSummary], root: Path = ROOT, tables: tuple[str, ...] = TABLES) -> str:
    """The published tables named (titles), then the runs of no published row."""
    recipes = recipes_by_row(root)
    by_row: dict[str, list[RunSummary]] = {}
    for s in summaries:
        by_row.setdefault(s.row.name if s.row is not None else OTHER, []).append(s)
    out = [HEADER]
    notes: list[str] = []
    for title in tables:
        out.append(f"| **{title}** | | | | | | | | |")
        for row in (r for r in PUBLISHED if r.table == title):
            mark = ""
            if row.note:
                if row.note not in notes:
                    notes.append(row.note)
                mark = f" [{notes.index(row.note) + 1}]"
            names = recipes.get(row.name) or list(row.recipes)
            published = " / ".join(m.published_text(row.values.get(m.expected)) for m in TASK_METRICS[row.task])
            head = [row.name + mark, ", ".join(f"`{r}`" for r in names) or "-", _labels(row.task), published]
            runs = by_row.get(row.name, [])
            if not runs:
                out.append(_md(head + ["no run yet", "-", "-", "-", "-"]))
            for i, s in enumerate(runs):
                for j, cells in enumerate(_run_lines(s)):
                    out.append(_md((head if i == 0 and j == 0 else ["", "", "", ""]) + cells))
    others = by_row.get(OTHER, [])
    if others:
        out.append(f"| **{OTHER}** | | | | | | | | |")
        for s in others:
            for j, cells in enumerate(_run_lines(s)):
                recipe = f"`{recipe_key(s.recipe)}`" if s.recipe else "-"
                published = " / ".join(m.published_text(s.published(m)) for m in s.metrics) or "-"
                head = ["-", recipe, _labels(s.task), published] if j == 0 else ["", "", "", ""]
                out.append(_md(head + cells))
    text = "\n".join(out) + "\n"
    if notes:
        text += "\n" + "\n".join(f"[{i}] {n}  " for i, n in enumerate(notes, 1)) + "\n"
    text += "\n" + TOLERANCE_TEXT + "\n"
    return text


def _run_lines(s: RunSummary) -> list[list[str]]:
    lines = [line for line in s.lines if line.kind in SHOWN]
    if not lines:
        return [[f"`{s.run_dir}`", "-", "-", "-", s.status]]
    out = []
    for line in lines:
        comparisons = s.compare(line)
        measured = " / ".join(_fmt(c.measured) for c in comparisons) or "-"
        diff = " / ".join(_signed(c.difference) for c in comparisons) or "-"
        if line is s.compared:
            verdict = f"**{s.status}**"
            outside = [c for c in comparisons[1:] if c.within is False]
            verdict += "".join(f"; {c.metric.label} {c.verdict}" for c in outside)
        elif s.pending is not None and line.kind == "last":
            verdict = f"pending: {s.pending}"
        else:
            verdict = "not compared"
        if s.notes and line is (s.compared or lines[0]):
            verdict += " (caveats: see the run's report.md)"
        out.append([f"`{s.run_dir}`", line.label, measured, diff, verdict])
    return out


def comparisons_table(tables: tuple[str, ...] = TABLES) -> str:
    rows = [r for r in comparison_rows() if r[0] in tables]
    if not rows:
        return ""
    lines = ["Comparison rows quoted by the blog (not trained here; values from torchvision's weight metadata, "
             "which the blog rounds):", "", "| model | metric | published | source |", "|---|---|---:|---|"]
    for _, name, values, source in rows:
        metric = " / ".join(_LABEL[k] for k in values)
        lines.append(f"| {name} | {metric} | {' / '.join(f'{v:.3f}' for v in values.values())} | {source} |")
    return "\n".join(lines) + "\n"


def plot(summaries: list[RunSummary], path: Path) -> list[tuple[str, float, float, float]]:
    """Draw measured against published (first metric of each compared run); return the points drawn
    as (label, published, measured, tolerance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for s in summaries:
        if s.compared is None or not s.metrics:
            continue
        c = s.compare(s.compared)[0]
        if c.measured is not None and c.published is not None:
            label = s.row.name if s.row is not None else str(s.run_dir)
            points.append((f"{label} ({c.metric.label})", c.published, c.measured, c.metric.tolerance))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, max(4.0, 0.45 * len(points) + 2)))
    if points:
        lo = min(min(p[1], p[2]) for p in points) - 2
        hi = max(max(p[1], p[2]) for p in points) + 2
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, label="measured = published")
        ax.scatter([p[1] for p in points], [p[2] for p in points], zorder=3)
        for label, x, y, _ in points:
            ax.annotate(label.split(" (")[0][:28], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ys = list(range(len(points)))
        bx.barh(ys, [2 * p[3] for p in points], left=[-p[3] for p in points], color="0.88", height=0.9,
                label="tolerance")
        bx.barh(ys, [p[2] - p[1] for p in points], height=0.5,
                color=["C2" if abs(p[2] - p[1]) <= p[3] + 1e-9 else "C3" for p in points])
        bx.set_yticks(ys, [p[0] for p in points], fontsize=7)
        bx.legend(loc="lower right", fontsize=8)
        bx.axvline(0, color="0.3", lw=1)
        bx.set_xscale("symlog", linthresh=1.0)  # linear within ±1 point (the tolerances), log beyond: a toy run
                                                 # 60 points off does not flatten the others
        bx.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "no run compared yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("published (%)")
    ax.set_ylabel("measured (%)")
    ax.set_title("measured against published")
    ax.legend(loc="upper left", fontsize=8)
    bx.set_xlabel("measured - published (points)")
    bx.set_title("measured - published (grey: the tolerance)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # atomically: a killed report leaves no half-drawn file
    fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".").lower())
    plt.close(fig)
    tmp.replace(path)
    return points


_LABEL = {"acc1": "Acc@1", "acc5": "Acc@5", "bbox_map": "box mAP", "miou": "mIoU", "pixel_acc": "pixel acc"}
_TASK_LABELS = {"classification": "Acc@1 / Acc@5", "qat": "int8 Acc@1 / Acc@5", "detection": "box mAP",
                "segmentation": "mIoU / pixel acc"}


def _labels(task: str | None) -> str:
    return _TASK_LABELS.get(task or "", "-")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v:+.3f}"


def _md(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories, or folders of them")
    ap.add_argument("--out", type=Path, help="also write the Markdown to this file")
    ap.add_argument("--plot", type=Path, metavar="FILE", help="draw measured against published (PNG, SVG, PDF)")
    ap.add_argument("--tables", nargs="+", choices=[*TABLE_NAMES, "none"], metavar="TABLE",
                    help=f"the published tables shown ({', '.join(TABLE_NAMES)}; none: only runs of no published "
                         "row; default: all)")
    args = ap.parse_args(argv)
    check_outputs(args.out, args.plot)
    tables = TABLES if args.tables is None else tuple(TABLE_NAMES[t] for t in args.tables if t != "none")
    summaries = [summarize(run) for run in find_runs(args.runs)]
    text = "# Reproduction report\n\n" + table(summaries, tables=tables)
    comparisons = comparisons_table(tables)
    text += "\n" + comparisons if comparisons else ""
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)
        print(f"\nwrote {args.out}")
    if args.plot is not None:
        points = plot(summaries, args.plot)
        print(f"wrote {args.plot} ({len(points)} runs compared)")
    return text


if __name__ == "__main__":
    try:
        main()
    except ReportError as exc:
        print(f"report.py: error: {exc}", file=sys.stderr)
        sys.exit(exc.status)
