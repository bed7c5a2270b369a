"""Offline mismatch analysis (the paper's): sample with an engine, rescore with the trainer, compare.

Files written by `save_mismatch` (one run = one sampler dtype):
    summary.json   the `mismatch/*` metrics, plus model, sampler, dtypes, counts and sampling settings
    tokens.npz     sequences [N, T] (prompt then response; log-prob t is of sequences[:, t] given [:, :t]),
                   attention_mask, response_mask, sampler_logprobs, trainer_logprobs ([N, T] float32,
                   0 where response_mask is 0)
    token_probs.png, seq_log_ratio.png   pi vs mu scatter; sequence log-ratio vs response length
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import numpy as np

from jaxrl_fp16 import mismatch
from jaxrl_fp16.sampling.base import Rollout, Sampler, SamplingSettings
from jaxrl_fp16.scoring import Scorer

__all__ = ["MismatchResult", "measure_mismatch", "save_mismatch", "random_prompts", "load_prompts",
           "format_table", "json_safe"]


@dataclasses.dataclass
class MismatchResult:
    summary: dict[str, Any]
    rollout: Rollout
    trainer_logprobs: np.ndarray


def measure_mismatch(sampler: Sampler, scorer: Scorer, params: Any, prompts: Sequence[Sequence[int]],
                     settings: SamplingSettings, info: dict[str, Any] | None = None) -> MismatchResult:
    """Samples `prompts` with `sampler`, rescores the same tokens with `scorer` on `params`, compares them."""
    t0 = time.perf_counter()
    rollout = sampler.generate(prompts, settings)
    t1 = time.perf_counter()
    temperature = settings.temperature if settings.temperature > 0 else 1.0
    pi = scorer(params, rollout.tokens, rollout.attention_mask, temperature)
    t2 = time.perf_counter()
    pi = np.where(rollout.response_mask == 1, pi, 0.0).astype(np.float32)
    metrics = mismatch.summarize(mismatch.mismatch_metrics(rollout.logprobs, pi, rollout.response_mask))
    lengths = rollout.response_lengths
    summary = {
        **(info or {}),
        "sampler_dtype": str(np.dtype(sampler.compute_dtype)),
        "trainer_dtype": str(np.dtype(scorer.compute_dtype)),
        "num_prompts": len(prompts),
        "num_sequences": rollout.num_rows,
        "response_length_mean": float(lengths.mean()),
        "truncated_fraction": float(rollout.truncated.mean()),
        "sampling": dataclasses.asdict(settings),
        "seconds_sampling": t1 - t0,
        "seconds_scoring": t2 - t1,
        **metrics,
    }
    return MismatchResult(summary, rollout, pi)


def save_mismatch(result: MismatchResult, out_dir: str | os.PathLike, plots: bool = True) -> None:
    os.makedirs(out_dir, exist_ok=True)
    r = result.rollout
    np.savez_compressed(
        os.path.join(out_dir, "tokens.npz"), sequences=r.tokens, attention_mask=r.attention_mask,
        response_mask=r.response_mask, sampler_logprobs=r.logprobs.astype(np.float32),
        trainer_logprobs=result.trainer_logprobs.astype(np.float32), prompt_index=r.prompt_index)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(json_safe(result.summary), f, indent=2)
    if plots:
        from jaxrl_fp16.tools import plots as plotting

        label = f"sampler {result.summary['sampler_dtype']} / trainer {result.summary['trainer_dtype']}"
        plotting.token_prob_scatter({label: (r.logprobs, result.trainer_logprobs, r.response_mask)},
                                    os.path.join(out_dir, "token_probs.png"))
        plotting.seq_log_ratio_vs_length({label: (r.logprobs, result.trainer_logprobs, r.response_mask)},
                                         os.path.join(out_dir, "seq_log_ratio.png"))


def json_safe(obj: Any) -> Any:
    """Strict JSON: numpy scalars as Python numbers, NaN as null, infinities as "inf" / "-inf"."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None if np.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def random_prompts(num: int, length: int, vocab_size: int, exclude: Sequence[int] = (),
                   seed: int = 0) -> list[list[int]]:
    """`num` prompts of `length` token ids drawn uniformly from the vocabulary minus `exclude` (no tokenizer)."""
    if num < 1 or length < 1:
        raise ValueError(f"need at least one prompt of at least one token, got {num} x {length}")
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(list(exclude), dtype=np.int64))
    rng = np.random.default_rng(seed)
    return rng.choice(allowed, size=(num, length)).tolist()


def load_prompts(path: str | os.PathLike, model_dir: str | None = None) -> list[list[int]]:
    """Prompts from a file: JSON lines of token-id lists or {"prompt_ids": [...]}, or {"prompt": text} /
    plain-text lines (one prompt a line), tokenized with the model directory's tokenizer."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path} does not exist")
    texts, prompts = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                item = line.rstrip("\n")
            if isinstance(item, dict):
                item = item.get("prompt_ids", item.get("prompt"))
                if item is None:
                    raise ValueError(f"{path}:{lineno}: expected a 'prompt_ids' or 'prompt' field")
            if isinstance(item, list):
                if not all(isinstance(t, int) for t in item):
                    raise ValueError(f"{path}:{lineno}: a token-id list must hold integers only")
                prompts.append(item)
            else:
                texts.append((len(prompts), str(item)))
                prompts.append(None)
    if texts:
        if model_dir is None:
            raise ValueError(f"{path} holds text prompts: a model directory with a tokenizer is needed")
        from jaxrl_fp16.models.hf import load_tokenizer

        tok = load_tokenizer(model_dir)
        for i, text in texts:
            prompts[i] = tok(text, add_special_tokens=False)["input_ids"]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


TABLE_COLUMNS = ("mismatch/kl_k3", "mismatch/kl_k1", "mismatch/prob_abs_diff_mean", "mismatch/prob_abs_diff_max",
                 "mismatch/seq_log_ratio_abs_mean", "mismatch/seq_log_ratio_abs_max", "mismatch/num_tokens")


def format_table(summaries: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the main mismatch statistics, one row per run."""
    head = ["sampler", "sampler dtype", "trainer dtype"] + [c.removeprefix("mismatch/") for c in TABLE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [str(s.get("sampler", "")), s["sampler_dtype"], s["trainer_dtype"]]
        cells += [f"{int(s[c])}" if c.endswith("num_tokens") else f"{s[c]:.3g}" for c in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
