"""PNG plots (matplotlib, headless). The only module that imports matplotlib."""

from __future__ import annotations

from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["token_prob_scatter", "seq_log_ratio_vs_length"]

Series = tuple[np.ndarray, np.ndarray, np.ndarray]  # (log mu [N,T], log pi [N,T], response mask [N,T])


def token_prob_scatter(series: Mapping[str, Series], path: str, max_points: int = 20000) -> None:
    """Token probability under the trainer (pi) against the sampler (mu), one panel per series."""
    n = len(series)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.2), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (label, (lmu, lpi, mask)) in zip(axes[0], series.items()):
        m = np.asarray(mask).astype(bool)
        mu, pi = np.exp(np.asarray(lmu)[m]), np.exp(np.asarray(lpi)[m])
        if mu.size > max_points:
            keep = rng.choice(mu.size, max_points, replace=False)
            mu, pi = mu[keep], pi[keep]
        ax.scatter(mu, pi, s=3, alpha=0.4, linewidths=0)
        ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--", label="pi = mu")
        mean_abs = float(np.mean(np.abs(pi - mu))) if mu.size else float("nan")
        ax.set_title(f"{label}\nmean |pi - mu| = {mean_abs:.2e}", fontsize=9)
        ax.set_xlabel("sampler probability mu(token)")
        ax.set_ylabel("trainer probability pi(token)")
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seq_log_ratio_vs_length(series: Mapping[str, Series], path: str) -> None:
    """Sequence log-ratio |sum_t log pi - log mu| against response length.

    Dots: whole sequences at their length. Line: the mean |log-ratio| of the first k response tokens over the
    sequences at least k long, which shows how the mismatch accumulates along a response.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, (lmu, lpi, mask)) in enumerate(series.items()):
        color = colors[i % len(colors)]
        m = np.asarray(mask).astype(bool)
        d = np.where(m, np.asarray(lpi, np.float64) - np.asarray(lmu, np.float64), 0.0)
        lengths = m.sum(axis=1)
        ratio = np.abs(d.sum(axis=1))
        keep = (lengths > 0) & (ratio > 0)  # exact agreement has no place on a log axis
        ax.scatter(lengths[keep], ratio[keep], s=8, alpha=0.35, color=color)
        # Prefix sums over response tokens only, indexed by the response token count k.
        rows = [row[mm] for row, mm in zip(d, m) if mm.any()]
        if rows:
            longest = max(len(r) for r in rows)
            prefix = np.full((len(rows), longest), np.nan)
            for j, r in enumerate(rows):
                prefix[j, : len(r)] = np.abs(np.cumsum(r))
            k = np.arange(1, longest + 1)
            mean = np.nanmean(prefix, axis=0)
            ax.plot(k, np.where(mean > 0, mean, np.nan), color=color, lw=1.8,
                    label=f"{label}: mean over first k tokens")
    ax.set_yscale("log")
    ax.set_xlabel("response length k (tokens)")
    ax.set_ylabel("|log pi(y) - log mu(y)|  (sequence log-ratio)")
    ax.set_title("Sequence-level mismatch vs response length\n(dots: whole sequences)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
