"""Faithful low-precision rounding in XLA.

By default XLA may keep "excess precision": a bfloat16/float16 op whose result feeds another op can be left
unrounded (a bf16 matmul on CPU, for example, is computed in FP32 and its rounding to bf16 dropped when the
next op converts it back up). PyTorch eager, transformers and vLLM round every op's output to its dtype, and the
mismatch this project measures is made of exactly those roundings. So unless the user has chosen a value,
we set `--xla_allow_excess_precision=false` before JAX starts its backends. Set the flag yourself in XLA_FLAGS
(either value) to override.

XLA:CPU's YNNPACK fusions (jaxlib 0.10) ignore that flag: a bf16 matmul fused with the FP32 ops that follow it
(the LM head, then the log-softmax at a traced temperature) is kept in FP32, so the trainer's log-probs skip
the bf16 rounding of the logits that the sampler's decode step applies (max |d log p| 0.04-0.05 on a tiny sharp
model). With `JAXRL_FP16_STRICT_ROUNDING=1` we also switch those fusions off
(`--xla_cpu_experimental_ynn_fusion_type=`, empty: none), on the jaxlib versions known to have the flag (XLA
aborts on a flag it does not know); then real bf16/f16 equal their emulated formats. It is not the default: on
CPUs, part of the JAX engine's sampler-trainer mismatch comes from exactly this difference (see the README's
"Faithful rounding"). Set the flag yourself to override either way.
"""

import logging
import os

FLAG = "--xla_allow_excess_precision"
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_JAXLIB = ((0, 10), (0, 11))  # [first, last) jaxlib (major, minor) whose XLA has YNN_FLAG
STRICT_ENV = "JAXRL_FP16_STRICT_ROUNDING"


def _jaxlib_minor() -> tuple[int, int] | None:
    try:
        from importlib.metadata import version

        major, minor = version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except Exception:  # not installed, or a version string we do not read
        return None


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def _wanted(flags: str) -> list[str]:
    """The flags to add to `flags`: those the user has not set."""
    wanted = [] if FLAG in flags else [f"{FLAG}=false"]
    jaxlib = _jaxlib_minor()
    if strict() and YNN_FLAG not in flags and jaxlib is not None and YNN_JAXLIB[0] <= jaxlib < YNN_JAXLIB[1]:
        wanted.append(f"{YNN_FLAG}=")
    return wanted


def apply() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    wanted = _wanted(flags)
    if not wanted:
        return
    try:
        from jax._src import xla_bridge

        started = bool(getattr(xla_bridge, "_backends", None))
    except Exception:  # pragma: no cover - private API moved
        started = False
    if started:
        logging.getLogger(__name__).warning(
            "JAX backends started before jaxrl_fp16 was imported: %s could not be set, so XLA may skip some "
            "low-precision roundings. Import jaxrl_fp16 first, or set XLA_FLAGS yourself.", " ".join(wanted))
        return
    os.environ["XLA_FLAGS"] = " ".join([flags, *wanted]).strip()


apply()
