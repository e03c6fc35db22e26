"""A pytest plugin for tools/mutants.py: which lines of the mutated modules each test runs, and which test
failed first.

Loaded with `-p tools.mutants_trace`; the modules to watch come in MUTANTS_TRACE_FILES (os.pathsep-separated
absolute paths) and the map is written to MUTANTS_TRACE_OUT as JSON:
{"lines": {file: {line: [test ids]}}, "import_lines": {file: [lines]}, "durations": {test id: seconds}}.
Lines run while a test file is imported (module level: defs, constants, class bodies) go to `import_lines`:
tools/mutants.py runs every test of the module for those. coverage.py would do the same job with a C tracer
but is not a dependency of the project; a `sys.settrace` that returns no local tracer outside the watched
files costs about as much here (the tests spend their time in torch's C code).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import defaultdict

_FILES = {os.path.realpath(p) for p in os.environ.get("MUTANTS_TRACE_FILES", "").split(os.pathsep) if p}
_current: list[str | None] = [None]
_lines: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
_import_lines: dict[str, set[int]] = defaultdict(set)
_durations: dict[str, float] = {}
_started: dict[str, float] = {}
_real: dict[str, str | None] = {}


def _watched(filename: str) -> str | None:
    if filename not in _real:
        path = os.path.realpath(filename)
        _real[filename] = path if path in _FILES else None
    return _real[filename]


def _global(frame, event, arg):
    path = _watched(frame.f_code.co_filename)
    if path is None:
        return None

    def local(frame, event, arg):
        if event == "line":
            test = _current[0]
            if test is None:
                _import_lines[path].add(frame.f_lineno)
            else:
                _lines[path][frame.f_lineno].add(test)
        return local

    return local


def pytest_configure(config):
    if _FILES:
        sys.settrace(_global)
        threading.settrace(_global)


def pytest_runtest_logreport(report):
    """MUTANTS_FAILED_OUT: the id of the first test that fails or errors (ids may hold spaces)."""
    out = os.environ.get("MUTANTS_FAILED_OUT")
    if out and report.failed and not os.path.exists(out):
        with open(out, "w") as fh:
            fh.write(report.nodeid)


def pytest_collectreport(report):
    pytest_runtest_logreport(report)


def pytest_runtest_logstart(nodeid, location):
    _current[0] = nodeid
    _started[nodeid] = time.perf_counter()


def pytest_runtest_logfinish(nodeid, location):
    _durations[nodeid] = time.perf_counter() - _started.pop(nodeid, time.perf_counter())
    _current[0] = None


def pytest_unconfigure(config):
    if _FILES:
        sys.settrace(None)
        threading.settrace(None)
    out = os.environ.get("MUTANTS_TRACE_OUT")
    if out:
        data = {"lines": {f: {str(n): sorted(t) for n, t in lines.items()} for f, lines in _lines.items()},
                "import_lines": {f: sorted(n) for f, n in _import_lines.items()},
                "durations": _durations}
        with open(out, "w") as fh:
            json.dump(data, fh)
