"""The trainer's side of the comparison: teacher-forced log-probs (pi) of given sequences, batched and jitted.

Rows are processed in fixed-size batches and the sequence length is padded to a multiple of `length_bucket`,
so scoring rollouts of varying length reuses a handful of compiled programs.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_fp16.models.config import ModelConfig, Numerics
from jaxrl_fp16.models.decoder import CausalLM, token_logprobs
from jaxrl_fp16.precision import as_dtype

__all__ = ["Scorer"]


@functools.partial(jax.jit, static_argnames=("model", "chunk_size"))
def _score(model: CausalLM, params: Any, tokens_BxT: jax.Array, mask_BxT: jax.Array, temperature: jax.Array,
           chunk_size: int) -> jax.Array:
    return token_logprobs(model, params, tokens_BxT, mask_BxT, temperature=temperature, chunk_size=chunk_size)


class Scorer:
    """Computes log pi of every token of a batch of sequences with the training forward in one compute dtype."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any = "float32", numerics: Numerics = Numerics(),
                 batch_size: int = 64, length_bucket: int = 64, chunk_size: int = 256):
        self.cfg = cfg
        self.compute_dtype = as_dtype(dtype)
        self.model = CausalLM(cfg, dtype=self.compute_dtype, numerics=numerics)
        self.batch_size = batch_size
        self.length_bucket = length_bucket
        self.chunk_size = chunk_size

    def __call__(self, params: Any, tokens: np.ndarray, attention_mask: np.ndarray,
                 temperature: float = 1.0) -> np.ndarray:
        """log pi [N, T] (FP32): entry t is log p(tokens[:, t] | tokens[:, :t]); params are FP32 masters."""
        tokens = np.asarray(tokens, np.int32)
        attention_mask = np.asarray(attention_mask, np.int32)
        N, T = tokens.shape
        width = -(-T // self.length_bucket) * self.length_bucket
        compute_params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, self.compute_dtype), params)
        bs = min(self.batch_size, N)
        out = []
        for start in range(0, N, bs):
            tok = np.zeros((bs, width), np.int32)
            mask = np.zeros((bs, width), np.int32)
            rows = slice(start, min(start + bs, N))
            n = rows.stop - rows.start
            tok[:n, :T], mask[:n, :T] = tokens[rows], attention_mask[rows]
            mask[n:, 0] = 1  # filler rows: one real token, never read
            lp = _score(self.model, compute_params, jnp.asarray(tok), jnp.asarray(mask),
                        jnp.float32(temperature), self.chunk_size)
            out.append(np.asarray(lp)[:n, :T])
        return np.concatenate(out, axis=0)
