"""Every command quoted in the project runs as written.

Commands are extracted from the comments of every recipe, README.md and docs/*.md (code blocks and inline code) and
the docstrings of the scripts (top level, tools/, bench/). Each is checked for what it would do:
- train_*.py: `--print-config` with the quoted arguments exits 0 (torchrun's --nproc_per_node becomes
  WORLD_SIZE, so derived values are the launch's); a README example shown with its error output
  must fail with that output;
- average_checkpoints.py: runs as written, in a scratch directory holding a small fake run at the
  quoted --run path (and the quoted --inputs files); --eval's evaluation is replaced by fixed numbers;
- other scripts: their argparse parser accepts the arguments (the script body is not run);
- `make T`: T is a target of the Makefile (`make -n`); `python -c CODE`: CODE compiles;
- a usage synopsis (`[...]`, `...`, PLACEHOLDER) names an existing script and options it has.
A command whose script (or --recipe file) does not exist yet is skipped, saying so, only while it is
work in progress: the script is train_detection.py / train_segmentation.py / train_qat.py (being
written), or the file quoting it is not committed yet. Anywhere else a missing file fails.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, run_in_process

COMMAND_WORDS = ("python", "python3", "torchrun", "srun", "make")
BEING_WRITTEN = ("train_detection.py", "train_segmentation.py", "train_qat.py")
_LABEL = re.compile(r"^(?:[A-Z][\w ,()/-]{0,40}:\s+)?(?:\$\s+)?(?P<cmd>.*)$")   # "Run:  python ..."
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]+$")                                   # RUN_DIR, PATH


def _tracked(rel: str) -> bool:
    proc = subprocess.run(["git", "ls-files", "--error-unmatch", rel], cwd=ROOT, capture_output=True, check=False)
    return proc.returncode == 0


@dataclass
class Quoted:
    where: str                       # file:line
    text: str                        # the command as quoted (continuations joined)
    shown_output: list[str] = field(default_factory=list)  # README: the output printed under a "$ " command

    @property
    def id(self) -> str:
        return f"{self.where}: {self.text[:70]}"


# ============================================================================ extraction


def _starts_command(text: str) -> bool:
    return any(text.startswith(w + " ") for w in COMMAND_WORDS)


def _cut_prose(cmd: str) -> str:
    """A command ends where a remark in parentheses starts (outside quotes): `python x.py (why).`"""
    quote = None
    for i, ch in enumerate(cmd):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif cmd.startswith(" (", i):
            return cmd[:i].rstrip()
    return cmd.rstrip()


def commands_in_lines(lines: list[str], where: str, first_line: int = 1, labels: bool = True) -> list[Quoted]:
    """Commands in prose or comment lines (already stripped of '#'): a line whose text, after an optional
    'Label:' and '$ ' prompt, starts with a command word; a trailing backslash continues it."""
    out, i = [], 0
    while i < len(lines):
        text = lines[i].strip()
        m = _LABEL.match(text) if labels else None
        cmd = m.group("cmd") if m else text.removeprefix("$ ").strip()
        start = i
        if _starts_command(cmd):
            while cmd.endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd[:-1].rstrip() + " " + lines[i].strip()
            out.append(Quoted(f"{where}:{first_line + start}", _cut_prose(cmd)))
        i += 1
    return out


def commands_in_recipe(path: Path) -> list[Quoted]:
    lines = path.read_text().splitlines()
    comments = [line.strip()[1:] if line.strip().startswith("#") else "" for line in lines]
    return commands_in_lines(comments, str(path.relative_to(ROOT)))


def commands_in_markdown(path: Path) -> list[Quoted]:
    rel = str(path.relative_to(ROOT))
    lines = path.read_text().splitlines()
    out: list[Quoted] = []
    in_block, block_start = False, 0
    for n, line in enumerate(lines):
        if line.strip().startswith("```"):
            if not in_block:
                in_block, block_start = True, n + 1
                continue
            in_block = False
            block = lines[block_start:n]
            found = commands_in_lines([b if not b.strip().startswith("#") else "" for b in block], rel,
                                      block_start + 1, labels=False)
            for q in found:  # output shown under a "$ command" line, up to the next command
                k = int(q.where.rsplit(":", 1)[1]) - block_start - 1
                if block[k].strip().startswith("$ "):
                    shown = []
                    for b in block[k + 1:]:
                        if _starts_command(b.strip().removeprefix("$ ")):
                            break
                        shown.append(b.strip())
                    q.shown_output = [s for s in shown if s]
            out += found
        elif not in_block:
            for span in re.findall(r"`([^`]+)`", line):
                if _starts_command(span.strip()):
                    out.append(Quoted(f"{rel}:{n + 1}", span.strip()))
    return out


def commands_in_docstring(path: Path) -> list[Quoted]:
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
    return commands_in_lines(doc.splitlines(), str(path.relative_to(ROOT)), 1, labels=False)


def all_quoted() -> list[Quoted]:
    out: list[Quoted] = []
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        out += commands_in_recipe(path)
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        out += commands_in_markdown(path)
    for folder in (ROOT, ROOT / "tools", ROOT / "bench"):
        for path in sorted(folder.glob("*.py")):
            out += commands_in_docstring(path)
    return out


QUOTED = all_quoted()


def test_extraction_finds_the_known_commands():
    texts = {q.text for q in QUOTED}
    for expected in [
        "python average_checkpoints.py --run runs/mobilenet_v3_large --select last-improved:3 --metric acc1 "
        "--out runs/mobilenet_v3_large/averaged.pt --eval --export",                      # recipe, continued
        "torchrun --nproc_per_node=8 train_classification.py --recipe recipes/large.yaml data.root=/data/imagenet",
        "python tools/report.py runs/mobilenet_v3_large    # both commands above also write its report.md",
        "python tools/reproduce.py toy --jobs 2",                                          # docs/reproducing.md
        "make demo",                                                                        # inline in README
        "python tools/demo.py [--data toy_data] [--out runs/demo]",                         # a docstring
    ]:
        assert expected in texts, expected
    shown = [q for q in QUOTED if q.shown_output]
    assert shown and shown[0].shown_output[0].endswith("problems with the configuration:")


def test_extraction_rules_on_a_sample():
    lines = ["Run:  torchrun --nproc_per_node=8 train_x.py --recipe r.yaml \\", "        a.b=1",
             "Reproduces: 74.042 (make sure this is not a command)", "$ python tools/y.py --out d   # note",
             "  (or: python z.py)", "Eval: python train_q.py --recipe q.yaml (the blog's numbers).",
             "Get them: python -c \"import a; a.f(w='x (y)')\""]
    found = commands_in_lines(lines, "f", 10)
    assert [(q.where, q.text) for q in found] == [
        ("f:10", "torchrun --nproc_per_node=8 train_x.py --recipe r.yaml a.b=1"),
        ("f:13", "python tools/y.py --out d   # note"),
        ("f:15", "python train_q.py --recipe q.yaml"),
        ("f:16", "python -c \"import a; a.f(w='x (y)')\"")]


# ============================================================================ checking


class _Parsed(Exception):
    pass


def _split(text: str) -> list[list[str]]:
    tokens = shlex.split(text, comments=True)
    commands, current = [], []
    for tok in tokens:
        if tok in ("&&", ";", "||"):
            commands.append(current)
            current = []
        else:
            current.append(tok)
    return [c for c in commands + [current] if c]


def _is_synopsis(text: str, args: list[str]) -> bool:
    return "..." in text or any(a.startswith(("[", "<")) or "|" in a or _PLACEHOLDER.match(a) for a in args)


def _help(script: Path) -> str:
    proc = run_in_process(script, ["--help"], Path.cwd())
    assert proc.returncode == 0, f"{script.name} --help: exit {proc.returncode}\n{proc.stderr}"
    return proc.stdout


def _fake_run(run_dir: Path, metric: str = "acc1", epochs: int = 5) -> None:
    """A run directory average_checkpoints.py can read: every epoch improves `metric`."""
    from engine import checkpoint

    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    rows = []
    for e in range(epochs):
        state = {"w": torch.full((3,), float(e)), "n": torch.tensor(e)}
        checkpoint.save(checkpoint.new(state, epoch=e, optimizer={}), run_dir / "checkpoints" / f"epoch_{e:03d}.pt")
        rows.append({"epoch": e, metric: 50.0 + e, "acc5": 80.0 + e})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "config.yaml").write_text("model: {name: mobilenet_v3_large}\n")  # --eval: a classification run


def _check_average(args: list[str], tmp_path: Path, monkeypatch) -> None:
    import average_checkpoints as avg
    from engine import checkpoint

    monkeypatch.chdir(tmp_path)
    ns = dict(zip(args, args[1:]))
    if "--run" in ns:
        _fake_run(Path(ns["--run"]), ns.get("--metric", "acc1"))
    if "--inputs" in args:
        i = args.index("--inputs") + 1
        while i < len(args) and not args[i].startswith("--"):
            Path(args[i]).parent.mkdir(parents=True, exist_ok=True)
            checkpoint.save(checkpoint.new({"w": torch.ones(3) * i}, epoch=i), Path(args[i]))
            i += 1
    monkeypatch.setattr(avg, "evaluate_in_run", lambda run_dir, weights: {"acc1": 55.0, "acc5": 85.0})
    result = avg.main(args)
    assert Path(result["out"]).is_file()
    if "--eval" in args:
        assert (Path(ns["--run"]) / "report.md").is_file()


def _check_argparse(script: Path, args: list[str], monkeypatch) -> None:
    source = script.read_text()
    assert "argparse" in source, f"{script.name} quotes arguments but has no argparse parser"
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **k):
        raise _Parsed(original(self, *a, **k))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        proc = run_in_process(script, args, Path.cwd())
    except _Parsed:
        return
    if proc.returncode != 0:
        pytest.fail(f"{script.name} {' '.join(args)}: the parser refused it (exit {proc.returncode}): {proc.stderr}")
    pytest.fail(f"{script.name} {' '.join(args)}: the script ran without parsing arguments")


def _check_make(targets: list[str]) -> None:
    assert targets, "`make` with no target"
    if shutil.which("make"):
        for t in targets:
            proc = subprocess.run(["make", "-n", "-C", str(ROOT), t], capture_output=True, text=True)
            assert proc.returncode == 0, f"make -n {t}: {proc.stderr}"
    else:  # no make on this machine: the target must at least be a rule of the Makefile
        rules = re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE)
        assert set(targets) <= set(rules), f"{targets} not among the Makefile's rules {rules}"


def check_command(q: Quoted, tokens: list[str], tmp_path: Path, monkeypatch) -> None:
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    word, args = tokens[0], tokens[1:]
    if word == "make":
        return _check_make(args)
    if word == "srun":
        while args and args[0].startswith("-"):
            args = args[1:]
        word, args = args[0], args[1:]
    if word == "torchrun":
        options = []
        while args and not args[0].endswith(".py"):
            options.append(args.pop(0))
        for opt in options:
            if opt.startswith(("--nproc_per_node=", "--nproc-per-node=")):
                monkeypatch.setenv("WORLD_SIZE", opt.split("=", 1)[1])
        word = "python"
    assert word in ("python", "python3"), f"unexpected command word {word!r}"
    if args[:1] == ["-c"]:
        compile(args[1], "<quoted python -c>", "exec")
        return
    if args[:1] == ["-m"]:
        import importlib.util

        assert importlib.util.find_spec(args[1]) is not None, f"no module {args[1]}"
        return
    name, script, args = args[0], ROOT / args[0], args[1:]
    recipe = args[args.index("--recipe") + 1] if "--recipe" in args[:-1] else None
    for needed in [name] + ([recipe] if recipe and not _is_synopsis(q.text, args) else []):
        if not (ROOT / needed).is_file():
            quoting = q.where.rsplit(":", 1)[0]
            if script.name in BEING_WRITTEN or not _tracked(quoting):
                why = "being written" if script.name in BEING_WRITTEN else f"{quoting} is new, uncommitted work"
                pytest.skip(f"{needed} does not exist yet ({why}); this quoted command is checked once it does")
            pytest.fail(f"{q.where}: {needed} does not exist")
    if _is_synopsis(q.text, args):
        help_text = _help(script)
        for a in args:
            flag = a.strip("[]").split("=", 1)[0]
            if flag.startswith("--"):
                assert flag in help_text, f"{script.name}: {flag} is not one of its options"
        return
    if script.name.startswith("train_"):
        proc = run_in_process(script, [*args, "--print-config"], ROOT)
        code, err = proc.returncode, proc.stderr
        if q.shown_output:  # an example of an error: it must fail, with the output shown
            assert code == 2, f"expected exit status 2, got {code}"
            for shown in q.shown_output:
                if "..." not in shown and not shown.startswith("("):
                    assert shown in err, f"README shows {shown!r}; the script printed:\n{err}"
            return
        assert code == 0, f"--print-config exit {code}:\n{err[-2000:]}"
        return
    if script.name == "average_checkpoints.py":
        return _check_average(args, tmp_path, monkeypatch)
    _check_argparse(script, args, monkeypatch)


@pytest.mark.parametrize("q", QUOTED, ids=lambda q: q.id)
def test_quoted_command_runs_as_written(q: Quoted, tmp_path, monkeypatch):
    for tokens in _split(q.text):
        check_command(q, tokens, tmp_path, monkeypatch)


# ============================================================================ recipe headers agree with the recipe


def _recipe_commands(path: Path) -> list[list[str]]:
    return [tokens for q in commands_in_recipe(path) for tokens in _split(q.text)]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_header_commands_name_this_recipe_and_its_run(path: Path):
    rel = path.relative_to(ROOT).as_posix()
    commands = _recipe_commands(path)
    recipes = [t[t.index("--recipe") + 1] for t in commands if "--recipe" in t]
    assert rel in recipes, f"{rel}: no quoted command runs this recipe (found {recipes})"
    output_dir = (yaml.safe_load(path.read_text()).get("run") or {}).get("output_dir")
    for t in commands:
        if any(a.endswith("average_checkpoints.py") for a in t) and "--run" in t:
            assert t[t.index("--run") + 1] == output_dir, f"{rel}: averaging --run is not run.output_dir {output_dir}"


@pytest.mark.parametrize("text", [
    # the form five recipe headers used to quote: --out is required
    "python average_checkpoints.py --run runs/mobilenet_v3_large --select last-improved:3 --eval --export",
    "python train_classification.py --recipe recipes/large.yaml optimizer.weight_decy=1e-4",   # misspelt key
    "python tools/make_toy_data.py --outdir toy_data",                                         # no such option
    "python train_classification.py --recipe recipes/no_such_recipe.yaml",
    "make no_such_target",
])
def test_the_checker_rejects_broken_commands(text, tmp_path, monkeypatch):
    q = Quoted("README.md:1", text)
    with pytest.raises((AssertionError, SystemExit, pytest.fail.Exception)):
        for tokens in _split(text):
            check_command(q, tokens, tmp_path, monkeypatch)
