"""Direct preference optimisation losses: pure FP32 functions of per-pair sequence log-probs (jit-able).

Per preference pair b (prompt x, chosen response y_w, rejected response y_l):

    pc, pr     log pi_theta(y_w | x), log pi_theta(y_l | x)   summed over response tokens; the differentiable inputs
    rc, rr     log pi_ref(y_w | x),   log pi_ref(y_l | x)     the frozen reference (the starting weights); constants
    h          (pc - rc) - (pr - rr)                           the DPO logit (log-ratio difference)
    r_w, r_l   beta (pc - rc), beta (pr - rr)                   implicit rewards

    sigmoid (DPO; cDPO with label smoothing eps):
        l_b = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        dl_b/dpc = -dl_b/dpr = beta (eps sigmoid(beta h) - (1 - eps) sigmoid(-beta h))
    ipo:
        l_b = (h - 1 / (2 beta))^2
        dl_b/dpc = -dl_b/dpr = 2 (h - 1 / (2 beta))

    loss = mean_b l_b

`log sigmoid` is evaluated as `-softplus(-x)` (no overflow for large |beta h|). The IPO form here takes the
summed log-ratios as given; TRL's `ipo` divides them by the response length first (pass per-token means to
get that). Diagnostics (float32 scalars, no gradient): `accuracy` = mean_b of 1[r_w > r_l] with ties counted as
1/2 (at the start, when the policy is the reference, every pair is a tie and the accuracy is 0.5),
`margin` = mean(r_w - r_l), `chosen_reward` = mean(r_w), `rejected_reward` = mean(r_l), `logits` = mean(h),
`policy_accuracy` = mean_b of 1[pc > pr] (does the policy itself prefer the chosen response).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxrl_fp16.validation import ConfigError, check_fields, check_positive

__all__ = ["DPO_DIAG_NAMES", "DPO_LOSSES", "DPOLossConfig", "DPOSection", "dpo_loss", "dpo_loss_from_tokens",
           "sequence_logps"]

Array = jax.Array

DPO_DIAG_NAMES: tuple[str, ...] = ("accuracy", "margin", "chosen_reward", "rejected_reward", "logits",
                                   "policy_accuracy")


def _sigmoid_terms(beta: float, label_smoothing: float, h_B: Array) -> Array:
    """-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    z_B = beta * h_B
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z_B) - label_smoothing * jax.nn.log_sigmoid(-z_B)


def _ipo_terms(beta: float, label_smoothing: float, h_B: Array) -> Array:
    """(h - 1 / (2 beta))^2."""
    del label_smoothing
    return jnp.square(h_B - 1.0 / (2.0 * beta))


DPO_LOSSES: dict[str, Callable[[float, float, Array], Array]] = {
    "sigmoid": _sigmoid_terms,
    "ipo": _ipo_terms,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOLossConfig:
    """Which preference loss and its constants (hashable: usable as a static argument of `jax.jit`)."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO: the assumed probability that a label is flipped

    def __post_init__(self):
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(f"loss_type={self.loss_type!r} is unknown; valid: {', '.join(DPO_LOSSES)}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing applies to loss_type 'sigmoid' only, not to 'ipo'")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOSection:
    """Offline preference optimisation (`jaxrl-fp16 dpo`) on pairs made from the task's problems (the correct
    answer against a near miss); the frozen reference is the base model. `precision`, `optim`, `loss_scale` and
    `checkpoint` (its `every` counts optimizer steps) are shared with RL training."""

    loss_type: str = "sigmoid"  # sigmoid (DPO, cDPO with label_smoothing) or ipo
    beta: float = 0.1
    label_smoothing: float = 0.0
    num_pairs: int = 2048  # training pairs; the data cycles through per-epoch permutations
    eval_pairs: int = 256  # held-out pairs (prompts never trained on)
    steps: int = 200  # optimizer steps
    batch_size: int = 32  # pairs per optimizer step
    microbatches: int = 1  # gradient accumulation inside each step
    eval_every: int = 20  # steps between held-out evaluations (also at the start and the end)
    seed: int = 0  # pair generation and data order

    def __post_init__(self):
        check_fields(self, "dpo")
        check_positive("dpo", num_pairs=self.num_pairs, eval_pairs=self.eval_pairs, steps=self.steps,
                       batch_size=self.batch_size, microbatches=self.microbatches, eval_every=self.eval_every)
        if self.batch_size % self.microbatches:
            raise ConfigError(f"dpo.batch_size={self.batch_size} does not split into "
                              f"dpo.microbatches={self.microbatches}")
        try:
            self.loss_config()
        except ValueError as e:
            raise ConfigError(f"dpo.{e}") from None

    def loss_config(self) -> DPOLossConfig:
        """The `DPOLossConfig` of this section."""
        return DPOLossConfig(loss_type=self.loss_type, beta=self.beta, label_smoothing=self.label_smoothing)


def sequence_logps(logp_BxT: Array, mask_BxT: Array) -> Array:
    """Sum over the masked (response) positions of per-token log-probs, in FP32: [B, T] -> [B]."""
    if jnp.shape(logp_BxT) != jnp.shape(mask_BxT) or len(jnp.shape(mask_BxT)) != 2:
        raise ValueError(f"logp and mask must share one [B, T] shape, got {jnp.shape(logp_BxT)} and "
                         f"{jnp.shape(mask_BxT)}")
    mask_BxT = jnp.asarray(mask_BxT).astype(bool)
    return jnp.sum(jnp.where(mask_BxT, jnp.asarray(logp_BxT, jnp.float32), 0.0), axis=-1)


def _tie_half(x_B: Array, y_B: Array) -> Array:
    """mean of 1[x > y] + 1/2 1[x == y]."""
    return jnp.mean((x_B > y_B).astype(jnp.float32) + 0.5 * (x_B == y_B).astype(jnp.float32))


def dpo_loss(config: DPOLossConfig, chosen_logp_B: Array, rejected_logp_B: Array, ref_chosen_logp_B: Array,
             ref_rejected_logp_B: Array) -> tuple[Array, dict[str, Array]]:
    """The preference loss of `config.loss_type` from per-pair sequence log-probs (see the module docstring).

    Args:
      config: a `DPOLossConfig`.
      chosen_logp_B, rejected_logp_B: the policy's summed response log-probs [B]; differentiated.
      ref_chosen_logp_B, ref_rejected_logp_B: the frozen reference's [B]; treated as constants.

    Returns:
      `(loss, diagnostics)`: a float32 scalar to minimise and float32 scalars keyed by `DPO_DIAG_NAMES`.
    """
    shapes = {jnp.shape(x) for x in (chosen_logp_B, rejected_logp_B, ref_chosen_logp_B, ref_rejected_logp_B)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four log-prob inputs must share one [B] shape, got {sorted(shapes)}")
    const = jax.lax.stop_gradient
    pc_B = jnp.asarray(chosen_logp_B, jnp.float32)
    pr_B = jnp.asarray(rejected_logp_B, jnp.float32)
    rc_B = const(jnp.asarray(ref_chosen_logp_B, jnp.float32))
    rr_B = const(jnp.asarray(ref_rejected_logp_B, jnp.float32))
    chosen_ratio_B, rejected_ratio_B = pc_B - rc_B, pr_B - rr_B
    h_B = chosen_ratio_B - rejected_ratio_B
    loss = jnp.mean(DPO_LOSSES[config.loss_type](config.beta, config.label_smoothing, h_B))
    chosen_reward_B = config.beta * chosen_ratio_B
    rejected_reward_B = config.beta * rejected_ratio_B
    diag = {
        "accuracy": _tie_half(chosen_reward_B, rejected_reward_B),
        "margin": jnp.mean(chosen_reward_B - rejected_reward_B),
        "chosen_reward": jnp.mean(chosen_reward_B),
        "rejected_reward": jnp.mean(rejected_reward_B),
        "logits": jnp.mean(h_B),
        "policy_accuracy": _tie_half(pc_B, pr_B),
    }
    return loss, {k: jnp.asarray(const(v), jnp.float32) for k, v in diag.items()}


def dpo_loss_from_tokens(config: DPOLossConfig, chosen_logp_BxT: Array, rejected_logp_BxT: Array,
                         ref_chosen_logp_BxT: Array, ref_rejected_logp_BxT: Array, chosen_mask_BxT: Array,
                         rejected_mask_BxT: Array) -> tuple[Array, dict[str, Array]]:
    """`dpo_loss` from per-token log-probs [B, T] and response masks, summed over the masked tokens in FP32."""
    return dpo_loss(config, sequence_logps(chosen_logp_BxT, chosen_mask_BxT),
                    sequence_logps(rejected_logp_BxT, rejected_mask_BxT),
                    sequence_logps(ref_chosen_logp_BxT, chosen_mask_BxT),
                    sequence_logps(ref_rejected_logp_BxT, rejected_mask_BxT))
