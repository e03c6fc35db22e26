"""tools/mutants.py: which mutants it makes, how it draws them, how it judges them (on a tiny project of its
own, with real pytest runs), and that every listed equivalent is one the tool still draws."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

import tools.mutants as mt

ROOT = Path(__file__).resolve().parents[1]

SNIPPET = '''"""A docstring: not a call statement."""
import os


def f(a, b, items):
    if a < b and not items:
        a += 1
    x = -a * 2.5
    for i in items:
        if i is not None:
            continue
        break
    os.sync()
    return x if a >= 0 else True


if __name__ == "__main__":
    f(1, 2, [])
'''


def test_the_mutation_sites_of_a_snippet_are_the_documented_one_token_changes():
    sites = {(SNIPPET[a:b], repl, kind) for a, b, repl, kind, _ in mt._sites(SNIPPET)}
    assert sites == {
        ("<", "<=", "comparison"),
        ("and", "or", "boolean"),
        ("not ", "", "not removed"),
        ("a < b and not items", "not (a < b and not items)", "not added"),
        ("+=", "-=", "arithmetic"),
        ("1", "2", "number"),
        ("-", "", "sign removed"),
        ("*", "/", "arithmetic"),
        ("2.5", "5.0", "number"),       # a float doubles
        ("is not", "is", "comparison"),  # two tokens, one operator
        ("i is not None", "not (i is not None)", "not added"),
        ("continue", "break", "break/continue"),
        ("break", "continue", "break/continue"),
        ("os.sync()", "pass", "call dropped"),
        (">=", ">", "comparison"),
        ("0", "1", "number"),
        ("a >= 0", "not (a >= 0)", "not added"),
        ("True", "False", "constant"),
    }
    lines = {SNIPPET.count("\n", 0, a) + 1 for a, *_ in mt._sites(SNIPPET)}
    assert max(lines) < SNIPPET.splitlines().index('if __name__ == "__main__":') + 1  # the main block is skipped
    assert 1 not in lines  # the module docstring is not a call


def _project(tmp_path: Path, module: str, tests: str) -> Path:
    """A tree the tool can run on: pkg/mod.py, tests/test_mod.py and the tool's own pytest plugin."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "mod.py").write_text(module)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_mod.py").write_text(tests)
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "__init__.py").write_text("")
    shutil.copy(ROOT / "tools" / "mutants_trace.py", tmp_path / "tools" / "mutants_trace.py")
    return tmp_path


@pytest.fixture
def at(monkeypatch):
    """Point the tool at another tree (its ROOT, its .mutants cache, its unit-test list)."""
    def point(root: Path, tests=("tests",)):
        monkeypatch.setattr(mt, "ROOT", root)
        monkeypatch.setattr(mt, "CACHE", root / ".mutants")
        monkeypatch.setattr(mt, "TESTS", list(tests))
        monkeypatch.setattr(mt, "PYTHON", Path(sys.executable))
        monkeypatch.setattr(mt, "_texts", {})
        return root
    return point


def test_the_draw_is_seeded_and_keyed_by_line_text_so_an_edit_elsewhere_leaves_it(tmp_path, at):
    body = "".join(f"def f{k}(x):\n    return x + {k} < {k + 1}\n\n\n" for k in range(30))
    root = at(_project(tmp_path, body, ""))
    first = [(m.before, m.after) for m in mt.draw(["pkg/mod.py"], 10, seed=5)]
    assert first == [(m.before, m.after) for m in mt.draw(["pkg/mod.py"], 10, seed=5)]
    assert first != [(m.before, m.after) for m in mt.draw(["pkg/mod.py"], 10, seed=6)]
    # a new function at the top moves every line but changes no line's text: the same mutants, in the same order
    (root / "pkg" / "mod.py").write_text("import os\n\n\ndef g():\n    return 99 > 98\n\n\n" + body)
    mt._texts.clear()
    drawn = [(m.before, m.after) for m in mt.draw(["pkg/mod.py"], 40, seed=5)]
    assert [d for d in drawn if "99" not in d[0]][:10] == first


def test_a_mutant_that_does_not_compile_or_changes_nothing_is_not_drawn_and_no_mutate_lines_are_skipped(
        tmp_path, at):
    root = at(_project(tmp_path, "def f(a):\n    x = a < 1  # no mutate\n    return a * 1\n", ""))
    text = (root / "pkg" / "mod.py").read_text()
    star = text.index("*")
    assert mt.make("pkg/mod.py", star, star + 1, "/", "arithmetic").after == "return a / 1"
    assert mt.make("pkg/mod.py", star, star + 1, "(", "arithmetic") is None        # a syntax error
    assert mt.make("pkg/mod.py", star, star + 1, "*", "arithmetic") is None        # the same tree
    assert all(text.count("\n", 0, a) != 1 for _, a, *_ in mt.all_mutants(["pkg/mod.py"]))


MODULE = '''LIMIT = 10


def clamp(x):
    if x < 0:
        return 0
    if x > LIMIT:
        return LIMIT
    return x
'''

TESTS = '''from pkg.mod import LIMIT, clamp


def test_low():
    assert clamp(-5) == 0


def test_middle():
    assert clamp(5) == 5


def test_limit():
    assert clamp(15) == 10 and LIMIT == 10  # (a test that only read LIMIT would run no line of the module)
'''


def test_a_mutant_is_killed_only_by_a_test_that_fails_with_it_and_passes_without_it(tmp_path, at):
    """The tool end to end on a tiny project: a real traced pytest run maps lines to tests, and each mutant is
    judged by the tests that run its line, in a tree the tool writes the mutant into and restores."""
    root = at(_project(tmp_path, MODULE, TESTS))
    trace = mt.trace_map(["pkg/mod.py"])
    assert trace["lines"]["pkg/mod.py"]["6"] == ["tests/test_mod.py::test_low"]        # `return 0`
    assert trace["lines"]["pkg/mod.py"]["8"] == ["tests/test_mod.py::test_limit"]      # `return LIMIT`
    assert len(trace["lines"]["pkg/mod.py"]["5"]) == 3 and "1" not in trace["lines"]["pkg/mod.py"]
    assert 1 in trace["import_lines"]["pkg/mod.py"]
    assert list((root / ".mutants").glob("trace-*.json"))  # cached for the next run

    text = MODULE

    def mutant(old, new):
        a = text.index(old)
        return mt.make("pkg/mod.py", a, a + len(old), new, "test")

    verdicts = {}
    for name, m in {"x <= 0": mutant("x < 0", "x <= 0"),             # no test at 0: survives
                    "x > 0": mutant("x < 0", "x > 0"),               # clamp(5) == 0: killed
                    "return 1": mutant("return 0", "return 1"),      # killed by test_low, the only test of the line
                    "LIMIT = 11": mutant("LIMIT = 10", "LIMIT = 11"),  # a line run at import: every test
                    "x >= LIMIT": mutant("x > LIMIT", "x >= LIMIT")}.items():  # line 7 runs, no test tells
        verdicts[name] = mt.judge(m, root, trace)
    assert (root / "pkg" / "mod.py").read_text() == MODULE  # restored after each
    assert {k: v.verdict for k, v in verdicts.items()} == {
        "x <= 0": "survived", "x > 0": "killed", "return 1": "killed", "LIMIT = 11": "killed",
        "x >= LIMIT": "survived"}
    assert verdicts["x > 0"].detail in {"by tests/test_mod.py::test_middle", "by tests/test_mod.py::test_limit"}
    assert verdicts["return 1"].tests == ["tests/test_mod.py::test_low"]
    assert set(verdicts["LIMIT = 11"].tests) == {f"tests/test_mod.py::test_{t}" for t in ("low", "middle", "limit")}
    assert verdicts["x <= 0"].detail == "3 tests pass"


def test_a_failure_that_is_not_the_mutants_doing_is_not_a_kill(tmp_path, at):
    """A test that fails without the mutant too (here: one that fails once a file exists, made after the
    trace) is reported as survived, with what the re-runs gave."""
    tests = TESTS + '''

def test_middle_again():
    import os
    assert clamp(5) == 5 and not os.path.exists("gone")
'''
    root = at(_project(tmp_path, MODULE, tests))
    trace = mt.trace_map(["pkg/mod.py"])
    (root / "gone").write_text("")  # from now on test_middle_again fails whatever the module says
    a = MODULE.index("x > LIMIT")
    m = mt.judge(mt.make("pkg/mod.py", a, a + len("x > LIMIT"), "x >= LIMIT", "test"), root, trace)
    assert m.verdict == "survived"
    assert m.detail == "tests/test_mod.py::test_middle_again alone: failed with the mutant, failed without " \
                       "(not counted)"


def test_equivalents_file_format_errors_name_the_file(tmp_path):
    p = tmp_path / "eq.txt"
    p.write_text("# comment\nfile: a.py\nline: x = 1\nmutant: x = 2\n\nfile: b.py\nline: y\n")
    with pytest.raises(SystemExit, match=re.escape(str(p)) + ".*expected blocks of 'file:', 'line:'"):
        mt.load_equivalents(p)
    p.write_text("# comment\nfile: a.py\nline: x = 1\nmutant: x = 2\nwhy: only x's parity is read\n")
    assert mt.load_equivalents(p) == {("a.py", "x = 1", "x = 2"): "only x's parity is read"}


def test_every_listed_equivalent_is_a_mutant_the_tool_still_makes():
    """An entry whose line was edited or removed no longer matches anything: it would silently stop
    counting. Each entry must name a mutant of today's code, exactly as the tool prints it."""
    equivalents = mt.load_equivalents()
    assert len(equivalents) >= 40
    made: dict[tuple[str, str], set[str]] = {}
    for rel in {rel for rel, _, _ in equivalents}:
        text = (ROOT / rel).read_text()
        wanted = {before for r, before, _ in equivalents if r == rel}
        for a, b, repl, kind, _ in mt._sites(text):
            line = " ".join(text[text.rfind("\n", 0, a) + 1:text.find("\n", b)].split())
            if line in wanted and (m := mt.make(rel, a, b, repl, kind)) is not None:
                made.setdefault((rel, line), set()).add(m.after)
    stale = [f"{rel}: {before}  ->  {after}" for rel, before, after in equivalents
             if after not in made.get((rel, before), set())]
    assert stale == []


def test_the_score_line_counts_killed_over_killed_plus_survived(tmp_path, at, capsys, monkeypatch):
    root = at(_project(tmp_path, MODULE, TESTS))
    monkeypatch.setattr(mt, "EQUIVALENTS", root / "eq.txt")
    (root / "eq.txt").write_text("file: pkg/mod.py\nline: if x < 0:\nmutant: if x <= 0:\nwhy: nobody calls it at 0\n")

    def judge_all(todo, trace, jobs):  # stand-in verdicts: the judging is the tests' above
        for m in todo:
            m.verdict = "survived" if "LIMIT" in m.before else "killed"
    monkeypatch.setattr(mt, "judge_all", judge_all)
    monkeypatch.setattr(mt.signal, "signal", lambda *args: None)  # main's SIGTERM handler: not in pytest
    out = tmp_path / "r.json"
    assert mt.main(["pkg/mod.py", "--seed", "3", "-n", "100", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("killed", "survived", "equivalent")}
    assert counts["equivalent"] == 1 and sum(counts.values()) == len(rows) == len(mt.all_mutants(["pkg/mod.py"]))
    k, s = counts["killed"], counts["survived"]
    assert f"seed 3: {k} killed, {s} survived, 1 equivalent; score {k}/{k + s} = {k / (k + s):.0%}" \
        in capsys.readouterr().out
