"""Policy-gradient losses under a sampler/trainer mismatch: one pure FP32 function per algorithm (jit-able).

Per response token t of sequence b (where `mask_BxT` is set):

    logp_t   log pi_theta(y_t)    current policy; the only differentiable input
    old_t    log pi_theta'(y_t)   trainer's recomputation with the weights that sampled (constant)
    mu_t     log mu(y_t)          sampler's log-prob (constant)
    A        advantage: one per sequence (`advantages_B`), or one per token (`advantages_BxT`, A_bt, e.g. GAE)
    C = is_cap;  sg = stop_gradient;  n_b = number of response tokens
    clamp(x) = clip(x, -log_ratio_clamp, log_ratio_clamp), applied to every log-ratio before exp
    r_t      = exp(clamp(logp_t - old_t))                                  pi_theta / pi_theta'
    ppo(x)   = min(x A, clip(x, 1 - lo, 1 + hi) A)

Per-token objective terms j_t of each algorithm (registry name: term):

    pg              A logp_t                                           vanilla policy gradient, no IS
    grpo            ppo(r_t), (lo, hi) = (eps_low, eps_high)           PPO-clip, token level
    grpo_token_tis  ppo(r_t) sg(min(exp(clamp(old_t - mu_t)), C))
    grpo_seq_tis    ppo(r_t) sg(min(rho, C))                           rho = exp(clamp(sum_t (old_t - mu_t)))
    grpo_seq_mis    ppo(r_t) sg(rho 1{rho <= C})                       sequences with rho > C contribute 0
    pg_seq_is       sg(w) A logp_t                                     w = exp(clamp(sum_t (logp_t - mu_t)))
    pg_seq_tis      sg(min(w, C)) A logp_t
    pg_seq_mis      sg(w 1{w <= C}) A logp_t
    gspo            ppo(s), (lo, hi) = (gspo_eps_low, gspo_eps_high)   s = exp(clamp(mean_t (logp_t - old_t)))

GSPO is implemented in its sequence form: every response token of sequence b carries the sequence objective J_b =
ppo(s_b), so `seq-mean-token-mean` gives the GSPO objective mean_b J_b. With A per sequence this has the value and
the gradient of GSPO-token (s_t = sg(s) pi_theta(y_t) / sg(pi_theta(y_t))) under every aggregation. GSPO
takes sequence advantages only; every other algorithm also takes per-token advantages (A becomes A_bt).

The loss is the negative objective, plus an optional KL penalty to a reference policy (k3 per token):

    loss = -agg(j) + kl_coef * agg(k3),   k3_t = exp(d_t) - d_t - 1,  d_t = clamp(ref_t - logp_t)

Aggregations agg(x) (sequences without a response token are left out everywhere):

    token-mean               sum_{b,t} x_bt / N                  N = number of response tokens
    seq-mean-token-mean      mean_b (sum_t x_bt / n_b)
    seq-mean-token-sum-norm  mean_b (sum_t x_bt / L)             L = config.max_response_len, a constant

Diagnostics (float32 scalars; token statistics pool the response tokens, sequence statistics the non-empty
sequences):

    policy_loss     -agg(j), the loss without the KL penalty
    clip_frac       fraction where the clipped PPO branch is taken (clip(x) A < x A): tokens for the grpo family,
                    sequences for gspo; 0 for the pg family
    is_weight_mean  mean / max of the IS weights actually applied (after truncation or masking, so masked
    is_weight_max   sequences count as 0): tokens for grpo_token_tis, sequences for the seq variants; 1 otherwise
    masked_frac     fraction of sequences whose weight exceeds C and is masked (the *_mis variants); 0 otherwise
    ratio_mean      mean_t r_t
    kl_ref          agg(k3), only when kl_coef > 0

Conventions:
  * Inputs are cast to float32 first. Masked-out positions may hold anything (NaN, inf): they are replaced with
    `jnp.where` before any arithmetic, so neither the loss nor its gradient sees them. So is the advantage of a
    sequence without a response token.
  * No response token at all: the loss and its gradient are 0; fractions are 0, weights and ratios 1.
  * `old_logp_BxT`, `sampler_logp_BxT` and `ref_logp_BxT` are constants: gradients are not taken through them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["AGGREGATIONS", "DIAG_NAMES", "LOSSES", "LossConfig", "LossInputs", "compute_loss", "gspo_loss",
           "grpo_loss", "grpo_seq_mis_loss", "grpo_seq_tis_loss", "grpo_token_tis_loss", "pg_loss",
           "pg_seq_is_loss", "pg_seq_mis_loss", "pg_seq_tis_loss"]

Array = jax.Array

DIAG_NAMES: tuple[str, ...] = ("policy_loss", "clip_frac", "is_weight_mean", "is_weight_max", "masked_frac",
                               "ratio_mean")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class LossInputs:
    """The batch a loss reads: [B, T] per-token log-probs of the sampled tokens, advantages, [B, T] mask.

    Exactly one of `advantages_B` (one per sequence, as GRPO's) and `advantages_BxT` (one per token, as PPO's
    GAE) is given.
    """

    logp_BxT: Array  # log pi_theta, differentiable
    old_logp_BxT: Array  # log pi_theta', the trainer's recomputation before the update
    sampler_logp_BxT: Array  # log mu, as the sampler reported it
    mask_BxT: Array  # nonzero on response tokens
    advantages_B: Array | None = None
    advantages_BxT: Array | None = None
    ref_logp_BxT: Array | None = None  # frozen reference policy; needed only when kl_coef > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Which loss, how it is aggregated, and its constants (hashable: pass it to `jax.jit` as a static arg)."""

    algorithm: str = "grpo"
    aggregation: str = "token-mean"
    eps_low: float = 0.2
    eps_high: float = 0.28
    gspo_eps_low: float = 3e-4
    gspo_eps_high: float = 4e-4
    is_cap: float = 2.0
    log_ratio_clamp: float = 20.0
    max_response_len: int | None = None  # the constant L of seq-mean-token-sum-norm (required there)
    kl_coef: float = 0.0

    def __post_init__(self):
        # Errors name the run config's keys (`loss.<field>`). Every float is a finite number: none of them takes
        # inf to mean "no limit" (an unbounded clip or cap would let one token's ratio overflow the loss).
        if self.algorithm not in LOSSES:
            raise ValueError(f"loss.algorithm={self.algorithm!r} is unknown; valid: {', '.join(LOSSES)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"loss.aggregation={self.aggregation!r} is unknown; valid: {', '.join(AGGREGATIONS)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ValueError(f"loss.{f.name} must be a finite number, got {value!r}")
        for name in ("eps_low", "gspo_eps_low"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"loss.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("eps_high", "gspo_eps_high", "kl_coef"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("is_cap", "log_ratio_clamp"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"loss.{name} must be > 0, got {getattr(self, name)}")
        length = self.max_response_len
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length <= 0):
            raise ValueError(f"loss.max_response_len must be a positive int, got {length!r}")
        if self.aggregation == "seq-mean-token-sum-norm" and length is None:
            raise ValueError("loss.aggregation='seq-mean-token-sum-norm' needs loss.max_response_len")


class _Batch(NamedTuple):
    """Inputs in float32 with masked-out positions zeroed, plus the counts every loss needs."""

    logp_BxT: Array
    old_logp_BxT: Array
    mu_logp_BxT: Array
    ref_logp_BxT: Array | None
    adv_B: Array | None  # None when the advantages are per token
    adv_BxT: Array  # the advantage of every token: A_b broadcast, or A_bt
    mask_BxT: Array  # bool
    has_tokens_B: Array  # bool


def _check_shapes(inputs: LossInputs) -> None:
    """Raises ValueError unless the per-token inputs share one [B, T] shape and the advantages are [B] or [B, T]."""
    if (inputs.advantages_B is None) == (inputs.advantages_BxT is None):
        raise ValueError("give exactly one of advantages_B (per sequence) and advantages_BxT (per token)")
    named = {"logp_BxT": inputs.logp_BxT, "old_logp_BxT": inputs.old_logp_BxT,
             "sampler_logp_BxT": inputs.sampler_logp_BxT, "mask_BxT": inputs.mask_BxT}
    if inputs.ref_logp_BxT is not None:
        named["ref_logp_BxT"] = inputs.ref_logp_BxT
    if inputs.advantages_BxT is not None:
        named["advantages_BxT"] = inputs.advantages_BxT
    shapes = {name: jnp.shape(x) for name, x in named.items()}
    if len(set(shapes.values())) != 1 or len(shapes["mask_BxT"]) != 2:
        raise ValueError(f"per-token inputs must share one [B, T] shape, got {shapes}")
    if inputs.advantages_B is not None and jnp.shape(inputs.advantages_B) != shapes["mask_BxT"][:1]:
        raise ValueError(f"advantages_B must have shape {shapes['mask_BxT'][:1]}, "
                         f"got {jnp.shape(inputs.advantages_B)}")


def _prepare(inputs: LossInputs) -> _Batch:
    """Casts to float32 and replaces everything outside the response tokens before any arithmetic."""
    _check_shapes(inputs)
    mask_BxT = jnp.asarray(inputs.mask_BxT).astype(bool)
    has_tokens_B = jnp.any(mask_BxT, axis=-1)

    def f32(x: Array) -> Array:
        return jnp.where(mask_BxT, jnp.asarray(x, jnp.float32), 0.0)

    const = jax.lax.stop_gradient
    ref = None if inputs.ref_logp_BxT is None else const(f32(inputs.ref_logp_BxT))
    if inputs.advantages_B is not None:
        adv_B = const(jnp.where(has_tokens_B, jnp.asarray(inputs.advantages_B, jnp.float32), 0.0))
        adv_BxT = jnp.broadcast_to(adv_B[:, None], mask_BxT.shape)
    else:
        adv_B, adv_BxT = None, const(f32(inputs.advantages_BxT))
    return _Batch(logp_BxT=f32(inputs.logp_BxT), old_logp_BxT=const(f32(inputs.old_logp_BxT)),
                  mu_logp_BxT=const(f32(inputs.sampler_logp_BxT)), ref_logp_BxT=ref, adv_B=adv_B,
                  adv_BxT=adv_BxT, mask_BxT=mask_BxT, has_tokens_B=has_tokens_B)


def _mean(x: Array, mask: Array, empty: float) -> Array:
    """Mean of x where mask is set; `empty` when nothing is."""
    count = jnp.sum(mask).astype(jnp.float32)
    return jnp.where(count > 0, jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(count, 1.0), empty)


def _max(x: Array, mask: Array, empty: float) -> Array:
    """Max of x where mask is set; `empty` when nothing is."""
    return jnp.where(jnp.any(mask), jnp.max(jnp.where(mask, x, -jnp.inf)), empty)


# --- aggregations: (terms_BxT, mask_BxT, max_response_len) -> scalar; terms are already 0 off the mask ---------

def _token_mean(terms_BxT: Array, mask_BxT: Array, max_response_len: int | None) -> Array:
    """sum over all response tokens / their number."""
    del max_response_len
    return jnp.sum(terms_BxT) / jnp.maximum(jnp.sum(mask_BxT).astype(jnp.float32), 1.0)


def _seq_mean_token_mean(terms_BxT: Array, mask_BxT: Array, max_response_len: int | None) -> Array:
    """Mean over non-empty sequences of each sequence's token mean."""
    del max_response_len
    n_B = jnp.sum(mask_BxT, axis=-1).astype(jnp.float32)
    return _mean(jnp.sum(terms_BxT, axis=-1) / jnp.maximum(n_B, 1.0), n_B > 0, 0.0)


def _seq_mean_token_sum_norm(terms_BxT: Array, mask_BxT: Array, max_response_len: int | None) -> Array:
    """Mean over non-empty sequences of each sequence's token sum / max_response_len."""
    return _mean(jnp.sum(terms_BxT, axis=-1) / float(max_response_len), jnp.any(mask_BxT, axis=-1), 0.0)


AGGREGATIONS: dict[str, Callable[[Array, Array, int | None], Array]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


# --- shared pieces ---------------------------------------------------------------------------------------------

def _exp_clamped(log_ratio: Array, config: LossConfig) -> Array:
    """exp(clip(log_ratio, -log_ratio_clamp, log_ratio_clamp))."""
    return jnp.exp(jnp.clip(log_ratio, -config.log_ratio_clamp, config.log_ratio_clamp))


def _ppo(ratio: Array, adv: Array, eps_low: float, eps_high: float) -> tuple[Array, Array]:
    """min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) and where the clipped branch is taken."""
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    return jnp.minimum(unclipped, clipped), clipped < unclipped


def _grpo_terms(config: LossConfig, x: _Batch) -> tuple[Array, Array]:
    """Token PPO-clip terms ppo(r_t) (0 off the mask) and the fraction of tokens where clipping is active."""
    ratio_BxT = _exp_clamped(x.logp_BxT - x.old_logp_BxT, config)
    terms_BxT, clipped_BxT = _ppo(ratio_BxT, x.adv_BxT, config.eps_low, config.eps_high)
    return jnp.where(x.mask_BxT, terms_BxT, 0.0), _mean(clipped_BxT, x.mask_BxT, 0.0)


def _seq_weight(log_w_B: Array, config: LossConfig, mode: str) -> tuple[Array, Array]:
    """Sequence IS weight sg(exp(clamp(log_w))): as is ("is"), truncated at C ("tis"), or masked above C ("mis")."""
    w_B = _exp_clamped(log_w_B, config)
    over_cap_B = w_B > config.is_cap
    if mode == "tis":
        w_B = jnp.minimum(w_B, config.is_cap)
    elif mode == "mis":
        w_B = jnp.where(over_cap_B, 0.0, w_B)
    return jax.lax.stop_gradient(w_B), over_cap_B


def _finish(config: LossConfig, x: _Batch, terms_BxT: Array, *, clip_frac: Array | float = 0.0,
            is_weight_mean: Array | float = 1.0, is_weight_max: Array | float = 1.0,
            masked_frac: Array | float = 0.0) -> tuple[Array, dict[str, Array]]:
    """Aggregates the objective terms into the loss, adds the KL penalty, and assembles the diagnostics."""
    aggregate = AGGREGATIONS[config.aggregation]
    policy_loss = -aggregate(jnp.where(x.mask_BxT, terms_BxT, 0.0), x.mask_BxT, config.max_response_len)
    ratio_BxT = _exp_clamped(x.logp_BxT - x.old_logp_BxT, config)
    diag = {
        "policy_loss": policy_loss,
        "clip_frac": clip_frac,
        "is_weight_mean": is_weight_mean,
        "is_weight_max": is_weight_max,
        "masked_frac": masked_frac,
        "ratio_mean": _mean(ratio_BxT, x.mask_BxT, 1.0),
    }
    loss = policy_loss
    if config.kl_coef > 0:
        if x.ref_logp_BxT is None:
            raise ValueError("kl_coef > 0 needs ref_logp_BxT")
        d_BxT = jnp.clip(x.ref_logp_BxT - x.logp_BxT, -config.log_ratio_clamp, config.log_ratio_clamp)
        k3_BxT = jnp.where(x.mask_BxT, jnp.expm1(d_BxT) - d_BxT, 0.0)  # exp(d) - d - 1, accurate for small d
        diag["kl_ref"] = aggregate(k3_BxT, x.mask_BxT, config.max_response_len)
        loss = loss + config.kl_coef * diag["kl_ref"]
    diag = {k: jnp.asarray(jax.lax.stop_gradient(v), jnp.float32) for k, v in diag.items()}
    return loss, diag


# --- the algorithms --------------------------------------------------------------------------------------------

def pg_loss(config: LossConfig, inputs: LossInputs) -> tuple[Array, dict[str, Array]]:
    """Vanilla policy gradient: j_t = A logp_t (no importance sampling)."""
    x = _prepare(inputs)
    return _finish(config, x, x.adv_BxT * x.logp_BxT)


def grpo_loss(config: LossConfig, inputs: LossInputs) -> tuple[Array, dict[str, Array]]:
    """GRPO / PPO-clip at the token level: j_t = min(r_t A, clip(r_t, 1-eps_low, 1+eps_high) A)."""
    x = _prepare(inputs)
    terms_BxT, clip_frac = _grpo_terms(config, x)
    return _finish(config, x, terms_BxT, clip_frac=clip_frac)


def grpo_token_tis_loss(config: LossConfig, inputs: LossInputs) -> tuple[Array, dict[str, Array]]:
    """GRPO with token-level truncated IS: j_t = ppo(r_t) sg(min(pi_theta'(y_t) / mu(y_t), C))."""
    x = _prepare(inputs)
    terms_BxT, clip_frac = _grpo_terms(config, x)
    w_BxT = jnp.minimum(_exp_clamped(x.old_logp_BxT - x.mu_logp_BxT, config), config.is_cap)
    return _finish(config, x, terms_BxT * w_BxT, clip_frac=clip_frac,
                   is_weight_mean=_mean(w_BxT, x.mask_BxT, 1.0), is_weight_max=_max(w_BxT, x.mask_BxT, 1.0))


def _grpo_seq(config: LossConfig, inputs: LossInputs, mode: str) -> tuple[Array, dict[str, Array]]:
    """GRPO with every term of a sequence times its weight from rho = pi_theta'(y) / mu(y)."""
    x = _prepare(inputs)
    terms_BxT, clip_frac = _grpo_terms(config, x)
    w_B, over_cap_B = _seq_weight(jnp.sum(x.old_logp_BxT - x.mu_logp_BxT, axis=-1), config, mode)
    return _finish(config, x, terms_BxT * w_B[:, None], clip_frac=clip_frac,
                   is_weight_mean=_mean(w_B, x.has_tokens_B, 1.0), is_weight_max=_max(w_B, x.has_tokens_B, 1.0),
                   masked_frac=_mean(over_cap_B, x.has_tokens_B, 0.0) if mode == "mis" else 0.0)


def grpo_seq_tis_loss(config: LossConfig, inputs: LossInputs) -> tuple[Array, dict[str, Array]]:
    """GRPO with sequence-level truncated IS: j_t = ppo(r_t) sg(min(rho, C))."""
    return _grpo_seq(config, inputs, "tis")


def grpo_seq_mis_loss(config: LossConfig, inputs: LossInputs) -> tuple[Array, dict[str, Array]]:
    """GRPO with sequence-level masked IS: j_t = ppo(r_t) sg(rho 1{rho <= C})."""
    return _grpo_seq(config, inputs, "mis")


def _pg_seq(config: LossConfig, inputs: LossInputs, mode: str) -> tuple[Array, dict[str, Array]]:
    """PG with every term of a sequence times its weight from w = pi_theta(y) / mu(y)."""
    x = _prepare(inputs)
    w_B, over_cap_B = _seq_weight(jnp.sum(x.logp_BxT - x.mu_logp_BxT, axis=-1), config, mode)
    return _finish(config, x, (w_B[:, None] * x.adv_BxT) * x.logp_BxT,
                   is_weight_mean=_mean(w_B, x.has_tokens_B, 1.0), is_weight_max=_max(w_B, x.has_tokens_B, 1.0),
                   masked_frac=_mean(over_cap_B, x.has_tokens_B, 0.0) if mode == "mis" else 0.0)


def pg_seq_is_loss(config: LossConfig, inputs: LossInputs) -> tuple[Array, dict[str, Array]]:
    """PG with sequence-level IS: j_t = sg(w) A logp_t, w = pi_theta(y) / mu(y)."""
    return _pg_seq(config, inputs, "is")


def pg_seq_tis_loss(config: LossConfig, inputs: LossInputs) -> tuple[Array, dict[str, Array]]:
    """PG with sequence-level truncated IS: j_t = sg(min(w, C)) A logp_t."""
    return _pg_seq(config, inputs, "tis")


def pg_seq_mis_loss(config: LossConfig, inputs: LossInputs) -> tuple[Array, dict[str, Array]]:
    """PG with sequence-level masked IS: j_t = sg(w 1{w <= C}) A logp_t."""
    return _pg_seq(config, inputs, "mis")


def gspo_loss(config: LossConfig, inputs: LossInputs) -> tuple[Array, dict[str, Array]]:
    """GSPO, sequence form: each response token carries J_b = ppo(s_b), s_b = (pi_theta(y) / pi_theta'(y))^(1/n_b)."""
    x = _prepare(inputs)
    if x.adv_B is None:
        raise ValueError("gspo takes one advantage per sequence (advantages_B), not per-token advantages_BxT")
    n_B = jnp.sum(x.mask_BxT, axis=-1).astype(jnp.float32)
    s_B = _exp_clamped(jnp.sum(x.logp_BxT - x.old_logp_BxT, axis=-1) / jnp.maximum(n_B, 1.0), config)
    objective_B, clipped_B = _ppo(s_B, x.adv_B, config.gspo_eps_low, config.gspo_eps_high)
    return _finish(config, x, jnp.where(x.mask_BxT, objective_B[:, None], 0.0),
                   clip_frac=_mean(clipped_B, x.has_tokens_B, 0.0))


LossFn = Callable[[LossConfig, LossInputs], tuple[Array, dict[str, Array]]]

LOSSES: dict[str, LossFn] = {
    "pg": pg_loss,
    "grpo": grpo_loss,
    "grpo_token_tis": grpo_token_tis_loss,
    "grpo_seq_tis": grpo_seq_tis_loss,
    "grpo_seq_mis": grpo_seq_mis_loss,
    "pg_seq_is": pg_seq_is_loss,
    "pg_seq_tis": pg_seq_tis_loss,
    "pg_seq_mis": pg_seq_mis_loss,
    "gspo": gspo_loss,
}


def compute_loss(config: LossConfig, inputs: LossInputs) -> tuple[Array, dict[str, Array]]:
    """The loss of `config.algorithm` (see the module docstring).

    Args:
      config: a `LossConfig`; static under `jax.jit` (it is hashable).
      inputs: a `LossInputs`; only `logp_BxT` is differentiated.

    Returns:
      `(loss, diagnostics)`: a float32 scalar to minimise, and a dict of float32 scalars keyed by `DIAG_NAMES`
      (plus `kl_ref` when `config.kl_coef > 0`).
    """
    return LOSSES[config.algorithm](config, inputs)
