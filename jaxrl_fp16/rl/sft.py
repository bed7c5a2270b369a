"""Supervised warm start: teach a (tiny) model a task's reference responses with the one mixed-precision step,
so that RL starts from a base model that solves part of the task. Also builds and caches the base model that
a run config describes (`ensure_base_model`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl_fp16.loss_scale import DynamicLossScale, NoOpLossScale
from jaxrl_fp16.models.decoder import CausalLM, token_logprobs
from jaxrl_fp16.models.hf import load_hf_params, save_hf_params
from jaxrl_fp16.precision import get_policy
from jaxrl_fp16.step import TrainState, make_train_step

__all__ = ["run_sft", "ensure_base_model", "sft_examples"]

log = logging.getLogger(__name__)


def sft_examples(task: Any, tokenizer: Any, num: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenized (prompt + reference response + EOS) rows, right-padded: tokens, attention mask, loss mask."""
    problems = task.generate(num, seed)
    eos = tokenizer.eos_token_id
    rows, loss_rows = [], []
    for p in problems:
        prompt = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        response = tokenizer(task.reference_response(p), add_special_tokens=False)["input_ids"] + [eos]
        rows.append(prompt + response)
        loss_rows.append([0] * len(prompt) + [1] * len(response))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    tokens = np.full((num, width), pad, np.int32)
    attn = np.zeros((num, width), np.int32)
    loss_mask = np.zeros((num, width), np.float32)
    for i, (r, m) in enumerate(zip(rows, loss_rows)):
        tokens[i, : len(r)], attn[i, : len(r)], loss_mask[i, : len(m)] = r, 1, m
    return tokens, attn, loss_mask


def run_sft(model_dir: str, task: Any, sft: Any, out_dir: str, *, progress: bool = True,
            overwrite: bool = False) -> dict[str, float]:
    """Trains `model_dir` on `task`'s reference responses per the `SFTSection` `sft`; writes an HF dir."""
    from tqdm.auto import tqdm

    from jaxrl_fp16.models.hf import load_tokenizer
    from jaxrl_fp16.outputs import check_output_dir

    check_output_dir(out_dir, overwrite=overwrite, sources=[model_dir])  # before the training, not after it
    cfg, params = load_hf_params(model_dir)
    tokenizer = load_tokenizer(model_dir)
    policy = get_policy(sft.precision)
    tokens, attn, loss_mask = sft_examples(task, tokenizer, sft.num_problems, sft.seed)
    if tokens.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"SFT examples are {tokens.shape[1]} tokens long, more than the model's context "
                         f"({cfg.max_position_embeddings})")
    model = CausalLM(cfg, dtype=policy.compute_dtype)

    def loss_fn(p, batch):
        logp = token_logprobs(model, p, batch["tokens"], batch["attn"])
        mask = batch["loss_mask"]
        nll = -jnp.sum(logp * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        return nll, {}

    warmup = max(0, min(sft.warmup_steps, sft.steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, sft.lr, warmup, sft.steps, end_value=sft.lr * 0.1) \
        if sft.steps > 1 else sft.lr
    optimizer = optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.0)
    scale = DynamicLossScale(loss_scale=2.0 ** 15, period=200) if policy.compute_dtype == np.float16 \
        else NoOpLossScale()
    step = make_train_step(loss_fn, optimizer, policy, max_grad_norm=1.0, donate=True)
    state = TrainState.create(jax.tree_util.tree_map(jnp.asarray, params), optimizer, scale)
    rng = np.random.default_rng(sft.seed)
    losses = []
    for _ in tqdm(range(sft.steps), desc="warm start", disable=not progress, leave=False):
        idx = rng.choice(len(tokens), size=sft.batch_size, replace=len(tokens) < sft.batch_size)
        state, metrics = step(state, {"tokens": tokens[idx], "attn": attn[idx], "loss_mask": loss_mask[idx]})
        losses.append(float(metrics["loss"]))
    save_hf_params(jax.device_get(state.params), cfg, out_dir, dtype="float32", tokenizer_from=model_dir,
                   overwrite=overwrite)
    stats = {"sft/loss_first": losses[0], "sft/loss_last": float(np.mean(losses[-10:])),
             "sft/skipped_steps": int(state.skipped_steps)}
    log.info("warm start done: %s", stats)
    return stats


def _cache_key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ensure_base_model(run: Any, progress: bool = True) -> str:
    """The base model directory of a `RunConfig`: `model.path`, or a tiny model built and warm-started on the
    run's task, cached under `model.cache_dir` keyed by everything that determines it. With several processes,
    process 0 builds it while the others wait, then they find it (`model.cache_dir` shared by the hosts)."""
    from jaxrl_fp16 import multiprocess

    if run.model.path is not None:
        return _ensure_base_model(run, progress)
    return multiprocess.first_then_others(lambda: _ensure_base_model(run, progress), "base-model")


def _ensure_base_model(run: Any, progress: bool) -> str:
    import dataclasses

    from jaxrl_fp16.models.tiny import make_tiny
    from jaxrl_fp16.rl.tasks import make_task

    m = run.model
    if m.path is not None:
        if not os.path.isfile(os.path.join(m.path, "config.json")):
            raise FileNotFoundError(f"model.path={m.path} is not a Hugging Face model directory (no config.json)")
        return m.path
    spec = {"tiny": dataclasses.asdict(m.tiny), "warm_start": dataclasses.asdict(m.warm_start),
            "task": {"name": run.task.name, "options": dict(run.task.options)}, "version": 1}
    out = os.path.join(m.cache_dir, f"base-{run.task.name}-{_cache_key(spec)}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    os.makedirs(m.cache_dir, exist_ok=True)
    t = m.tiny
    with tempfile.TemporaryDirectory(dir=m.cache_dir) as tmp:
        random_dir = make_tiny(os.path.join(tmp, "random"), t.arch, vocab_size=t.vocab_size,
                               hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                               num_layers=t.num_layers, num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
                               tie_word_embeddings=t.tie_word_embeddings,
                               max_position_embeddings=t.max_position_embeddings, seed=t.seed)
        task = make_task(run.task.name, **dict(run.task.options))
        run_sft(random_dir, task, m.warm_start, out, progress=progress)
    spec_file = os.path.join(out, "base_model_spec.json")
    with open(f"{spec_file}.{os.getpid()}.tmp", "w") as f:  # a writer's own temporary file, then a rename
        json.dump(spec, f, indent=2)
    os.replace(f.name, spec_file)
    return out
