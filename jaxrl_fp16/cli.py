"""`jaxrl-fp16` command line: each subcommand parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import jaxrl_fp16  # noqa: F401  (sets XLA flags before JAX starts)
from jaxrl_fp16 import commands

DEFAULT_SHARP = 8.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrl-fp16", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-tiny", help="write a tiny random Hugging Face model with a tokenizer")
    p.add_argument("out", help="output directory: new, empty, or written by jaxrl-fp16 before (then replaced "
                   "atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="also replace an existing Hugging Face model folder not written by jaxrl-fp16 (a folder "
                        "holding other files is always refused)")
    p.add_argument("--arch", choices=("qwen2", "qwen3", "llama"), default="qwen2")
    p.add_argument("--vocab-size", type=int, default=320)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--max-position-embeddings", type=int, default=512)
    p.add_argument("--untied", action="store_true", help="separate LM head (default: tied embeddings)")
    p.add_argument("--sharp", type=float, nargs="?", const=DEFAULT_SHARP, default=None, metavar="SCALE",
                   help=f"peaked output distributions: logits scaled by SCALE (default {DEFAULT_SHARP}); "
                        "mismatch is only visible when outputs are sharp")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=commands.make_tiny)

    p = sub.add_parser("mismatch", help="offline sampler-vs-trainer mismatch analysis (the paper's)")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--sampler", default="jax", help="jax (built in), vllm or transformers")
    p.add_argument("--dtype", required=True,
                   help="sampler dtype: float16|bfloat16|float32, or a comma list to compare in one call")
    p.add_argument("--trainer-dtype", default=None, help="trainer compute dtype (default: the sampler's)")
    p.add_argument("--allow-dtype-mismatch", action="store_true",
                   help="allow sampler and trainer dtypes that differ (for studying it)")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--prompts", default=None, help="file: JSON lines of token-id lists, or text lines")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--fp32-ops", nargs="*", default=None, metavar="OP",
                   help="op classes to run in FP32 in both engines' JAX code (norm, softmax, attn_scores, "
                        "lm_head, rope, residual)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load a checkpoint holding NaN/inf weights (refused by default)")
    p.set_defaults(func=commands.mismatch)

    p = sub.add_parser("fp16-check", help="FP16 readiness report of a checkpoint (activation/weight range)")
    p.add_argument("model", help="Hugging Face model directory")
    p.add_argument("--dtype", default="float16", help="the low-precision dtype to check (default float16)")
    p.add_argument("--prompts", default=None, help="file of prompts (text lines or JSON token-id lists)")
    p.add_argument("--num-sequences", type=int, default=4, help="random sequences when no --prompts")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load a checkpoint holding NaN/inf weights (refused by default)")
    p.set_defaults(func=commands.fp16_check)

    p = sub.add_parser("study", help="where the mismatch comes from: per-layer drift of the two paths, op-class "
                       "overrides, mismatch vs response length")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--dtype", default="bfloat16,float16", help="comma list of compute dtypes to study")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (study.md, study.json, PNG plots)")
    p.set_defaults(func=commands.study)

    p = sub.add_parser("sanity", help="the paper's sanity experiment in miniature: FP16 vs BF16 RL, with a report")
    p.add_argument("--quick", action="store_true", help="GRPO in FP16 and BF16 only (minutes on 2 CPU cores); "
                   "without it: FP32 plus every algorithm in both precisions (about an hour)")
    p.add_argument("--sampler", default="jax", choices=("jax", "vllm", "transformers"))
    p.add_argument("--out", default="runs/sanity", help="output directory (report.md, plots, one folder per arm)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every arm")
    p.set_defaults(func=commands.sanity)

    p = sub.add_parser("sweep", help="the sanity RL run once per float format (real dtypes and emulated eXmY) and "
                       "seed: mismatch and training accuracy against mantissa bits, with a report")
    p.add_argument("--quick", action="store_true", help="10 formats, 1 seed, 30 iterations (about 20 minutes on 2 "
                   "idle CPU cores); without it: 15 formats, 3 seeds, 60 iterations and the long-response arm")
    p.add_argument("--formats", default=None, help="comma list: float32, bfloat16, float16 (real dtypes) or eXmY "
                   "(emulated, e.g. e8m3,e5m10)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 1 with --quick, else 3)")
    p.add_argument("--long", action="store_true", help="also the long-response arm (FP16 and BF16)")
    p.add_argument("--long-only", action="store_true", help="the long-response arm alone")
    p.add_argument("--out", default="runs/sweep", help="output directory (sweep.json, report.md, plots, one "
                   "folder per run; an existing one is resumed)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every run")
    p.set_defaults(func=commands.sweep)

    p = sub.add_parser("train", help="RL training from a YAML run config")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. loss.algorithm=gspo")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<config name>)")
    p.add_argument("--steps", type=int, default=None, help="number of RL iterations (train.iterations)")
    from jaxrl_fp16.rl.rundir import add_resume_arguments

    add_resume_arguments(p)
    p.add_argument("--export", default=None, metavar="DIR", help="also export the final policy to DIR (HF)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --export replace an existing Hugging Face model folder not written by jaxrl-fp16 (a "
                        "folder holding other files is always refused)")
    p.add_argument("--plan", choices=("auto", "on", "off"), default="auto",
                   help="compile the memory plan first and stop (exit 3) when the run does not fit; auto: for a "
                        "model.path of 50M+ parameters (see jaxrl-fp16 plan)")
    p.set_defaults(func=commands.train)

    p = sub.add_parser("plan", help="per-device memory of a run, from XLA's ahead-of-time compile of the update "
                       "step and the scorer (config.json only, no weights); exit 3 when it does not fit")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.microbatches=64")
    p.add_argument("--num-devices", type=int, default=None,
                   help="devices of the host (default: those present; others are simulated on the CPU)")
    p.add_argument("--device-memory-gib", type=float, default=None,
                   help="memory of each device (default: the devices'; on a CPU host the host RAM); given on a "
                        "CPU host, the plan is for a GPU")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan as JSON")
    p.set_defaults(func=commands.plan)

    p = sub.add_parser("dpo", help="offline preference optimisation (DPO) from a YAML run config")
    p.add_argument("config", nargs="?", default=None, help="YAML run config (see configs/dpo/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. dpo.beta=0.5")
    p.add_argument("--config", dest="config_option", default=None, metavar="CONFIG",
                   help="the run config, as an option")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/dpo_<config name>)")
    p.add_argument("--steps", type=int, default=None, help="number of optimizer steps (dpo.steps)")
    add_resume_arguments(p)
    p.set_defaults(func=commands.dpo)

    p = sub.add_parser("doctor", help="this host's backend, devices, memory and versions; with a run config, the "
                       "GPU memory split between JAX and vLLM and what is missing (exit 1)")
    p.add_argument("config", nargs="?", default=None, help="YAML run config to check (optional)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sampler.name=vllm")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=commands.doctor)

    p = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face directory")
    p.add_argument("run_dir", help="a run directory (with config.yaml and checkpoints/)")
    p.add_argument("out", help="output Hugging Face directory: new, empty, or an earlier export (written "
                   "atomically); never the run directory or the working folder")
    p.add_argument("--overwrite", action="store_true",
                   help="also replace an existing Hugging Face model folder not written by jaxrl-fp16 (a folder "
                        "holding other files is always refused)")
    p.add_argument("--iteration", type=int, default=None, help="which checkpoint (default: the latest)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.set_defaults(func=commands.export)

    p = sub.add_parser("sft", help="supervised warm start on a task's reference responses")
    p.add_argument("config", help="YAML run config (model, task and model.warm_start sections are used)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--out", default=None, help="output Hugging Face directory: new, empty, or written by "
                   "jaxrl-fp16 before")
    p.add_argument("--overwrite", action="store_true",
                   help="also replace an existing Hugging Face model folder not written by jaxrl-fp16")
    p.set_defaults(func=commands.sft)
    for p in sub.choices.values():  # --debug also after the subcommand
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)")
    return parser


# Failures a user can cause and fix (bad input, missing or unwritable files, a full disk): one line, exit 2.
EXPECTED_ERRORS = (ValueError, OSError)
DEBUG_ENV = "JAXRL_FP16_DEBUG"


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _debug_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _leave(code: int) -> int:
    """A process of several that fails exits at once with `code`: JAX's shutdown at exit would wait (minutes) at a
    barrier for the others, which wait in a collective for this one; its exit lets them fail too."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may stand anywhere after the config, also after options.
    if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if _debug_requested(args):  # tracebacks as they are
        return args.func(args)
    prefix = f"jaxrl-fp16 {args.command}: error:"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"jaxrl-fp16 {args.command}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as e:
        print(f"{prefix} {_one_line(e) or type(e).__name__}", file=sys.stderr)
        return _leave(getattr(e, "exit_code", 2))  # 3: the run does not fit its devices (memory.DoesNotFitError)
    except Exception as e:  # a defect, not the user's input: still one line, and how to see where it came from
        print(f"{prefix} unexpected {type(e).__name__}: {_one_line(e)} (run with --debug or {DEBUG_ENV}=1 for the "
              f"traceback)", file=sys.stderr)
        return _leave(1)


if __name__ == "__main__":
    sys.exit(main())
