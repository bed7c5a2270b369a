"""The trainer's side of the comparison: teacher-forced log-probs (pi) of given sequences, batched and jitted.

Widths are bucketed by `bucket_width` (the one bucketing rule of the trainer: its training batches and this
scorer use it): the next power of two at or above `MIN_BUCKET_WIDTH`, capped at the run's fixed width, so a run
whose rows are at most M tokens wide compiles at most `len(bucket_widths(M))` = ceil(log2(M / 16)) + 1 widths
(M > 16; 1 otherwise). Rows are processed in batches sized by a memory budget (`score_rows`): the row count
times the estimated activation bytes of one row (`score_row_bytes`) stays within it, with at least
`MIN_SCORE_ROWS` rows: XLA compiles a one-row batch to other kernels (its FP16 log-probs differ in the last
bits), and with two or more rows every row's log-probs are bitwise the same whatever the split.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_fp16 import multiprocess
from jaxrl_fp16.models.attention import resolve_attention
from jaxrl_fp16.models.config import ModelConfig, Numerics
from jaxrl_fp16.models.decoder import CausalLM, token_logprobs
from jaxrl_fp16.precision import as_dtype

__all__ = ["DEFAULT_SCORE_MEMORY_GIB", "MIN_BUCKET_WIDTH", "MIN_SCORE_ROWS", "Scorer", "bucket_width",
           "bucket_widths", "device_inputs", "filled_batches", "score_row_bytes", "score_rows"]

MIN_BUCKET_WIDTH = 16  # the smallest bucket: shorter rows cost a few padded tokens, not another compile
DEFAULT_SCORE_MEMORY_GIB = 2.0  # activation budget of one scoring batch (`train.score_memory_gib`)
MIN_SCORE_ROWS = 2  # rows of the smallest scoring batch (see the module docstring)
_GIB = 1024 ** 3


def bucket_width(longest: int, max_width: int | None = None, *, floor: int = MIN_BUCKET_WIDTH) -> int:
    """The padded width of a batch whose longest row is `longest` tokens: the next power of two >= `longest`
    (at least `floor`), capped at `max_width` (the run's fixed width; None: no cap). Idempotent:
    bucket_width(bucket_width(n, m), m) == bucket_width(n, m)."""
    if longest < 1 or floor < 1:
        raise ValueError(f"bucket_width: longest={longest} and floor={floor} must be >= 1")
    if max_width is not None and longest > max_width:
        raise ValueError(f"bucket_width: a row of {longest} tokens is wider than the fixed width {max_width}")
    width = max(floor, 1 << (longest - 1).bit_length())
    return width if max_width is None else min(width, max_width)


def bucket_widths(max_width: int, *, floor: int = MIN_BUCKET_WIDTH) -> list[int]:
    """Every width `bucket_width(n, max_width)` can return for n in 1..max_width, ascending."""
    widths, w = [], floor
    while w < max_width:
        widths.append(w)
        w *= 2
    return widths + [max_width]


def score_row_bytes(cfg: ModelConfig, width: int, *, compute_bytes: int, chunk_size: int = 256,
                    score_keys: int | None = None) -> int:
    """Estimated peak activation bytes of scoring one row of `width` tokens (forward only, no gradients):
    one layer's activations in the compute dtype, T x c x (6H + 2Q + 2K + 3I) (the layer scan keeps one layer
    alive), its attention scores, masked scores and probabilities in FP32 (XLA:CPU measured ~12.4 B per score
    with dense attention), Nq x T x S x 16 for the S keys whose scores are alive at once (`score_keys`: T for
    dense attention, the default; one key block for blockwise; `attention_score_keys`), the final hidden states,
    T x H x 2c, and one FP32 logits chunk with its log-softmax, min(chunk, T) x V x 12. Parameters are not
    counted."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    Q, K = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    keys = width if score_keys is None else min(score_keys, width)
    layer = width * compute_bytes * (6 * H + 2 * Q + 2 * K + 3 * I) + cfg.num_heads * width * keys * 16
    return layer + width * H * 2 * compute_bytes + min(chunk_size, width) * V * 12


def attention_score_keys(kind: str, width: int, block: int) -> int:
    """Keys per query whose FP32 scores are alive at once in attention implementation `kind` (resolved): all
    `width` for dense, one key block for blockwise and for a fused kernel (an upper bound: it tiles smaller)."""
    return width if kind == "dense" else min(block, width)


def score_rows(cfg: ModelConfig, width: int, budget_bytes: float, *, compute_bytes: int,
               chunk_size: int = 256, score_keys: int | None = None) -> int:
    """Rows per scoring batch at `width`: as many as fit `budget_bytes` (rows x score_row_bytes <= budget),
    at least `MIN_SCORE_ROWS` (a budget below two rows is exceeded, not split further)."""
    per_row = score_row_bytes(cfg, width, compute_bytes=compute_bytes, chunk_size=chunk_size,
                              score_keys=score_keys)
    return max(MIN_SCORE_ROWS, int(budget_bytes // per_row))


@functools.partial(jax.jit, static_argnames=("model", "chunk_size"))
def _score(model: CausalLM, params: Any, tokens_BxT: jax.Array, mask_BxT: jax.Array, temperature: jax.Array,
           chunk_size: int) -> jax.Array:
    return token_logprobs(model, params, tokens_BxT, mask_BxT, temperature=temperature, chunk_size=chunk_size)


def device_inputs(params: Any, *host: np.ndarray) -> list[jax.Array]:
    """Host arrays as a jitted forward takes them beside `params`: on the default device, or as replicated global
    arrays when `params` span several processes (every process holds the same rows)."""
    sharding = multiprocess.input_sharding(params)
    if sharding is None:
        return [jnp.asarray(x) for x in host]
    return [multiprocess.global_array(x, sharding) for x in host]


def filled_batches(tokens: np.ndarray, attention_mask: np.ndarray, rows: int,
                   width: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The rows of `tokens` and `attention_mask` [N, T] in consecutive batches of `rows` rows, right-padded to
    `width` >= T columns: yields (real rows n, tokens [rows, width], mask [rows, width]) as int32 host arrays, the
    last batch topped up with filler rows (one real token, never read), so every batch has one shape."""
    tokens, attention_mask = np.asarray(tokens, np.int32), np.asarray(attention_mask, np.int32)
    N, T = tokens.shape
    if rows < 1 or width < T:
        raise ValueError(f"filled_batches: {rows} rows of width {width} cannot hold rows of width {T}")
    for start in range(0, N, rows):
        n = min(rows, N - start)
        tok, mask = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
        tok[:n, :T], mask[:n, :T] = tokens[start:start + n], attention_mask[start:start + n]
        mask[n:, 0] = 1
        yield n, tok, mask


class Scorer:
    """Computes log pi of every token of a batch of sequences with the training forward in one compute dtype.

    `memory_gib`: the activation budget of one batch (`score_rows`); `batch_size`: an optional cap on its rows;
    `attention`, `attention_block`, `unroll`: the model's (`model.attention`, `model.layer_loop`).
    """

    def __init__(self, cfg: ModelConfig, *, dtype: Any = "float32", numerics: Numerics = Numerics(),
                 batch_size: int | None = None, memory_gib: float = DEFAULT_SCORE_MEMORY_GIB,
                 chunk_size: int = 256, attention: str = "auto", attention_block: int = 512, unroll: bool = False):
        if not memory_gib > 0:
            raise ValueError(f"Scorer: memory_gib must be > 0, got {memory_gib!r}")
        self.cfg = cfg
        self.compute_dtype = as_dtype(dtype)
        self.model = CausalLM(cfg, dtype=self.compute_dtype, numerics=numerics, attention=attention,
                              attention_block=attention_block, unroll=unroll)
        self.batch_size = batch_size
        self.memory_gib = memory_gib
        self.chunk_size = chunk_size

    def rows(self, width: int, num_rows: int, memory_gib: float | None = None) -> int:
        """Rows per batch for `num_rows` rows padded to `width`: what the budget (`memory_gib`, default the
        scorer's) allows, capped by `batch_size` and `num_rows`, at least `MIN_SCORE_ROWS` (filler rows)."""
        budget = self.memory_gib if memory_gib is None else memory_gib
        m = self.model
        kind = resolve_attention(m.attention, backend=jax.default_backend(), seq_len=width, dtype=m.dtype,
                                 numerics=m.numerics, head_dim=self.cfg.head_dim)
        rows = score_rows(self.cfg, width, budget * _GIB, compute_bytes=self.compute_dtype.itemsize,
                          chunk_size=self.chunk_size,
                          score_keys=attention_score_keys(kind, width, self.model.attention_block))
        return max(MIN_SCORE_ROWS, min(rows, num_rows, self.batch_size or num_rows))

    def __call__(self, params: Any, tokens: np.ndarray, attention_mask: np.ndarray,
                 temperature: float = 1.0, *, max_width: int | None = None,
                 memory_gib: float | None = None) -> np.ndarray:
        """log pi [N, T] (FP32): entry t is log p(tokens[:, t] | tokens[:, :t]); params are FP32 masters.

        Rows are right-padded to `bucket_width(T, max_width)` (`max_width`: the caller's fixed width, so an
        already bucketed batch is scored at its own width); `memory_gib` overrides the scorer's budget."""
        N, T = np.shape(tokens)
        width = bucket_width(T, max_width)
        compute_params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, self.compute_dtype), params)
        out = []
        for n, tok, mask in filled_batches(tokens, attention_mask, self.rows(width, N, memory_gib), width):
            inputs = device_inputs(compute_params, tok, mask, np.float32(temperature))
            out.append(multiprocess.to_host(_score(self.model, compute_params, *inputs, self.chunk_size))[:n, :T])
        return np.concatenate(out, axis=0)
