"""PNG plots (matplotlib, headless). The only module that imports matplotlib."""

from __future__ import annotations

from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["token_prob_scatter", "seq_log_ratio_vs_length", "layer_drift_plot", "override_gap_plot",
           "mismatch_vs_length_plot", "training_curves", "metric_vs_mantissa_bits"]

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


# ----- precision study (jaxrl_fp16.tools.study) -----

_DRIFT_STYLES = (  # (column prefix, legend text, line style, marker, filled marker)
    ("inf_vs_train", "inference vs training, both in the dtype", "-", "o", True),
    ("inf_vs_fp32", "inference vs inference in FP32", "--", "s", False),
    ("train_vs_fp32", "training vs training in FP32", ":", "^", True),
    ("fp32_inf_vs_train", "inference vs training, both in FP32", "-.", "x", True),
)


def _positive(values) -> np.ndarray:
    """Values for a log axis: non-positive (or missing) ones become NaN (a gap, not a crash)."""
    v = np.asarray(values, np.float64)
    return np.where(v > 0, v, np.nan)


def layer_drift_plot(tables: Mapping[str, list[dict]], path: str) -> None:
    """Relative hidden-state drift after each layer, one colour per dtype and one line style per comparison.

    `tables` maps a dtype label to its per-layer rows (`layer`, `<comparison>_mean`, `<comparison>_max`).
    Left panel: mean over response positions; right panel: max.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, stat in zip(axes, ("mean", "max")):
        layers: list[int] = []
        for i, (label, rows) in enumerate(tables.items()):
            color = colors[i % len(colors)]
            layers = [r["layer"] for r in rows]
            for prefix, text, ls, marker, filled in _DRIFT_STYLES:
                values = np.array([r.get(f"{prefix}_{stat}", np.nan) for r in rows], np.float64)
                if values.size and np.all(values == 0):
                    text += " (0 at every layer: not drawn)"
                ax.plot(layers, _positive(values), ls=ls, marker=marker, color=color, lw=1.5,
                        ms=7 if not filled else 5, mfc=color if filled else "none", label=f"{label}: {text}")
        ax.set_yscale("log")
        ax.set_xlabel("layer (residual stream after it)")
        ax.set_title(f"{stat} over response positions", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if layers:
            ax.set_xticks(layers)
    axes[0].set_ylabel("relative drift  ||h_a - h_b|| / ||h_b||")
    axes[1].tick_params(labelleft=True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle("Where the sampler's (KV-cache decode) and the trainer's (full-sequence) hidden states diverge",
                 fontsize=11)
    ncol = max(1, len(tables))
    nrow = -(-len(labels) // ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.035 * nrow + 0.01, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def override_gap_plot(tables: Mapping[str, list[dict]], path: str,
                      metrics: tuple[str, ...] = ("kl_k3", "prob_abs_diff_mean"), floor: float = -1.0) -> None:
    """Fraction of the mismatch gap closed by forcing each op class to FP32, grouped bars (one per dtype).

    `tables` maps a dtype label to its override rows (`override`, `fp32_ops`, `<metric>_gap_closed`), one panel
    per metric. The baseline (0% by definition) is left out; an op class the baseline already runs in FP32 is
    marked so. Bars below `floor` (a variant much worse than the baseline) are cut at it; every bar is labelled.
    """
    order: list[str] = []
    in_baseline: set[str] = set()
    for rows in tables.values():
        order += [r["override"] for r in rows if r["override"] not in order and r["override"] != "baseline"]
        base = next((r["fp32_ops"] for r in rows if r["override"] == "baseline"), None)
        in_baseline |= {r["override"] for r in rows if r["override"] not in ("baseline", "all", "none", "scale_q")
                        and r["fp32_ops"] == base}
    preferred = ["none", "norm", "softmax", "attn_scores", "lm_head", "rope", "residual", "all", "scale_q"]
    order = [o for o in preferred if o in order] + [o for o in order if o not in preferred]
    ticks = [f"{o}\n(already FP32)" if o in in_baseline else o for o in order]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(7.5, 1.0 * len(order) + 2), 3.6 * len(metrics)),
                             squeeze=False)
    width = 0.8 / max(1, len(tables))
    x = np.arange(len(order))
    for ax, metric in zip(axes[:, 0], metrics):
        lowest = 0.0
        for i, (label, rows) in enumerate(tables.items()):
            by_name = {r["override"]: r[f"{metric}_gap_closed"] for r in rows}
            values = np.array([np.nan if by_name.get(o) is None else by_name[o] for o in order], np.float64)
            shown = np.maximum(values, floor)
            if np.any(np.isfinite(shown)):
                lowest = min(lowest, float(np.nanmin(shown)))
            pos = x + (i - (len(tables) - 1) / 2) * width
            ax.bar(pos, 100 * shown, width, color=colors[i % len(colors)], label=label)
            for p, v, h in zip(pos, values, shown):
                if np.isfinite(v):
                    ax.annotate(f"{int(round(100 * v))}%", (p, 100 * h), xytext=(0, 2 if h >= 0 else -2),
                                textcoords="offset points", ha="center", va="bottom" if h >= 0 else "top",
                                fontsize=7)
        ax.axhline(0, color="black", lw=0.8)
        ax.axhline(100, color="gray", lw=0.8, ls="--")
        ax.set_xticks(x, ticks, fontsize=8)
        ax.set_ylim(100 * lowest - 15, 118)
        ax.set_ylabel(f"{metric}\ngap closed (%)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0, 0].set_title("Mismatch removed by running one op class in FP32 in both paths (same tokens)\n"
                         "100% = gone, 0% = baseline, < 0 = worse; 'none' = every op class in the dtype, "
                         "'all' = every op class in FP32", fontsize=10)
    axes[-1, 0].set_xlabel("op class forced to FP32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mismatch_vs_length_plot(series: Mapping[str, Mapping[str, np.ndarray]], path: str) -> None:
    """Token mismatch |log pi - log mu| and sequence log-ratio |prefix sum| against the response position k.

    `series` maps a label (dtype) to the arrays of `jaxrl_fp16.tools.study.mismatch_vs_length`. Thin lines: every k;
    markers: bins of k.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = (("token_abs_mean", "mean |log pi - log mu| of token k", "Token mismatch at position k"),
              ("prefix_abs_mean", "mean |sum of log pi - log mu over tokens 1..k|",
               "Sequence log-ratio after k tokens"))
    for ax, (key, ylabel, title) in zip(axes, panels):
        for i, (label, arrays) in enumerate(series.items()):
            color = colors[i % len(colors)]
            ax.plot(arrays["k"], _positive(arrays[key]), color=color, lw=0.8, alpha=0.45)
            centres = (np.asarray(arrays["bin_start"]) + np.asarray(arrays["bin_stop"]) - 1) / 2
            ax.plot(centres, _positive(arrays[f"bin_{key}"]), color=color, lw=1.8, marker="o", ms=4, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("response token position k")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_curves(series: Mapping[str, "list[float]"], path: str, *, ylabel: str, title: str,
                    log: bool = False, smooth: int = 1) -> None:
    """One line per run against the iteration; `smooth` > 1 adds a trailing moving average (raw values faint)."""
    fig, ax = plt.subplots(figsize=(7, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, values) in enumerate(series.items()):
        y = np.asarray(values, np.float64)
        x = np.arange(1, len(y) + 1)
        color = colors[i % len(colors)]
        if log:
            zeros = x[y == 0]
            y = np.where(y > 0, y, np.nan)  # exact agreement has no place on a log axis: marked below instead
            if zeros.size:
                finite = y[np.isfinite(y)]
                floor = finite.min() / 3 if finite.size else 1e-12
                ax.scatter(zeros, np.full(zeros.shape, floor), marker="v", color=color, s=18,
                           label=f"{label}: exactly 0 (drawn at the bottom)")
        if smooth > 1:
            ax.plot(x, y, color=color, alpha=0.25, lw=1)
            avg = np.array([np.nanmean(y[max(0, j - smooth + 1):j + 1]) for j in range(len(y))])
            ax.plot(x, avg, color=color, lw=2, label=f"{label} ({smooth}-iteration mean)")
        else:
            ax.plot(x, y, color=color, lw=1.5, marker="." if log else None, label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("RL iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def metric_vs_mantissa_bits(points: "list[dict]", path: str, *, keys: Mapping[str, str], ylabel: str, title: str,
                            log: bool = False) -> None:
    """A metric against the format's mantissa bits, one point per row (`mantissa_bits`, `exponent_bits`,
    `emulated`, `format` and the `keys`), one colour per exponent width; filled markers: real dtypes, hollow:
    emulated. `keys` maps a row key to its legend text (several keys: one marker shape each); each is joined by
    a line through the per-bits means of the emulated 8-exponent-bit rows and float32. On a log axis a value of 0 is drawn at the
    bottom as a downward triangle."""
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    widths = sorted({int(p["exponent_bits"]) for p in points}, reverse=True)
    shapes = ("o", "s", "D", "^")
    positive = [float(p[k]) for p in points for k in keys if np.isfinite(p[k]) and p[k] > 0]
    floor = min(positive) / 3 if positive else 1e-12
    for j, (key, text) in enumerate(keys.items()):
        for i, e in enumerate(widths):
            color = colors[i % len(colors)]
            for emulated in (False, True):
                rows = [p for p in points if p["exponent_bits"] == e and bool(p["emulated"]) == emulated]
                if not rows:
                    continue
                x = np.array([p["mantissa_bits"] for p in rows], np.float64)
                y = np.array([p[key] for p in rows], np.float64)
                zero = log & (y <= 0)
                ax.scatter(x[~zero], y[~zero], marker=shapes[j % len(shapes)], s=40, color=color,
                           facecolors="none" if emulated else color,
                           label=f"{text}: e{e} {'emulated' if emulated else 'real dtype'}")
                if zero.any():
                    ax.scatter(x[zero], np.full(int(zero.sum()), floor), marker="v", s=40, color=color,
                               label=f"{text}: e{e}, exactly 0 (drawn at the bottom)")
            family = [p for p in points if p["exponent_bits"] == e and (p["emulated"] or p["format"] == "float32")]
            bits = sorted({p["mantissa_bits"] for p in family})
            if e == 8 and len(bits) > 1:
                means = [np.mean([p[key] for p in family if p["mantissa_bits"] == b]) for b in bits]
                means = np.where(np.asarray(means) > 0, means, np.nan) if log else means
                ax.plot(bits, means, color=color, lw=1, alpha=0.6)
        for p in points:
            if np.isfinite(p[key]) and (p[key] > 0 or not log):
                ax.annotate(p["format"], (p["mantissa_bits"], p[key]), xytext=(3, 3), textcoords="offset points",
                            fontsize=6, alpha=0.7)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("mantissa bits (stored, without the implicit one)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
