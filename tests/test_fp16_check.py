"""FP16 readiness report: healthy, overflowing and underflowing models, checked against independent computations."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_fp16.tools import fp16_check
from jaxrl_fp16.tools.fp16_check import LAYER_OPS, fp16_readiness
from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.models.decoder import CausalLM, causal_inputs
from jaxrl_fp16.models.hf_table import expected_params_shapes

F16_MAX = 65504.0
# Qwen3-like (q/k norms), untied head, 3 layers.
CFG = ModelConfig(arch="qwen3", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=False)
B, T = 2, 12


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, CFG.vocab_size, size=(B, T)).astype(np.int32)


@pytest.fixture(scope="module")
def params():
    """Random FP32 numpy params as the decoder initialises them: kernels N(0, 0.02), norm scales 1."""
    rng = np.random.default_rng(1)

    def init(path, shape):
        if path[-1].key == "scale":
            return np.ones(shape, np.float32)
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    p = jax.tree_util.tree_map_with_path(init, expected_params_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple))
    p["final_norm"]["scale"] *= 8.0  # peaked logits, as a trained model has
    return p


def _replace(params, path, fn):
    """A copy of `params` with the leaf at `path` replaced by fn(leaf) (numpy)."""
    out = jax.tree.map(np.array, params)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = fn(node[path[-1]].copy())
    return out


def _row(report, layer, op):
    (row,) = [r for r in report.activations if r.layer == layer and r.op == op]
    return row


def _weight(report, name):
    (row,) = [w for w in report.weights if w.name == name]
    return row


def _forward(params, tokens, dtype):
    """(logits [B, T, V], residual stream after each layer [L, B, T, H]), independently of the report."""
    tok = jnp.asarray(tokens)
    logits, _, hidden = jax.jit(CausalLM(CFG, dtype).apply, static_argnames="collect_hidden")(
        {"params": params}, tok, *causal_inputs(tok, None, None), collect_hidden=True)
    return logits, hidden


@pytest.fixture(scope="module")
def healthy(params, tokens):
    return fp16_readiness(CFG, params, tokens)


def test_healthy_model_is_ok(healthy):
    assert healthy.ok and healthy.first_overflow is None and healthy.dtype == "f16"
    assert healthy.summary.startswith("ok for f16")
    assert all(r.n_inf == r.n_nan == 0 and r.headroom > 1 for r in healthy.activations)
    assert not healthy.overflowing_weights
    # Every op of every layer, in forward order, between the embedding and the head.
    assert [(r.layer, r.op) for r in healthy.activations] == (
        [(None, "embed")] + [(l, op) for l in range(CFG.num_layers) for op in LAYER_OPS]
        + [(None, "final_norm"), (None, "logits")])
    assert _row(healthy, None, "embed").count == B * T * CFG.hidden_size
    assert _row(healthy, 0, "mlp.act").count == B * T * CFG.intermediate_size
    assert all(r.dtype == "f16" for r in healthy.activations)
    # One weight row per HF tensor: embedding, final norm, LM head; per layer q/k/v/o, q/k norms, 3 MLP, 2 norms.
    assert len(healthy.weights) == len(set(w.name for w in healthy.weights)) == 3 + CFG.num_layers * 11
    assert healthy.weights[0].name == "model.embed_tokens.weight"


def test_logits_max_matches_an_independent_forward(healthy, params, tokens):
    logits32, _ = _forward(params, tokens, jnp.float32)
    logits16, _ = _forward(params, tokens, jnp.float16)
    row = _row(healthy, None, "logits")
    want32, want16 = float(jnp.abs(logits32).max()), float(jnp.abs(logits16).max())
    assert want32 > 1.0
    np.testing.assert_allclose(row.ref_max_abs, want32, rtol=1e-6)
    assert row.max_abs == want16  # the same FP16 value
    np.testing.assert_allclose(row.max_abs, want32, rtol=2 ** -7)  # within FP16 rounding of the FP32 value
    assert row.headroom == pytest.approx(F16_MAX / row.ref_max_abs)


def test_layer_rows_are_in_layer_order(healthy, params, tokens):
    _, hidden_LxBxTxH = _forward(params, tokens, jnp.float32)
    want = np.abs(np.asarray(hidden_LxBxTxH)).max(axis=(1, 2, 3))
    got = [_row(healthy, l, "residual").ref_max_abs for l in range(CFG.num_layers)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert len(set(np.round(want, 6))) == CFG.num_layers  # distinct, so a permutation would be caught


def test_activation_overflow_names_the_first_layer_and_op(params, tokens):
    # Layer 1's MLP: up_proj x 1e3, down_proj x 1e5. Every weight stays representable in FP16; the MLP output
    # does not.
    p = _replace(params, ("layers", "mlp", "up_proj", "kernel"), lambda w: w * np.r_[1, 1e3, 1][:, None, None])
    p = _replace(p, ("layers", "mlp", "down_proj", "kernel"), lambda w: w * np.r_[1, 1e5, 1][:, None, None])
    report = fp16_readiness(CFG, p, tokens)
    assert not report.ok and not report.overflowing_weights
    first = report.first_overflow
    assert (first.layer, first.op) == (1, "mlp.down_proj")
    assert first.n_inf > 0 and first.ref_max_abs > F16_MAX and first.headroom < 1
    assert first.max_abs <= F16_MAX  # finite values only
    assert "layer 1 mlp.down_proj" in report.summary and report.summary.startswith("NOT OK")
    # Everything before it is clean; the residual stream after it carries the inf.
    before = report.activations[:report.activations.index(first)]
    assert before and all(not r.overflow for r in before)
    assert _row(report, 1, "residual").n_inf > 0
    assert report.to_markdown().count("\n| 1 | mlp.down_proj | f16 |") == 1


def test_weight_overflow_flush_and_subnormals_are_counted(params, tokens):
    planted = {0: 1e5, 1: -7e4, 2: 65520.0, 3: 65519.0, 4: 1e-8, 5: -2e-8, 6: 1e-6, 7: 3e-5}

    def plant(w):
        flat = w[2].reshape(-1)
        for i, v in planted.items():
            flat[i] = v
        return w

    p = _replace(params, ("layers", "attn", "q_proj", "kernel"), plant)
    report = fp16_readiness(CFG, p, tokens)
    w_HxQ = p["layers"]["attn"]["q_proj"]["kernel"][2]
    with np.errstate(over="ignore"):
        c = w_HxQ.astype(np.float16)
    row = _weight(report, "model.layers.2.self_attn.q_proj.weight")
    assert row.n_overflow == np.isinf(c).sum() == 3  # 1e5, -7e4, 65520; 65519 rounds to 65504
    assert row.n_flushed == ((w_HxQ != 0) & (c == 0)).sum() >= 2
    assert row.n_subnormal == ((c != 0) & (np.abs(c) < np.finfo(np.float16).tiny)).sum() >= 2
    assert row.max_abs == 1e5 and row.count == w_HxQ.size
    assert [w.name for w in report.overflowing_weights] == [row.name]
    assert not report.ok and "3 weights overflow in 1 tensors" in report.summary


def test_underflow_of_tiny_activations_is_counted(params, tokens):
    p = _replace(params, ("embed", "embedding"), lambda e: e * 1e-6)  # std 2e-8: FP16 subnormal or zero
    report = fp16_readiness(CFG, p, tokens)
    e = p["embed"]["embedding"]
    looked_up = e[tokens]
    c = looked_up.astype(np.float16)
    row = _row(report, None, "embed")
    assert row.n_underflow == ((looked_up != 0) & (c == 0)).sum() > 0
    assert row.n_subnormal == ((c != 0) & (np.abs(c) < np.finfo(np.float16).tiny)).sum() > 0
    assert row.n_underflow + row.n_subnormal == row.count  # nothing is left a normal FP16 number
    w = _weight(report, "model.embed_tokens.weight")
    assert w.n_flushed == ((e != 0) & (e.astype(np.float16) == 0)).sum() > 0
    assert report.ok  # flushing is not overflow: the norm after the embedding rescales what is left


def test_padding_is_excluded(params, tokens):
    mask = np.ones((B, T), np.int32)
    mask[0, :5] = 0  # left padding
    # A large embedding row used only at padded positions must not show up.
    pad_token = (set(range(CFG.vocab_size)) - set(tokens[0, 5:].tolist()) - set(tokens[1].tolist())).pop()
    tok = tokens.copy()
    tok[0, :5] = pad_token
    p = _replace(params, ("embed", "embedding"), lambda e: np.where(np.arange(len(e))[:, None] == pad_token, 3e4, e))
    report = fp16_readiness(CFG, p, tok, mask)
    row = _row(report, None, "embed")
    assert row.count == mask.sum() * CFG.hidden_size
    assert row.ref_max_abs == np.abs(p["embed"]["embedding"][tok[mask.astype(bool)]]).max() < 1
    assert report.ok and _weight(report, "model.embed_tokens.weight").max_abs == 3e4


def test_report_serialises(params, tokens, healthy):
    overflowing = _replace(params, ("layers", "mlp", "down_proj", "kernel"), lambda w: w * 1e7)
    silent = _replace(params, ("embed", "embedding"), lambda e: e * 0)  # all-zero activations: infinite headroom
    def no_constants(name):
        raise ValueError(name)

    for report in (healthy, fp16_readiness(CFG, overflowing, tokens), fp16_readiness(CFG, silent, tokens)):
        d = json.loads(report.to_json(), parse_constant=no_constants)  # strict JSON: no Infinity/NaN tokens
        assert d["ok"] == report.ok and d["summary"] == report.summary and d["dtype"] == "f16"
        assert len(d["activations"]) == len(report.activations) and len(d["weights"]) == len(report.weights)
        assert d["activations"][-1]["op"] == "logits"
        md = report.to_markdown()
        assert md.count("\n| ") == 2 + len(report.activations) + len(report.weights)
    assert d["ok"] and d["activations"][0]["headroom"] == "inf" and d["activations"][0]["ref_max_abs"] == 0
    assert d["activations"][0]["headroom_bits"] == "inf"


def test_repeated_calls_do_not_recompile(params, tokens, healthy):
    before = fp16_check._activation_stats._cache_size()
    p = _replace(params, ("embed", "embedding"), lambda e: e * 2)
    fp16_readiness(CFG, p, tokens)
    fp16_readiness(CFG, params, tokens, np.ones((B, T), np.int32))
    assert fp16_check._activation_stats._cache_size() == before
