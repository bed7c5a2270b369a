"""`python -m benchmarks` (`make bench`): every CPU comparison in one run; writes `bench/results.json` (a list
of comparisons: name, ours, peer, unit, ratio (higher is better for us), target, met), `bench/results.md` and,
with `--readme`, the table between the README's bench markers.

The GPU benchmark is separate (`python -m benchmarks.gpu`, see its docstring).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

import jaxrl_fp16  # noqa: F401  (first: sets the XLA flags before JAX starts)
from benchmarks import decode, models, overheads, train_step, weight_push
from benchmarks.common import machine_info, markdown_table, write_results

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
DTYPES = ("float32", "bfloat16", "float16")


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per comparison (round-robin)")
    ap.add_argument("--only", default="decode,train,push,overheads",
                    help="comma-separated subset of: decode, train, push, overheads")
    ap.add_argument("--readme", default=None, help="also write the table into this README between the markers")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr)])
    for noisy in ("vllm", "jax", "absl", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    only = set(args.only.split(","))
    root = os.path.join(args.out, "models")
    results = []
    if "decode" in only:
        results += decode.run_decode(models.build(root, "tiny"), "tiny", DTYPES, batch=8, prompt_len=16,
                                     max_new_tokens=64, repeats=args.repeats)
        results += decode.run_decode(models.build(root, "50M"), "50M", DTYPES, batch=8, prompt_len=16,
                                     max_new_tokens=32, repeats=args.repeats)
    if "train" in only:
        for size in ("tiny", "small"):
            results += train_step.run_train_step(models.build(root, size), size, DTYPES, rows=8, length=128,
                                                 repeats=args.repeats)
    if "push" in only:
        for size in ("tiny", "50M"):
            results += weight_push.run_weight_push(models.build(root, size), size, "float16",
                                                   repeats=2 * args.repeats)
    if "overheads" in only:
        results += overheads.run_overheads(os.path.join("configs", "tiny_fp16.yaml"), iterations=6,
                                           repeats=4 * args.repeats)
    machine = machine_info()
    json_path, md_path = write_results(args.out, results, machine)
    if args.readme:
        update_readme(args.readme, markdown_table(results, machine))
    print(markdown_table(results, machine))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
