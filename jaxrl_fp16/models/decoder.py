"""A Flax (linen) decoder-only causal LM for the Qwen2, Qwen3, Llama and Mistral families.

One module serves both engines of the method:
- the training path: a teacher-forced full-sequence forward (no cache), and
- the inference path: prefill and one-token decode steps against a KV cache held in the compute dtype.

Parameters are FP32 master arrays (layers stacked on a leading axis, `nn.scan`); every op casts its
parameters to `dtype` (the policy's compute dtype), so a caller may pass FP32 params or params already cast
with `Policy.cast_to_compute` and get identical results. Which sensitive steps run in FP32 is set by `Numerics`.

Attention is written out (no fused kernel) so that its precision is explicit: scores = q.k^T * scale
(in `dtype`, or FP32), masked where a key is padding or in the future, softmax (FP32 by default), probs.v.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_fp16.models.config import ModelConfig, Numerics

__all__ = ["CausalLM", "KVCache", "init_cache"]

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


def _kernel_init():
    return nn.initializers.normal(stddev=0.02)


class Dense(nn.Module):
    """x @ kernel (+ bias) in `dtype`; kernel stored (in, out) in FP32."""

    features: int
    use_bias: bool
    dtype: Any
    compute_f32: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", _kernel_init(), (x.shape[-1], self.features), jnp.float32)
        dtype = jnp.float32 if self.compute_f32 else self.dtype
        y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(dtype)
        return y


class RMSNorm(nn.Module):
    """As transformers: normalise (in FP32 when `f32`), cast back to the input dtype, multiply by the weight."""

    eps: float
    dtype: Any
    f32: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        in_dtype = x.dtype
        stat_dtype = jnp.float32 if self.f32 else in_dtype
        xs = x.astype(stat_dtype)
        var = jnp.mean(jnp.square(xs), axis=-1, keepdims=True)
        y = (xs * jax.lax.rsqrt(var + jnp.asarray(self.eps, stat_dtype))).astype(in_dtype)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def _rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_cos_sin(cfg: ModelConfig, positions_BxT: Array) -> tuple[Array, Array]:
    """cos/sin [B, T, D] in FP32 (the angles are always computed in FP32, as transformers does)."""
    inv_freq = jnp.asarray(cfg.inv_freq())
    angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxTxNxD: Array, cos_BxTxD: Array, sin_BxTxD: Array, f32: bool) -> Array:
    dtype = jnp.float32 if f32 else x_BxTxNxD.dtype
    x = x_BxTxNxD.astype(dtype)
    cos, sin = cos_BxTxD[:, :, None, :].astype(dtype), sin_BxTxD[:, :, None, :].astype(dtype)
    return (x * cos + _rotate_half(x) * sin).astype(x_BxTxNxD.dtype)


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: Any
    numerics: Numerics

    @nn.compact
    def __call__(self, x_BxTxH, cos_sin, mask_BxTxS, layer_cache):
        cfg, num = self.cfg, self.numerics
        B, T, _ = x_BxTxH.shape
        D, Nq, Nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        q = Dense(Nq * D, cfg.qkv_bias, self.dtype, name="q_proj")(x_BxTxH).reshape(B, T, Nq, D)
        k = Dense(Nkv * D, cfg.qkv_bias, self.dtype, name="k_proj")(x_BxTxH).reshape(B, T, Nkv, D)
        v = Dense(Nkv * D, cfg.qkv_bias, self.dtype, name="v_proj")(x_BxTxH).reshape(B, T, Nkv, D)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, self.dtype, num.norm_f32, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, self.dtype, num.norm_f32, name="k_norm")(k)
        cos, sin = cos_sin
        q = apply_rope(q, cos, sin, num.rope_f32)
        k = apply_rope(k, cos, sin, num.rope_f32)

        if layer_cache is not None:  # write this call's keys/values into the cache slots, attend over all slots
            cache_k, cache_v, index = layer_cache
            k_all = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
            new_cache = (k_all, v_all)
        else:
            k_all, v_all, new_cache = k, v, None

        score_dtype = jnp.float32 if num.attn_scores_f32 else self.dtype
        S = k_all.shape[1]
        qg = q.reshape(B, T, Nkv, cfg.num_groups, D).astype(score_dtype)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_all.astype(score_dtype))
        scores = scores * jnp.asarray(D ** -0.5, score_dtype)
        mask = mask_BxTxS[:, None, None, :, :]
        soft_dtype = jnp.float32 if num.softmax_f32 else score_dtype
        scores = jnp.where(mask, scores.astype(soft_dtype), jnp.finfo(soft_dtype).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(score_dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v_all.astype(score_dtype))
        out = out.reshape(B, T, Nq * D).astype(self.dtype)
        del S
        y = Dense(cfg.hidden_size, cfg.o_bias, self.dtype, name="o_proj")(out)
        return y, new_cache


class MLP(nn.Module):
    cfg: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = Dense(cfg.intermediate_size, cfg.mlp_bias, self.dtype, name="gate_proj")(x)
        up = Dense(cfg.intermediate_size, cfg.mlp_bias, self.dtype, name="up_proj")(x)
        return Dense(cfg.hidden_size, cfg.mlp_bias, self.dtype, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block; scanned over layers (carry: hidden states; per-layer inputs: this layer's cache)."""

    cfg: ModelConfig
    dtype: Any
    numerics: Numerics
    collect_hidden: bool = False

    @nn.compact
    def __call__(self, h, cos_sin, mask_BxTxS, index, layer_kv):
        cfg, num = self.cfg, self.numerics
        res_dtype = h.dtype
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, num.norm_f32, name="input_norm")(h)
        layer_cache = None if layer_kv is None else (layer_kv[0], layer_kv[1], index)
        a, new_kv = Attention(cfg, self.dtype, num, name="attn")(x, cos_sin, mask_BxTxS, layer_cache)
        h = h + a.astype(res_dtype)
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, num.norm_f32, name="post_attn_norm")(h)
        h = h + MLP(cfg, self.dtype, name="mlp")(x).astype(res_dtype)
        return h, (new_kv, h if self.collect_hidden else None)


class CausalLM(nn.Module):
    """Decoder-only causal LM.

    Attributes:
      cfg: the architecture.
      dtype: compute dtype (the precision policy's `compute_dtype`).
      numerics: which sensitive steps run in FP32.
      unroll: layers per iteration of the layer loop (`nn.scan`'s unroll; True = all). The parameters are the
        same either way; unrolling the decode loop saves the per-layer slicing of the stacked weights and the
        loop's per-iteration overhead, which dominate one-token steps of small models.
    """

    cfg: ModelConfig
    dtype: Any = jnp.float32
    numerics: Numerics = Numerics()
    unroll: int | bool = 1

    @nn.compact
    def __call__(self, tokens_BxT: Array, positions_BxT: Array, mask_BxTxS: Array,
                 cache: KVCache | None = None, index: Array | int = 0, *,
                 return_logits: bool = True, collect_hidden: bool = False):
        """Runs the decoder; returns (logits FP32 [B,T,V] or final-normed hidden [B,T,H], new cache, per-layer).

        Without a cache, `mask_BxTxS` is [B, T, T] (query t may see key s); with one it is [B, T, S] over the
        cache's slots, and the keys and values of these T tokens are written at slots [index, index + T).
        `per_layer` is the residual stream after each layer, [L, B, T, H], when `collect_hidden`, else None.
        """
        cfg, num = self.cfg, self.numerics
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=jnp.float32, dtype=self.dtype,
                         embedding_init=_kernel_init(), name="embed")
        res_dtype = jnp.float32 if num.residual_f32 else self.dtype
        h = embed(tokens_BxT).astype(res_dtype)
        cos_sin = rope_cos_sin(cfg, positions_BxT)
        kv = None if cache is None else (cache.k_LxBxSxKxD, cache.v_LxBxSxKxD)
        layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=cfg.num_layers,
            unroll=self.unroll,
        )(cfg, self.dtype, num, collect_hidden, name="layers")
        h, (new_kv, per_layer) = layers(h, cos_sin, mask_BxTxS, jnp.asarray(index, jnp.int32), kv)
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, num.norm_f32, name="final_norm")(h.astype(self.dtype))
        new_cache = None if cache is None else KVCache(new_kv[0], new_kv[1], cache.kv_mask_BxS)
        if cfg.tie_word_embeddings:
            head = lambda x: embed.attend(x)  # noqa: E731  (x @ embedding.T)
            if num.lm_head_f32:
                table = embed.variables["params"]["embedding"].astype(jnp.float32)
                head = lambda x: jnp.dot(x.astype(jnp.float32), table.T)  # noqa: E731
        else:
            head = Dense(cfg.vocab_size, False, self.dtype, num.lm_head_f32, name="lm_head")
        if not return_logits:
            if self.is_initializing():
                head(h)  # create the head's parameters
            return h, new_cache, per_layer
        return head(h).astype(jnp.float32), new_cache, per_layer


def causal_inputs(tokens_BxT: Array, positions_BxT: Array | None, attention_mask_BxT: Array | None):
    """Positions (cumulative count of real tokens, as for left padding) and the [B, T, T] causal key mask."""
    B, T = tokens_BxT.shape
    valid = jnp.ones((B, T), jnp.bool_) if attention_mask_BxT is None else attention_mask_BxT.astype(jnp.bool_)
    if positions_BxT is None:
        positions_BxT = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)
    causal = jnp.tril(jnp.ones((T, T), jnp.bool_))
    mask = causal[None] & valid[:, None, :]
    return positions_BxT, mask


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def lm_head_logits(params: Any, cfg: ModelConfig, h_BxTxH: Array, dtype: Any, numerics: Numerics) -> Array:
    """FP32 logits from final hidden states, using the head's parameters directly (for chunked evaluation)."""
    head_dtype = jnp.float32 if numerics.lm_head_f32 else dtype
    if cfg.tie_word_embeddings:
        kernel_HxV = params["embed"]["embedding"].astype(head_dtype).T
    else:
        kernel_HxV = params["lm_head"]["kernel"].astype(head_dtype)
    return jnp.dot(h_BxTxH.astype(head_dtype), kernel_HxV).astype(jnp.float32)


def token_logprobs(model: CausalLM, params: Any, tokens_BxT: Array, attention_mask_BxT: Array | None = None,
                   *, temperature: float = 1.0, chunk_size: int = 256) -> Array:
    """Teacher-forced log-probs [B, T] (FP32): entry t is log p(tokens[:, t] | tokens[:, :t]); entry 0 is 0.

    Logits are formed, divided by the temperature and log-softmaxed in FP32 one chunk of positions at a time
    under `jax.checkpoint`, so no more than one [B, chunk, V] logits block is alive, forward or backward.
    """
    B, T = tokens_BxT.shape
    positions_BxT, mask_BxTxT = causal_inputs(tokens_BxT, None, attention_mask_BxT)
    h_BxTxH, _, _ = model.apply({"params": params}, tokens_BxT, positions_BxT, mask_BxTxT, return_logits=False)
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
