"""Attention implementations (dense, blockwise, the cuDNN wrapper), layer rematerialisation and the FP16 overflow
of unscaled attention scores.

The cuDNN kernel needs a GPU: here its wrapper (`fused_attention`: row rotation for padding, grouped heads,
layout) runs with JAX's XLA implementation ("fused-xla"), which checks everything but the kernel itself.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_fp16.models import attention as attn
from jaxrl_fp16.models.config import ModelConfig, Numerics, RopeScaling
from jaxrl_fp16.models.decoder import CausalLM, causal_inputs, token_logprobs
from jaxrl_fp16.models.layers import arith

CONFIGS = {
    "qwen2": ModelConfig(arch="qwen2", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, max_position_embeddings=16384),
    "qwen3": ModelConfig(arch="qwen3", vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=1, head_dim=24, qk_norm=True, tie_word_embeddings=True),
    "llama": ModelConfig(arch="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=4, head_dim=16, qkv_bias=True, o_bias=True, mlp_bias=True,
                         rope_theta=500000.0, max_position_embeddings=256,
                         rope_scaling=RopeScaling(rope_type="llama3", factor=8.0,
                                                  original_max_position_embeddings=16)),
}
B, T, BLOCK = 3, 37, 8  # T not a multiple of the block


@functools.cache  # one eager init per config (seconds each), shared: callers must not mutate the dicts
def init_params(cfg, seed=0):
    tok = jnp.zeros((1, 4), jnp.int32)
    params = CausalLM(cfg).init(jax.random.PRNGKey(seed), tok, *causal_inputs(tok, None, None))["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)  # random biases/norm weights: layout mistakes show
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def batch(vocab=97):
    """Ragged rows: left padding (5 and 11 slots), and a right-padded row."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (B, T)), jnp.int32)
    mask = np.ones((B, T), np.int32)
    mask[0, :5] = 0
    mask[1, :11] = 0
    mask[2, 30:] = 0
    return tokens, jnp.asarray(mask)


def scored(mask):
    """[B, T-1] where log p(token t | < t) is meaningful: tokens t and t-1 both real."""
    return np.asarray((mask[:, 1:] > 0) & (mask[:, :-1] > 0))


def logprobs_and_grads(model, params, tokens, mask):
    keep = jnp.asarray(scored(mask))

    def loss(p):
        lp = token_logprobs(model, p, tokens, mask)
        return jnp.sum(jnp.where(keep, lp[:, 1:], 0.0)), lp

    (_, lp), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(lp)[:, 1:], grads


def max_rel_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_blockwise_and_cudnn_wrapper_match_dense_fp32(arch):
    cfg = CONFIGS[arch]
    params = init_params(cfg)
    tokens, mask = batch()
    keep = scored(mask)
    ref_lp, ref_g = logprobs_and_grads(CausalLM(cfg, attention="dense"), params, tokens, mask)
    for kind in ("blockwise", "fused-xla"):
        lp, g = logprobs_and_grads(CausalLM(cfg, attention=kind, attention_block=BLOCK), params, tokens, mask)
        assert np.abs(lp - ref_lp)[keep].max() <= 1e-5, kind
        assert max_rel_diff(g, ref_g) <= 1e-5, kind


def test_attention_functions_match_dense_with_both_mask_forms():
    """Grouped heads (G=3), a block size that does not divide T, the validity [B, T] and an explicit [B, T, T]."""
    Bq, Tq, Nkv, G, D = 2, 21, 2, 3, 8
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (Bq, Tq, Nkv, G, D))
    k, v = (jax.random.normal(kk, (Bq, Tq, Nkv, D)) for kk in ks[1:])
    valid = jnp.asarray(np.arange(Tq)[None, :] >= np.array([[0], [6]]))  # row 1 left-padded
    full = attn.causal_mask(valid)
    f32 = arith(jnp.float32, None)
    ref = attn.dense_attention(q, k, v, full, ar=f32, sc=f32, soft=f32)
    real = np.asarray(valid)  # rows of padding queries are never read
    for name, out in {
        "blockwise/valid": attn.blockwise_attention(q, k, v, valid, block=4),
        "blockwise/full": attn.blockwise_attention(q, k, v, full, block=4),
        "blockwise/one block": attn.blockwise_attention(q, k, v, valid, block=64),
        "fused-xla/valid": attn.fused_attention(q, k, v, valid, implementation="xla"),
        "fused-xla/full": attn.fused_attention(q, k, v, full, implementation="xla"),
    }.items():
        assert out.shape == ref.shape, name
        assert np.abs(np.asarray(out - ref))[real].max() <= 1e-5, name


def test_blockwise_half_precision_is_as_close_to_fp32_as_dense():
    cfg = CONFIGS["qwen2"]
    params = init_params(cfg)
    tokens, mask = batch()
    keep = scored(mask)

    def logprobs(model):
        return np.asarray(jax.jit(lambda p: token_logprobs(model, p, tokens, mask))(params))[:, 1:]

    ref = logprobs(CausalLM(cfg))
    for dtype in (jnp.float16, jnp.bfloat16):
        dense = logprobs(CausalLM(cfg, dtype=dtype, attention="dense"))
        block = logprobs(CausalLM(cfg, dtype=dtype, attention="blockwise", attention_block=BLOCK))
        gap_dense, gap_block = np.abs(dense - ref)[keep].mean(), np.abs(block - ref)[keep].mean()
        assert 0 < gap_block <= 2 * gap_dense, (jnp.dtype(dtype).name, gap_block, gap_dense)


@pytest.mark.parametrize("kind", ["dense", "blockwise"])
def test_remat_keeps_logprobs_and_gradients(kind):
    cfg = CONFIGS["qwen3"]
    params = init_params(cfg)
    tokens, mask = batch()
    ref_lp, ref_g = logprobs_and_grads(CausalLM(cfg, attention=kind, attention_block=BLOCK, remat="none"),
                                       params, tokens, mask)
    for remat in ("full", "dots"):
        model = CausalLM(cfg, attention=kind, attention_block=BLOCK, remat=remat)
        lp, g = logprobs_and_grads(model, params, tokens, mask)
        # The same ops; XLA may fuse the program around the checkpoint differently: FP32 rounding at most.
        assert np.abs(lp - ref_lp).max() <= 1e-6, remat
        assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(ref_g)
        assert max_rel_diff(g, ref_g) <= 1e-6, remat


@pytest.mark.parametrize("remat", ["none", "full"])
def test_an_unrolled_layer_loop_keeps_parameters_logprobs_and_gradients(remat):
    """`model.layer_loop: unrolled` (CausalLM.unroll): the same parameter tree (so the same checkpoints) and the
    same function; XLA compiles each layer apart, so FP32 rounding at most."""
    cfg = CONFIGS["qwen2"]
    scanned, unrolled = CausalLM(cfg, remat=remat), CausalLM(cfg, remat=remat, unroll=True)
    tokens, mask = batch()
    inputs = (tokens, *causal_inputs(tokens, None, mask))
    a, b = (m.init(jax.random.PRNGKey(3), *inputs)["params"] for m in (scanned, unrolled))
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    ref_lp, ref_g = logprobs_and_grads(scanned, a, tokens, mask)
    lp, g = logprobs_and_grads(unrolled, a, tokens, mask)
    assert np.abs(lp - ref_lp).max() <= 1e-6
    assert max_rel_diff(g, ref_g) <= 1e-6
    hlo = [jax.jit(lambda p, m=m: m.apply({"params": p}, *inputs)[0]).lower(a).as_text() for m in (scanned, unrolled)]
    assert "stablehlo.while" in hlo[0] and "stablehlo.while" not in hlo[1]  # the option does what it says


def test_auto_is_dense_with_dots_remat_on_cpu_for_short_sequences():
    cfg = CONFIGS["llama"]
    params = init_params(cfg)
    tokens, mask = batch()
    assert CausalLM(cfg).resolved(T) == ("dense", "dots")
    auto, auto_g = logprobs_and_grads(CausalLM(cfg), params, tokens, mask)
    dense, dense_g = logprobs_and_grads(CausalLM(cfg, attention="dense", remat="dots"), params, tokens, mask)
    assert np.array_equal(auto, dense)
    jax.tree_util.tree_map(np.testing.assert_array_equal, auto_g, dense_g)


def test_resolvers():
    half, num = jnp.float16, Numerics()
    gpu = dict(backend="gpu", seq_len=512, numerics=num, head_dim=128)
    assert attn.resolve_attention("auto", dtype=half, **gpu) == "cudnn"
    assert attn.resolve_attention("auto", dtype=jnp.bfloat16, **gpu) == "cudnn"
    assert attn.resolve_attention("auto", backend="gpu", seq_len=8192) == "cudnn"  # dtype unknown (a planner)
    assert attn.resolve_attention("auto", dtype=jnp.float32, **gpu) == "dense"
    assert attn.resolve_attention("auto", dtype=jnp.float32, **dict(gpu, seq_len=4096)) == "blockwise"
    assert attn.resolve_attention("auto", dtype=half, **dict(gpu, head_dim=12)) == "dense"  # cuDNN: D % 8
    assert attn.resolve_attention("auto", dtype=half, **dict(gpu, numerics=Numerics(attn_scores_f32=True),
                                                                  seq_len=4096)) == "blockwise"
    assert attn.resolve_attention("auto", dtype=half, **dict(gpu, numerics=Numerics(softmax_f32=False),
                                                                  seq_len=4096)) == "dense"
    n = attn.BLOCKWISE_MIN_LEN
    assert attn.resolve_attention("auto", backend="cpu", seq_len=n - 1, dtype=half, numerics=num) == "dense"
    assert attn.resolve_attention("auto", backend="cpu", seq_len=n, dtype=half, numerics=num) == "blockwise"
    emulated = Numerics(emulate="e5m10")
    assert attn.resolve_attention("auto", backend="cpu", seq_len=8 * n, dtype=jnp.float32,
                                  numerics=emulated) == "dense"
    for choice in ("dense", "blockwise", "cudnn"):
        assert attn.resolve_attention(choice, backend="cpu", seq_len=16) == choice
    assert attn.resolve_remat("auto", backend="gpu") == "full"
    assert attn.resolve_remat("auto", backend="cpu") == "dots"
    assert attn.resolve_remat("dots", backend="cpu") == "dots"
    with pytest.raises(ValueError, match="model.attention='flash'"):
        attn.resolve_attention("flash", backend="gpu", seq_len=16)
    with pytest.raises(ValueError, match="model.remat='some'"):
        attn.resolve_remat("some", backend="gpu")


def test_unsupported_implementations_are_refused_naming_the_key():
    with pytest.raises(ValueError, match="model.attention='cudnn' needs a GPU"):
        attn.check_attention("cudnn", dtype=jnp.float16, numerics=Numerics(), backend="cpu")
    with pytest.raises(ValueError, match="model.attention='cudnn' needs compute dtype"):
        attn.check_attention("cudnn", dtype=jnp.float32, numerics=Numerics(), backend="gpu")
    with pytest.raises(ValueError, match="model.attention='blockwise' does not emulate"):
        attn.check_attention("blockwise", dtype=jnp.float32, numerics=Numerics(emulate="e5m10"), backend="cpu")
    cfg = CONFIGS["qwen2"]
    tokens, mask = batch()
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="model.attention='cudnn' needs a GPU"):
            token_logprobs(CausalLM(cfg, dtype=jnp.float16, attention="cudnn"), init_params(cfg), tokens, mask)
    with pytest.raises(ValueError, match="model.attention='xla'"):
        CausalLM(cfg, attention="xla")
    with pytest.raises(ValueError, match="model.remat='some'"):
        CausalLM(cfg, remat="some")


def _temp_bytes(model, params, length):
    def loss(p, tokens, mask):
        return jnp.sum(token_logprobs(model, p, tokens, mask))

    spec = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return jax.jit(jax.grad(loss)).lower(params, spec, spec).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly_dense_quadratically():
    """Compiled temporaries of a training step's gradient at 4096 and 8192 tokens (nothing runs)."""
    cfg = CONFIGS["qwen2"]
    params = init_params(cfg)
    block = {n: _temp_bytes(CausalLM(cfg, attention="blockwise", remat="none"), params, n) for n in (4096, 8192)}
    dense = {n: _temp_bytes(CausalLM(cfg, attention="dense", remat="none"), params, n) for n in (4096, 8192)}
    assert block[8192] / block[4096] < 2.5  # linear (2x) plus constants
    assert dense[8192] / dense[4096] > 3.5  # the [T, T] scores (4x)
    assert block[8192] * 20 < dense[8192]


def _overflowing_params(cfg):
    """q = k = 64 in every slot of every head (zero kernels, bias 64): the unscaled q.k^T of a token with
    itself is 64 * 64 * head_dim = 65536 * head_dim / 16 > 65504 (FP16's largest), the scaled one is not."""
    params = init_params(cfg)
    layers = dict(params["layers"])
    a = dict(layers["attn"])
    for name in ("q_proj", "k_proj"):
        a[name] = {"kernel": jnp.zeros_like(a[name]["kernel"]), "bias": jnp.full_like(a[name]["bias"], 64.0)}
    layers["attn"] = a
    return dict(params, layers=layers)


def test_scale_q_keeps_fp16_scores_finite():
    cfg = CONFIGS["qwen2"]  # head_dim 16: unscaled self-score 65536, scaled 16384
    assert 64.0 * 64.0 * cfg.head_dim > float(jnp.finfo(jnp.float16).max) > 64.0 * 64.0 * cfg.head_dim ** 0.5
    params = _overflowing_params(cfg)
    tokens, mask = batch()
    keep = scored(mask)
    ref, _ = logprobs_and_grads(CausalLM(cfg), params, tokens, mask)
    assert np.isfinite(ref).all()
    fp16 = dict(dtype=jnp.float16, attention="dense")
    unscaled, _ = logprobs_and_grads(CausalLM(cfg, **fp16), params, tokens, mask)
    assert not np.isfinite(unscaled[keep]).all()  # inf scores -> NaN softmax
    for model in (CausalLM(cfg, numerics=Numerics(scale_q=True), **fp16),
                  CausalLM(cfg, dtype=jnp.float16, attention="blockwise", attention_block=BLOCK)):
        lp, g = logprobs_and_grads(model, params, tokens, mask)
        assert np.isfinite(lp).all() and all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(g))
        assert np.abs(lp - ref)[keep].max() < 0.1
    same, _ = logprobs_and_grads(CausalLM(cfg, numerics=Numerics(scale_q=True)), params, tokens, mask)
    assert np.abs(same - ref)[keep].max() <= 1e-5  # in FP32 only the rounding order changes
