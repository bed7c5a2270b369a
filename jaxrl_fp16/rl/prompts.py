"""The training prompt set: a task's problems, optionally filtered to the "perfectible" ones that the base model
solves with a pass rate inside a band (the paper's sanity test: 20%-80%).

Pass rates are estimated with the built-in JAX sampler in FP32, whatever the run's precision, and cached:
every arm of a precision comparison trains on the same prompts.

The selection works with any sampler: sample k responses per problem, keep the problems whose pass rate (mean
reward) lies in [low, high] (20-80% in the paper); a sound pipeline then drives training accuracy above 95%.
`build_perfectible_set` does it with a `solve(prompts, k)` callable, `build_prompt_set` with the run's samplers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxrl_fp16 import multiprocess
from jaxrl_fp16.rl.tasks import Problem, Task, score_responses
from jaxrl_fp16.sampling import JaxSampler
from jaxrl_fp16.validation import ConfigError, check_fields, check_positive

__all__ = ["PerfectibleSection", "build_prompt_set", "rollout_rewards", "pass_rates", "select_perfectible",
           "PerfectibleSet", "build_perfectible_set"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerfectibleSection:
    """Keep prompts the base model solves with a pass rate in [low, high] (the paper: 20%-80%)."""

    enabled: bool = True
    low: float = 0.2
    high: float = 0.8
    samples_per_prompt: int = 8
    max_prompts: int = 256
    # "jax": the built-in sampler in FP32 (embedded; the same prompts for every precision arm).
    # "run": the run's own sampler (e.g. vLLM on a GPU host, for large models); the set is cached on first use
    # and shared by later arms.
    sampler: str = "jax"

    def __post_init__(self):
        check_fields(self, "perfectible")
        if self.sampler not in ("jax", "run"):
            raise ConfigError(f"perfectible.sampler={self.sampler!r}; valid: jax, run")
        if not 0 <= self.low <= self.high <= 1:
            raise ConfigError(f"perfectible.low/high must satisfy 0 <= low <= high <= 1, got {self.low}, "
                              f"{self.high}")
        check_positive("perfectible", samples_per_prompt=self.samples_per_prompt, max_prompts=self.max_prompts)


def pass_rates(rewards_N: Any, group_size: int) -> np.ndarray:
    """Per-prompt mean reward [P] of rewards [N = P * group_size] grouped by prompt (prompt i: rows i*K..i*K+K-1)."""
    r = np.asarray(rewards_N, np.float64).reshape(-1)
    if group_size < 1 or r.size % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of group_size={group_size}")
    bad = np.flatnonzero(~np.isfinite(r))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"non-finite reward {r[i]} at row {i} (prompt {i // group_size}); "
                         f"{bad.size} non-finite in all")
    return r.reshape(-1, group_size).mean(axis=1)


def _check_window(low: float, high: float) -> None:
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")


def _in_window(rates: np.ndarray, low: float, high: float) -> np.ndarray:
    """The mask of pass rates in [low, high], bounds included."""
    _check_window(low, high)
    return (rates >= low) & (rates <= high)


def select_perfectible(problems: Sequence[Problem], pass_rates: Any, low: float = 0.2,
                       high: float = 0.8) -> list[Problem]:
    """The problems whose pass rate lies in [low, high] (bounds included), in their original order."""
    rates = np.asarray(pass_rates, np.float64).reshape(-1)
    if rates.size != len(problems):
        raise ValueError(f"{rates.size} pass rates for {len(problems)} problems")
    if not np.isfinite(rates).all():
        i = int(np.flatnonzero(~np.isfinite(rates))[0])
        raise ValueError(f"non-finite pass rate {rates[i]} for problem {i} (prompt {problems[i].prompt!r})")
    return [p for p, kept in zip(problems, _in_window(rates, low, high)) if kept]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerfectibleSet:
    """The selected problems with their pass rates, the pass rates of every candidate and summary stats."""

    problems: list[Problem]
    pass_rates: np.ndarray  # [S] of the selected problems
    candidate_pass_rates: np.ndarray  # [P] of all candidates, in their order
    stats: dict[str, float]


def build_perfectible_set(task: Task, problems: Sequence[Problem],
                          solve: Callable[[list[str], int], Sequence[Sequence[str | tuple[str, bool]]]], *,
                          k: int = 8, low: float = 0.2, high: float = 0.8,
                          batch_size: int | None = None) -> PerfectibleSet:
    """Estimates each problem's pass rate from `k` sampled responses and keeps those in [low, high].

    Args:
      task: scores the responses.
      problems: the candidates (e.g. `task.generate(n, seed)`).
      solve: `solve(prompts, k)` returns k responses for each prompt: decoded texts, or (text, truncated) pairs
        so that responses that hit the length limit get the task's truncated reward. Any sampler + tokenizer.
      k: samples per prompt.
      low, high: the pass-rate window (the paper's 20-80%).
      batch_size: prompts per `solve` call (None: all at once).

    Returns:
      A `PerfectibleSet`; stats: num_candidates, num_selected, fraction_selected, mean_pass_rate (all candidates),
      mean_pass_rate_selected, fraction_never_solved (rate 0), fraction_always_solved (rate 1), samples_per_prompt.
    """
    _check_window(low, high)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    step = max(1, len(problems)) if batch_size is None else batch_size
    chunks = []
    for start in range(0, len(problems), step):
        batch = list(problems[start:start + step])
        responses = solve([p.prompt for p in batch], k)
        if any(len(group) != k for group in responses):
            raise ValueError(f"solve must return {k} responses per prompt")
        chunks.append(score_responses(task, batch, responses))
    rewards_PxK = np.concatenate(chunks) if chunks else np.zeros((0, k))
    rates = pass_rates(rewards_PxK.reshape(-1), k)
    keep = _in_window(rates, low, high)
    selected = [p for p, kept in zip(problems, keep) if kept]
    n = len(problems)
    stats = {
        "num_candidates": float(n),
        "num_selected": float(len(selected)),
        "fraction_selected": len(selected) / n if n else 0.0,
        "mean_pass_rate": float(rates.mean()) if n else 0.0,
        "mean_pass_rate_selected": float(rates[keep].mean()) if selected else 0.0,
        "fraction_never_solved": float((rates == 0).mean()) if n else 0.0,
        "fraction_always_solved": float((rates == 1).mean()) if n else 0.0,
        "samples_per_prompt": float(k),
    }
    return PerfectibleSet(problems=selected, pass_rates=rates[keep], candidate_pass_rates=rates, stats=stats)


def rollout_rewards(task: Any, problems: list[Problem], tokenizer: Any, rollout: Any) -> np.ndarray:
    """Rewards [N] of a rollout that holds K consecutive responses to each of `problems`, in order."""
    texts = tokenizer.batch_decode(rollout.responses(), skip_special_tokens=True)
    items = list(zip(texts, rollout.truncated.tolist()))
    k = len(items) // len(problems)
    grouped = [items[i * k:(i + 1) * k] for i in range(len(problems))]
    return score_responses(task, problems, grouped).reshape(-1).astype(np.float32)


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: str, obj: Any) -> None:
    """`obj` as JSON at `path`, atomically: a temporary file of this writer's own, then a rename (concurrent
    writers of the same cache each rename a whole file)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def build_prompt_set(run: Any, base_dir: str, model_cfg: Any, params: Any, tokenizer: Any, task: Any,
                     run_sampler: Any = None) -> tuple[list[Problem], dict[str, Any]]:
    """The problems to train on, with stats (candidates, kept, mean pass rate before/after the filter).

    Pass rates come from the built-in JAX sampler in FP32, or from `run_sampler` when
    `perfectible.sampler` is "run". With several processes, process 0 builds the cache (its own sampler, on
    its own devices) while the others wait, then every process reads it: the same set everywhere."""
    return multiprocess.first_then_others(
        lambda: _build_prompt_set(run, base_dir, model_cfg, params, tokenizer, task, run_sampler), "prompt-set")


def _build_prompt_set(run: Any, base_dir: str, model_cfg: Any, params: Any, tokenizer: Any, task: Any,
                      run_sampler: Any = None) -> tuple[list[Problem], dict[str, Any]]:
    candidates = task.generate(run.task.num_problems, run.task.seed)
    if not run.perfectible.enabled:
        return candidates[: run.perfectible.max_prompts], {"prompts/candidates": len(candidates),
                                                           "prompts/kept": min(len(candidates),
                                                                               run.perfectible.max_prompts)}
    spec = {"base": os.path.realpath(base_dir), "task": dataclasses.asdict(run.task),
            "perfectible": dataclasses.asdict(run.perfectible), "temperature": run.sampler.temperature,
            "top_p": run.sampler.top_p, "top_k": run.sampler.top_k,
            "max_new_tokens": run.sampler.max_new_tokens,
            "sampler": "jax-float32" if run.perfectible.sampler == "jax" else run.sampler.name, "version": 1}
    cache = os.path.join(run.model.cache_dir, f"prompts-{_key(spec)}.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            saved = json.load(f)
        return [candidates[i] for i in saved["indices"]], saved["stats"]

    p = run.perfectible
    if p.sampler == "run":
        if run_sampler is None:
            raise ValueError("perfectible.sampler='run' needs the run's sampler")
        sampler = run_sampler
    else:
        sampler = JaxSampler(model_cfg, params, dtype="float32", max_batch_size=run.sampler.max_batch_size)
    prompts = [tokenizer(c.prompt, add_special_tokens=False)["input_ids"] for c in candidates]
    rollout = sampler.generate(prompts, run.sampler.settings(p.samples_per_prompt, run.task.seed, logprobs=False))
    rewards = rollout_rewards(task, candidates, tokenizer, rollout)
    rates = pass_rates(rewards, p.samples_per_prompt)
    position = {id(c): i for i, c in enumerate(candidates)}
    kept = [position[id(c)] for c in select_perfectible(candidates, rates, p.low, p.high)][: p.max_prompts]
    if not kept:
        raise ValueError(f"no problem has a pass rate in [{p.low}, {p.high}] (mean pass rate "
                         f"{float(np.mean(rates)):.3f} over {len(candidates)} candidates): the base model is too "
                         f"weak or too strong for this task; change the warm start or the band")
    stats = {"prompts/candidates": len(candidates), "prompts/kept": len(kept),
             "prompts/pass_rate_all": float(np.mean(rates)),
             "prompts/pass_rate_kept": float(np.mean(np.asarray(rates)[kept]))}
    _write_json(cache, {"indices": [int(i) for i in kept], "stats": stats})
    log.info("prompt set: %s", stats)
    return [candidates[i] for i in kept], stats
