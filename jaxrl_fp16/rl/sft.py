"""Supervised warm start: teach a (tiny) model a task's reference responses with the one mixed-precision step,
so that RL starts from a base model that solves part of the task. Also builds and caches the base model that
a run config describes (`ensure_base_model`), and defines the run config's `model` section (`ModelSection`, with
its `tiny` model and `warm_start`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl_fp16 import multiprocess
from jaxrl_fp16.loss_scale import LossScaleSection
from jaxrl_fp16.models.attention import resolve_remat
from jaxrl_fp16.models.config import Numerics
from jaxrl_fp16.models.decoder import CausalLM, token_logprobs
from jaxrl_fp16.models.hf import load_hf_params, load_tokenizer, save_hf_params
from jaxrl_fp16.models.tiny import EOS_TOKEN, PAD_TOKEN, make_tiny
from jaxrl_fp16.outputs import check_output_dir
from jaxrl_fp16.precision import get_policy
from jaxrl_fp16.step import TrainState, make_train_step
from jaxrl_fp16.validation import (ConfigError, call_checked, check_choice, check_fields, check_non_negative,
                                   check_positive)

__all__ = ["ModelSection", "TinyModelConfig", "SFTSection", "run_sft", "ensure_base_model", "base_model_spec",
           "base_model_key", "warm_start_result", "sft_examples",
           "SFT_LOSS_SCALE", "ATTENTION_CHOICES", "REMAT_CHOICES", "LAYER_LOOP_CHOICES"]

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "dense", "blockwise", "cudnn")
REMAT_CHOICES = ("auto", "none", "full", "dots")
LAYER_LOOP_CHOICES = ("scan", "unrolled")
# The warm start's loss scale: dynamic for float16 compute (from 2^15, growing every 200 finite steps), else none.
SFT_LOSS_SCALE = LossScaleSection(init_scale=2.0 ** 15, period=200)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyModelConfig:
    """A tiny random model built locally when `model.path` is not set (see `jaxrl-fp16 make-tiny`)."""

    arch: str = "qwen2"
    vocab_size: int = 320
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    seed: int = 0

    def __post_init__(self):
        check_fields(self, "model.tiny")
        if self.arch not in ("qwen2", "qwen3", "llama"):
            raise ConfigError(f"model.tiny.arch={self.arch!r}; valid: qwen2, qwen3, llama")
        check_positive("model.tiny", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                       intermediate_size=self.intermediate_size, num_layers=self.num_layers, num_heads=self.num_heads,
                       num_kv_heads=self.num_kv_heads, max_position_embeddings=self.max_position_embeddings)
        tokens = 256 + len((EOS_TOKEN, PAD_TOKEN))  # the character tokenizer: one token per byte, EOS and PAD
        if self.vocab_size < tokens:
            raise ConfigError(f"model.tiny.vocab_size={self.vocab_size} is smaller than the tokenizer's {tokens} "
                              f"tokens")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(f"model.tiny.hidden_size={self.hidden_size} must be num_heads={self.num_heads} "
                              f"times an even head size (RoPE rotates pairs)")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.tiny.num_heads={self.num_heads} must be a multiple of "
                              f"model.tiny.num_kv_heads={self.num_kv_heads}")

    def build(self, out_dir: str) -> str:
        """Writes this random model (Hugging Face format, with its character tokenizer) to `out_dir`."""
        return make_tiny(out_dir, self.arch, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                         intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                         num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                         tie_word_embeddings=self.tie_word_embeddings,
                         max_position_embeddings=self.max_position_embeddings, seed=self.seed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTSection:
    """Supervised warm start on the task's reference responses (the same mixed-precision step)."""

    steps: int = 400  # steps per round: `warmup_steps` of warmup, then a cosine decay to lr / 10
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 20
    precision: str = "fp32"
    num_problems: int = 4096
    seed: int = 0
    # Rounds to a loss target: with `target_loss` set, a round whose mean loss over its last tenth of steps is
    # above it is followed by another (the schedule restarts, Adam's moments carry over), up to `max_rounds`
    # rounds; a run that stops above the target says so in the log. None: one round, no check.
    target_loss: Optional[float] = None
    max_rounds: int = 1

    def __post_init__(self):
        check_fields(self, "model.warm_start")
        check_positive("model.warm_start", steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                       num_problems=self.num_problems, max_rounds=self.max_rounds)
        check_non_negative("model.warm_start", warmup_steps=self.warmup_steps)
        call_checked("model.warm_start.precision", get_policy, self.precision)
        if self.target_loss is not None:
            check_positive("model.warm_start", target_loss=self.target_loss)
        elif self.max_rounds > 1:
            raise ConfigError(f"model.warm_start.max_rounds={self.max_rounds} needs model.warm_start.target_loss "
                              f"(the loss that ends the rounds)")

    @property
    def window(self) -> int:
        """The steps at the end of a round whose mean loss is compared with `target_loss`."""
        return max(1, self.steps // 10)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    """The base policy: an existing Hugging Face directory, or a tiny model built and warm-started locally
    (cached under `cache_dir`, keyed by everything that determines it, so every arm of a comparison starts
    from the same weights)."""

    path: Optional[str] = None
    tiny: TinyModelConfig = dataclasses.field(default_factory=TinyModelConfig)
    warm_start: SFTSection = dataclasses.field(default_factory=SFTSection)
    cache_dir: str = ".cache/jaxrl_fp16"
    fp32_ops: list[str] = dataclasses.field(default_factory=list)  # Numerics overrides (op classes in FP32)
    # An emulated float format ("e5m10", "e4m3fn", "bfloat16", ...) for the trainer's compute and the JAX
    # sampler (`Numerics.emulate`); needs `precision` with compute dtype float32 (e.g. `fp32`).
    emulate: Optional[str] = None
    # Attention implementation for the training and scoring forward: "dense" (the [T, S] score tensor, written
    # out op by op), "blockwise" (online softmax over key blocks of `attention_block` keys: O(T) memory),
    # "cudnn" (jax.nn.dot_product_attention's fused kernel, GPUs only), "auto" (chosen per backend and length).
    attention: str = "auto"
    attention_block: int = 512
    # Rematerialisation of each scanned decoder layer in the backward pass: "none", "full" (recompute the whole
    # layer), "dots" (save matmul outputs, recompute the rest), "auto" (chosen per backend).
    remat: str = "auto"
    # The layer loop of the training and scoring forward (not the sampler's): "scan" (one compiled layer, looped)
    # or "unrolled" (every layer compiled in line: no per-layer slicing of the stacked weights and activations;
    # faster on a CPU, compile time grows with the layer count). Same parameters, same checkpoints.
    layer_loop: str = "scan"

    def __post_init__(self):
        check_fields(self, "model")
        try:
            Numerics.from_overrides(self.fp32_ops, emulate=self.emulate)  # validates the names and the format
        except ValueError as e:
            key = "model.emulate" if "emulate" in str(e) else "model.fp32_ops"
            raise ConfigError(f"{key}: {e}") from None
        check_choice("model.attention", self.attention, ATTENTION_CHOICES)
        check_choice("model.remat", self.remat, REMAT_CHOICES)
        check_choice("model.layer_loop", self.layer_loop, LAYER_LOOP_CHOICES)
        check_positive("model", attention_block=self.attention_block)

    @property
    def unroll(self) -> bool:
        """`CausalLM.unroll` of the training and scoring forward."""
        return self.layer_loop == "unrolled"

    def numerics(self) -> Numerics:
        """The `Numerics` the trainer, scorer and JAX sampler run with."""
        return Numerics.from_overrides(self.fp32_ops, emulate=self.emulate)

    def forward_options(self) -> dict[str, Any]:
        """The training and scoring forward's layout options, as `CausalLM` and `Scorer` take them."""
        return dict(attention=self.attention, attention_block=self.attention_block, unroll=self.unroll)

    def causal_lm(self, cfg: Any, dtype: Any, numerics: Optional[Numerics] = None) -> CausalLM:
        """The training forward of `cfg` in compute `dtype` with this section's attention, layer loop and remat."""
        return CausalLM(cfg, dtype=dtype, numerics=numerics or Numerics(), remat=self.remat, **self.forward_options())

    def forward_spec(self, backend: str) -> dict[str, Any]:
        """What of the forward's options changes a warm start's result on `backend` ("auto" remat resolved)."""
        return {"attention": self.attention, "attention_block": self.attention_block, "layer_loop": self.layer_loop,
                "remat": resolve_remat(self.remat, backend=backend)}


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


def run_sft(model_dir: str, task: Any, sft: SFTSection, out_dir: str, *, forward: Optional[ModelSection] = None,
            progress: bool = True, overwrite: bool = False) -> dict[str, float]:
    """Trains `model_dir` on `task`'s reference responses per the `SFTSection` `sft`; writes an HF dir. The
    forward runs with `forward`'s attention, layer loop and remat (a run's `model` section; None: the defaults)."""
    from tqdm.auto import tqdm

    check_output_dir(out_dir, overwrite=overwrite, sources=[model_dir])  # before the training, not after it
    cfg, params = load_hf_params(model_dir)
    tokenizer = load_tokenizer(model_dir)
    policy = get_policy(sft.precision)
    tokens, attn, loss_mask = sft_examples(task, tokenizer, sft.num_problems, sft.seed)
    if tokens.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"SFT examples are {tokens.shape[1]} tokens long, more than the model's context "
                         f"({cfg.max_position_embeddings})")
    model = (forward or ModelSection()).causal_lm(cfg, policy.compute_dtype)

    def loss_fn(p, batch):
        logp = token_logprobs(model, p, batch["tokens"], batch["attn"])
        mask = batch["loss_mask"]
        nll = -jnp.sum(logp * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        return nll, {}

    warmup = max(0, min(sft.warmup_steps, sft.steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, sft.lr, warmup, sft.steps, end_value=sft.lr * 0.1) \
        if sft.steps > 1 else sft.lr
    if sft.max_rounds > 1 and callable(schedule):  # each round restarts the schedule
        schedule = functools.partial(_restarted, schedule, sft.steps)
    optimizer = optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.0)
    scale = SFT_LOSS_SCALE.build(policy.compute_dtype)
    step = make_train_step(loss_fn, optimizer, policy, max_grad_norm=1.0, donate=True)
    state = TrainState.create(jax.tree_util.tree_map(jnp.asarray, params), optimizer, scale)
    rng = np.random.default_rng(sft.seed)
    losses, round_losses = [], []
    bar = tqdm(total=sft.steps, desc="warm start", disable=not progress, leave=False)
    for r in range(sft.max_rounds):
        bar.reset(total=sft.steps)
        bar.set_description(f"warm start round {r + 1}" if sft.max_rounds > 1 else "warm start")
        for _ in range(sft.steps):
            idx = rng.choice(len(tokens), size=sft.batch_size, replace=len(tokens) < sft.batch_size)
            state, metrics = step(state, {"tokens": tokens[idx], "attn": attn[idx], "loss_mask": loss_mask[idx]})
            losses.append(float(metrics["loss"]))
            bar.update()
        round_losses.append(float(np.mean(losses[-sft.window:])))
        if sft.target_loss is None or round_losses[-1] <= sft.target_loss:
            break
        log.info("warm start round %d: mean loss over its last %d steps %.4f > target %g%s", r + 1, sft.window,
                 round_losses[-1], sft.target_loss, "; another round" if r + 1 < sft.max_rounds else "")
    bar.close()
    reached = sft.target_loss is None or round_losses[-1] <= sft.target_loss
    if not reached:
        log.warning("warm start ended above its target: mean loss %.4f over the last %d steps after %d rounds > "
                    "model.warm_start.target_loss=%g (raise model.warm_start.max_rounds or steps)",
                    round_losses[-1], sft.window, sft.max_rounds, sft.target_loss)
    save_hf_params(jax.device_get(state.params), cfg, out_dir, dtype="float32", tokenizer_from=model_dir,
                   overwrite=overwrite)
    stats = {"sft/loss_first": losses[0], "sft/loss_last": float(np.mean(losses[-10:])),
             "sft/loss_window": round_losses[-1], "sft/rounds": len(round_losses),
             "sft/target_reached": bool(reached), "sft/skipped_steps": int(state.skipped_steps)}
    log.info("warm start done: %s", stats)
    return stats


def _restarted(schedule: Callable[[Any], Any], period: int, count: Any) -> Any:
    """`schedule` restarted every `period` steps."""
    return schedule(count % period)


def base_model_spec(run: Any) -> dict[str, Any]:
    """Everything that determines the tiny base model of a `RunConfig` (with `model.path` unset): the random
    model, the warm start, the task, and the forward's options as they run on this backend."""
    m = run.model
    return {"tiny": dataclasses.asdict(m.tiny), "warm_start": dataclasses.asdict(m.warm_start),
            "task": {"name": run.task.name, "options": dict(run.task.options)},
            "forward": m.forward_spec(jax.default_backend()), "version": 2}


def base_model_key(run: Any) -> str:
    """The cache key of `base_model_spec(run)` (the base model's folder is `base-<task>-<key>`)."""
    return hashlib.sha256(json.dumps(base_model_spec(run), sort_keys=True, default=str).encode()).hexdigest()[:16]


def warm_start_result(base_dir: str) -> dict[str, Any]:
    """The warm start's statistics recorded with a cached base model (`run_sft`'s; {} for another folder, or one
    whose record is unreadable: the statistics are a report's, not the model's)."""
    try:
        with open(os.path.join(base_dir, "base_model_spec.json")) as f:
            return dict(json.load(f).get("warm_start_result", {}))
    except (FileNotFoundError, ValueError, AttributeError):
        return {}


def ensure_base_model(run: Any, progress: bool = True) -> str:
    """The base model directory of a `RunConfig`: `model.path`, or a tiny model built and warm-started on the
    run's task, cached under `model.cache_dir` keyed by everything that determines it. With several processes,
    process 0 builds it while the others wait, then they find it (`model.cache_dir` shared by the hosts)."""
    if run.model.path is not None:
        return _ensure_base_model(run, progress)
    return multiprocess.first_then_others(lambda: _ensure_base_model(run, progress), "base-model")


def _ensure_base_model(run: Any, progress: bool) -> str:
    m = run.model
    if m.path is not None:
        if not os.path.isfile(os.path.join(m.path, "config.json")):
            raise FileNotFoundError(f"model.path={m.path} is not a Hugging Face model directory (no config.json)")
        return m.path
    spec = base_model_spec(run)
    out = os.path.join(m.cache_dir, f"base-{run.task.name}-{base_model_key(run)}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    os.makedirs(m.cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=m.cache_dir) as tmp:
        random_dir = m.tiny.build(os.path.join(tmp, "random"))
        stats = run_sft(random_dir, run.task.build(), m.warm_start, out, forward=m, progress=progress)
    spec_file = os.path.join(out, "base_model_spec.json")
    with open(f"{spec_file}.{os.getpid()}.tmp", "w") as f:  # a writer's own temporary file, then a rename
        json.dump({**spec, "warm_start_result": stats}, f, indent=2)
    os.replace(f.name, spec_file)
    return out
