"""The one mixed-precision update step: every trainer in this project changes parameters through it.

    step(state, batch, frozen=None):
        for each micro-batch m (lax.scan):
            loss_m, aux_m, g_m = value_and_grad(S * loss_fn(cast_to_compute(params_f32), batch_m[, frozen]))
        g = unscale(mean_m g_m)                      # FP32, divided by S
        finite = all_finite(g); g = finite ? g : 0   # no NaN reaches the optimizer (lax.cond)
        norm = global_norm(g); g = clip(g, max_grad_norm)
        params', opt_state' = optimizer(g, opt_state, params)
        applied = finite and params', opt_state' all finite   # e.g. lr=inf: finite gradients, non-finite update
        keep params and opt_state unchanged unless applied; skipped += not applied; S = S.adjust(finite)

Gradients are taken with respect to the FP32 master parameters: the cast to the compute dtype happens inside
the differentiated function, so its transpose brings the FP16 cotangents back to FP32.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxrl_fp16.loss_scale import LossScale, all_finite, select_tree
from jaxrl_fp16.precision import Policy, get_policy

__all__ = ["TrainState", "make_train_step"]

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
_STEP_METRICS = ("loss", "grad_norm", "loss_scale", "skipped", "grads_finite", "update_finite")


@struct.dataclass
class TrainState:
    """Everything the update step reads and writes: FP32 params, optimizer state, loss scale, counters."""

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    loss_scale: LossScale
    skipped_steps: jax.Array

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation, loss_scale: LossScale) -> "TrainState":
        """A fresh state at step 0 with `optimizer.init(params)`."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                   loss_scale=loss_scale, skipped_steps=jnp.zeros((), jnp.int32))


def _clip_by_global_norm(grads: Any, norm: jax.Array, max_norm: float) -> Any:
    """optax.clip_by_global_norm's formula, reusing the already computed norm."""
    return jax.tree_util.tree_map(
        lambda g: jax.lax.select(norm < max_norm, g, (g / norm.astype(g.dtype)) * max_norm), grads)


def _zeros_like(tree: Any) -> Any:
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


def _check_param_dtypes(params: Any, policy: Policy) -> None:
    """Raises if a floating parameter is not in the policy's parameter dtype (e.g. a BF16 checkpoint)."""
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != policy.param_dtype:
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} has dtype {x.dtype}, but policy {policy} "
                             f"keeps parameters in {policy.param_dtype}; cast them with policy.cast_to_param")


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, policy: Policy | str, *,
                    max_grad_norm: float | None = 1.0, num_microbatches: int = 1,
                    donate: bool = False, state_sharding: Any = None, batch_sharding: Any = None
                    ) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the jitted update step `step_fn(state, batch, frozen=None) -> (new_state, metrics)`.

    Args:
      loss_fn: `loss_fn(compute_params, batch) -> (loss, aux)`; `compute_params` are already cast to the
        policy's compute dtype; `loss` is a scalar (computed in FP32 by convention), `aux` a dict of arrays.
        When the step is called with `frozen`, it is `loss_fn(compute_params, batch, frozen)`: `frozen` (e.g.
        a frozen base model under adapters) is cast to the compute dtype, passed whole to every micro-batch
        and never differentiated; it is an argument of the jitted step, not a constant baked into it.
      optimizer: an optax transformation, applied to the unscaled, clipped FP32 gradients.
      policy: a `Policy` or a policy string ("fp16-mixed", "p=f32,c=f16,o=f32", ...).
      max_grad_norm: clip the global gradient norm to this (optax.clip_by_global_norm); None disables.
      num_microbatches: split every batch leaf's leading axis into this many micro-batches and average the
        losses, gradients and aux values over them (gradient accumulation with `lax.scan`).
      donate: donate the input state's buffers (params, optimizer and loss-scale state, counters) to the output
        state, so they do not exist twice during an update; the state passed in is deleted by the call and must
        not be used again (keep the returned one). `batch` and `frozen` are never donated.
      state_sharding: shardings of the state (a `TrainState` of shardings, e.g. `sharding.state_shardings`):
        the step takes and returns the state sharded so. None: as the arguments come (one device).
      batch_sharding: shardings of the batch (a sharding or a tree of them, e.g. `sharding.batch_sharding`).
        Both only set `jax.jit`'s in/out shardings; the computation is the same on one device or many.

    Returns:
      The jitted step. Metrics are scalars: `loss` (unscaled), `grad_norm` (unscaled, before clipping; 0 on a
      skipped step), `loss_scale` (the scale used by this step), `skipped`, `grads_finite` and `update_finite` (int32 0/1),
      and the averaged `aux` entries (float32).
    """
    policy = get_policy(policy)
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")

    def scaled_grads(params, loss_scale, batch, frozen=None):
        """(loss, aux, scaled gradients) of one micro-batch; gradients w.r.t. the FP32 params."""
        extra = () if frozen is None else (policy.cast_to_compute(frozen),)

        def scaled_loss(p):
            loss, aux = loss_fn(policy.cast_to_compute(p), batch, *extra)
            loss = jnp.asarray(loss).astype(jnp.float32)
            aux = jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(jnp.float32), dict(aux))
            return loss_scale.scale(loss), (loss, aux)

        (_, (loss, aux)), grads = jax.value_and_grad(scaled_loss, has_aux=True)(params)
        return loss, aux, grads

    def accumulated_grads(params, loss_scale, batch, frozen=None):
        """Mean (loss, aux, scaled gradients) over `num_microbatches` micro-batches."""
        if num_microbatches == 1:
            return scaled_grads(params, loss_scale, batch, frozen)
        m = num_microbatches

        def split(x):
            if x.ndim == 0 or x.shape[0] % m:
                raise ValueError(f"batch leaf of shape {x.shape}: leading axis not divisible by "
                                 f"num_microbatches={m}")
            return x.reshape((m, x.shape[0] // m) + x.shape[1:])

        micro = jax.tree_util.tree_map(lambda x: split(jnp.asarray(x)), batch)

        def body(total, microbatch):
            grads_m = scaled_grads(params, loss_scale, microbatch, frozen)
            return jax.tree_util.tree_map(jnp.add, total, grads_m), None

        shapes = jax.eval_shape(scaled_grads, params, loss_scale, jax.tree_util.tree_map(lambda x: x[0], micro),
                                frozen)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(body, zeros, micro)
        return jax.tree_util.tree_map(lambda x: x / m, total)

    def train_step(state: TrainState, batch: Any, frozen: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
        _check_param_dtypes(state.params, policy)
        loss, aux, grads = accumulated_grads(state.params, state.loss_scale, batch, frozen)
        clash = set(aux) & set(_STEP_METRICS)
        if clash:
            raise ValueError(f"loss_fn aux keys {sorted(clash)} clash with the step's metrics")
        grads = state.loss_scale.unscale(grads)
        grads_finite = all_finite(grads)
        # A cond, not a select: a select fused into the optimizer's kernels changes where XLA contracts
        # multiply-adds into FMAs, and the FP32 step would no longer equal plain optax bit for bit.
        grads = jax.lax.cond(grads_finite, lambda g: g, _zeros_like, grads)
        grad_norm = optax.tree.norm(grads)
        if max_grad_norm is not None:
            grads = _clip_by_global_norm(grads, grad_norm, max_grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Finite gradients can still make a non-finite update (an infinite learning rate, an overflowing
        # moment): such a step is skipped too, so the state never holds a non-finite value. The loss scale
        # reacts to the gradients only (a smaller scale cannot fix the update).
        update_finite = all_finite((params, opt_state))
        applied = grads_finite & update_finite
        new_state = state.replace(
            step=state.step + 1,
            params=select_tree(applied, params, state.params),
            opt_state=select_tree(applied, opt_state, state.opt_state),
            loss_scale=state.loss_scale.adjust(grads_finite),
            skipped_steps=state.skipped_steps + (~applied).astype(jnp.int32),
        )
        metrics = {
            **aux,
            "loss": loss,
            "grad_norm": grad_norm.astype(jnp.float32),
            "loss_scale": jnp.asarray(state.loss_scale.loss_scale, jnp.float32),
            "skipped": (~applied).astype(jnp.int32),
            "grads_finite": grads_finite.astype(jnp.int32),
            "update_finite": update_finite.astype(jnp.int32),
        }
        return new_state, metrics

    donate_argnums = (0,) if donate else ()  # the state only
    if state_sharding is None and batch_sharding is None:
        return jax.jit(train_step, donate_argnums=donate_argnums)
    sharded = jax.jit(train_step, donate_argnums=donate_argnums,
                      in_shardings=(state_sharding, batch_sharding, None), out_shardings=(state_sharding, None))

    def sharded_step(state: TrainState, batch: Any, frozen: Any = None):
        return sharded(state, batch, frozen)  # in_shardings name every positional argument: pass all three

    return sharded_step
