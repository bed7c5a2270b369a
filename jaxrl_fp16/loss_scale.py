"""Loss scaling for FP16 training: no-op, static and dynamic scales, as immutable pytrees.

FP16's smallest subnormal is 6e-8, so small gradients underflow to zero in the backward pass. Multiplying the loss
by S before differentiating lifts them into range; the gradients are divided by S (in FP32) before the optimizer.
The dynamic scale follows PyTorch's GradScaler: it backs off on overflow and grows after a run of finite steps.

Every run-time value (the scale, the counter, and the constants period / factor / min / max) is a pytree leaf,
so a jitted step never recompiles when any of them changes, and all of them survive `jax.jit` unchanged.

`LossScaleSection` (the run config's `loss_scale`) builds the scale every trainer starts from (RL, SFT, DPO).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxrl_fp16.emulation import FloatFormat
from jaxrl_fp16.validation import ConfigError, check_fields, check_positive

__all__ = ["NoOpLossScale", "StaticLossScale", "DynamicLossScale", "LossScale", "all_finite", "select_tree",
           "LossScaleSection", "LOSS_SCALE_KINDS", "AUTO_SCALE_MAX_EXPONENT_BITS"]

_PY_NUMBERS = (bool, int, float, np.generic, np.ndarray)


def _as_leaf(value: Any, dtype: Any) -> Any:
    """Python/numpy numbers become arrays of `dtype`; anything else (tracers, arrays, placeholders) is kept."""
    if isinstance(value, _PY_NUMBERS):
        return jnp.asarray(value, dtype)
    return value


def _host_value(value: Any) -> float | None:
    """The value of a python/numpy scalar given to a constructor, or None if it is not one."""
    if isinstance(value, _PY_NUMBERS) and np.ndim(value) == 0:
        return float(value)
    return None


def _compute_dtype(x: jax.Array) -> Any:
    """Arithmetic dtype for scaling a floating leaf: at least float32."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _multiply(tree: Any, factor: jax.Array) -> Any:
    """Multiplies every floating leaf by `factor` in (at least) float32 and casts back to the leaf's dtype."""

    def mul(x):
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        dtype = _compute_dtype(x)
        return (x.astype(dtype) * jnp.asarray(factor).astype(dtype)).astype(x.dtype)

    return jax.tree_util.tree_map(mul, tree)


def all_finite(tree: Any) -> jax.Array:
    """A scalar bool array: True iff every floating leaf of `tree` is finite (True for a tree with none)."""
    leaves = [jnp.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
    flags = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not flags:
        return jnp.asarray(True)
    return jnp.all(jnp.stack(flags))


def select_tree(pred: jax.Array, a: Any, b: Any) -> Any:
    """Leaf-wise `lax.select(pred, a, b)` for a scalar bool `pred` and two trees of the same structure."""
    pred = jnp.asarray(pred)
    if pred.ndim != 0 or pred.dtype != jnp.bool_:
        raise ValueError(f"pred must be a scalar bool, got shape {pred.shape} dtype {pred.dtype}")
    struct_a, struct_b = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    if struct_a != struct_b:
        raise ValueError(f"select_tree needs trees of the same structure, got {struct_a} and {struct_b}")
    return jax.tree_util.tree_map(lambda x, y: jax.lax.select(pred, x, y), a, b)


@struct.dataclass
class NoOpLossScale:
    """No loss scaling: scale and unscale are the identity, the scale is 1."""

    @property
    def loss_scale(self) -> jax.Array:
        return jnp.ones((), jnp.float32)

    def scale(self, tree: Any) -> Any:
        return tree

    def unscale(self, tree: Any) -> Any:
        return tree

    def adjust(self, grads_finite: jax.Array) -> "NoOpLossScale":
        del grads_finite
        return self


@struct.dataclass
class StaticLossScale:
    """A fixed loss scale: scale multiplies by S, unscale by 1/S, adjust changes nothing."""

    loss_scale: jax.Array

    def __post_init__(self):
        value = _host_value(self.loss_scale)
        if value is not None and not (np.isfinite(value) and value > 0):
            raise ValueError(f"loss_scale must be finite and > 0, got {value}")
        object.__setattr__(self, "loss_scale", _as_leaf(self.loss_scale, jnp.float32))

    def scale(self, tree: Any) -> Any:
        return _multiply(tree, self.loss_scale)

    def unscale(self, tree: Any) -> Any:
        return _multiply(tree, 1.0 / jnp.asarray(self.loss_scale, jnp.float32))

    def adjust(self, grads_finite: jax.Array) -> "StaticLossScale":
        del grads_finite
        return self


@struct.dataclass
class DynamicLossScale:
    """A loss scale that backs off on overflow and grows after `period` finite steps (PyTorch GradScaler).

    adjust(grads_finite):
        if grads_finite:
            counter += 1
            if counter == period:
                loss_scale = min(max_loss_scale, loss_scale * factor)
                counter = 0
        else:
            loss_scale = max(min_loss_scale, loss_scale / factor)
            counter = 0

    The caller skips the parameter update when the gradients are not finite (see `select_tree`).
    """

    loss_scale: jax.Array
    _: dataclasses.KW_ONLY
    counter: jax.Array = 0
    period: jax.Array = 2000
    factor: jax.Array = 2
    min_loss_scale: jax.Array = 1.0
    max_loss_scale: jax.Array = 2**24

    def __post_init__(self):
        self._validate()
        for name, dtype in (("loss_scale", jnp.float32), ("counter", jnp.int32), ("period", jnp.int32),
                            ("factor", jnp.float32), ("min_loss_scale", jnp.float32),
                            ("max_loss_scale", jnp.float32)):
            object.__setattr__(self, name, _as_leaf(getattr(self, name), dtype))

    def _validate(self):
        """Checks the fields given as python/numpy numbers; arrays and tracers are taken as they are."""
        v = {f.name: _host_value(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for name in ("loss_scale", "min_loss_scale", "max_loss_scale"):
            if v[name] is not None and not (np.isfinite(v[name]) and v[name] > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v[name]}")
        if v["factor"] is not None and not (np.isfinite(v["factor"]) and v["factor"] > 1):
            raise ValueError(f"factor must be finite and > 1, got {v['factor']}")
        for name, low in (("period", 1), ("counter", 0)):
            if v[name] is not None and (v[name] != int(v[name]) or v[name] < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {v[name]}")
        low, scale, high = v["min_loss_scale"], v["loss_scale"], v["max_loss_scale"]
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_loss_scale ({low}) must be <= max_loss_scale ({high})")
        if scale is not None and low is not None and scale < low:
            raise ValueError(f"loss_scale ({scale}) must be >= min_loss_scale ({low})")
        if scale is not None and high is not None and scale > high:
            raise ValueError(f"loss_scale ({scale}) must be <= max_loss_scale ({high})")

    def scale(self, tree: Any) -> Any:
        return _multiply(tree, self.loss_scale)

    def unscale(self, tree: Any) -> Any:
        return _multiply(tree, 1.0 / jnp.asarray(self.loss_scale, jnp.float32))

    def adjust(self, grads_finite: jax.Array) -> "DynamicLossScale":
        """The next loss scale after a step whose gradients were finite (or not); see the class docstring."""
        grads_finite = jnp.asarray(grads_finite, jnp.bool_)
        counter = self.counter + 1
        grow = grads_finite & (counter >= self.period)
        grown = jnp.where(grow, jnp.minimum(self.max_loss_scale, self.loss_scale * self.factor), self.loss_scale)
        backed_off = jnp.maximum(self.min_loss_scale, self.loss_scale / self.factor)
        loss_scale = jnp.where(grads_finite, grown, backed_off)
        counter = jnp.where(grads_finite & ~grow, counter, jnp.zeros_like(counter))
        return dataclasses.replace(self, loss_scale=loss_scale, counter=counter)


LossScale = Union[NoOpLossScale, StaticLossScale, DynamicLossScale]


LOSS_SCALE_KINDS = ("auto", "dynamic", "static", "none")
# An emulated format with this many exponent bits or fewer underflows small gradients as FP16 (e5m10) does.
AUTO_SCALE_MAX_EXPONENT_BITS = 5
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossScaleSection:
    """`auto`: dynamic scaling when the compute dtype is float16 or `model.emulate` has at most 5 exponent bits
    (e5m10, e5m2, e4m3: gradients underflow as in FP16), none otherwise (PyTorch GradScaler's defaults but growth
    every 400 steps, as in the reference runs)."""

    kind: str = "auto"
    init_scale: float = 2.0 ** 16
    period: int = 400
    factor: float = 2.0
    min_scale: float = 1.0
    max_scale: float = 2.0 ** 24

    def __post_init__(self):
        check_fields(self, "loss_scale")
        if self.kind not in LOSS_SCALE_KINDS:
            raise ConfigError(f"loss_scale.kind={self.kind!r}; valid: {', '.join(LOSS_SCALE_KINDS)}")
        check_positive("loss_scale", init_scale=self.init_scale, period=self.period, min_scale=self.min_scale,
                       max_scale=self.max_scale)
        for name in ("init_scale", "min_scale", "max_scale", "factor"):
            if getattr(self, name) > _FLOAT32_MAX:  # the loss scale state is float32
                raise ConfigError(f"loss_scale.{name}={getattr(self, name)} overflows float32 (max "
                                  f"{_FLOAT32_MAX:.4g})")
        if self.period > _INT32_MAX:
            raise ConfigError(f"loss_scale.period={self.period} overflows int32 (max {_INT32_MAX})")
        if self.kind in ("auto", "dynamic"):  # auto is dynamic for float16 compute
            if not self.factor > 1:
                raise ConfigError(f"loss_scale.factor must be > 1 for a dynamic loss scale (loss_scale.kind="
                                  f"{self.kind}), got {self.factor}")
            if not self.min_scale <= self.init_scale <= self.max_scale:
                raise ConfigError(f"loss_scale: need min_scale <= init_scale <= max_scale for a dynamic loss scale "
                                  f"(loss_scale.kind={self.kind}), got loss_scale.min_scale={self.min_scale}, "
                                  f"loss_scale.init_scale={self.init_scale}, loss_scale.max_scale={self.max_scale}")

    def resolved_kind(self, compute_dtype: Any, float_format: FloatFormat | None = None) -> str:
        """`kind`, with `auto` resolved: dynamic when the emulated format `float_format` (if any) has at most
        `AUTO_SCALE_MAX_EXPONENT_BITS` exponent bits (e5m10, e5m2, e4m3), else when `compute_dtype` is float16;
        none otherwise."""
        if self.kind != "auto":
            return self.kind
        if float_format is not None:
            return "dynamic" if float_format.exponent_bits <= AUTO_SCALE_MAX_EXPONENT_BITS else "none"
        return "dynamic" if compute_dtype == np.float16 else "none"

    def build(self, compute_dtype: Any, float_format: FloatFormat | None = None) -> LossScale:
        """The initial loss scale of a step computing in `compute_dtype` (or in the emulated `float_format`)."""
        kind = self.resolved_kind(compute_dtype, float_format)
        if kind == "dynamic":
            return DynamicLossScale(loss_scale=self.init_scale, period=self.period, factor=self.factor,
                                    min_loss_scale=self.min_scale, max_loss_scale=self.max_scale)
        if kind == "static":
            return StaticLossScale(self.init_scale)
        return NoOpLossScale()
