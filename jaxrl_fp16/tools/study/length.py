"""Mismatch against the position in the response: does it grow along a sequence?

With d_k = log pi - log mu of a sequence's k-th response token (k = 1, 2, ...):

    token_abs_mean[k]   mean over sequences with at least k response tokens of |d_k|
    prefix_abs_mean[k]  mean over the same sequences of |d_1 + ... + d_k|, the sequence log-ratio after k tokens

and the same pooled over bins of consecutive k (token-weighted).
"""

from __future__ import annotations

import numpy as np

__all__ = ["mismatch_vs_length"]


def mismatch_vs_length(sampler_logprobs: np.ndarray, trainer_logprobs: np.ndarray, mask: np.ndarray, *,
                       num_bins: int = 16) -> dict[str, np.ndarray]:
    """Per-response-position mismatch statistics.

    Args:
      sampler_logprobs, trainer_logprobs: [N, T] log mu and log pi (rollout layout).
      mask: [N, T] nonzero on response tokens; a row's k-th set entry is its k-th response token.
      num_bins: at most this many bins of consecutive positions, of (nearly) equal width.

    Returns:
      Arrays (float64 statistics; NaN where no sequence reaches a position):
        k [K] (1-based), count [K] (sequences with >= k tokens), token_abs_mean [K], prefix_abs_mean [K];
        bin_start [B], bin_stop [B] (k in [start, stop)), bin_count [B] (tokens), bin_token_abs_mean [B],
        bin_prefix_abs_mean [B].
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    m_NxT = np.asarray(mask) != 0
    if not (np.shape(sampler_logprobs) == np.shape(trainer_logprobs) == m_NxT.shape) or m_NxT.ndim != 2:
        raise ValueError("sampler_logprobs, trainer_logprobs and mask must share one [N, T] shape")
    d_NxT = np.where(m_NxT, np.asarray(trainer_logprobs, np.float64) - np.asarray(sampler_logprobs, np.float64),
                     0.0)
    k_NxT = np.cumsum(m_NxT, axis=1)  # k of each response token (1-based)
    prefix_NxT = np.cumsum(d_NxT, axis=1)
    K = int(k_NxT[:, -1].max()) if m_NxT.size else 0
    k_idx = k_NxT[m_NxT] - 1
    count = np.bincount(k_idx, minlength=K).astype(np.int64)
    token_sum = np.bincount(k_idx, weights=np.abs(d_NxT[m_NxT]), minlength=K)
    prefix_sum = np.bincount(k_idx, weights=np.abs(prefix_NxT[m_NxT]), minlength=K)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"k": np.arange(1, K + 1), "count": count, "token_abs_mean": token_sum / count,
               "prefix_abs_mean": prefix_sum / count}
        edges = np.unique(np.round(np.linspace(1, K + 1, min(num_bins, max(K, 1)) + 1)).astype(np.int64))
        start, stop = edges[:-1], edges[1:]
        tok_n = np.array([count[a - 1:b - 1].sum() for a, b in zip(start, stop)], np.int64)
        out.update(
            bin_start=start, bin_stop=stop, bin_count=tok_n,
            bin_token_abs_mean=np.array([token_sum[a - 1:b - 1].sum() for a, b in zip(start, stop)]) / tok_n,
            bin_prefix_abs_mean=np.array([prefix_sum[a - 1:b - 1].sum() for a, b in zip(start, stop)]) / tok_n)
    return out
