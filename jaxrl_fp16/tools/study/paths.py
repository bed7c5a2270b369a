"""Both engines' computations replayed on given tokens, exposing their per-layer residual streams.

Inference path: the sampler's own `prefill` + `decode_step`, teacher-forced with the sampled tokens, in the same
row and prompt-width buckets as `JaxSampler`, so that it recomputes the sampler's log-probs (mu). Training path:
the teacher-forced full-sequence forward. Both report hidden states at the *scoring positions* of a rollout:
position P - 1 + k, whose next-token distribution scores response token k (k = 0 .. R - 1, P the prompt width).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_fp16.models.config import ModelConfig, Numerics
from jaxrl_fp16.models.decoder import CausalLM, causal_inputs
from jaxrl_fp16.models.inference import decode_step, prefill
from jaxrl_fp16.precision import as_dtype
from jaxrl_fp16.sampling.base import Rollout
from jaxrl_fp16.sampling.jax_sampler import processed_logits

__all__ = ["Batch", "batches", "cast_params", "make_model", "inference_batch", "training_batch",
           "inference_logprobs"]

Array = jax.Array


def make_model(cfg: ModelConfig, dtype: Any, numerics: Numerics = Numerics()) -> CausalLM:
    return CausalLM(cfg, dtype=as_dtype(dtype), numerics=numerics)


def cast_params(params: Any, dtype: Any) -> Any:
    """The FP32 masters cast once to the compute dtype, as both engines do before they run."""
    dt = as_dtype(dtype)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dt), params)


@dataclasses.dataclass(frozen=True)
class Batch:
    """Rows [start, stop) of a rollout, padded to `tokens_BxT.shape[0]` rows by repeating the first one.

    tokens_BxT / attention_BxT: the rollout layout (prompt left-padded to P, then R response columns).
    prompt_BxW / prompt_mask_BxW: the prompt re-padded on the left to the sampler's bucketed width W >= P.
    """

    start: int
    stop: int
    tokens_BxT: np.ndarray
    attention_BxT: np.ndarray
    prompt_BxW: np.ndarray
    prompt_mask_BxW: np.ndarray
    response_BxR: np.ndarray


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def batches(rollout: Rollout, pad_id: int, *, max_batch_size: int = 256,
            prompt_bucket: int = 16) -> Iterator[Batch]:
    """The rollout's rows in `JaxSampler`'s batches (same row buckets, same prompt width), in order."""
    P = rollout.prompt_width
    W = -(-P // prompt_bucket) * prompt_bucket
    for start in range(0, rollout.num_rows, max_batch_size):
        stop = min(start + max_batch_size, rollout.num_rows)
        bucket = min(_next_pow2(stop - start), max_batch_size)
        idx = np.concatenate([np.arange(start, stop), np.full(bucket - (stop - start), start)])
        tok, att = rollout.tokens[idx].astype(np.int32), rollout.attention_mask[idx].astype(np.int32)
        prompt = np.concatenate([np.full((bucket, W - P), pad_id, np.int32), tok[:, :P]], axis=1)
        prompt_mask = np.concatenate([np.zeros((bucket, W - P), np.int32), att[:, :P]], axis=1)
        yield Batch(start, stop, tok, att, prompt, prompt_mask, tok[:, P:])


class _HiddenTap:
    """The model as `prefill` and `decode_step` see it, keeping the per-layer residual stream of each call."""

    def __init__(self, model: CausalLM):
        self.model, self.cfg, self.dtype = model, model.cfg, model.dtype
        self.taken: list[Array] = []

    def apply(self, variables, *args, **kwargs):
        out = self.model.apply(variables, *args, collect_hidden=True, **kwargs)
        self.taken.append(out[2])
        return out


def _sampled_logprob(logits_BxV: Array, token_B: Array, temperature: Array) -> Array:
    """log mu of `token_B` exactly as `sample_tokens` computes it (temperature only: no top-k / top-p)."""
    lg = processed_logits(logits_BxV, temperature, jnp.float32(1.0), jnp.int32(0))
    return jnp.take_along_axis(jax.nn.log_softmax(lg, axis=-1), token_B[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("model", "collect_hidden"))
def _replay(model: CausalLM, params: Any, prompt_BxW: Array, mask_BxW: Array, response_BxR: Array,
            temperature: Array, *, collect_hidden: bool):
    W, R = prompt_BxW.shape[1], response_BxR.shape[1]
    engine = _HiddenTap(model) if collect_hidden else model
    logits, cache, pos_B = prefill(engine, params, prompt_BxW, mask_BxW, W + R)
    first_LxBxH = engine.taken.pop()[:, :, -1] if collect_hidden else None

    def step(carry, n):
        logits, cache, pos_B = carry
        tok_B = response_BxR[:, n]
        lp_B = _sampled_logprob(logits, tok_B, temperature)
        logits, cache = decode_step(engine, params, tok_B, pos_B, cache, W + n)
        h_LxBxH = engine.taken.pop()[:, :, 0] if collect_hidden else None
        return (logits, cache, pos_B + 1), (lp_B, h_LxBxH)

    _, (lp_RxB, h_RxLxBxH) = jax.lax.scan(step, (logits, cache, pos_B), jnp.arange(R))
    if not collect_hidden:
        return lp_RxB.T, None
    # Response token k is scored at the prefill's last position (k = 0) or by decode step k - 1.
    h_RxLxBxH = jnp.concatenate([first_LxBxH[None], h_RxLxBxH[:-1]], axis=0)
    return lp_RxB.T, h_RxLxBxH.transpose(1, 2, 0, 3)


@functools.partial(jax.jit, static_argnames=("model", "prompt_width"))
def _forward_hidden(model: CausalLM, params: Any, tokens_BxT: Array, mask_BxT: Array, *, prompt_width: int):
    positions_BxT, mask_BxTxT = causal_inputs(tokens_BxT, None, mask_BxT)
    _, _, h_LxBxTxH = model.apply({"params": params}, tokens_BxT, positions_BxT, mask_BxTxT,
                                  return_logits=False, collect_hidden=True)
    R = tokens_BxT.shape[1] - prompt_width
    return h_LxBxTxH[:, :, prompt_width - 1:prompt_width - 1 + R]


def inference_batch(model: CausalLM, params: Any, batch: Batch, temperature: float,
                    collect_hidden: bool = False) -> tuple[Array, Array | None]:
    """The inference path on one batch: log mu [B, R] of the response tokens, and (optionally) the residual
    stream after each layer at the scoring positions, [L, B, R, H] in the path's residual dtype."""
    return _replay(model, params, jnp.asarray(batch.prompt_BxW), jnp.asarray(batch.prompt_mask_BxW),
                   jnp.asarray(batch.response_BxR), jnp.float32(temperature), collect_hidden=collect_hidden)


def training_batch(model: CausalLM, params: Any, batch: Batch) -> Array:
    """The training path's residual stream after each layer at the scoring positions, [L, B, R, H]."""
    P = batch.tokens_BxT.shape[1] - batch.response_BxR.shape[1]
    return _forward_hidden(model, params, jnp.asarray(batch.tokens_BxT), jnp.asarray(batch.attention_BxT),
                           prompt_width=P)


def inference_logprobs(cfg: ModelConfig, params: Any, rollout: Rollout, dtype: Any, *,
                       numerics: Numerics = Numerics(), temperature: float = 1.0, max_batch_size: int = 256,
                       prompt_bucket: int = 16) -> np.ndarray:
    """log mu [N, T] of the rollout's response tokens recomputed by the KV-cache engine in `dtype` under
    `numerics` (0 off the response), with the sampler's batching: with the sampler's own settings this
    reproduces `rollout.logprobs`."""
    model = make_model(cfg, dtype, numerics)
    cparams = cast_params(params, dtype)
    P = rollout.prompt_width
    out = np.zeros(rollout.tokens.shape, np.float32)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    for b in batches(rollout, pad_id, max_batch_size=max_batch_size, prompt_bucket=prompt_bucket):
        lp, _ = inference_batch(model, cparams, b, temperature)
        out[b.start:b.stop, P:] = np.asarray(lp)[: b.stop - b.start]
    return np.where(rollout.response_mask == 1, out, 0.0).astype(np.float32)
