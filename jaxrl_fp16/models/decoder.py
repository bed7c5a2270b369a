"""A Flax (linen) decoder-only causal LM for the Qwen2, Qwen3, Llama and Mistral families.

One module serves both engines of the method:
- the training path: a teacher-forced full-sequence forward (no cache), and
- the inference path: prefill and one-token decode steps against a KV cache held in the compute dtype.

Parameters are FP32 master arrays (layers stacked on a leading axis, `nn.scan`); every op casts its
parameters to `dtype` (the policy's compute dtype), so a caller may pass FP32 params or params already cast
with `Policy.cast_to_compute` and get identical results. Which sensitive steps run in FP32 is set by `Numerics`.

Attention (`jaxrl_fp16.models.attention`) is by default written out (no fused kernel) so that its precision is
explicit: scores = q.k^T * scale (in `dtype`, or FP32), masked where a key is padding or in the future, softmax
(FP32 by default), probs.v. Long sequences use blockwise (online-softmax) attention, GPUs cuDNN's fused kernel;
each layer may be rematerialised in the backward (`CausalLM.attention`, `CausalLM.remat`).

Emulated formats (`Numerics.emulate`, compute dtype float32): each op computes in FP32 and rounds where the real
dtype would (the building blocks and `Arith`: `jaxrl_fp16.models.layers`), so on XLA:CPU e5m10/e8m7 give the real
FP16/BF16 forward and weight gradients bit for bit. Without emulation the compiled code is what it was.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_fp16.models import attention as attn
from jaxrl_fp16.models.config import ModelConfig, Numerics
from jaxrl_fp16.models.layers import (MLP, Arith, Dense, RMSNorm, apply_rope, arith, emulated_format, fan_out,
                                      kernel_init, rope_cos_sin, upcast_dot, upcasts)

__all__ = ["CausalLM", "KVCache", "init_cache", "causal_inputs", "valid_inputs", "token_logprobs"]

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer, [L, B, S, Nkv, D] in the compute dtype, plus the key validity mask.

    `kv_mask_BxS` is 1 where a slot holds a real token (not left padding, already written). Slots are shared
    by the batch: slot s of every row is written by the same call.
    """

    k_LxBxSxKxD: Array
    v_LxBxSxKxD: Array
    kv_mask_BxS: Array

    @property
    def max_len(self) -> int:
        return self.k_LxBxSxKxD.shape[2]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any) -> KVCache:
    """An empty cache of `max_len` slots."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), jnp.bool_))


class Attention(nn.Module):
    """Projections, q/k norms and RoPE, then one of `attention.ATTENTION_IMPLS` (the KV-cache path: dense).

    `mask`: [B, T, S] for dense attention and with a cache; with blockwise or fused attention also the key
    validity [B, T] (causal implied)."""

    cfg: ModelConfig
    dtype: Any
    numerics: Numerics
    attention: str = "dense"
    attention_block: int = 512
    f32_weights: bool = False  # see CausalLM

    @nn.compact
    def __call__(self, x_BxTxH, cos_sin, mask, layer_cache):
        cfg, num = self.cfg, self.numerics
        fmt = num.float_format
        B, T, _ = x_BxTxH.shape
        D, Nq, Nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        dense = functools.partial(Dense, dtype=self.dtype, fmt=fmt, f32_weights=self.f32_weights)
        xq, xk, xv = (x_BxTxH,) * 3 if fmt is None else fan_out(x_BxTxH, 3, fmt)
        q = dense(Nq * D, cfg.qkv_bias, name="q_proj")(xq).reshape(B, T, Nq, D)
        k = dense(Nkv * D, cfg.qkv_bias, name="k_proj")(xk).reshape(B, T, Nkv, D)
        v = dense(Nkv * D, cfg.qkv_bias, name="v_proj")(xv).reshape(B, T, Nkv, D)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, self.dtype, num.norm_f32, fmt=fmt, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, self.dtype, num.norm_f32, fmt=fmt, name="k_norm")(k)
        cos, sin = cos_sin
        q = apply_rope(q, cos, sin, num.rope_f32, fmt)
        k = apply_rope(k, cos, sin, num.rope_f32, fmt)

        if layer_cache is not None:  # write this call's keys/values into the cache slots, attend over all slots
            cache_k, cache_v, index = layer_cache
            k_all = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
            new_cache = (k_all, v_all)
        else:
            k_all, v_all, new_cache = k, v, None

        ar, sc = arith(self.dtype, fmt), arith(self.dtype, fmt, num.attn_scores_f32)
        qg = q.reshape(B, T, Nkv, cfg.num_groups, D)
        if layer_cache is not None or self.attention == "dense":
            soft = arith(self.dtype, fmt, True) if num.softmax_f32 else sc
            out = attn.dense_attention(qg, k_all, v_all, mask, ar=ar, sc=sc, soft=soft, scale_q=num.scale_q)
        elif self.attention == "blockwise":
            out = attn.blockwise_attention(qg, k, v, mask, block=self.attention_block,
                                           f32_products=num.attn_scores_f32)
        else:
            impl = "cudnn" if self.attention == "cudnn" else "xla"
            out = attn.fused_attention(qg, k, v, mask, implementation=impl)
        out = ar.cast(out.reshape(B, T, Nq * D))
        y = dense(cfg.hidden_size, cfg.o_bias, name="o_proj")(out)
        return y, new_cache


class DecoderLayer(nn.Module):
    """Pre-norm block; scanned over layers (carry: hidden states; per-layer inputs: this layer's cache)."""

    cfg: ModelConfig
    dtype: Any
    numerics: Numerics
    collect_hidden: bool = False
    attention: str = "dense"  # a resolved implementation (`attention.ATTENTION_IMPLS`)
    attention_block: int = 512
    f32_weights: bool = False  # see CausalLM

    @nn.compact
    def __call__(self, h, cos_sin, mask_BxTxS, index, layer_kv):
        cfg, num = self.cfg, self.numerics
        fmt = num.float_format
        res = Arith(h.dtype) if fmt is None else arith(self.dtype, fmt, num.residual_f32)  # the residual stream
        norm = dict(fmt=fmt, input_f32=num.residual_f32)
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, num.norm_f32, **norm, name="input_norm")(h)
        layer_cache = None if layer_kv is None else (layer_kv[0], layer_kv[1], index)
        a, new_kv = Attention(cfg, self.dtype, num, self.attention, self.attention_block, self.f32_weights,
                              name="attn")(x, cos_sin, mask_BxTxS, layer_cache)
        h = res.out(h + res.cast(arith(self.dtype, fmt).use(a)))
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, num.norm_f32, **norm, name="post_attn_norm")(h)
        mlp = MLP(cfg, self.dtype, fmt, self.f32_weights, name="mlp")
        h = res.out(h + res.cast(arith(self.dtype, fmt).use(mlp(x))))
        return h, (new_kv, h if self.collect_hidden else None)


class CausalLM(nn.Module):
    """Decoder-only causal LM.

    Attributes:
      cfg: the architecture.
      dtype: compute dtype (the precision policy's `compute_dtype`).
      numerics: which sensitive steps run in FP32, and the emulated format if any (`Numerics.emulate`, which
        needs `dtype` float32).
      unroll: layers per iteration of the layer loop (`nn.scan`'s unroll; True = all). The parameters are the
        same either way; unrolling the decode loop saves the per-layer slicing of the stacked weights and the
        loop's per-iteration overhead, which dominate one-token steps of small models.
      attention: the training/scoring forward's attention ("auto", "dense", "blockwise", "cudnn"; "fused-xla"
        checks the cuDNN wrapper on any backend), resolved at trace time by `attention.resolve_attention` for
        the default backend, the key length, `dtype` and `numerics`. The KV-cache path is always dense.
      attention_block: tokens per query/key block of blockwise attention.
      remat: rematerialisation of each layer in the backward ("auto", "none", "full", "dots"; resolved by
        `attention.resolve_remat`); the KV-cache path is never rematerialised.
      f32_weights: the weights are FP32 arrays holding values of the half-precision `dtype` (each rounded to it
        once, e.g. `x.astype(dtype).astype(float32)`); every matmul with a weight then multiplies in FP32 the
        upcast input and rounds the product to `dtype` (`layers.upcast_dot`), and the embedding lookup reads the
        FP32 table. That is the arithmetic XLA:CPU compiles a half-precision matmul to (both operands converted
        to FP32, accumulation in FP32, the result rounded), without converting every weight on every call: the
        JAX sampler's decode on CPUs. Off for FP32 and emulated formats (already FP32), and where weights are
        trainer master weights (they would not be rounded).
    """

    cfg: ModelConfig
    dtype: Any = jnp.float32
    numerics: Numerics = Numerics()
    unroll: int | bool = 1
    attention: str = "auto"
    attention_block: int = 512
    remat: str = "auto"
    f32_weights: bool = False

    def __post_init__(self):
        emulated_format(self.dtype, self.numerics)  # an emulated format needs dtype float32: fail when built
        if self.attention != "auto" and self.attention not in attn.ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r}; valid: auto, {', '.join(attn.ATTENTION_IMPLS)}")
        attn.resolve_remat(self.remat, backend="cpu")  # validates the name
        if self.attention_block < 1:
            raise ValueError(f"model.attention_block must be >= 1, got {self.attention_block}")
        super().__post_init__()

    def resolved(self, seq_len: int) -> tuple[str, str]:
        """(attention, remat) as this model runs them on the default backend for `seq_len` keys."""
        backend = jax.default_backend()
        kind = attn.resolve_attention(self.attention, backend=backend, seq_len=seq_len, dtype=self.dtype,
                                      numerics=self.numerics, head_dim=self.cfg.head_dim)
        attn.check_attention(kind, dtype=self.dtype, numerics=self.numerics, backend=backend)
        return kind, attn.resolve_remat(self.remat, backend=backend)

    @nn.compact
    def __call__(self, tokens_BxT: Array, positions_BxT: Array, mask: Array,
                 cache: KVCache | None = None, index: Array | int = 0, *,
                 return_logits: bool = True, collect_hidden: bool = False):
        """Runs the decoder; returns (logits FP32 [B,T,V] or final-normed hidden [B,T,H], new cache, per-layer).

        Without a cache, `mask` is the key validity [B, T] (1 on real tokens; causal attention implied, the mask
        is then built per block by blockwise attention) or an explicit [B, T, T] (query t may see key s, as
        `causal_inputs` builds it); with a cache it is [B, T, S] over the cache's slots, and the keys and values
        of these T tokens are written at slots [index, index + T).
        `per_layer` is the residual stream after each layer, [L, B, T, H], when `collect_hidden`, else None.
        """
        cfg, num = self.cfg, self.numerics
        fmt = emulated_format(self.dtype, num)
        ar = arith(self.dtype, fmt)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=jnp.float32, dtype=self.dtype,
                         embedding_init=kernel_init(), name="embed")
        res_dtype = jnp.float32 if num.residual_f32 else self.dtype
        h = embed(tokens_BxT)
        f32_table = upcasts(ar, self.f32_weights)
        if fmt is not None:  # look up in the rounded table (its cotangent is then rounded too, as a cast's)
            h = jnp.take(ar.cast(embed.variables["params"]["embedding"]), tokens_BxT, axis=0)
        elif f32_table:  # the FP32 table holds `dtype` values: look up, then cast the rows (exact)
            h = jnp.take(embed.variables["params"]["embedding"], tokens_BxT, axis=0).astype(self.dtype)
        h = h.astype(res_dtype)
        cos_sin = rope_cos_sin(cfg, positions_BxT)
        kv = None if cache is None else (cache.k_LxBxSxKxD, cache.v_LxBxSxKxD)
        if cache is not None:
            if mask.ndim != 3:
                raise ValueError(f"with a KV cache the mask must be [B, T, S], got shape {mask.shape}")
            kind, remat = "dense", "none"
        else:
            kind, remat = self.resolved(tokens_BxT.shape[1])
        if mask.ndim == 2 and kind == "dense":
            mask = attn.causal_mask(mask.astype(jnp.bool_))
        layer = DecoderLayer
        if remat != "none":  # inside the scan, which already keeps the recomputation from being merged (no CSE)
            layer = nn.remat(DecoderLayer, policy=attn.remat_policy(remat), prevent_cse=False)
        layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=cfg.num_layers,
            unroll=self.unroll,
        )(cfg, self.dtype, num, collect_hidden, kind, self.attention_block, self.f32_weights, name="layers")
        h, (new_kv, per_layer) = layers(h, cos_sin, mask, jnp.asarray(index, jnp.int32), kv)
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, num.norm_f32, fmt=fmt, name="final_norm")(ar.cast(h))
        new_cache = None if cache is None else KVCache(new_kv[0], new_kv[1], cache.kv_mask_BxS)
        if cfg.tie_word_embeddings and fmt is not None:
            hd = arith(self.dtype, fmt, num.lm_head_f32)
            table = hd.cast(embed.variables["params"]["embedding"])
            head = lambda x: hd.out(jnp.dot(hd.cast(x), table.T, precision=hd.precision))  # noqa: E731
        elif cfg.tie_word_embeddings:
            head = lambda x: embed.attend(x)  # noqa: E731  (x @ embedding.T)
            if num.lm_head_f32:
                table = embed.variables["params"]["embedding"].astype(jnp.float32)
                head = lambda x: jnp.dot(x.astype(jnp.float32), table.T)  # noqa: E731
            elif f32_table:
                table = embed.variables["params"]["embedding"]
                head = lambda x: upcast_dot(x, table.T, self.dtype)  # noqa: E731
        else:
            head = Dense(cfg.vocab_size, False, self.dtype, num.lm_head_f32, fmt, self.f32_weights, name="lm_head")
        if not return_logits:
            if self.is_initializing():
                head(h)  # create the head's parameters
            return h, new_cache, per_layer
        return head(h).astype(jnp.float32), new_cache, per_layer


def valid_inputs(tokens_BxT: Array, positions_BxT: Array | None, attention_mask_BxT: Array | None):
    """Positions (cumulative count of real tokens, as for left padding) and the key validity [B, T] (bool)."""
    B, T = tokens_BxT.shape
    valid = jnp.ones((B, T), jnp.bool_) if attention_mask_BxT is None else attention_mask_BxT.astype(jnp.bool_)
    if positions_BxT is None:
        positions_BxT = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)
    return positions_BxT, valid


def causal_inputs(tokens_BxT: Array, positions_BxT: Array | None, attention_mask_BxT: Array | None):
    """Positions (cumulative count of real tokens, as for left padding) and the [B, T, T] causal key mask."""
    positions_BxT, valid = valid_inputs(tokens_BxT, positions_BxT, attention_mask_BxT)
    return positions_BxT, attn.causal_mask(valid)


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def lm_head_logits(params: Any, cfg: ModelConfig, h_BxTxH: Array, dtype: Any, numerics: Numerics) -> Array:
    """FP32 logits from final hidden states, using the head's parameters directly (for chunked evaluation)."""
    hd = arith(dtype, emulated_format(dtype, numerics), numerics.lm_head_f32)
    if cfg.tie_word_embeddings:
        kernel_HxV = hd.cast(params["embed"]["embedding"]).T
    else:
        kernel_HxV = hd.cast(params["lm_head"]["kernel"])
    return hd.out(jnp.dot(hd.cast(h_BxTxH), kernel_HxV, precision=hd.precision)).astype(jnp.float32)


def token_logprobs(model: CausalLM, params: Any, tokens_BxT: Array, attention_mask_BxT: Array | None = None,
                   *, temperature: float = 1.0, chunk_size: int = 256) -> Array:
    """Teacher-forced log-probs [B, T] (FP32): entry t is log p(tokens[:, t] | tokens[:, :t]); entry 0 is 0.

    Logits are formed, divided by the temperature and log-softmaxed in FP32 one chunk of positions at a time
    under `jax.checkpoint`, so no more than one [B, chunk, V] logits block is alive, forward or backward.
    """
    B, T = tokens_BxT.shape
    positions_BxT, valid_BxT = valid_inputs(tokens_BxT, None, attention_mask_BxT)
    h_BxTxH, _, _ = model.apply({"params": params}, tokens_BxT, positions_BxT, valid_BxT, return_logits=False)
    # Position t-1 predicts token t.
    h_BxNxH = h_BxTxH[:, :-1]
    targets_BxN = tokens_BxT[:, 1:]
    n = T - 1
    chunk = max(1, min(chunk_size, n))
    pad = (-n) % chunk
    h_BxNxH = jnp.pad(h_BxNxH, ((0, 0), (0, pad), (0, 0)))
    targets_BxN = jnp.pad(targets_BxN, ((0, 0), (0, pad)))
    num_chunks = (n + pad) // chunk
    h_CxBxKxH = h_BxNxH.reshape(B, num_chunks, chunk, -1).swapaxes(0, 1)
    t_CxBxK = targets_BxN.reshape(B, num_chunks, chunk).swapaxes(0, 1)
    cfg, dtype, numerics = model.cfg, model.dtype, model.numerics

    @jax.checkpoint
    def chunk_logprobs(h_BxKxH, t_BxK):
        logits = lm_head_logits(params, cfg, h_BxKxH, dtype, numerics) / jnp.float32(temperature)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logp, t_BxK[..., None], axis=-1)[..., 0]

    lp_CxBxK = jax.lax.map(lambda args: chunk_logprobs(*args), (h_CxBxKxH, t_CxBxK))
    lp_BxN = lp_CxBxK.swapaxes(0, 1).reshape(B, -1)[:, :n]
    return jnp.concatenate([jnp.zeros((B, 1), jnp.float32), lp_BxN], axis=1)
