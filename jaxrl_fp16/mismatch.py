"""Sampler-vs-trainer mismatch statistics over response tokens (pure jax.numpy, jit-able).

With log mu_t the sampler's log-prob of sampled token t, log pi_t the trainer's recomputation, and
d_t = log mu_t - log pi_t, over the tokens where `mask` is set:

    mismatch/kl_k1                  mean_t d_t                           KL(mu||pi), k1 estimator
    mismatch/kl_k2                  mean_t d_t^2 / 2                     k2 estimator
    mismatch/kl_k3                  mean_t (r_t - 1 - log r_t)           k3 estimator, r_t = pi_t/mu_t = exp(-d_t); >= 0
    mismatch/seq_kl                 mean_b sum_t d_bt                    per-sequence KL, averaged over sequences
    mismatch/prob_abs_diff_mean     mean_t |pi_t - mu_t|
    mismatch/prob_abs_diff_max      max_t  |pi_t - mu_t|
    mismatch/prob_abs_diff_std      std_t  |pi_t - mu_t|                 population std (ddof = 0)
    mismatch/prob_diff_max          max_t  (pi_t - mu_t)
    mismatch/prob_diff_min          min_t  (pi_t - mu_t)
    mismatch/log_ratio_abs_max      max_t  |d_t|
    mismatch/seq_log_ratio_abs_mean mean_b |sum_t d_bt|                  |log pi(y)/mu(y)| of the sequence
    mismatch/seq_log_ratio_abs_max  max_b  |sum_t d_bt|
    mismatch/prob_pearson           Pearson correlation of pi_t and mu_t over tokens
    mismatch/num_tokens             number of response tokens (int32)

Conventions:
  * Everything is computed in float32 whatever the input dtype.
  * Token statistics pool all response tokens of the batch. Sequence statistics run over the sequences with at
    least one response token; a sequence whose mask is all zero is left out (it does not count as a 0).
  * Masked-out positions contribute nothing, even when they hold NaN or inf: they are replaced with `jnp.where`
    before any arithmetic. Non-finite values at response positions are real and propagate.
  * No response token at all: every statistic is NaN and `num_tokens` is 0 (NaN rather than an error, so that the
    function stays jit-able).
  * `prob_pearson` is NaN when pi or mu is constant over the response tokens (zero variance, including a single
    token); it is clipped to [-1, 1] and is exactly 1 when pi == mu.
  * No clamping: a huge log-ratio gives a huge (possibly inf) k3, which is what it measures.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

__all__ = ["METRIC_NAMES", "mismatch_metrics", "summarize"]

METRIC_NAMES: tuple[str, ...] = (
    "mismatch/kl_k1",
    "mismatch/kl_k2",
    "mismatch/kl_k3",
    "mismatch/seq_kl",
    "mismatch/prob_abs_diff_mean",
    "mismatch/prob_abs_diff_max",
    "mismatch/prob_abs_diff_std",
    "mismatch/prob_diff_max",
    "mismatch/prob_diff_min",
    "mismatch/log_ratio_abs_max",
    "mismatch/seq_log_ratio_abs_mean",
    "mismatch/seq_log_ratio_abs_max",
    "mismatch/prob_pearson",
    "mismatch/num_tokens",
)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x where mask is set; NaN when nothing is."""
    count = jnp.sum(mask).astype(jnp.float32)
    total = jnp.sum(jnp.where(mask, x, 0.0))
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)


def _masked_max(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Max of x where mask is set; NaN when nothing is."""
    return jnp.where(jnp.any(mask), jnp.max(jnp.where(mask, x, -jnp.inf)), jnp.nan)


def _masked_min(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Min of x where mask is set; NaN when nothing is."""
    return -_masked_max(-x, mask)


def _masked_std(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population standard deviation of x where mask is set (two-pass); NaN when nothing is."""
    centred = x - _masked_mean(x, mask)
    return jnp.sqrt(_masked_mean(centred * centred, mask))


def _masked_pearson(x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """Pearson correlation of x and y where mask is set; NaN if either is constant there (or nothing is set)."""
    x_c = jnp.where(mask, x - _masked_mean(x, mask), 0.0)
    y_c = jnp.where(mask, y - _masked_mean(y, mask), 0.0)
    # Scaled so the largest deviation is 1: sums of squares are then >= 1 and their product cannot underflow.
    x_c = x_c / jnp.max(jnp.abs(x_c))
    y_c = y_c / jnp.max(jnp.abs(y_c))
    cov = jnp.sum(x_c * y_c)
    var_x = jnp.sum(x_c * x_c)
    var_y = jnp.sum(y_c * y_c)
    # Constancy is tested exactly (max == min), not through var == 0, which rounding in the mean can miss.
    constant = (_masked_max(x, mask) == _masked_min(x, mask)) | (_masked_max(y, mask) == _masked_min(y, mask))
    # cov / sqrt(var_x * var_y), arranged so that x == y gives exactly 1 (cov / var_x == 1, sqrt(1) == 1)
    # even where the compiler turns a / sqrt(b) into a * rsqrt(b).
    pearson = jnp.clip((cov / var_x) * jnp.sqrt(var_x / var_y), -1.0, 1.0)
    return jnp.where(constant | ~jnp.any(mask), jnp.nan, pearson)


def _check_shapes(logp_mu_BxT: jax.Array, logp_pi_BxT: jax.Array, mask_BxT: jax.Array) -> None:
    """Raises ValueError unless the three inputs share one [B, T] shape."""
    shapes = {jnp.shape(logp_mu_BxT), jnp.shape(logp_pi_BxT), jnp.shape(mask_BxT)}
    if len(shapes) != 1 or len(jnp.shape(mask_BxT)) != 2:
        raise ValueError(
            "sampler_logprobs, trainer_logprobs and mask must share one [B, T] shape, got "
            f"{jnp.shape(logp_mu_BxT)}, {jnp.shape(logp_pi_BxT)}, {jnp.shape(mask_BxT)}")


def mismatch_metrics(sampler_logprobs: jax.Array, trainer_logprobs: jax.Array,
                     mask: jax.Array) -> dict[str, jax.Array]:
    """Sampler-vs-trainer mismatch statistics over the response tokens (see the module docstring).

    One jitted program per input shape (eagerly, its ~100 small ops would each be dispatched, and compiled once
    per process); traced inside another jitted function it is inlined as usual.

    Args:
      sampler_logprobs: [B, T] log mu of the sampled tokens, as the sampler reported them.
      trainer_logprobs: [B, T] log pi of the same tokens, recomputed by the trainer.
      mask: [B, T] bool or numeric; nonzero on response tokens. Other positions may hold anything.

    Returns:
      A dict keyed by `METRIC_NAMES` of scalars: float32, except `mismatch/num_tokens` (int32), in
      `METRIC_NAMES` order (`jax.jit` of this function returns the keys sorted; `summarize` restores the order).
    """
    _check_shapes(sampler_logprobs, trainer_logprobs, mask)
    out = _metrics(sampler_logprobs, trainer_logprobs, mask)
    return {name: out[name] for name in METRIC_NAMES}


@jax.jit
def _metrics(sampler_logprobs: jax.Array, trainer_logprobs: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    mask_BxT = jnp.asarray(mask).astype(bool)
    # Garbage at masked-out positions is replaced before any arithmetic, so no NaN/inf can leak from it.
    logp_mu_BxT = jnp.where(mask_BxT, jnp.asarray(sampler_logprobs, jnp.float32), 0.0)
    logp_pi_BxT = jnp.where(mask_BxT, jnp.asarray(trainer_logprobs, jnp.float32), 0.0)

    d_BxT = logp_mu_BxT - logp_pi_BxT
    # r - 1 - log r with r = exp(-d), via expm1 to keep small d accurate; clamped at its true lower bound 0.
    k3_BxT = jnp.maximum(jnp.expm1(-d_BxT) + d_BxT, 0.0)
    prob_diff_BxT = jnp.exp(logp_pi_BxT) - jnp.exp(logp_mu_BxT)
    prob_abs_diff_BxT = jnp.abs(prob_diff_BxT)

    seq_d_B = jnp.sum(jnp.where(mask_BxT, d_BxT, 0.0), axis=-1)
    has_tokens_B = jnp.any(mask_BxT, axis=-1)

    return {
        "mismatch/kl_k1": _masked_mean(d_BxT, mask_BxT),
        "mismatch/kl_k2": _masked_mean(0.5 * d_BxT * d_BxT, mask_BxT),
        "mismatch/kl_k3": _masked_mean(k3_BxT, mask_BxT),
        "mismatch/seq_kl": _masked_mean(seq_d_B, has_tokens_B),
        "mismatch/prob_abs_diff_mean": _masked_mean(prob_abs_diff_BxT, mask_BxT),
        "mismatch/prob_abs_diff_max": _masked_max(prob_abs_diff_BxT, mask_BxT),
        "mismatch/prob_abs_diff_std": _masked_std(prob_abs_diff_BxT, mask_BxT),
        "mismatch/prob_diff_max": _masked_max(prob_diff_BxT, mask_BxT),
        "mismatch/prob_diff_min": _masked_min(prob_diff_BxT, mask_BxT),
        "mismatch/log_ratio_abs_max": _masked_max(jnp.abs(d_BxT), mask_BxT),
        "mismatch/seq_log_ratio_abs_mean": _masked_mean(jnp.abs(seq_d_B), has_tokens_B),
        "mismatch/seq_log_ratio_abs_max": _masked_max(jnp.abs(seq_d_B), has_tokens_B),
        "mismatch/prob_pearson": _masked_pearson(jnp.exp(logp_pi_BxT), jnp.exp(logp_mu_BxT), mask_BxT),
        "mismatch/num_tokens": jnp.sum(mask_BxT, dtype=jnp.int32),
    }


def summarize(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    """Python floats for JSON logging (one device transfer), `METRIC_NAMES` first; NaN stays float('nan')."""
    host = jax.device_get(dict(metrics))
    order = [name for name in METRIC_NAMES if name in host] + sorted(set(host) - set(METRIC_NAMES))
    return {name: float(host[name]) for name in order}
