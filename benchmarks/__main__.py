"""`python -m benchmarks` (`make bench`): every CPU comparison in one run; writes `bench/results.json` (a list
of comparisons: name, ours, peer, unit, ratio (higher is better for us), target, met), `bench/results.md` and,
with `--readme`, the table between the README's bench markers.

Each unit (one decode size, one training-step size, one push size, the overheads) runs in a fresh Python process,
so that no engine, thread pool or compiled program of one unit disturbs the next; the systems of a unit run
round-robin inside it (the decode systems each in a process of their own, `SystemProcess`, which builds one dtype's
engine after the other). `--unit NAME` runs one unit in this process (what the parent starts).

The GPU benchmark is separate (`python -m benchmarks.gpu`, see its docstring).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import tempfile

import jaxrl_fp16  # noqa: F401  (first: sets the XLA flags before JAX starts)
from benchmarks import models
from benchmarks.common import Comparison, machine_info, markdown_table, write_results

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
DTYPES = ("float32", "bfloat16", "float16")
GROUPS = ("decode", "train", "push", "overheads")


def update_readme(path: str, table: str) -> None:
    with open(path) as f:
        text = f.read()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no {START} ... {END} markers to put the table between")
    text = pattern.sub(lambda _: f"{START}\n{table}{END}", text)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


DECODE_NEW_TOKENS = {"tiny": 64, "50M": 32}
TRAIN_SIZES = ("tiny", "small")
PUSH_SIZES = ("tiny", "50M")


def unit_names(groups: set[str]) -> list[str]:
    """The units of the selected groups, in table order."""
    names = []
    if "decode" in groups:
        names += [f"decode:{size}" for size in DECODE_NEW_TOKENS]
    if "train" in groups:
        names += [f"train:{size}" for size in TRAIN_SIZES]
    if "push" in groups:
        names += [f"push:{size}" for size in PUSH_SIZES]
    if "overheads" in groups:
        names.append("overheads")
    return names


def run_unit(name: str, root: str, repeats: int) -> list[Comparison]:
    """Runs one unit in this process (each group's module is imported here, by the unit that needs it)."""
    group, *key = name.split(":")
    if group == "decode":
        from benchmarks.decode import run_decode

        (size,) = key
        return run_decode(models.build(root, size), size, DTYPES, batch=8, prompt_len=16,
                          max_new_tokens=DECODE_NEW_TOKENS[size], repeats=repeats)
    if group == "train":
        from benchmarks.train_step import run_train_step

        (size,) = key
        return run_train_step(models.build(root, size), size, DTYPES, rows=8, length=128, repeats=repeats)
    if group == "push":
        from benchmarks.weight_push import run_weight_push

        (size,) = key
        return run_weight_push(models.build(root, size), size, "float16", repeats=2 * repeats)
    from benchmarks.overheads import run_overheads

    return run_overheads(os.path.join("configs", "tiny_fp16.yaml"), iterations=6, repeats=4 * repeats)


def run_unit_in_subprocess(name: str, args: argparse.Namespace) -> list[Comparison]:
    """Runs one unit in a fresh interpreter and reads back its comparisons; a failed unit fails the bench."""
    with tempfile.TemporaryDirectory(prefix="bench-unit-") as tmp:
        path = os.path.join(tmp, "unit.json")
        cmd = [sys.executable, "-m", "benchmarks", "--unit", name, "--unit-json", path, "--out", args.out,
               "--repeats", str(args.repeats)]
        code = subprocess.run(cmd, check=False).returncode
        if code != 0:
            raise RuntimeError(f"benchmark unit {name!r} failed (exit code {code}); its log is above")
        with open(path) as f:
            return [Comparison(**r) for r in json.load(f)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per comparison (round-robin)")
    ap.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of: {', '.join(GROUPS)}")
    ap.add_argument("--readme", default=None, help="also write the table into this README between the markers")
    ap.add_argument("--unit", default=None, help="run only this unit, in this process (e.g. decode:50M)")
    ap.add_argument("--unit-json", default=None, help="with --unit: write its comparisons to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr)])
    for noisy in ("vllm", "jax", "absl", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.unit is not None:
        known = unit_names(set(GROUPS))
        if args.unit not in known:
            ap.error(f"unknown unit {args.unit!r}; the units are: {', '.join(known)}")
        results = run_unit(args.unit, os.path.join(args.out, "models"), args.repeats)
        if args.unit_json:
            with open(args.unit_json, "w") as f:
                json.dump([dataclasses.asdict(r) for r in results], f)
        return 0
    only = set(args.only.split(","))
    if only - set(GROUPS):
        ap.error(f"--only: unknown {sorted(only - set(GROUPS))}; choose from {', '.join(GROUPS)}")
    results = []
    for name in unit_names(only):
        logging.getLogger("benchmarks").info("unit %s", name)
        results += run_unit_in_subprocess(name, args)
    machine = machine_info()
    json_path, md_path = write_results(args.out, results, machine)
    if args.readme:
        update_readme(args.readme, markdown_table(results, machine))
    print(markdown_table(results, machine))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
