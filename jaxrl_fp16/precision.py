"""Mixed-precision policies in jmp's vocabulary: where parameters live, where compute runs, what comes out.

A policy is three dtypes. Parameters are the FP32 master copy; the step casts them to the compute dtype once,
at the loss boundary; outputs (logits, losses) come back in the output dtype.

Grammar of `get_policy` (jmp's, plus named presets):

    "p=f32,c=f16,o=f32"              keys p|params, c|compute, o|output
    "params=float32,compute=bfloat16"  output defaults to compute, compute defaults to params
    "c=f16"                          params default to float32
    "f16"                            a bare dtype sets all three
    "fp16-mixed" | "bf16-mixed"      FP32 params, that compute dtype, FP32 output (the paper's two settings)
    "fp32"                           FP32 everywhere
    "fp16-true" | "bf16-true"        everything in that dtype (PyTorch Lightning's "-true" convention)

Dtype names: f32|float32|full, f16|float16, bf16|bfloat16, and `half`. `half` is the platform's fast 16-bit
float, resolved when the string is parsed: bfloat16 on TPU (which has no fast float16 path), float16 on every
other backend (GPU, CPU). `str(policy)` always prints the resolved dtypes, so it round-trips through
`get_policy` on any backend.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Policy", "get_policy", "parse_dtype", "as_dtype", "dtype_name", "half_dtype", "PRESETS", "DTYPE_NAMES"]

_CANONICAL = {np.dtype(jnp.float32): "f32", np.dtype(jnp.float16): "f16", np.dtype(jnp.bfloat16): "bf16"}

# Names accepted for each dtype; `half` is resolved per backend by `half_dtype`.
DTYPE_NAMES: dict[str, Any] = {
    "f32": jnp.float32,
    "float32": jnp.float32,
    "full": jnp.float32,
    "f16": jnp.float16,
    "float16": jnp.float16,
    "bf16": jnp.bfloat16,
    "bfloat16": jnp.bfloat16,
    "half": None,
}

_KEYS = {"p": "param_dtype", "params": "param_dtype", "c": "compute_dtype", "compute": "compute_dtype",
         "o": "output_dtype", "output": "output_dtype"}

PRESETS: dict[str, str] = {
    "fp16-mixed": "p=f32,c=f16,o=f32",
    "bf16-mixed": "p=f32,c=bf16,o=f32",
    "fp32": "p=f32,c=f32,o=f32",
    "fp16-true": "p=f16,c=f16,o=f16",
    "bf16-true": "p=bf16,c=bf16,o=bf16",
}


def half_dtype() -> np.dtype:
    """The platform's 16-bit float: bfloat16 on TPU, float16 elsewhere."""
    return np.dtype(jnp.bfloat16 if jax.default_backend() == "tpu" else jnp.float16)


def parse_dtype(name: str) -> np.dtype:
    """Parses one dtype name (see `DTYPE_NAMES`); raises ValueError naming the valid ones."""
    key = name.strip().lower()
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; valid dtype names: {', '.join(DTYPE_NAMES)}")
    if key == "half":
        return half_dtype()
    return np.dtype(DTYPE_NAMES[key])


def as_dtype(dtype: Any) -> np.dtype:
    """A supported floating dtype from a name (see `DTYPE_NAMES`) or a dtype; raises ValueError otherwise."""
    dt = parse_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    dtype_name(dt)  # validates
    return dt


def dtype_name(dtype: Any) -> str:
    """Short canonical name of a supported floating dtype ('f32', 'f16', 'bf16')."""
    dt = np.dtype(dtype)
    if dt not in _CANONICAL:
        raise ValueError(f"unsupported dtype {dt}; supported: float32, float16, bfloat16")
    return _CANONICAL[dt]


def _cast_floating(tree: Any, dtype: np.dtype) -> Any:
    def cast(x):
        if isinstance(x, (jax.Array, np.ndarray, np.generic)) and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype) if x.dtype != dtype else x
        return x

    return jax.tree_util.tree_map(cast, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Three dtypes: master parameters, computation, outputs. Casts touch floating leaves only."""

    param_dtype: np.dtype
    compute_dtype: np.dtype
    output_dtype: np.dtype

    def __post_init__(self):
        for field in ("param_dtype", "compute_dtype", "output_dtype"):
            object.__setattr__(self, field, np.dtype(getattr(self, field)))
            dtype_name(getattr(self, field))  # validates

    def cast_to_param(self, tree: Any) -> Any:
        return _cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree: Any) -> Any:
        return _cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree: Any) -> Any:
        return _cast_floating(tree, self.output_dtype)

    def with_output_dtype(self, dtype: Any) -> "Policy":
        return dataclasses.replace(self, output_dtype=np.dtype(dtype))

    @property
    def is_mixed(self) -> bool:
        return self.compute_dtype != self.param_dtype

    def __str__(self) -> str:
        return (f"p={dtype_name(self.param_dtype)},c={dtype_name(self.compute_dtype)},"
                f"o={dtype_name(self.output_dtype)}")


def get_policy(spec: str | Policy) -> Policy:
    """Parses a policy string (jmp grammar or a preset name, see module docstring) into a Policy."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"policy must be a non-empty string, got {spec!r}; presets: {', '.join(PRESETS)}")
    text = PRESETS.get(spec.strip().lower(), spec.strip())
    if "=" not in text:
        try:
            dtype = parse_dtype(text)
        except ValueError:
            raise ValueError(
                f"unknown precision policy {spec!r}: not a preset ({', '.join(PRESETS)}) nor a dtype "
                f"({', '.join(DTYPE_NAMES)}); or give keys, e.g. 'p=f32,c=f16,o=f32'") from None
        return Policy(dtype, dtype, dtype)
    found: dict[str, np.dtype] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in _KEYS:
            raise ValueError(f"bad part {part.strip()!r} in policy {spec!r}: keys are "
                             f"{'|'.join(_KEYS)} (e.g. 'p=f32,c=f16,o=f32')")
        field = _KEYS[key]
        if field in found:
            raise ValueError(f"policy {spec!r} sets {field} twice")
        try:
            found[field] = parse_dtype(value)
        except ValueError as e:
            raise ValueError(f"in policy {spec!r}: {e}") from None
    param = found.get("param_dtype", np.dtype(jnp.float32))
    compute = found.get("compute_dtype", param)
    output = found.get("output_dtype", compute)
    return Policy(param, compute, output)
