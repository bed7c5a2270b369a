"""Op-class attribution: how much of the mismatch goes away when one op class runs in FP32 in both paths.

One rollout (sampled in D with the baseline numerics) is rescored by both paths under each variant: the
inference path by teacher-forcing the sampled tokens through prefill + decode, the training path by `Scorer`.
The tokens never change, so a row differs from the baseline only through numerics. Variants:

    baseline   the numerics the rollout was sampled with (by default transformers': norm and softmax in FP32)
    none       every op class in D
    <class>    the baseline plus that op class in FP32 (equal to the baseline for a class it already has)
    all        every op class in FP32: what remains comes from the matmuls and the weights' rounding to D
    scale_q    the baseline with q scaled before q.k^T (`Numerics.scale_q`, the order of the GPU engines' fused
               kernels up to their FP32 scores) instead of the unscaled product rounded to D, then scaled
               (transformers' eager order); left out when the baseline already scales q

    gap_closed = 1 - metric(variant) / metric(baseline)   (1: mismatch gone; 0: no effect; < 0: worse)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jaxrl_fp16 import mismatch
from jaxrl_fp16.models.config import ModelConfig, Numerics
from jaxrl_fp16.precision import as_dtype
from jaxrl_fp16.sampling.base import Rollout
from jaxrl_fp16.scoring import Scorer
from jaxrl_fp16.tools.study import paths

__all__ = ["OP_CLASSES", "SCALE_Q", "override_variants", "override_table", "best_override", "fp32_ops"]

OP_CLASSES: tuple[str, ...] = Numerics.op_classes()
SCALE_Q = "scale_q"  # the variant that reorders the attention scaling (not an op class: nothing moves to FP32)
GAP_METRICS = ("kl_k3", "prob_abs_diff_mean")
_REPORTED = ("kl_k3", "prob_abs_diff_mean", "prob_abs_diff_max", "seq_log_ratio_abs_mean")


def fp32_ops(numerics: Numerics) -> str:
    """The op classes `numerics` runs in FP32, comma-separated ("-" for none)."""
    names = [c for c in OP_CLASSES if getattr(numerics, f"{c}_f32")]
    return ",".join(names) or "-"


def override_variants(base: Numerics = Numerics(),
                      op_classes: Sequence[str] | None = None) -> dict[str, Numerics]:
    """Variant name -> numerics: baseline, none, each op class added to the baseline, all, and scale_q (the
    baseline scaling q before q.k^T) unless the baseline already does."""
    classes = OP_CLASSES if op_classes is None else tuple(op_classes)
    unknown = [c for c in classes if c not in OP_CLASSES]
    if unknown:
        raise ValueError(f"unknown op class(es) {unknown}; valid: {', '.join(OP_CLASSES)}")
    variants = {"baseline": base, "none": Numerics(**{f"{c}_f32": False for c in OP_CLASSES}, emulate=base.emulate)}
    variants.update({c: dataclasses.replace(base, **{f"{c}_f32": True}) for c in classes})
    variants["all"] = dataclasses.replace(Numerics.all_f32(), emulate=base.emulate)
    if not base.scale_q:
        variants[SCALE_Q] = dataclasses.replace(base, scale_q=True)
    return variants


def override_table(cfg: ModelConfig, params: Any, rollout: Rollout, dtype: Any, *, base: Numerics = Numerics(),
                   op_classes: Sequence[str] | None = None, temperature: float = 1.0,
                   max_batch_size: int = 256, prompt_bucket: int = 16) -> list[dict[str, Any]]:
    """Mismatch between the two paths in `dtype` under each override variant, on the rollout's tokens.

    Args:
      cfg, params: the model and its FP32 params.
      rollout: tokens sampled in `dtype` with `base` numerics.
      dtype: the compute dtype D of both paths.
      base: the baseline numerics (those the rollout was sampled with).
      op_classes: the op classes to force one at a time (default: all of `OP_CLASSES`).
      temperature: the sampling temperature.
      max_batch_size, prompt_bucket: the sampler's batching, reproduced by the inference path.

    Returns:
      One row per variant, sorted by the fraction of the KL (k3) gap closed, largest first: `override`,
      `fp32_ops`, the mismatch statistics, and `<metric>_gap_closed` for kl_k3 and prob_abs_diff_mean.
    """
    dt = str(as_dtype(dtype))
    scoring_temperature = temperature if temperature > 0 else 1.0
    done: dict[Numerics, dict[str, float]] = {}  # variants with equal numerics are computed once
    rows = []
    for name, numerics in override_variants(base, op_classes).items():
        if numerics not in done:
            mu = paths.inference_logprobs(cfg, params, rollout, dt, numerics=numerics, temperature=temperature,
                                          max_batch_size=max_batch_size, prompt_bucket=prompt_bucket)
            pi = Scorer(cfg, dtype=dt, numerics=numerics)(params, rollout.tokens, rollout.attention_mask,
                                                          scoring_temperature)
            stats = mismatch.summarize(mismatch.mismatch_metrics(mu, pi, rollout.response_mask))
            done[numerics] = {k: stats[f"mismatch/{k}"] for k in _REPORTED}
        rows.append({"override": name, "fp32_ops": fp32_ops(numerics), **done[numerics]})
    baseline = next(r for r in rows if r["override"] == "baseline")
    for row in rows:
        for metric in GAP_METRICS:
            row[f"{metric}_gap_closed"] = _gap_closed(row[metric], baseline[metric])
    rows.sort(key=lambda r: -np.inf if np.isnan(r["kl_k3_gap_closed"]) else r["kl_k3_gap_closed"], reverse=True)
    return rows


def _gap_closed(value: float, baseline: float) -> float:
    return 1.0 - value / baseline if baseline > 0 else float("nan")


def best_override(rows: Sequence[dict[str, Any]], metric: str = "kl_k3") -> str | None:
    """The single op class whose FP32 override closes the largest fraction of `metric`'s gap (None if none)."""
    single = [r for r in rows if r["override"] in OP_CLASSES and np.isfinite(r[f"{metric}_gap_closed"])]
    return max(single, key=lambda r: r[f"{metric}_gap_closed"])["override"] if single else None
