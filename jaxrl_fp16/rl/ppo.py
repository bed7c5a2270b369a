"""PPO with a critic: a value model trained by the same jitted mixed-precision step as the policy.

The trainable parameters become one tree, `{"policy": <CausalLM params>, "critic": {"backbone", "value_head"}}`,
and the step differentiates one loss with one loss scale and one optimizer:

    loss = policy_loss(A_bt) + vf_coef * value_loss
    value_loss = agg(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)) / 2     c = value_clip
    V_t = w . h_{t-1} + b      h: the critic backbone's final-normed hidden state (the position that predicts
                               token t, the log-probs' convention), head in FP32; V_0 = 0

Per iteration: V_old <- critic on the rollout (the step's compute dtype), (A, R) <- GAE on the terminal rewards
(`advantages.gae_advantages`), A optionally whitened over the batch's response tokens; the policy loss is any
registered token-level loss (`grpo` is PPO-clip) with per-token advantages.

The critic is a separate backbone initialised from the base policy, with a zero value head (V = 0 at the start).
A head on the policy's own hidden states would save a forward pass, but value-loss gradients would then move
the policy whose token probabilities the sampler must reproduce (the quantity this project measures), and the
policy's parameters would no longer be a plain Hugging Face tree that the sampler and the export take as is.
Each group (policy, critic) has its gradient norm clipped on its own, so a large value loss never shrinks the
policy's step; the critic may take a larger learning rate (`lr_scale`). With AdamW (invariant to a gradient's
scale) `vf_coef` then acts mainly through the critic's clipping threshold.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl_fp16 import multiprocess
from jaxrl_fp16.models.decoder import CausalLM, valid_inputs
from jaxrl_fp16.precision import Policy
from jaxrl_fp16.rl.advantages import gae_advantages, masked_whiten
from jaxrl_fp16.rl.losses import AGGREGATIONS
from jaxrl_fp16.scoring import device_inputs, filled_batches

__all__ = ["CriticConfig", "GROUPS", "ValueScorer", "clip_by_group_norm", "critic_values", "explained_variance",
           "init_params", "iteration_targets", "make_optimizer", "policy_params", "rollout_targets", "scale_group",
           "value_loss", "value_loss_term"]

Array = jax.Array
GROUPS = ("policy", "critic")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CriticConfig:
    """The `critic:` section of a run: PPO's value model and GAE (off unless `enabled`)."""

    enabled: bool = False
    vf_coef: float = 0.5  # weight of the value loss in the one loss
    value_clip: float | None = 0.2  # c of the clipped value loss; None: unclipped
    gamma: float = 1.0
    lam: float = 0.95
    lr_scale: float = 1.0  # the critic's learning rate is optim.lr times this
    whiten_advantages: bool = True  # (A - mean) / std over the batch's response tokens

    def __post_init__(self):
        # Every float is a finite number (an unclipped value loss is value_clip=None, not inf).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", "float | None") and value is not None and (
                    isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise ValueError(f"critic.{f.name} must be a finite number, got {value!r}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"critic.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("vf_coef", "lr_scale"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"critic.{name} must be > 0, got {getattr(self, name)}")
        if self.value_clip is not None and not self.value_clip > 0.0:
            raise ValueError(f"critic.value_clip must be > 0 or null (unclipped), got {self.value_clip}")


# --- parameters ----------------------------------------------------------------------------------------------

def init_params(policy: Any) -> dict[str, Any]:
    """The trainable tree of a PPO run: the policy, and a critic backbone copied from it with a zero value head.

    The copy holds its own buffers (no aliasing with the policy) and leaves out an untied LM head, which the
    critic never reads.
    """
    backbone = {k: jax.tree_util.tree_map(jnp.array, v) for k, v in policy.items() if k != "lm_head"}
    hidden = policy["final_norm"]["scale"].shape[-1]
    head = {"kernel": jnp.zeros((hidden,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}
    return {"policy": policy, "critic": {"backbone": backbone, "value_head": head}}


def policy_params(params: Any) -> Any:
    """The policy's own (Hugging Face-shaped) parameters of a PPO tree."""
    return params["policy"]


def _check_groups(tree: Any) -> None:
    if not isinstance(tree, dict) or set(tree) != set(GROUPS):
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"PPO parameters must have the top-level keys {GROUPS}, got {keys}")


def clip_by_group_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm applied to each group of the PPO tree on its own (stateless)."""

    def update_fn(updates, state, params=None):
        del params
        _check_groups(updates)
        out = {}
        for group in GROUPS:
            norm = optax.tree.norm(updates[group])
            out[group] = jax.tree_util.tree_map(
                lambda u, n=norm: jax.lax.select(n < max_norm, u, (u / n.astype(u.dtype)) * max_norm), updates[group])
        return out, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def scale_group(group: str, factor: float) -> optax.GradientTransformation:
    """Multiplies the updates of one group of the PPO tree by `factor` (stateless)."""

    def update_fn(updates, state, params=None):
        del params
        _check_groups(updates)
        return {**updates, group: jax.tree_util.tree_map(lambda u: u * factor, updates[group])}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(inner: optax.GradientTransformation, critic: CriticConfig,
                   max_grad_norm: float | None) -> optax.GradientTransformation:
    """One optax transformation for the PPO tree: clip each group's gradient norm on its own, apply `inner`
    (element-wise, e.g. AdamW, so one state over both groups equals one per group), and scale the critic's
    updates by `lr_scale` (for AdamW exactly a learning rate `lr_scale` times larger).

    The step's own clipping must be off (`max_grad_norm=None`): it would clip the two groups together.
    """
    parts = [clip_by_group_norm(max_grad_norm)] if max_grad_norm is not None else []
    parts.append(inner)
    if critic.lr_scale != 1.0:
        parts.append(scale_group("critic", critic.lr_scale))
    return optax.chain(*parts)


# --- the value model -----------------------------------------------------------------------------------------

def critic_values(model: CausalLM, critic: Any, tokens_BxT: Array, attention_mask_BxT: Array) -> Array:
    """V [B, T] in FP32: entry t is the value of the state tokens[:, :t] (entry 0 is 0), the log-probs' layout.

    The backbone runs in `model`'s compute dtype, with the attention the policy's log-probs use (the key validity
    [B, T]: the model builds the causal mask itself, per block for blockwise attention, never a [B, T, T] array
    for long sequences); the scalar head reads its final-normed hidden state in FP32.
    """
    positions_BxT, valid_BxT = valid_inputs(tokens_BxT, None, attention_mask_BxT)
    h_BxTxH, _, _ = model.apply({"params": critic["backbone"]}, tokens_BxT, positions_BxT, valid_BxT,
                                return_logits=False)
    head = critic["value_head"]
    v_BxT = jnp.dot(h_BxTxH.astype(jnp.float32), head["kernel"].astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)  # FP32, not TF32 on GPUs
    v_BxT = v_BxT + head["bias"].astype(jnp.float32)
    return jnp.pad(v_BxT[:, :-1], ((0, 0), (1, 0)))  # position t-1 is the state before token t


def value_loss(values_BxT: Array, old_values_BxT: Array, returns_BxT: Array, mask_BxT: Array, *,
               value_clip: float | None, aggregation: str = "token-mean",
               max_response_len: int | None = None) -> tuple[Array, dict[str, Array]]:
    """PPO's clipped value loss agg(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)) / 2, in FP32.

    Only `values_BxT` is differentiated; entries off the mask may hold anything. Diagnostics: `value_loss`,
    `value_clip_frac` (the fraction of response tokens where the clipped term is the larger one).
    """
    mask_BxT = jnp.asarray(mask_BxT).astype(bool)

    def f32(x):
        return jnp.where(mask_BxT, jnp.asarray(x, jnp.float32), 0.0)

    v_BxT = f32(values_BxT)
    old_BxT, ret_BxT = jax.lax.stop_gradient(f32(old_values_BxT)), jax.lax.stop_gradient(f32(returns_BxT))
    err_BxT = jnp.square(v_BxT - ret_BxT)
    if value_clip is None:
        terms_BxT, clipped_BxT = err_BxT, jnp.zeros_like(mask_BxT)
    else:
        v_clipped_BxT = jnp.clip(v_BxT, old_BxT - value_clip, old_BxT + value_clip)
        err_clipped_BxT = jnp.square(v_clipped_BxT - ret_BxT)
        terms_BxT, clipped_BxT = jnp.maximum(err_BxT, err_clipped_BxT), err_clipped_BxT > err_BxT
    terms_BxT = jnp.where(mask_BxT, terms_BxT, 0.0)
    loss = 0.5 * AGGREGATIONS[aggregation](terms_BxT, mask_BxT, max_response_len)
    count = jnp.maximum(jnp.sum(mask_BxT).astype(jnp.float32), 1.0)
    diag = {"value_loss": loss, "value_clip_frac": jnp.sum(clipped_BxT & mask_BxT) / count}
    return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, diag)


def value_loss_term(model: CausalLM, critic: Any, batch: dict[str, Array], config: CriticConfig,
                    aggregation: str, max_response_len: int | None) -> tuple[Array, dict[str, Array]]:
    """vf_coef * value_loss of a mini-batch (keys `tokens`, `attention_mask`, `response_mask`, `old_values`,
    `returns`) and its diagnostics under `critic/` names, for the trainer's loss function."""
    values_BxT = critic_values(model, critic, batch["tokens"], batch["attention_mask"])
    loss, diag = value_loss(values_BxT, batch["old_values"], batch["returns"], batch["response_mask"],
                            value_clip=config.value_clip, aggregation=aggregation,
                            max_response_len=max_response_len)
    return config.vf_coef * loss, {f"critic/{k}": v for k, v in diag.items()}


def explained_variance(values_BxT: Array, returns_BxT: Array, mask_BxT: Array) -> Array:
    """1 - Var(R - V) / Var(R) over the response tokens (population variances); 0 when Var(R) is 0."""
    mask_BxT = jnp.asarray(mask_BxT).astype(bool)
    count = jnp.maximum(jnp.sum(mask_BxT).astype(jnp.float32), 1.0)

    def var(x):
        x = jnp.where(mask_BxT, jnp.asarray(x, jnp.float32), 0.0)
        mean = jnp.sum(x) / count
        return jnp.sum(jnp.where(mask_BxT, jnp.square(x - mean), 0.0)) / count

    var_r = var(returns_BxT)
    residual = jnp.where(mask_BxT, jnp.asarray(returns_BxT, jnp.float32) - jnp.asarray(values_BxT, jnp.float32),
                         0.0)
    return jnp.where(var_r > 0, 1.0 - var(residual) / jnp.where(var_r > 0, var_r, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("config",))
def iteration_targets(rewards_N: Array, old_values_NxT: Array, response_mask_NxT: Array,
                      config: CriticConfig) -> tuple[Array, Array, dict[str, Array]]:
    """Per-token advantages (GAE, whitened if configured) and returns of one iteration's rollout, and the
    critic's metrics: `critic/value_mean`, `critic/return_mean`, `critic/explained_variance`."""
    mask_NxT = jnp.asarray(response_mask_NxT).astype(bool)
    adv_NxT, ret_NxT = gae_advantages(rewards_N, old_values_NxT, mask_NxT, gamma=config.gamma, lam=config.lam)
    if config.whiten_advantages:
        adv_NxT = masked_whiten(adv_NxT, mask_NxT)
    count = jnp.maximum(jnp.sum(mask_NxT).astype(jnp.float32), 1.0)
    old_NxT = jnp.where(mask_NxT, jnp.asarray(old_values_NxT, jnp.float32), 0.0)
    metrics = {"critic/value_mean": jnp.sum(old_NxT) / count, "critic/return_mean": jnp.sum(ret_NxT) / count,
               "critic/explained_variance": explained_variance(old_NxT, ret_NxT, mask_NxT)}
    return adv_NxT, ret_NxT, metrics


@functools.partial(jax.jit, static_argnames=("model", "policy"))
def _values(model: CausalLM, policy: Policy, critic: Any, tokens_BxT: Array, mask_BxT: Array) -> Array:
    return critic_values(model, policy.cast_to_compute(critic), tokens_BxT, mask_BxT)


def fixed_rows(batch_size: int) -> Callable[[int, int], int]:
    """A `ValueScorer` row rule: `batch_size` rows per batch, fewer for a smaller rollout."""
    return lambda width, num_rows: max(1, min(batch_size, num_rows))


class ValueScorer:
    """V_old of a rollout: the critic's values with the same cast and forward as in the step, in batches of
    `rows(width, num_rows)` rows. The trainer passes the policy scorer's rule (`Scorer.rows` under the run's
    `train.score_memory_gib`): the critic's forward holds the policy's activations less the logits chunk, so the
    policy's row count fits the same budget."""

    def __init__(self, model: CausalLM, policy: Policy, rows: Callable[[int, int], int] = fixed_rows(64)):
        self.model, self.policy, self.rows = model, policy, rows

    def __call__(self, critic: Any, tokens: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """[N, T] float32 values of `critic` (FP32 master parameters)."""
        N, T = np.shape(tokens)
        bs = self.rows(T, N)
        if bs < 1:
            raise ValueError(f"ValueScorer: the row rule gave {bs} rows for {N} rows of width {T}")
        out = []
        for n, tok, mask in filled_batches(tokens, attention_mask, bs, T):
            tok, mask = device_inputs(critic, tok, mask)  # global arrays when the critic spans processes
            out.append(multiprocess.to_host(_values(self.model, self.policy, critic, tok, mask))[:n])
        return np.concatenate(out).astype(np.float32)


def rollout_targets(scorer: ValueScorer, critic: Any, rewards_N: np.ndarray, tokens: np.ndarray,
                    attention_mask: np.ndarray, response_mask: np.ndarray,
                    config: CriticConfig) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
    """One iteration's PPO inputs: per-token advantages [N, T], the extra batch entries of the value loss
    (`old_values`, `returns`), and the critic's metrics (host arrays and floats)."""
    mask = np.asarray(response_mask) > 0
    old_values = np.where(mask, scorer(critic, tokens, attention_mask), 0.0).astype(np.float32)
    adv, returns, metrics = iteration_targets(jnp.asarray(rewards_N, jnp.float32), old_values, mask, config)
    extra = {"old_values": old_values, "returns": np.asarray(returns, np.float32)}
    return np.asarray(adv, np.float32), extra, {k: float(v) for k, v in metrics.items()}
