"""The inference path: prefill and one-token decode steps against a KV cache, the engine a sampler drives.

Prompts are left-padded to a common width P so that every row's last prompt token sits in slot P - 1 and the
batch decodes in lock-step: step n writes slot P + n for every row. Positions count real tokens only, so a
left-padded row gets the same positions (and, in exact arithmetic, the same log-probs) as it would alone.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_fp16.models.decoder import CausalLM, KVCache, init_cache

__all__ = ["prefill", "decode_step", "left_pad"]

Array = jax.Array


def prefill(model: CausalLM, params: Any, prompt_BxP: Array, prompt_mask_BxP: Array, max_len: int,
            cache_dtype: Any | None = None) -> tuple[Array, KVCache, Array]:
    """Runs the prompts through the model, filling cache slots [0, P).

    Returns the FP32 logits of the next token [B, V], the cache (max_len slots, in the compute dtype unless
    `cache_dtype` says otherwise) and the position of the next token [B].
    """
    B, P = prompt_BxP.shape
    if P > max_len:
        raise ValueError(f"prompt width {P} exceeds the cache length {max_len}")
    valid_BxP = prompt_mask_BxP.astype(jnp.bool_)
    cache = init_cache(model.cfg, B, max_len, cache_dtype or model.dtype)
    kv_mask_BxS = cache.kv_mask_BxS.at[:, :P].set(valid_BxP)
    cache = KVCache(cache.k_LxBxSxKxD, cache.v_LxBxSxKxD, kv_mask_BxS)
    positions_BxP = jnp.maximum(jnp.cumsum(valid_BxP.astype(jnp.int32), axis=-1) - 1, 0)
    slots = jnp.arange(max_len)
    causal_PxS = slots[None, :] <= jnp.arange(P)[:, None]
    mask_BxPxS = causal_PxS[None] & kv_mask_BxS[:, None, :]
    logits_BxPxV, cache, _ = model.apply({"params": params}, prompt_BxP, positions_BxP, mask_BxPxS, cache, 0)
    next_pos_B = positions_BxP[:, -1] + 1
    return logits_BxPxV[:, -1], cache, next_pos_B


def decode_step(model: CausalLM, params: Any, token_B: Array, position_B: Array, cache: KVCache,
                index: Array) -> tuple[Array, KVCache]:
    """Feeds one token per row at cache slot `index`; returns the next-token FP32 logits [B, V] and the cache."""
    kv_mask_BxS = cache.kv_mask_BxS.at[:, index].set(True)
    cache = KVCache(cache.k_LxBxSxKxD, cache.v_LxBxSxKxD, kv_mask_BxS)
    slots = jnp.arange(cache.max_len)
    mask_Bx1xS = (kv_mask_BxS & (slots[None, :] <= index))[:, None, :]
    logits_Bx1xV, cache, _ = model.apply({"params": params}, token_B[:, None], position_B[:, None], mask_Bx1xS,
                                         cache, index)
    return logits_Bx1xV[:, 0], cache


def left_pad(prompts: list[list[int]], pad_id: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to `width` (default: the longest); returns int32 host arrays tokens [B, P] and
    mask [B, P] (numpy: no device round trip; jitted functions take them as they are)."""
    if not prompts:
        raise ValueError("no prompts given")
    longest = max(len(p) for p in prompts)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    width = longest if width is None else width
    if longest > width:
        raise ValueError(f"a prompt has {longest} tokens, more than the width {width}")
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return tokens, mask
