"""Faithful low-precision rounding in XLA.

By default XLA may keep "excess precision": a bfloat16/float16 op whose result feeds another op can be left
unrounded (a bf16 matmul on CPU, for example, is computed in FP32 and its rounding to bf16 dropped when the
next op converts it back up). PyTorch eager, transformers and vLLM round every op's output to its dtype, and the
mismatch this project measures is made of exactly those roundings. So unless the user has chosen a value,
we set `--xla_allow_excess_precision=false` before JAX starts its backends. Set the flag yourself in XLA_FLAGS
(either value) to override.
"""

import logging
import os

FLAG = "--xla_allow_excess_precision"


def apply() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG in flags:
        return
    try:
        from jax._src import xla_bridge

        started = bool(getattr(xla_bridge, "_backends", None))
    except Exception:  # pragma: no cover - private API moved
        started = False
    if started:
        logging.getLogger(__name__).warning(
            "JAX backends started before jaxrl_fp16 was imported: %s=false could not be set, so XLA may skip "
            "some low-precision roundings. Import jaxrl_fp16 first, or set XLA_FLAGS yourself.", FLAG)
        return
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}=false".strip()


apply()
