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

GPU determinism (`debug.deterministic=true` in a run config, or `JAXRL_FP16_DETERMINISTIC=1`): XLA:GPU may pick
kernels by autotuning and reduce with atomics, so two runs of one program can differ in the last bits.
`--xla_gpu_deterministic_ops=true` ("guarantees run-to-run determinism on GPU"; a superset of
`--xla_gpu_exclude_nondeterministic_ops`) removes both, at some speed. The older `--xla_gpu_deterministic_reductions`
is gone from XLA (jaxlib 0.10 aborts on it). XLA reads XLA_FLAGS once, when JAX starts its backends: the variable
is read when `jaxrl_fp16` is imported, and the config key is applied by `enable_deterministic` (from
`jaxrl-fp16 train|dpo|sft` and the smoke run, after the config is read and before any JAX computation). On a CPU
the flag changes nothing (XLA:CPU runs one program the same way every time).
"""

import logging
import os

FLAG = "--xla_allow_excess_precision"
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_JAXLIB = ((0, 10), (0, 11))  # [first, last) jaxlib (major, minor) whose XLA has YNN_FLAG
STRICT_ENV = "JAXRL_FP16_STRICT_ROUNDING"
DETERMINISTIC_ENV = "JAXRL_FP16_DETERMINISTIC"
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops"
DETERMINISTIC_JAXLIB = (0, 4)  # first jaxlib (major, minor) relied on to know DETERMINISTIC_FLAG (0.10.2 checked)


def _jaxlib_minor() -> tuple[int, int] | None:
    try:
        from importlib.metadata import version

        major, minor = version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except Exception:  # not installed, or a version string we do not read
        return None


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def deterministic(environ=None) -> bool:
    return (os.environ if environ is None else environ).get(DETERMINISTIC_ENV, "") not in ("", "0")


def flag_value(flags: str, flag: str) -> str | None:
    """The value the last `flag=value` (or bare `flag`: "true") in the XLA_FLAGS text `flags` sets; None if unset."""
    value = None
    for token in flags.split():
        name, eq, rest = token.partition("=")
        if name == flag:
            value = rest if eq else "true"
    return value


def compose_flags(flags: str, *, strict_rounding: bool, deterministic_ops: bool,
                  jaxlib: tuple[int, int] | None) -> list[str]:
    """The flags to add to the XLA_FLAGS text `flags` (pure): those the user has not set.

    Args:
      flags: the current XLA_FLAGS.
      strict_rounding: JAXRL_FP16_STRICT_ROUNDING (also switch XLA:CPU's YNN fusions off).
      deterministic_ops: GPU run-to-run determinism (`--xla_gpu_deterministic_ops=true`).
      jaxlib: the installed jaxlib (major, minor), None when unknown: a flag its XLA may not know is left out
        (XLA aborts on an unknown flag), except the determinism flag when jaxlib is unknown.
    """
    wanted = [] if flag_value(flags, FLAG) is not None else [f"{FLAG}=false"]
    if (strict_rounding and flag_value(flags, YNN_FLAG) is None and jaxlib is not None
            and YNN_JAXLIB[0] <= jaxlib < YNN_JAXLIB[1]):
        wanted.append(f"{YNN_FLAG}=")
    if (deterministic_ops and flag_value(flags, DETERMINISTIC_FLAG) is None
            and (jaxlib is None or jaxlib >= DETERMINISTIC_JAXLIB)):
        wanted.append(f"{DETERMINISTIC_FLAG}=true")
    return wanted


def _wanted(flags: str) -> list[str]:
    """The flags to add to `flags` for this environment: those the user has not set."""
    return compose_flags(flags, strict_rounding=strict(), deterministic_ops=deterministic(),
                         jaxlib=_jaxlib_minor())


def started_backends() -> tuple[str, ...]:
    """The platforms whose JAX backends have started ("cpu", "cuda", ...); empty before any JAX computation."""
    try:
        from jax._src import xla_bridge

        return tuple(getattr(xla_bridge, "_backends", None) or ())
    except Exception:  # pragma: no cover - private API moved
        return ()


class DeterminismError(ValueError):
    """GPU determinism was asked for where it cannot be had (JAX already running on a GPU, a contrary flag)."""


def enable_deterministic(source: str = "debug.deterministic=true", environ=None) -> list[str]:
    """Turns GPU determinism on for this process: DETERMINISTIC_ENV=1 (the vLLM engine reads it for its
    batch-invariant mode) and `--xla_gpu_deterministic_ops=true` in XLA_FLAGS; returns the flags added.

    Call before any JAX computation. Raises DeterminismError naming `source` when XLA_FLAGS sets the flag to
    false, or when JAX has already started a GPU backend without it (XLA reads its flags once; set
    JAXRL_FP16_DETERMINISTIC=1 in the environment then). With only the CPU backend started nothing is lost: the
    flag concerns GPUs."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    value = flag_value(flags, DETERMINISTIC_FLAG)
    if value is not None and value.lower() not in ("true", "1"):
        raise DeterminismError(f"{source} but XLA_FLAGS sets {DETERMINISTIC_FLAG}={value}: remove it from "
                               f"XLA_FLAGS or set it to true")
    environ[DETERMINISTIC_ENV] = "1"
    if value is not None:
        return []
    started = started_backends()
    if started:
        if any(p != "cpu" for p in started):
            raise DeterminismError(f"{source} but JAX had already started its {', '.join(started)} backends "
                                   f"without {DETERMINISTIC_FLAG}=true (XLA reads XLA_FLAGS once): set "
                                   f"{DETERMINISTIC_ENV}=1 in the environment, or put "
                                   f"{DETERMINISTIC_FLAG}=true in XLA_FLAGS, before the process starts")
        logging.getLogger(__name__).info("%s: JAX runs on the CPU here, where XLA is deterministic; %s is for "
                                         "GPUs", source, DETERMINISTIC_FLAG)
        return []
    wanted = compose_flags(flags, strict_rounding=False, deterministic_ops=True, jaxlib=_jaxlib_minor())
    if wanted:
        environ["XLA_FLAGS"] = " ".join([flags, *wanted]).strip()
    return wanted


def apply() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    wanted = _wanted(flags)
    if not wanted:
        return
    started = bool(started_backends())
    if started:
        logging.getLogger(__name__).warning(
            "JAX backends started before jaxrl_fp16 was imported: %s could not be set, so XLA may skip some "
            "low-precision roundings. Import jaxrl_fp16 first, or set XLA_FLAGS yourself.", " ".join(wanted))
        return
    os.environ["XLA_FLAGS"] = " ".join([flags, *wanted]).strip()


apply()
