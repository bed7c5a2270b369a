"""The built-in sampler: the model's KV-cache path, jitted and batched, in the policy's compute dtype.

No extra install. Shapes are bucketed (rows to a power of two, prompt width to a multiple of `prompt_bucket`)
so that a new batch does not recompile; sampling settings other than `max_new_tokens` are traced values.
Randomness is per row: row r of a call with seed s draws from fold_in(PRNGKey(s), first_row + r)
(`SamplingSettings.first_row`, 0 by default), so a row's sample does not depend on how rows were batched, nor on
which process samples it.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_fp16 import multiprocess
from jaxrl_fp16.models.config import ModelConfig, Numerics
from jaxrl_fp16.models.decoder import CausalLM
from jaxrl_fp16.models.inference import decode_step, left_pad, prefill
from jaxrl_fp16.precision import as_dtype
from jaxrl_fp16.sampling.base import (FINISH_LENGTH, FINISH_STOP, BaseSampler, Rollout, SamplingSettings,
                                      validate_prompts)

__all__ = ["JaxSampler", "sample_tokens", "processed_logits"]

log = logging.getLogger(__name__)
Array = jax.Array


def processed_logits(logits_BxV: Array, temperature: Array, top_p: Array, top_k: Array) -> Array:
    """FP32 logits of the distribution actually sampled from: / temperature, then top-k, then top-p (as vLLM).

    Filtered-out tokens get -inf. `temperature <= 0` (greedy) leaves the logits untempered.
    """
    logits = logits_BxV.astype(jnp.float32)
    logits = logits / jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)

    def filtered(lg):
        V = lg.shape[-1]
        desc = -jnp.sort(-lg, axis=-1)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, lg.shape[:-1])[..., None].astype(jnp.int32),
                                  axis=-1)
        lg = jnp.where(lg < kth, -jnp.inf, lg)
        desc = jnp.where(jnp.arange(V) < k, desc, -jnp.inf)
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = mass_before < top_p
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(lg < cutoff, -jnp.inf, lg)

    needs_filter = (top_k > 0) | (top_p < 1.0)
    return jax.lax.cond(needs_filter, filtered, lambda lg: lg, logits)


def sample_tokens(logits_BxV: Array, keys_B: Array, step: Array, temperature: Array, top_p: Array,
                  top_k: Array) -> tuple[Array, Array]:
    """Samples one token per row; returns (tokens [B], log-probs [B] under the distribution sampled from).

    Row b draws from `fold_in(keys_B[b], step)`. Greedy (`temperature <= 0`) takes the argmax and draws no random
    bits: the draw is a branch of `lax.cond`, so a greedy decode step does not run the random generator's kernels
    (on a CPU, where a small model's decode step is bound by the number of kernels it runs, that is 5-20% of the
    step); the tokens and log-probs are those of the unbranched computation, bit for bit.
    """
    lg = processed_logits(logits_BxV, temperature, top_p, top_k)
    logp_BxV = jax.nn.log_softmax(lg, axis=-1)

    def sampled():
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
        return jax.vmap(lambda k, row: jax.random.categorical(k, row))(step_keys, lg).astype(jnp.int32)

    tokens = jax.lax.cond(temperature > 0, sampled, lambda: jnp.argmax(lg, axis=-1).astype(jnp.int32))
    return tokens, jnp.take_along_axis(logp_BxV, tokens[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _generate(model: CausalLM, params: Any, prompt_BxP: Array, mask_BxP: Array, base_key: Array, first_row: Array,
              stop_ids: Array, temperature: Array, top_p: Array, top_k: Array, pad_id: Array, *,
              max_new_tokens: int):
    B, P = prompt_BxP.shape
    # Row r of the call draws from fold_in(base_key, r): derived here, not eagerly per chunk on the host.
    row_ids = first_row.astype(jnp.uint32) + jnp.arange(B, dtype=jnp.uint32)
    keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base_key, row_ids)
    logits, cache, pos_B = prefill(model, params, prompt_BxP, mask_BxP, P + max_new_tokens)

    def cond(state):
        n, _, _, _, done_B, _, _ = state
        return (n < max_new_tokens) & ~jnp.all(done_B)

    def body(state):
        n, logits, cache, pos_B, done_B, out_tok, out_lp = state
        tok_B, lp_B = sample_tokens(logits, keys_B, n, temperature, top_p, top_k)
        tok_B = jnp.where(done_B, pad_id, tok_B)
        lp_B = jnp.where(done_B, 0.0, lp_B)
        out_tok = out_tok.at[:, n].set(tok_B)
        out_lp = out_lp.at[:, n].set(lp_B)
        done_B = done_B | jnp.isin(tok_B, stop_ids)
        logits, cache = decode_step(model, params, tok_B, pos_B, cache, P + n)
        return n + 1, logits, cache, pos_B + 1, done_B, out_tok, out_lp

    init = (jnp.int32(0), logits, cache, pos_B, jnp.zeros((B,), jnp.bool_),
            jnp.full((B, max_new_tokens), pad_id, jnp.int32), jnp.zeros((B, max_new_tokens), jnp.float32))
    n, _, _, _, done_B, out_tok, out_lp = jax.lax.while_loop(cond, body, init)
    # A row that is not done emitted `n` tokens; a done row stopped at its first stop token.
    is_stop = jnp.isin(out_tok, stop_ids) & (jnp.arange(max_new_tokens) < n)
    first_stop = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1) + 1, n)
    lengths_B = jnp.where(done_B, first_stop, n)
    return out_tok, out_lp, lengths_B, done_B


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class JaxSampler(BaseSampler):
    """Samples with the built-in JAX engine in one compute dtype (a `BaseSampler`).

    Args:
      cfg: the model architecture.
      params: FP32 params to start from (or push them later with `push_weights`).
      dtype: compute dtype name or dtype (the precision policy's compute dtype).
      numerics: which sensitive ops run in FP32 (must match the trainer's for a like-for-like comparison).
      max_batch_size: rows generated per engine call; larger requests are split.
      prompt_bucket: prompt widths are rounded up to a multiple of this.
      f32_weights: keep the weights as FP32 arrays of compute-dtype values (`CausalLM.f32_weights`: the
        arithmetic XLA:CPU compiles a bfloat16 matmul to, without converting the weights at every decode step,
        at twice the weights' memory). None (default): on when JAX runs on the CPU and the compute dtype is
        bfloat16. Not for float16 by default: there it moved the decode log-probs of a 50M model by up to 2e-3
        on an Intel Xeon with AVX-512 FP16 (cause not found: the full forward's logits were equal), and a GPU
        multiplies half-precision operands natively.
    """

    def __init__(self, cfg: ModelConfig, params: Any = None, *, dtype: Any = "float32",
                 numerics: Numerics = Numerics(), max_batch_size: int = 256, prompt_bucket: int = 16,
                 f32_weights: bool | None = None):
        self.cfg = cfg
        self.compute_dtype = as_dtype(dtype)
        half = self.compute_dtype != np.dtype(np.float32)
        if f32_weights is None:
            f32_weights = self.compute_dtype == jnp.bfloat16 and jax.default_backend() == "cpu"
        self.f32_weights = bool(f32_weights)
        if self.f32_weights and not half:
            raise ValueError(f"JaxSampler(f32_weights=True) is for a half-precision compute dtype, got "
                             f"{self.compute_dtype.name}")
        self.model = CausalLM(cfg, dtype=self.compute_dtype, numerics=numerics, f32_weights=self.f32_weights)
        self.max_batch_size = max_batch_size
        self.prompt_bucket = prompt_bucket
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self._params = None
        if params is not None:
            self.push_weights(params)
        log.info("JAX sampler: compute dtype %s%s", self.compute_dtype,
                 " (weights held in FP32)" if self.f32_weights else "")

    def _push(self, params: Any) -> None:
        """Takes the trainer's params, cast once to the compute dtype (FP32 params stay FP32 in `fp32`; with
        `f32_weights` the rounded values are held in FP32), into buffers of its own: the trainer's step donates
        (deletes) the arrays it was given. Arrays spread over
        several processes are gathered to the host one tensor at a time (a collective: every process pushes) and
        put on this process's first device: one engine per process."""
        stored = np.dtype(np.float32) if self.f32_weights else self.compute_dtype  # the values: compute dtype
        if multiprocess.input_sharding(params) is not None:
            device = jax.local_devices()[0]
            self._params = multiprocess.host_tree(params, then=lambda x: jax.device_put(
                np.asarray(x, self.compute_dtype).astype(stored, copy=False), device))
            return
        self._params = jax.tree_util.tree_map(
            lambda x: jnp.array(x, self.compute_dtype, copy=True).astype(stored), params)

    def _sample(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> Rollout:
        if self._params is None:
            raise RuntimeError("no weights: call push_weights(params) first")
        prompts = validate_prompts(prompts, self.cfg.vocab_size, self.cfg.max_position_embeddings,
                                   settings.max_new_tokens)
        K = settings.samples_per_prompt
        rows = [p for p in prompts for _ in range(K)]
        prompt_index = np.repeat(np.arange(len(prompts)), K)
        P = max(len(p) for p in rows)
        width = -(-P // self.prompt_bucket) * self.prompt_bucket
        stop = list(settings.stop_token_ids) + ([] if settings.ignore_eos else list(self.cfg.eos_token_ids))
        stop_ids = np.full((max(8, -(-len(stop) // 8) * 8),), -1, np.int32)
        stop_ids[: len(stop)] = stop
        base_key = jax.random.PRNGKey(settings.seed)
        scalars = (stop_ids, np.float32(settings.temperature), np.float32(settings.top_p), np.int32(settings.top_k),
                   np.int32(self.pad_id))

        R = settings.max_new_tokens
        out_tok, out_lp, lengths, stopped = [], [], [], []
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start:start + self.max_batch_size]
            bucket = min(_next_pow2(len(chunk)), self.max_batch_size)
            padded = chunk + [chunk[0]] * (bucket - len(chunk))
            tok_BxP, mask_BxP = left_pad(padded, self.pad_id, width)
            res = _generate(self.model, self._params, tok_BxP, mask_BxP, base_key,
                            np.uint32(settings.first_row + start),
                            *scalars, max_new_tokens=R)
            t, lp, n, d = (np.asarray(x)[: len(chunk)] for x in jax.device_get(res))
            out_tok.append(t), out_lp.append(lp), lengths.append(n), stopped.append(d)
        out_tok, out_lp = np.concatenate(out_tok), np.concatenate(out_lp)
        lengths, stopped = np.concatenate(lengths), np.concatenate(stopped)

        prompt_tok, prompt_mask = left_pad(rows, self.pad_id, P)
        resp_mask = (np.arange(R)[None, :] < lengths[:, None]).astype(np.int32)
        out_tok = np.where(resp_mask == 1, out_tok, self.pad_id).astype(np.int32)
        zeros = np.zeros_like(prompt_mask)
        return Rollout(
            tokens=np.concatenate([prompt_tok, out_tok], axis=1),
            attention_mask=np.concatenate([prompt_mask, resp_mask], axis=1).astype(np.int32),
            response_mask=np.concatenate([zeros, resp_mask], axis=1).astype(np.int32),
            logprobs=np.concatenate([np.zeros(prompt_mask.shape, np.float32),
                                     np.where(resp_mask == 1, out_lp, 0.0).astype(np.float32)], axis=1),
            prompt_index=prompt_index,
            prompt_width=P,
            finish_reasons=[FINISH_STOP if s else FINISH_LENGTH for s in stopped],
        )

    def _release(self) -> None:
        self._params = None
