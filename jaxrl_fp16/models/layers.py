"""The decoder's building blocks: how an op computes (`Arith`), Dense, RMSNorm, the MLP and RoPE.

Parameters are FP32 master arrays; every op casts its parameters to `dtype` (the policy's compute dtype).

Emulated formats (`Numerics.emulate`, compute dtype float32): each op computes in FP32 and its output, like each
weight, is rounded with `round_to_format` where the real dtype would round it (an `Arith` says how an op class
computes); matmuls run at full FP32 precision (`Precision.HIGHEST`: no TF32 on GPUs). The ops are those XLA runs
in a real dtype (sigmoid as 1 / (1 + exp(-x))), and each use's cotangent is rounded and the uses summed in JAX's
order (`fan_out`). Without emulation an `Arith` only casts: the compiled code is what it was.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrl_fp16.emulation import FloatFormat, round_to_format
from jaxrl_fp16.models.config import ModelConfig, Numerics

__all__ = ["Arith", "arith", "upcasts", "upcast_dot", "emulated_format", "kernel_init", "Dense", "RMSNorm", "MLP",
           "rope_cos_sin", "apply_rope", "emulated_sigmoid", "fan_out"]

Array = jax.Array


def kernel_init():
    """The initialiser of every kernel and of the embedding table."""
    return nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class Arith:
    """How an op class computes: in `dtype`, with every result rounded to `fmt` when emulating a format.

    `cast` replaces `x.astype(dtype)` (an operand or weight entering the op), `out` marks an op's result and
    `use` an operand already in `fmt` that is used more than once or upcast to FP32. With `fmt` None they are
    that cast and the identity, so the real-dtype code is unchanged. Rounding is idempotent, so `use` changes
    no value; it rounds the cotangent of that one use, as a real low-precision backward rounds each op's
    gradient output before the contributions of several uses are summed.
    """

    dtype: Any
    fmt: FloatFormat | None = None
    precision: Any = None  # matmul precision (HIGHEST in FP32 and when emulating: no TF32 on GPUs)

    def cast(self, x: Array) -> Array:
        x = x.astype(self.dtype)
        return x if self.fmt is None else round_to_format(x, self.fmt)

    def out(self, y: Array) -> Array:
        return y if self.fmt is None else round_to_format(y, self.fmt)

    use = out

    def const(self, value: float) -> Array:
        c = jnp.asarray(value, self.dtype)
        return c if self.fmt is None else round_to_format(c, self.fmt)

    @property
    def lowest(self) -> float:
        """The most negative finite value (the masked attention score)."""
        return jnp.finfo(self.dtype).min if self.fmt is None else -self.fmt.max


def arith(dtype: Any, fmt: FloatFormat | None, f32: bool = False) -> Arith:
    """The compute dtype (rounded to `fmt` when emulating), or FP32 unrounded when the op is forced to FP32.

    Matmuls in FP32 (the FP32 policy, an op forced to FP32, emulation) run at `Precision.HIGHEST`: on GPUs JAX's
    default FP32 matmul is TF32 (10 mantissa bits), which would make the FP32 arm and the FP32 overrides of a
    precision study something else. On CPUs it changes nothing (they have no TF32)."""
    out_dtype = jnp.float32 if f32 else dtype
    full = fmt is not None or jnp.dtype(out_dtype) == jnp.float32
    return Arith(out_dtype, None if f32 else fmt, jax.lax.Precision.HIGHEST if full else None)


def upcasts(ar: Arith, f32_weights: bool) -> bool:
    """Whether a product computed as `ar` says takes FP32 weights holding compute-dtype values
    (`CausalLM.f32_weights`): only a real half-precision product (an FP32 or emulated one is FP32 already)."""
    return f32_weights and ar.fmt is None and jnp.dtype(ar.dtype) != jnp.float32


def upcast_dot(x: Array, w: Array, dtype: Any) -> Array:
    """x @ w with x in the half-precision `dtype` and w an FP32 array of `dtype` values: the product of the
    upcast operands in FP32, rounded to `dtype`. Every product of two such values is exact in FP32, so this is
    the half-precision matmul with FP32 accumulation, as XLA:CPU compiles `jnp.dot` of two `dtype` arrays (it
    converts both operands to FP32, weights included, on every call)."""
    return jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST).astype(dtype)


def emulated_format(dtype: Any, numerics: Numerics) -> FloatFormat | None:
    """`numerics.float_format`, checking that the compute dtype is float32 when a format is emulated."""
    fmt = numerics.float_format
    if fmt is not None and jnp.dtype(dtype) != jnp.float32:
        raise ValueError(f"Numerics.emulate={numerics.emulate!r} needs the compute dtype float32 "
                         f"(the emulated format is carried in FP32), got {jnp.dtype(dtype).name}")
    return fmt


class Dense(nn.Module):
    """x @ kernel (+ bias) in `dtype`; kernel stored (in, out) in FP32.

    The leading axes of x are merged before the product ([B, T, in] -> [B*T, in]): the kernel's gradient is then
    one [in, N] x [N, out] product, where a dot over (B, T) made XLA:CPU first copy the incoming gradient into a
    transposed layout (a quarter of the small model's backward op time; README "Benchmarks").

    `f32_weights` (`CausalLM.f32_weights`): the kernel holds compute-dtype values in an FP32 array, and the
    product is taken in FP32 on the upcast input and rounded to the compute dtype."""

    features: int
    use_bias: bool
    dtype: Any
    compute_f32: bool = False
    fmt: FloatFormat | None = None  # emulated format
    f32_weights: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", kernel_init(), (x.shape[-1], self.features), jnp.float32)
        ar = arith(self.dtype, self.fmt, self.compute_f32)
        x = arith(self.dtype, self.fmt).use(x)  # the input is in the compute dtype (format)
        lead = x.shape[:-1]
        if upcasts(ar, self.f32_weights):
            y = upcast_dot(x.reshape(-1, x.shape[-1]), kernel, ar.dtype)
        else:
            y = jnp.dot(ar.cast(x.reshape(-1, x.shape[-1])), ar.cast(kernel), precision=ar.precision)
        y = ar.out(y.reshape(*lead, self.features))
        if self.use_bias:
            y = ar.out(y + ar.cast(self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)))
        return y


class RMSNorm(nn.Module):
    """As transformers: normalise (in FP32 when `f32`), cast back to the input dtype, multiply by the weight."""

    eps: float
    dtype: Any
    f32: bool = True
    fmt: FloatFormat | None = None  # emulated format
    input_f32: bool = False  # emulation only: the input is an FP32 value (the residual stream in FP32)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        # The input's own arithmetic (its dtype, or with emulation its format).
        inp = Arith(x.dtype) if self.fmt is None else arith(self.dtype, self.fmt, self.input_f32)
        stat = arith(inp.dtype, inp.fmt, self.f32)
        xs = stat.cast(inp.use(x))
        var = stat.out(jnp.mean(stat.out(jnp.square(stat.use(xs))), axis=-1, keepdims=True))
        y = inp.cast(stat.out(stat.use(xs) * stat.out(jax.lax.rsqrt(stat.out(var + stat.const(self.eps))))))
        ar = arith(self.dtype, self.fmt)
        return ar.out(ar.cast(scale) * ar.cast(y))


def _rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_cos_sin(cfg: ModelConfig, positions_BxT: Array) -> tuple[Array, Array]:
    """cos/sin [B, T, D] in FP32 (the angles are always computed in FP32, as transformers does)."""
    inv_freq = jnp.asarray(cfg.inv_freq())
    angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxTxNxD: Array, cos_BxTxD: Array, sin_BxTxD: Array, f32: bool,
               fmt: FloatFormat | None = None) -> Array:
    """x * cos + rotate_half(x) * sin, in x's dtype (its format `fmt` when emulating) or FP32, cast back."""
    inp = arith(x_BxTxNxD.dtype, fmt)
    op = arith(inp.dtype, fmt, f32)
    x = op.cast(inp.use(x_BxTxNxD))
    cos, sin = op.cast(cos_BxTxD[:, :, None, :]), op.cast(sin_BxTxD[:, :, None, :])
    return inp.cast(op.out(op.out(op.use(x) * cos) + op.out(_rotate_half(op.use(x)) * sin)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def emulated_sigmoid(x: Array, fmt: FloatFormat) -> Array:
    """lax.logistic in `fmt` as XLA computes it in a real dtype: 1 / (1 + exp(-x)), each op rounded."""
    r = functools.partial(round_to_format, fmt=fmt)
    return r(1.0 / r(1.0 + r(jnp.exp(-x))))


def _sigmoid_fwd(x, fmt):
    ans = emulated_sigmoid(x, fmt)
    return ans, ans


def _sigmoid_bwd(fmt, ans, ct):  # JAX's logistic derivative, ct * (ans * (1 - ans)), each op rounded
    r = functools.partial(round_to_format, fmt=fmt)
    return (r(r(ct) * r(ans * r(1.0 - ans))),)


emulated_sigmoid.defvjp(_sigmoid_fwd, _sigmoid_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def fan_out(x: Array, n: int, fmt: FloatFormat) -> tuple[Array, ...]:
    """`n` uses of x whose cotangents are summed as JAX sums them (last use first), each partial sum rounded."""
    return (x,) * n


def _fan_out_fwd(x, n, fmt):
    return (x,) * n, None


def _fan_out_bwd(n, fmt, _, cts):
    total = cts[-1]
    for ct in reversed(cts[:-1]):
        total = round_to_format(total + ct, fmt)
    return (total,)


fan_out.defvjp(_fan_out_fwd, _fan_out_bwd)


class MLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)) (with emulation: sigmoid and each product rounded)."""

    cfg: ModelConfig
    dtype: Any
    fmt: FloatFormat | None = None  # emulated format
    f32_weights: bool = False  # see Dense

    @nn.compact
    def __call__(self, x):
        cfg, fmt = self.cfg, self.fmt
        dense = functools.partial(Dense, use_bias=cfg.mlp_bias, dtype=self.dtype, fmt=fmt,
                                  f32_weights=self.f32_weights)
        gate = dense(cfg.intermediate_size, name="gate_proj")(x)
        up = dense(cfg.intermediate_size, name="up_proj")(x)
        if fmt is None:
            act = nn.silu(gate) * up
        else:  # silu = gate * sigmoid(gate), each op rounded
            ar = arith(self.dtype, fmt)
            act = ar.out(ar.out(ar.use(gate) * emulated_sigmoid(ar.use(gate), fmt)) * up)
        return dense(cfg.hidden_size, name="down_proj")(act)
