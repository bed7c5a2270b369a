"""Emulated floating-point formats: FP32 values rounded to X exponent and Y mantissa bits ("eXmY").

A precision study can run the model in a format no hardware offers (e8m3, e5m7, ...) by computing in FP32 and
rounding every op's output and every weight with `round_to_format` (see `Numerics.emulate`). The rounding is
pure integer arithmetic on the float32 bit pattern, so it is exact, jit-able and independent of the platform's
float flags (flush-to-zero, excess precision). `jax.lax.reduce_precision` does the same rounding for normal numbers but flushes
the target's subnormals to zero (e5m10: 18% of values drawn log-uniformly over [1e-12, 1e6] came out wrong),
so it cannot stand in for a real cast.

Formats (`FloatFormat.parse`):
- "eXmY" (2 <= X <= 8, 0 <= Y <= 23): IEEE 754 shape. Exponent bias 2^(X-1) - 1, subnormals below the
  smallest normal, the all-ones exponent for inf and NaN, overflow to +-inf. e8m7 is bfloat16, e5m10 float16,
  e5m2 the OCP FP8 E5M2 (`ml_dtypes.float8_e5m2`), e4m3 the IEEE-shaped FP8 (`ml_dtypes.float8_e4m3`,
  largest finite 240), e8m23 float32 (no-op).
- "eXmYfn" (X <= 7, Y >= 1): finite, as OCP FP8 E4M3 ("e4m3fn" = `ml_dtypes.float8_e4m3fn`, the FP8 of
  current accelerators, largest finite 448): no inf; the all-ones exponent holds normal numbers except the
  all-ones mantissa, which is NaN; inf and anything that rounds past the largest finite become NaN (as
  `ml_dtypes` casts do: no saturation).
- Aliases: "float32", "bfloat16", "float16", "float8_e5m2", "float8_e4m3", "float8_e4m3fn".

The rounding (round to nearest, ties to even; t = target):

    bias_t = 2^(X-1) - 1;  emin_t = 1 - bias_t                     # exponent of the smallest normal
    u = bits(x) as uint32;  sign = u & 0x80000000;  a = u & 0x7fffffff
    if a > 0x7f800000: return x                                     # NaN stays NaN (payload kept)
    e = a >> 23                                                     # biased FP32 exponent (0: subnormal)
    m = (a & 0x7fffff) | (0x800000 if e > 0 else 0)                 # significand, value = m * 2^(max(e,1)-150)
    shift = 23 - Y + max(0, (emin_t + 127) - max(e, 1))            # dropped bits: more below the target's
    shift = min(shift, 25)                                          #   normal range (subnormals); >= 25: to 0
    r = m mod 2^shift;  half = 2^(shift-1)
    up = r > half or (r == half and (m >> shift) is odd)
    m' = m - r + (2^shift if up else 0)                             # may carry into the next binade: fine,
    mag = 0 if m' == 0 else a - m + m'                              #   a = (max(e,1)-1) << 23 + m always
    if mag > bits(largest finite of t): mag = inf (IEEE) or NaN (fn)   # overflow after rounding, as IEEE
    return float32(sign | mag)

This is what a real cast does: for e8m7/e5m10/e5m2/e4m3/e4m3fn it equals the `ml_dtypes`/numpy casts bit for
bit (tests/test_emulation.py), and since FP32 has at least 2p+2 significand bits for p <= 11, an FP32 add, sub,
mul or div then rounded equals the correctly rounded op in the target (no double-rounding error).

Gradients: the VJP of `round_to_format` rounds the cotangent to the same format, as the transpose of a cast
does for a real low-precision value (its cotangent lives in that dtype).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FloatFormat", "round_to_format", "ALIASES"]

ALIASES = {"float32": "e8m23", "bfloat16": "e8m7", "float16": "e5m10", "float8_e5m2": "e5m2",
           "float8_e4m3": "e4m3", "float8_e4m3fn": "e4m3fn"}
_PATTERN = re.compile(r"e(\d+)m(\d+)(fn)?")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FloatFormat:
    """A binary floating-point format carried in float32: `exponent_bits` (2..8), `mantissa_bits` (0..23,
    stored bits, without the implicit leading one); `finite` for the OCP "fn" variant (no inf)."""

    exponent_bits: int
    mantissa_bits: int
    finite: bool = False

    def __post_init__(self):
        x, y = self.exponent_bits, self.mantissa_bits
        if not (isinstance(x, int) and 2 <= x <= 8):
            raise ValueError(f"{self.name}: exponent_bits must be an integer in [2, 8] (float32 carries it), got {x!r}")
        if not (isinstance(y, int) and 0 <= y <= 23):
            raise ValueError(f"{self.name}: mantissa_bits must be an integer in [0, 23], got {y!r}")
        if self.finite and (x == 8 or y == 0):
            raise ValueError(f"{self.name}: a finite (fn) format needs exponent_bits <= 7 and mantissa_bits >= 1")

    @classmethod
    def parse(cls, spec: "str | FloatFormat") -> "FloatFormat":
        """"e5m10", "e4m3fn" or an alias ("float16", "bfloat16", "float32", "float8_e4m3fn", ...)."""
        if isinstance(spec, FloatFormat):
            return spec
        return _parse(str(spec).strip().lower())

    @property
    def name(self) -> str:
        return f"e{self.exponent_bits}m{self.mantissa_bits}" + ("fn" if self.finite else "")

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal number (1 - bias)."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        return self.bias + 1 if self.finite else self.bias

    @property
    def max(self) -> float:
        """The largest finite value."""
        top = 2 - 2.0 ** -(self.mantissa_bits - 1) if self.finite else 2 - 2.0 ** -self.mantissa_bits
        return float(np.ldexp(top, self.max_exponent))

    @property
    def smallest_subnormal(self) -> float:
        return float(np.ldexp(1.0, self.min_exponent - self.mantissa_bits))

    @property
    def is_float32(self) -> bool:
        return self.exponent_bits == 8 and self.mantissa_bits == 23 and not self.finite


@functools.lru_cache(maxsize=None)
def _parse(spec: str) -> FloatFormat:
    spec = ALIASES.get(spec, spec)
    match = _PATTERN.fullmatch(spec)
    if match is None:
        raise ValueError(f"unknown float format {spec!r}; expected eXmY (e.g. e5m10), eXmYfn (e.g. e4m3fn) "
                         f"or one of {', '.join(ALIASES)}")
    return FloatFormat(exponent_bits=int(match[1]), mantissa_bits=int(match[2]), finite=bool(match[3]))


def _round_bits(x: jax.Array, fmt: FloatFormat) -> jax.Array:
    """The rounding of the module docstring, on a float32 array."""
    u32 = jnp.uint32
    u = jax.lax.bitcast_convert_type(x, u32)
    sign = u & u32(0x80000000)
    a = u & u32(0x7FFFFFFF)
    e = a >> u32(23)
    e_eff = jnp.maximum(e, u32(1))
    m = (a & u32(0x7FFFFF)) | jnp.where(e > 0, u32(0x800000), u32(0))
    min_normal_biased = fmt.min_exponent + 127  # >= 1 for exponent_bits <= 8
    extra = jnp.where(e_eff < min_normal_biased, u32(min_normal_biased) - e_eff, u32(0))
    shift = jnp.minimum(u32(23 - fmt.mantissa_bits) + extra, u32(25))
    r = m & ((u32(1) << shift) - u32(1))
    half = u32(1) << (jnp.maximum(shift, u32(1)) - u32(1))  # shift == 0 gives r == 0: never rounds up
    up = (r > half) | ((r == half) & (((m >> shift) & u32(1)) == 1))
    m_new = m - r + jnp.where(up, u32(1) << shift, u32(0))
    mag = jnp.where(m_new == 0, u32(0), a - m + m_new)
    max_bits = int(np.array(fmt.max, np.float32).view(np.uint32))
    over = u32(0x7FC00000) if fmt.finite else u32(0x7F800000)
    mag = jnp.where(mag > u32(max_bits), over, mag)
    out = jax.lax.bitcast_convert_type(sign | mag, jnp.float32)
    return jnp.where(a > u32(0x7F800000), x, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _round(x: jax.Array, fmt: FloatFormat) -> jax.Array:
    return _round_bits(x, fmt)


def _round_fwd(x, fmt):
    return _round_bits(x, fmt), None


def _round_bwd(fmt, _, ct):
    return (_round_bits(ct.astype(jnp.float32), fmt),)


_round.defvjp(_round_fwd, _round_bwd)


def round_to_format(x: jax.Array, fmt: "str | FloatFormat") -> jax.Array:
    """`x` (any float dtype) as float32, rounded to `fmt` (a `FloatFormat` or its name, e.g. "e5m10").

    Round to nearest, ties to even; subnormals, overflow, inf and NaN as in the format (module docstring).
    Differentiable: the cotangent is rounded to `fmt` too.
    """
    fmt = FloatFormat.parse(fmt)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"round_to_format takes a floating array, got {x.dtype}")
    x = x.astype(jnp.float32)
    if fmt.is_float32:
        return x
    return _round(x, fmt)
