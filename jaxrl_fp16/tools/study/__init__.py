"""Precision study tools: where the sampler-trainer mismatch comes from (by layer, by op class, by position)."""

from jaxrl_fp16.tools.study.layers import DRIFT_COMPARISONS, LayerDrift, layer_drift
from jaxrl_fp16.tools.study.length import mismatch_vs_length
from jaxrl_fp16.tools.study.overrides import OP_CLASSES, best_override, fp32_ops, override_table, override_variants
from jaxrl_fp16.tools.study.paths import inference_logprobs
from jaxrl_fp16.tools.study.report import STUDY_FILES, format_report, run_study, to_markdown

__all__ = [
    "DRIFT_COMPARISONS", "LayerDrift", "OP_CLASSES", "STUDY_FILES", "best_override", "format_report", "fp32_ops",
    "inference_logprobs", "layer_drift", "mismatch_vs_length", "override_table", "override_variants",
    "run_study", "to_markdown",
]
