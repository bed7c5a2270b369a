"""Where the suite's time goes: XLA compile seconds per test (`pytest --compile-times=PATH`).

Most of the suite's time on a CPU is XLA compiling programs. With `--compile-times=PATH` every test's backend
compile seconds and compiles (JAX's `/jax/core/compile/backend_compile_duration` events: programs actually compiled,
not those loaded from the persistent cache) and its wall seconds (set-up, call and tear-down; a module fixture
counts in the first test that uses it) are recorded in each process, gathered from the pytest-xdist workers, written
to PATH as JSON ({"tests": {nodeid: {"wall_s", "compile_s", "compiles"}}}) and summed by file in the terminal
summary. Compiles in subprocesses a test starts (CLI runs, engines) are not seen: their time is wall time only.

    .venv/bin/python -m pytest -n 2 --dist loadfile tests --compile-times=compile-times.json

Loaded by tests/conftest.py; `-p compile_times` loads it elsewhere (with this folder on the path).
"""

from __future__ import annotations

import collections
import json
import time

import pytest

__all__ = ["pytest_addoption", "pytest_configure", "pytest_runtest_protocol", "pytest_sessionfinish",
           "pytest_testnodedown", "pytest_terminal_summary"]

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_KEY = "compile_times"
SUMMARY_FILES = 15


class _Recorder:
    """Per-test wall and compile time in this process."""

    def __init__(self):
        self.current: str | None = None
        self.tests: dict[str, dict[str, float]] = collections.defaultdict(
            lambda: {"wall_s": 0.0, "compile_s": 0.0, "compiles": 0})

    def on_event(self, event: str, seconds: float, **_) -> None:
        if event == COMPILE_EVENT and self.current is not None:
            row = self.tests[self.current]
            row["compile_s"] += seconds
            row["compiles"] += 1


_STASH = pytest.StashKey[_Recorder]()  # this process's recorder
_MERGED = pytest.StashKey[dict]()  # the controller's (or the only process's) rows: nodeid -> row


def pytest_addoption(parser):
    parser.addoption("--compile-times", metavar="PATH", default=None,
                     help="write each test's XLA compile seconds and wall seconds to PATH (JSON) and sum them by "
                          "file in the summary")


def pytest_configure(config):
    if not config.getoption("compile_times"):
        return
    config.stash[_MERGED] = {}
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # xdist's controller runs no test: it only merges what its workers recorded
    import jax.monitoring  # only where tests run, and only when asked (not for every pytest run)

    recorder = _Recorder()
    jax.monitoring.register_event_duration_secs_listener(recorder.on_event)
    config.stash[_STASH] = recorder


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    recorder = item.config.stash.get(_STASH, None)
    if recorder is None:
        yield
        return
    recorder.current, start = item.nodeid, time.perf_counter()
    try:
        yield
    finally:
        recorder.tests[item.nodeid]["wall_s"] += time.perf_counter() - start
        recorder.current = None


def pytest_sessionfinish(session):
    recorder = session.config.stash.get(_STASH, None)
    if recorder is None:
        return
    tests = {k: dict(v) for k, v in recorder.tests.items()}
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand the rows to the controller
        session.config.workeroutput[_KEY] = json.dumps(tests)
    else:
        session.config.stash[_MERGED].update(tests)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist's controller: a worker finished; merge its rows."""
    merged = node.config.stash.get(_MERGED, None)
    rows = getattr(node, "workeroutput", {}).get(_KEY)
    if merged is not None and rows:
        merged.update(json.loads(rows))


def pytest_terminal_summary(terminalreporter, config):
    merged = config.stash.get(_MERGED, None)
    if merged is None or hasattr(config, "workerinput"):
        return
    path = config.getoption("compile_times")
    with open(path, "w") as f:
        json.dump({"tests": merged}, f, indent=1, sort_keys=True)
    by_file: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for nodeid, row in merged.items():
        acc = by_file[nodeid.split("::")[0]]
        acc[0] += row["wall_s"]
        acc[1] += row["compile_s"]
        acc[2] += row["compiles"]
    wall = sum(r["wall_s"] for r in merged.values())
    compile_s = sum(r["compile_s"] for r in merged.values())
    compiles = sum(r["compiles"] for r in merged.values())
    tr = terminalreporter
    tr.section("compile times")
    tr.write_line(f"{len(merged)} tests: {wall:.1f} s of test time, {compile_s:.1f} s compiling {compiles} XLA "
                  f"programs in the pytest processes ({path})")
    for name, (w, c, n) in sorted(by_file.items(), key=lambda kv: -kv[1][0])[:SUMMARY_FILES]:
        tr.write_line(f"{w:8.1f} s test time {c:8.1f} s compiling {n:6d} programs  {name}")
