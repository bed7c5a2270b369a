"""Attention implementations of the decoder, and the pure resolvers of `model.attention` / `model.remat`.

Layouts: q [B, T, Nkv, G, D] (G = query heads per key/value head), k and v [B, S, Nkv, D], all after RoPE.
The mask is either the key validity [B, S] of a teacher-forced forward (T == S; query t sees key s when s <= t
and key s is valid) or an explicit boolean [B, T, S] (a KV cache, or a caller that builds its own).

- "dense": the scores written out op by op as a [B, Nkv, G, T, S] tensor (`dense_attention`). Its precision is
  the one `Numerics` sets: q.k^T and probs.v in the compute dtype (FP32 with `attn_scores_f32`), the softmax in
  FP32 (`softmax_f32`), the unscaled q.k^T rounded to the compute dtype unless `scale_q`, every op rounded
  to the emulated format with `emulate`. The KV-cache path (prefill, decode) always uses it.
- "blockwise": online-softmax (flash-style) attention in pure JAX (`blockwise_attention`): query blocks and key
  blocks of `block` tokens, the causal/padding mask built per block, key blocks wholly in a query block's
  future skipped; a custom VJP recomputes each block's probabilities from the saved row max and sum, so neither
  the forward nor the backward holds more than one [B, Nkv, G, block, block] block of scores. Like the GPU
  engines' fused kernels: q.k^T is accumulated in FP32 (scores never round to the compute dtype, so they cannot
  overflow FP16), the softmax, its running max and sum are FP32, the probabilities enter probs.v in the
  compute dtype with FP32 accumulation. Honours `attn_scores_f32` (q, k, v and the probabilities in FP32);
  `softmax_f32` and `scale_q` do not apply (always FP32); `emulate` is refused.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (`fused_attention`), GPUs with FP16/BF16
  only; the same numerics as "blockwise" (`attn_scores_f32` does not apply: the kernel takes half inputs).
  With a [B, S] validity mask each row is rotated so its real tokens start at slot 0 and cuDNN's causal +
  sequence-length mask applies, which assumes each row's real tokens are contiguous (left and/or right
  padding, as the trainer's, scorer's and DPO rows are); an explicit [B, T, S] mask is passed as cuDNN's bias.
  "fused-xla" is the same wrapper with JAX's XLA implementation (any backend: it checks the wrapper's layout,
  grouped heads and masking on a CPU).
- "auto" (`resolve_attention`): cuDNN on a GPU for FP16/BF16 with the default attention numerics, else
  blockwise from `BLOCKWISE_MIN_LEN` keys on, else dense (so short runs on a CPU stay bit-identical).

Rematerialisation (`resolve_remat`): "none", "full" (a layer saves nothing but its inputs and recomputes its
forward in the backward), "dots" (saves the outputs of matmuls without batch dimensions, i.e. the projections
and the MLP; recomputes the rest); "auto" is "full" on a GPU and "dots" elsewhere.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["ATTENTION_IMPLS", "REMAT_KINDS", "BLOCKWISE_MIN_LEN", "resolve_attention", "resolve_remat",
           "remat_policy", "check_attention", "causal_mask", "dense_attention", "blockwise_attention",
           "fused_attention", "softmax"]

Array = jax.Array

ATTENTION_IMPLS = ("dense", "blockwise", "cudnn", "fused-xla")
REMAT_KINDS = ("none", "full", "dots")
# "auto" switches from dense to blockwise attention at this many keys (see README "Attention implementations").
BLOCKWISE_MIN_LEN = 1024
_HALF = ("float16", "bfloat16")
_LOWEST = float(jnp.finfo(jnp.float32).min)  # the masked score (finite: a fully masked row stays NaN-free)


# ----- resolvers (pure: a planner calls them for a GPU target from a CPU) -----

def _default_attention_numerics(numerics: Any) -> bool:
    """Whether the attention-related `Numerics` switches are at their defaults (what a fused kernel matches)."""
    if numerics is None:
        return True
    return (numerics.emulate is None and numerics.softmax_f32 and not numerics.attn_scores_f32
            and not getattr(numerics, "scale_q", False))


def resolve_attention(choice: str, *, backend: str, seq_len: int, dtype: Any = None, numerics: Any = None,
                      head_dim: int | None = None) -> str:
    """The implementation `choice` ("auto", "dense", "blockwise", "cudnn") runs as on `backend` ("cpu", "gpu",
    "tpu") for `seq_len` keys; `dtype`/`numerics`/`head_dim` None: not known (no condition on them).

    "auto": "cudnn" on a GPU when the compute dtype is FP16/BF16, the attention numerics are the defaults and
    the head size suits cuDNN (a multiple of 8, at most 128); otherwise "blockwise" from `BLOCKWISE_MIN_LEN`
    keys on when blockwise can honour the numerics (no emulated format, FP32 softmax); otherwise "dense"."""
    if choice != "auto":
        if choice not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={choice!r}; valid: auto, {', '.join(ATTENTION_IMPLS)}")
        return choice
    half = dtype is None or jnp.dtype(dtype).name in _HALF
    head_ok = head_dim is None or (head_dim % 8 == 0 and head_dim <= 128)
    if backend == "gpu" and half and head_ok and _default_attention_numerics(numerics):
        return "cudnn"
    blockwise_ok = numerics is None or (numerics.emulate is None and numerics.softmax_f32)
    return "blockwise" if blockwise_ok and seq_len >= BLOCKWISE_MIN_LEN else "dense"


def resolve_remat(choice: str, *, backend: str) -> str:
    """The rematerialisation `choice` ("auto", "none", "full", "dots") runs as on `backend`: "auto" is "full" on
    a GPU (activation memory is what limits batch and length there) and "dots" elsewhere (on a CPU the layer
    scan's saved elementwise values cost more to stack and read back than to recompute: README "Training step")."""
    if choice == "auto":
        return "full" if backend == "gpu" else "dots"
    if choice not in REMAT_KINDS:
        raise ValueError(f"model.remat={choice!r}; valid: auto, {', '.join(REMAT_KINDS)}")
    return choice


def remat_policy(kind: str):
    """The `jax.checkpoint` policy of a resolved remat kind ("full": save nothing; "dots": matmul outputs
    without batch dimensions)."""
    if kind == "full":
        return jax.checkpoint_policies.nothing_saveable
    if kind == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"model.remat={kind!r} has no checkpoint policy; valid: full, dots")


def check_attention(kind: str, *, dtype: Any, numerics: Any, backend: str) -> None:
    """Refuses an implementation that cannot run the model as configured, naming the key."""
    if kind not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention={kind!r}; valid: auto, {', '.join(ATTENTION_IMPLS)}")
    if kind == "dense":
        return
    if numerics.emulate is not None:
        raise ValueError(f"model.attention={kind!r} does not emulate formats (Numerics.emulate="
                         f"{numerics.emulate!r}); use model.attention=dense")
    if kind == "cudnn":
        if backend != "gpu":
            raise ValueError(f"model.attention='cudnn' needs a GPU (cuDNN), the backend is {backend!r}; use "
                             f"model.attention=blockwise or auto")
        if jnp.dtype(dtype).name not in _HALF:
            raise ValueError(f"model.attention='cudnn' needs compute dtype float16 or bfloat16, got "
                             f"{jnp.dtype(dtype).name}; use model.attention=blockwise or auto")


# ----- masks -----

def causal_mask(valid_BxS: Array) -> Array:
    """[B, T, T]: query t sees key s when s <= t and key s is valid (T == S)."""
    T = valid_BxS.shape[-1]
    causal = jnp.tril(jnp.ones((T, T), jnp.bool_))
    return causal[None] & valid_BxS[:, None, :]


# ----- dense -----

def softmax(x: Array, ar: Any) -> Array:
    """Softmax over the last axis; with emulation written out (as jax.nn.softmax) with each op rounded."""
    if ar.fmt is None:
        return jax.nn.softmax(x, axis=-1)
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    # A masked score (-fmt.max) minus the row max can fall below -fmt.max: -inf in an IEEE format (exp: 0), NaN in
    # a finite ("fn") one, which has no inf. It is read as the -inf it stands for; IEEE formats are unchanged.
    rounded = ar.out(shifted)
    rounded = jnp.where(jnp.isnan(rounded) & ~jnp.isnan(shifted), -jnp.inf, rounded)
    unnormalized = ar.out(jnp.exp(rounded))
    return ar.out(ar.use(unnormalized) / ar.out(jnp.sum(ar.use(unnormalized), axis=-1, keepdims=True)))


def dense_attention(q: Array, k: Array, v: Array, mask_BxTxS: Array, *, ar: Any, sc: Any, soft: Any,
                    scale_q: bool = False) -> Array:
    """The written-out attention, [B, T, Nkv, G, D] in `sc`'s dtype: `ar` is the compute arithmetic (q, k, v's),
    `sc` that of the score and probs.v products, `soft` that of the softmax (`layers.Arith`s). `scale_q`:
    q * D^-0.5 before q.k^T (the unscaled product cannot overflow the compute dtype); else (q.k^T) * D^-0.5."""
    D = q.shape[-1]
    qg = sc.cast(ar.use(q))
    if scale_q:
        qg = sc.out(qg * sc.const(D ** -0.5))
    scores = sc.out(jnp.einsum("btkgd,bskd->bkgts", qg, sc.cast(ar.use(k)), precision=sc.precision))
    if not scale_q:
        scores = sc.out(scores * sc.const(D ** -0.5))
    mask = mask_BxTxS[:, None, None, :, :]
    scores = jnp.where(mask, soft.cast(sc.use(scores)), soft.lowest)
    probs = sc.cast(softmax(scores, soft))
    return sc.out(jnp.einsum("bkgts,bskd->btkgd", probs, sc.cast(ar.use(v)), precision=sc.precision))


# ----- blockwise (online softmax, custom VJP) -----

def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _precision(dtype) -> Any:
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _block_mask(mask: Array, causal: bool, i, j, bq: int, bk: int) -> Array:
    """[B, bq, bk]: query block i against key block j (from the validity [B, S'] or the mask [B, T', S'])."""
    if causal:
        q_idx = i * bq + jnp.arange(bq)
        k_idx = j * bk + jnp.arange(bk)
        keys = jax.lax.dynamic_slice_in_dim(mask, j * bk, bk, axis=1)
        return (k_idx[None, :] <= q_idx[:, None])[None] & keys[:, None, :]
    return jax.lax.dynamic_slice(mask, (0, i * bq, j * bk), (mask.shape[0], bq, bk))


def _key_range(causal: bool, i, nk: int):
    """Key blocks [lo, hi) query block i visits: in causal mode (one block size on both sides) those up to and
    including the diagonal; blocks wholly in the future are never computed."""
    return 0, (i + 1 if causal else nk)


def _query_range(causal: bool, j, nq: int):
    """Query blocks [lo, hi) that see key block j."""
    return (j if causal else 0), nq


def _scores(qi: Array, kj: Array, scale: float) -> Array:
    """FP32 scores [B, Nkv, G, bq, bk] of a block: q.k^T accumulated in FP32, then scaled."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32, precision=_precision(qi.dtype))
    return s * jnp.float32(scale)


def _slice(x: Array, start, size: int) -> Array:
    return jax.lax.dynamic_slice_in_dim(x, start * size, size, axis=1)


def _flash_forward(q, k, v, mask, causal: bool, bq: int, bk: int, scale: float):
    """(out [B, T', Nkv, G, D] in q's dtype, (m, 1/l) [B, Nkv, G, T'] FP32: each row's max score and inverse
    softmax sum) over padded q [B, T', ...], k/v [B, S', ...]. A row whose keys are all masked (a padding query)
    averages the keys it visited with equal weights, finite both ways.

    The key loops have data-dependent bounds (while loops): nothing is unrolled, stacked or hoisted across
    blocks, so memory stays one block of scores whatever the length."""
    B, Tp, Nkv, G, D = q.shape
    nq, nk = Tp // bq, k.shape[1] // bk

    def q_block(i):
        qi = _slice(q, i, bq)

        def visit(j, c):
            m, l, acc = c
            kj, vj = _slice(k, j, bk), _slice(v, j, bk)
            s = jnp.where(_block_mask(mask, causal, i, j, bq, bk)[:, None, None], _scores(qi, kj, scale), _LOWEST)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            corr = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            l = l * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32,
                            precision=_precision(vj.dtype))
            return m_new, l, acc * corr[..., None] + pv

        init = (jnp.full((B, Nkv, G, bq), _LOWEST, jnp.float32), jnp.zeros((B, Nkv, G, bq), jnp.float32),
                jnp.zeros((B, Nkv, G, bq, D), jnp.float32))
        m, l, acc = jax.lax.fori_loop(*_key_range(causal, i, nk), visit, init)
        inv_l = 1.0 / l
        return jnp.einsum("bkgqd->bqkgd", acc * inv_l[..., None]).astype(q.dtype), (m, inv_l)

    out, stats = jax.lax.map(q_block, jnp.arange(nq))  # [nq, B, bq, ...], 2 x [nq, B, Nkv, G, bq]
    out = jnp.moveaxis(out, 0, 1).reshape(B, Tp, Nkv, G, D)
    return out, tuple(jnp.moveaxis(x, 0, -2).reshape(B, Nkv, G, Tp) for x in stats)


def _flash_backward(q, k, v, mask, out, stats, d_out, causal: bool, bq: int, bk: int, scale: float):
    """(dq, dk, dv) in the inputs' dtypes: each block's probabilities recomputed from the saved max and sum."""
    B, Tp, Nkv, G, D = q.shape
    nq, nk = Tp // bq, k.shape[1] // bk
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def k_block(j, grads):
        kj, vj = _slice(k, j, bk), _slice(v, j, bk)

        def visit(i, c):
            dq, dk, dv = c
            qi, doi = _slice(q, i, bq), _slice(d_out, i, bq)
            m_i, inv_l_i = (jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=-1) for x in stats)
            delta_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=-1)
            mask_ij = _block_mask(mask, causal, i, j, bq, bk)[:, None, None]
            p = jnp.exp(jnp.where(mask_ij, _scores(qi, kj, scale), _LOWEST) - m_i[..., None]) * inv_l_i[..., None]
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(vj.dtype), doi, preferred_element_type=jnp.float32,
                                 precision=_precision(vj.dtype))
            dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32,
                            precision=_precision(vj.dtype))
            ds = (jnp.where(mask_ij, p * (dp - delta_i[..., None]), 0.0) * jnp.float32(scale)).astype(qi.dtype)
            dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds, kj, preferred_element_type=jnp.float32,
                              precision=_precision(qi.dtype))
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi, preferred_element_type=jnp.float32,
                                 precision=_precision(qi.dtype))
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _slice(dq, i, bq) + dq_i, i * bq, axis=1)
            return dq, dk, dv

        dq, dk_all, dv_all = grads
        zeros = jnp.zeros((B, bk, Nkv, D), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(*_query_range(causal, j, nq), visit, (dq, zeros, zeros))
        return (dq, jax.lax.dynamic_update_slice_in_dim(dk_all, dk, j * bk, axis=1),
                jax.lax.dynamic_update_slice_in_dim(dv_all, dv, j * bk, axis=1))

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = jax.lax.fori_loop(0, nk, k_block, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, mask, causal, bq, bk, scale):
    return _flash_forward(q, k, v, mask, causal, bq, bk, scale)[0]


def _flash_fwd(q, k, v, mask, causal, bq, bk, scale):
    out, stats = _flash_forward(q, k, v, mask, causal, bq, bk, scale)
    return out, (q, k, v, mask, out, stats)


def _flash_bwd(causal, bq, bk, scale, res, d_out):
    q, k, v, mask, out, stats = res
    dq, dk, dv = _flash_backward(q, k, v, mask, out, stats, d_out, causal, bq, bk, scale)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q: Array, k: Array, v: Array, mask: Array, *, block: int = 512,
                        f32_products: bool = False) -> Array:
    """Online-softmax attention, [B, T, Nkv, G, D] in q's dtype, never forming a [T, S] tensor (forward or
    backward). `mask`: the validity [B, S] (causal, T == S) or an explicit [B, T, S]; `block`: tokens per query
    and key block (T and S are padded up to a multiple); `f32_products`: q, k, v and the probabilities in FP32
    (`Numerics.attn_scores_f32`)."""
    if block < 1:
        raise ValueError(f"model.attention_block must be >= 1, got {block}")
    B, T, Nkv, G, D = q.shape
    S = k.shape[1]
    causal = mask.ndim == 2
    if causal and S != T:
        raise ValueError(f"blockwise attention: a [B, S] validity mask needs as many keys as queries, got "
                         f"T={T}, S={S}")
    dtype = q.dtype
    if f32_products:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    bq, bk = min(block, T), min(block, S)
    if causal:  # one block size on both sides keeps the causal skip exact
        bq = bk = min(block, T)
    Tp, Sp = _ceil_to(T, bq), _ceil_to(S, bk)
    q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, Sp - S), (0, 0), (0, 0))) for x in (k, v))
    mask = mask.astype(jnp.bool_)
    mask = jnp.pad(mask, ((0, 0), (0, Sp - S))) if causal else jnp.pad(mask, ((0, 0), (0, Tp - T), (0, Sp - S)))
    out = _flash(q, k, v, mask, causal, bq, bk, D ** -0.5)
    return out[:, :T].astype(dtype)


# ----- fused (jax.nn.dot_product_attention: cuDNN, or XLA for checks) -----

def _rotate(x_BxT: Array, shift_B: Array) -> Array:
    """Row b of x moved left by shift_B[b] slots (circularly), along axis 1."""
    T = x_BxT.shape[1]
    idx = (jnp.arange(T)[None, :] + shift_B[:, None]) % T
    return jnp.take_along_axis(x_BxT, idx.reshape(idx.shape + (1,) * (x_BxT.ndim - 2)), axis=1)


def fused_attention(q: Array, k: Array, v: Array, mask: Array, *, implementation: str | None = "cudnn") -> Array:
    """`jax.nn.dot_product_attention`, [B, T, Nkv, G, D] in q's dtype. With the validity [B, S] (T == S), each
    row is rotated left so its first real token sits at slot 0 and the kernel's causal + sequence-length mask
    applies (its real tokens must be contiguous); an explicit [B, T, S] mask goes in as is."""
    B, T, Nkv, G, D = q.shape
    qh = q.reshape(B, T, Nkv * G, D)
    attend = functools.partial(jax.nn.dot_product_attention, scale=D ** -0.5, implementation=implementation)
    if mask.ndim == 3:
        out = attend(qh, k, v, mask=mask.astype(jnp.bool_)[:, None])
        return out.reshape(B, T, Nkv, G, D)
    if k.shape[1] != T:
        raise ValueError(f"fused attention: a [B, S] validity mask needs as many keys as queries, got T={T}, "
                         f"S={k.shape[1]}")
    valid = mask.astype(jnp.bool_)
    start = jnp.argmax(valid, axis=1).astype(jnp.int32)  # the first real token (0 for a row with none)
    length = jnp.maximum(jnp.sum(valid, axis=1, dtype=jnp.int32), 1)
    out = attend(_rotate(qh, start), _rotate(k, start), _rotate(v, start), is_causal=True,
                 query_seq_lengths=length, key_value_seq_lengths=length)
    return _rotate(out, (T - start) % T).reshape(B, T, Nkv, G, D)

