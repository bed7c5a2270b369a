"""The whole study on one model: sample, attribute by layer and by op class, by response position; write it up.

Files written by `run_study` into `out_dir`:
    study.md                 every table, each with a one-line reading guide
    study.json               the same numbers (and the per-position arrays), machine-readable
    layer_drift.png          per-layer hidden-state drift, per dtype and comparison
    override_gap.png         gap closed per op class forced to FP32, per dtype
    mismatch_vs_length.png   token and sequence mismatch against the response position
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Sequence

import numpy as np

from jaxrl_fp16 import mismatch
from jaxrl_fp16.tools.analysis import json_safe, random_prompts
from jaxrl_fp16.models.config import Numerics
from jaxrl_fp16.models.hf import load_hf_params
from jaxrl_fp16.precision import dtype_name
from jaxrl_fp16.sampling.base import SamplingSettings
from jaxrl_fp16.sampling.jax_sampler import JaxSampler
from jaxrl_fp16.scoring import Scorer
from jaxrl_fp16.tools.study import paths
from jaxrl_fp16.tools.study.layers import layer_drift
from jaxrl_fp16.tools.study.length import mismatch_vs_length
from jaxrl_fp16.tools.study.overrides import best_override, fp32_ops, override_table

__all__ = ["run_study", "to_markdown", "format_report", "STUDY_FILES"]

log = logging.getLogger(__name__)

STUDY_FILES = ("study.md", "study.json", "layer_drift.png", "override_gap.png", "mismatch_vs_length.png")
_CONTEXT_KEYS = ("kl_k3", "kl_k1", "prob_abs_diff_mean", "prob_abs_diff_max", "seq_log_ratio_abs_mean",
                 "seq_log_ratio_abs_max", "num_tokens")


def _cell(key: str, value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "nan"
        if key.endswith("gap_closed"):
            return f"{100 * value:.1f}%"
        return f"{value:.3g}"
    return str(value)


def to_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A markdown table of `rows` (dicts), in `columns` order (default: the first row's keys).

    Floats print with 3 significant digits, `*gap_closed` columns as percentages.
    """
    if not rows:
        return "(no rows)"
    columns = list(rows[0]) if columns is None else list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c, row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def run_study(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
              dtypes: Sequence[str] = ("bfloat16", "float16"), num_prompts: int, prompt_len: int,
              max_new_tokens: int, samples_per_prompt: int, seed: int, temperature: float = 1.0,
              numerics: Numerics = Numerics(), op_classes: Sequence[str] | None = None,
              max_batch_size: int = 256, plots: bool = True) -> dict[str, Any]:
    """Samples with the JAX engine in each dtype and attributes the sampler-trainer mismatch (see the module doc).

    Args:
      model_dir: a Hugging Face checkpoint folder (`load_hf_params`).
      out_dir: where the files go (created).
      dtypes: the compute dtypes to study, each for both paths.
      num_prompts, prompt_len: random prompts of token ids (special ids excluded), drawn with `seed`.
      max_new_tokens, samples_per_prompt, seed, temperature: the sampling (no top-k / top-p).
      numerics: the baseline numerics, used for sampling and as the override table's reference.
      op_classes: the op classes for the override table (default: all).
      max_batch_size: the sampler's rows per call (the inference replay uses the same batches).
      plots: write the PNGs.

    Returns:
      The content of study.json: settings, and per dtype the mismatch, per-layer rows, override rows, the best
      single override and the per-position arrays.
    """
    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    cfg, params = load_hf_params(model_dir)
    specials = [t for t in (*cfg.eos_token_ids, cfg.pad_token_id, cfg.bos_token_id) if t is not None]
    prompts = random_prompts(num_prompts, prompt_len, cfg.vocab_size, specials, seed)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, samples_per_prompt=samples_per_prompt,
                                temperature=temperature, seed=seed)
    scoring_temperature = temperature if temperature > 0 else 1.0
    result: dict[str, Any] = {
        "model": os.path.basename(os.path.normpath(os.fspath(model_dir))),
        "model_config": {"arch": cfg.arch, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                         "vocab_size": cfg.vocab_size, "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads},
        "baseline_fp32_ops": fp32_ops(numerics),
        "settings": {"num_prompts": num_prompts, "prompt_len": prompt_len, **dataclasses.asdict(settings)},
        "dtypes": {},
    }
    for dtype in dtypes:
        dt = str(paths.as_dtype(dtype))
        log.info("study: sampling in %s", dt)
        sampler = JaxSampler(cfg, params, dtype=dt, numerics=numerics, max_batch_size=max_batch_size)
        rollout = sampler.generate(prompts, settings)
        sampler.close()
        pi = Scorer(cfg, dtype=dt, numerics=numerics)(params, rollout.tokens, rollout.attention_mask,
                                                      scoring_temperature)
        pi = np.where(rollout.response_mask == 1, pi, 0.0).astype(np.float32)
        stats = mismatch.summarize(mismatch.mismatch_metrics(rollout.logprobs, pi, rollout.response_mask))
        log.info("study: per-layer drift in %s", dt)
        layers = layer_drift(cfg, params, rollout, dt, numerics=numerics, temperature=temperature,
                             max_batch_size=max_batch_size)
        log.info("study: op-class overrides in %s", dt)
        overrides = override_table(cfg, params, rollout, dt, base=numerics, op_classes=op_classes,
                                   temperature=temperature, max_batch_size=max_batch_size)
        length = mismatch_vs_length(rollout.logprobs, pi, rollout.response_mask)
        result["dtypes"][dt] = {
            "mismatch": {k.removeprefix("mismatch/"): v for k, v in stats.items()},
            "response_length_mean": float(rollout.response_lengths.mean()),
            "layer_drift": layers.rows,
            "layer_drift_mismatch": layers.mismatch,
            "overrides": overrides,
            "best_override": best_override(overrides),
            "length": {k: v.tolist() for k, v in length.items()},
        }
    result["seconds"] = time.perf_counter() - t_start
    files = ["study.md", "study.json"]
    if plots:
        files += _write_plots(result, out_dir)
    result["files"] = files
    with open(os.path.join(out_dir, "study.json"), "w") as f:
        json.dump(json_safe(result), f, indent=2)
    with open(os.path.join(out_dir, "study.md"), "w") as f:
        f.write(format_report(result))
    return result


def _label(dt: str) -> str:
    return {"f32": "FP32", "f16": "FP16", "bf16": "BF16"}[dtype_name(dt)]


def _write_plots(result: dict[str, Any], out_dir: str | os.PathLike) -> list[str]:
    from jaxrl_fp16.tools import plots

    per = result["dtypes"]
    plots.layer_drift_plot({_label(dt): d["layer_drift"] for dt, d in per.items()},
                           os.path.join(out_dir, "layer_drift.png"))
    plots.override_gap_plot({_label(dt): d["overrides"] for dt, d in per.items()},
                            os.path.join(out_dir, "override_gap.png"))
    plots.mismatch_vs_length_plot({_label(dt): {k: np.asarray(v, np.float64) for k, v in d["length"].items()}
                                   for dt, d in per.items()}, os.path.join(out_dir, "mismatch_vs_length.png"))
    return ["layer_drift.png", "override_gap.png", "mismatch_vs_length.png"]


def _divergence_summary(rows: Sequence[dict[str, Any]], kl_k3: float) -> str:
    """One sentence: how large the paths' drift gets, and at which layer it grows the most."""
    drift = np.array([r["inf_vs_train_mean"] for r in rows], np.float64)
    if not drift.size or not np.any(drift > 0):
        text = "the two paths' hidden states are bit-identical after every layer"
        if kl_k3 > 0:
            text += ", so the whole log-prob mismatch arises after the last layer (final norm, LM head)"
        return text + "."
    onset = int(np.argmax(drift > 0))
    prev = np.concatenate([[np.nan], drift[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        growth = np.where(prev > 0, drift / prev, np.nan)
    text = (f"the paths first differ after layer {rows[onset]['layer']} (mean {drift[onset]:.2g}) and reach "
            f"{drift[-1]:.2g} after layer {rows[-1]['layer']}")
    if np.any(np.isfinite(growth)):
        j = int(np.nanargmax(growth))
        text += f"; the largest step is layer {rows[j]['layer']} (x{growth[j]:.2g} over the layer before)"
    ratio = rows[-1].get("mismatch_to_rounding", float("nan"))
    if np.isfinite(ratio):
        text += f"; at the last layer the paths differ by {ratio:.2g}x the training path's own rounding error"
    return text + "."


_LAYER_COLUMNS = ("layer", "inf_vs_train_mean", "inf_vs_train_max", "inf_vs_fp32_mean", "inf_vs_fp32_max",
                  "train_vs_fp32_mean", "train_vs_fp32_max", "fp32_inf_vs_train_max", "inf_vs_train_nonzero",
                  "mismatch_to_rounding")
_OVERRIDE_COLUMNS = ("override", "fp32_ops", "kl_k3", "kl_k3_gap_closed", "prob_abs_diff_mean",
                     "prob_abs_diff_mean_gap_closed", "seq_log_ratio_abs_mean")


def format_report(result: dict[str, Any]) -> str:
    """study.md: the tables of a `run_study` result, each with a line on how to read it."""
    s, per = result["settings"], result["dtypes"]
    out = [
        "# Precision study: where the sampler-trainer mismatch comes from",
        "",
        f"Model `{result['model']}` ({result['model_config']['arch']}, {result['model_config']['num_layers']} "
        f"layers, hidden {result['model_config']['hidden_size']}); {s['num_prompts']} random prompts of "
        f"{s['prompt_len']} tokens x {s['samples_per_prompt']} samples, up to {s['max_new_tokens']} new tokens, "
        f"temperature {s['temperature']}, seed {s['seed']}. Baseline numerics: FP32 for "
        f"{result['baseline_fp32_ops']}. Each dtype samples its own responses with the JAX engine (KV-cache "
        f"decode: mu) and rescores them with the trainer's teacher-forced forward in the same dtype (pi).",
        "",
        "## Mismatch",
        "",
        "Token KL(mu||pi) (k3), mean/max |pi - mu| and the mean |sequence log-ratio| over the sampled responses.",
        "",
        to_markdown([{"dtype": dt, **{k: d["mismatch"][k] for k in _CONTEXT_KEYS},
                      "num_tokens": int(d["mismatch"]["num_tokens"])} for dt, d in per.items()]),
        "",
        "## Per-layer drift",
        "",
        "Relative distance ||h_a - h_b|| / ||h_b|| of the residual stream after each layer, at the positions "
        "whose next-token distribution scores a response token: `inf_vs_train` compares the two paths in the "
        "dtype (the mismatch), `inf_vs_fp32` / `train_vs_fp32` each path with itself in FP32 (its rounding "
        "error), `fp32_inf_vs_train` the two paths in FP32 (the floor); `inf_vs_train_nonzero` the fraction of "
        "positions where the paths differ at all; `mismatch_to_rounding` = "
        "inf_vs_train_mean / train_vs_fp32_mean (about 1.4 if the paths round independently, less if alike).",
    ]
    for dt, d in per.items():
        m = d["layer_drift_mismatch"]
        summary = _divergence_summary(d["layer_drift"], m["kl_k3"])
        out += ["", f"### {dt}", "", f"{_label(dt)}: {summary} Final log-probs: kl_k3 {m['kl_k3']:.3g}, "
                f"mean |pi - mu| {m['prob_abs_diff_mean']:.3g}.", "", to_markdown(d["layer_drift"], _LAYER_COLUMNS)]
    out += [
        "",
        "## Op-class overrides",
        "",
        "Both paths rescore the same sampled tokens with one op class forced to FP32 (the rest in the dtype); "
        "`gap_closed` = 1 - metric / metric(baseline): 100% removes the mismatch, 0% does nothing, negative "
        "makes it worse. `none` runs every op class in the dtype; `all` runs every op class in FP32, so what it "
        "leaves comes from the matmuls and the weights' rounding. A class the baseline already runs in FP32 "
        "equals the baseline. Sorted by the k3 gap closed.",
    ]
    for dt, d in per.items():
        best = d["best_override"]
        if best is None:
            line = f"{_label(dt)}: no single op class override was measured."
        else:
            row = next(r for r in d["overrides"] if r["override"] == best)
            line = (f"{_label(dt)}: the single op class that closes most of the gap is **{best}** "
                    f"({_cell('kl_k3_gap_closed', row['kl_k3_gap_closed'])} of kl_k3, "
                    f"{_cell('x_gap_closed', row['prob_abs_diff_mean_gap_closed'])} of mean |pi - mu|).")
        all_row = next((r for r in d["overrides"] if r["override"] == "all"), None)
        if all_row is not None:
            line += (f" With every op class in FP32, "
                     f"{_cell('x_gap_closed', 1 - all_row['kl_k3_gap_closed'])} of the k3 gap remains.")
        out += ["", f"### {dt}", "", line, "", to_markdown(d["overrides"], _OVERRIDE_COLUMNS)]
    out += [
        "",
        "## Mismatch vs response length",
        "",
        "Per bin of response positions k: mean |log pi - log mu| of token k, and mean |sequence log-ratio| after "
        "k tokens (over the sequences that long); a log-ratio that grows like sqrt(k) is a random walk of "
        "independent token errors.",
        "",
    ]
    bins_rows = []
    first = next(iter(per.values()), None)
    if first is not None:
        starts, stops = first["length"]["bin_start"], first["length"]["bin_stop"]
        for j, (a, b) in enumerate(zip(starts, stops)):
            row: dict[str, Any] = {"k": f"{a}-{b - 1}" if b - 1 > a else f"{a}"}
            for dt, d in per.items():
                ln = d["length"]
                same = j < len(ln["bin_start"]) and ln["bin_start"][j] == a and ln["bin_stop"][j] == b
                row[f"{_label(dt)} token"] = ln["bin_token_abs_mean"][j] if same else float("nan")
                row[f"{_label(dt)} prefix"] = ln["bin_prefix_abs_mean"][j] if same else float("nan")
            bins_rows.append(row)
    out += [to_markdown([{k: (float("nan") if v is None else v) for k, v in r.items()} for r in bins_rows])]
    pngs = [f for f in result.get("files", []) if f.endswith(".png")]
    if pngs:
        out += ["", "## Plots", ""] + [f"![{f[:-4]}]({f})" for f in pngs]
    return "\n".join(out) + "\n"
