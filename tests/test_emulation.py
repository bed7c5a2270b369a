"""Emulated float formats: `round_to_format` against real casts and ops bit for bit, against a slow numpy
reference for shapes no dtype has, and the model run with `Numerics(emulate=...)` against the real dtype."""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxrl_fp16 import _xla_flags
from jaxrl_fp16.emulation import FloatFormat, round_to_format
from jaxrl_fp16.models.config import Numerics
from jaxrl_fp16.models.decoder import CausalLM, token_logprobs
from jaxrl_fp16.models.hf import load_hf_params
from jaxrl_fp16.models.inference import decode_step, left_pad, prefill
from jaxrl_fp16.models.tiny import make_tiny
from jaxrl_fp16.sampling import SamplingSettings
from jaxrl_fp16.sampling.jax_sampler import JaxSampler


def _avx512_fp16_codegen() -> bool:
    """True on a CPU with AVX-512 FP16 instructions unless XLA's code is capped at AVX2 or below. There, with
    jaxlib 0.10.2, the real FP16 paths were measured not to equal e5m10 (they pass on the same machine with
    `--xla_cpu_max_isa=AVX2`, as `make test-isa` runs them; README, "Faithful rounding"); the cause is not
    established yet."""
    try:
        with open("/proc/cpuinfo") as f:
            if " avx512_fp16" not in f.read():
                return False
    except OSError:
        return False
    cap = _xla_flags.flag_value(os.environ.get("XLA_FLAGS", ""), "--xla_cpu_max_isa")
    return cap is None or cap.upper() not in ("SSE4_2", "AVX", "AVX2")


# A known failure, not a skip: the check still runs and reports XPASS once it holds.
FP16_CODEGEN = pytest.mark.xfail(_avx512_fp16_codegen(), strict=False,
                                 reason="real FP16 != e5m10 in XLA's code for AVX-512 FP16 CPUs (README)")

REAL = {"e8m7": ml_dtypes.bfloat16, "e5m10": np.float16, "e5m2": ml_dtypes.float8_e5m2,
        "e4m3fn": ml_dtypes.float8_e4m3fn, "e4m3": ml_dtypes.float8_e4m3, "e3m4": ml_dtypes.float8_e3m4}


def _bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def _grid(dtype) -> np.ndarray:
    """Every finite value of a 16- or 8-bit dtype, as sorted unique float32."""
    nbits = np.dtype(dtype).itemsize * 8
    codes = np.arange(2 ** nbits, dtype=np.uint16 if nbits == 16 else np.uint8)
    values = codes.view(dtype).astype(np.float32)
    return np.unique(values[np.isfinite(values)])


def _values(grid: np.ndarray, seed: int = 0) -> np.ndarray:
    """Random bit patterns (all of float32: subnormals, inf, NaN), normals over the whole exponent range, and
    the target's grid with its midpoints (exact ties) and their float32 neighbours, overflow included."""
    rs = np.random.RandomState(seed)
    random_bits = rs.randint(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    with np.errstate(over="ignore"):
        normals = (rs.standard_normal(200_000) * np.exp2(rs.uniform(-152, 130, 200_000))).astype(np.float32)
    top, ulp = float(grid[-1]), float(grid[-1] - grid[-2])
    with np.errstate(over="ignore"):
        edges = np.array([top + ulp / 2, top + ulp / 4, top + ulp * 0.75, top * 2, np.inf, np.nan, 0.0,
                          np.finfo(np.float32).smallest_subnormal, np.finfo(np.float32).max], np.float32)
    mids = ((grid[1:].astype(np.float64) + grid[:-1]) / 2).astype(np.float32)
    assert np.all(mids.astype(np.float64) == (grid[1:].astype(np.float64) + grid[:-1]) / 2)  # exact ties
    near = np.concatenate([mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))])
    return np.concatenate([random_bits, normals, grid, near, edges, -edges])


def reference_round(x: np.ndarray, exponent_bits: int, mantissa_bits: int, finite: bool = False) -> np.ndarray:
    """Slow and plain: scale |x| so that the format's last kept bit is 1, round half to even (np.rint), scale
    back; overflow past the largest finite to inf (NaN for a finite format)."""
    bias = 2 ** (exponent_bits - 1) - 1
    emin, emax = 1 - bias, bias + 1 if finite else bias
    largest = (2 - 2.0 ** -(mantissa_bits - 1 if finite else mantissa_bits)) * 2.0 ** emax
    v = x.astype(np.float64)
    out = np.empty_like(v)
    for i, value in enumerate(v):
        if np.isnan(value) or (np.isinf(value) and finite):
            out[i] = np.nan
        elif np.isinf(value):
            out[i] = value
        else:
            _, e = np.frexp(abs(value))  # |value| = m * 2**e, 0.5 <= m < 1: leading bit 2**(e - 1)
            quantum = 2.0 ** (max(e - 1, emin) - mantissa_bits)
            mag = np.rint(abs(value) / quantum) * quantum  # exact in float64
            out[i] = np.copysign(np.nan if finite else np.inf, value) if mag > largest else np.copysign(mag, value)
    return out.astype(np.float32)


def _assert_same(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    bad = _bits(got)[~nan] != _bits(want)[~nan]
    assert not bad.any(), f"{bad.sum()} values differ, e.g. {got[~nan][bad][:4]} vs {want[~nan][bad][:4]}"


# ----- formats -----

def test_parse_names_aliases_and_properties():
    assert FloatFormat.parse("e5m10") == FloatFormat(exponent_bits=5, mantissa_bits=10)
    assert FloatFormat.parse("float16") == FloatFormat.parse(" E5M10 ")
    assert FloatFormat.parse("bfloat16").name == "e8m7"
    assert FloatFormat.parse("float8_e4m3fn") == FloatFormat(exponent_bits=4, mantissa_bits=3, finite=True)
    assert FloatFormat.parse("float32").is_float32 and not FloatFormat.parse("e8m7").is_float32
    for name, dtype in REAL.items():
        fmt, info = FloatFormat.parse(name), ml_dtypes.finfo(dtype)
        assert fmt.max == float(info.max), name
        assert fmt.smallest_subnormal == float(info.smallest_subnormal), name
        assert fmt.min_exponent == int(info.minexp), name


@pytest.mark.parametrize("spec", ["e9m3", "e1m5", "e5m24", "x5m2", "e8m7fn", "e5m0fn", "half", ""])
def test_bad_formats_are_refused_naming_them(spec):
    with pytest.raises(ValueError, match="e9m3|e1m5|e5m24|x5m2|e8m7fn|e5m0fn|half|''"):
        FloatFormat.parse(spec)


def test_numerics_field_is_validated_normalised_and_hashable():
    assert Numerics().emulate is None and Numerics().float_format is None
    n = Numerics(emulate="float16")
    assert n.emulate == "e5m10" and n == Numerics(emulate="e5m10") and hash(n) == hash(Numerics(emulate="e5m10"))
    assert n.float_format == FloatFormat(exponent_bits=5, mantissa_bits=10)
    with pytest.raises(ValueError, match="Numerics.emulate='e9m2'"):
        Numerics(emulate="e9m2")
    o = Numerics.from_overrides("lm_head", emulate="bfloat16")
    assert o.lm_head_f32 and o.emulate == "e8m7"
    assert "emulate" not in Numerics.op_classes()
    with pytest.raises(ValueError, match="unknown op class 'emulate'"):
        Numerics.from_overrides("emulate")


# ----- values -----

@pytest.mark.parametrize("name", list(REAL))
def test_rounding_equals_the_real_cast_bit_for_bit(name):
    dtype = REAL[name]
    x = _values(_grid(dtype))
    with np.errstate(all="ignore"):
        want = x.astype(dtype).astype(np.float32)
    _assert_same(jax.jit(round_to_format, static_argnums=1)(x, name), want)
    assert np.isinf(want).any() != FloatFormat.parse(name).finite  # overflow to inf only with an inf


@pytest.mark.parametrize("name, dtype", [("e8m7", jnp.bfloat16), ("e5m10", jnp.float16)])
def test_rounding_equals_xla_convert(name, dtype):
    x = _values(_grid(REAL[name]), seed=1)
    _assert_same(round_to_format(x, name), jnp.asarray(x).astype(dtype).astype(jnp.float32))


@pytest.mark.parametrize("name", ["e8m3", "e8m5", "e8m10", "e5m7", "e6m4", "e3m2", "e2m1", "e7m16", "e5m3fn",
                                  "e4m3fn", "e5m10"])
def test_other_shapes_equal_a_slow_reference(name):
    fmt = FloatFormat.parse(name)
    rs = np.random.RandomState(2)
    e_lo = fmt.min_exponent - fmt.mantissa_bits - 2
    scale = np.exp2(rs.randint(e_lo, fmt.max_exponent + 3, 20_000))
    lattice = (rs.randint(0, 2 ** (fmt.mantissa_bits + 3), 20_000) * 2.0 ** -(fmt.mantissa_bits + 2)) * scale
    x = np.concatenate([lattice * rs.choice([-1, 1], 20_000),  # many exact ties and near-ties
                        rs.standard_normal(20_000) * np.exp2(rs.uniform(e_lo, fmt.max_exponent + 2, 20_000)),
                        [fmt.max, -fmt.max, fmt.smallest_subnormal / 2, 0.0, -0.0, np.inf, -np.inf, np.nan]])
    with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    _assert_same(round_to_format(x, name), reference_round(x, fmt.exponent_bits, fmt.mantissa_bits, fmt.finite))
    if name in REAL:  # the reference itself against a real cast
        with np.errstate(over="ignore"):
            real = x.astype(REAL[name]).astype(np.float32)
        _assert_same(reference_round(x, fmt.exponent_bits, fmt.mantissa_bits, fmt.finite), real)


@pytest.mark.parametrize("name, dtype", [("e8m7", jnp.bfloat16), ("e5m10", jnp.float16)])
@pytest.mark.parametrize("op", ["add", "subtract", "multiply", "divide"])
def test_fp32_op_then_round_equals_the_real_op(name, dtype, op):
    """Exact-then-rounded ops: FP32 has >= 2p+2 bits for p <= 11, so its own rounding never changes the result."""
    rs = np.random.RandomState(3)
    a, b = (np.asarray(round_to_format(rs.standard_normal(100_000) * np.exp2(rs.uniform(-24, 24, 100_000)), name))
            for _ in range(2))
    fn = getattr(jnp, op)
    real = jax.jit(lambda p, q: fn(p.astype(dtype), q.astype(dtype)).astype(jnp.float32))(a, b)
    emulated = jax.jit(lambda p, q: round_to_format(fn(p, q), name))(a, b)
    _assert_same(emulated, real)
    assert np.asarray(real != fn(a, b)).mean() > 0.3  # the rounding is not trivial


def test_gradient_of_rounding_rounds_the_cotangent():
    x = jnp.linspace(-3.0, 3.0, 101)
    c = jnp.asarray(np.random.RandomState(4).standard_normal(101), jnp.float32)
    g = jax.grad(lambda v: jnp.sum(round_to_format(v, "e5m10") * c))(x)
    _assert_same(g, round_to_format(c, "e5m10"))
    assert not np.array_equal(np.asarray(g), np.asarray(c))
    assert round_to_format(jnp.ones(3, jnp.bfloat16), "float32").dtype == jnp.float32
    with pytest.raises(TypeError, match="int32"):
        round_to_format(jnp.ones(3, jnp.int32), "e5m10")


# ----- the model -----

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp("emu") / "tiny", "qwen2", num_layers=2, seed=0)
    cfg, params = load_hf_params(path)
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, cfg.vocab_size, (6, 40)).astype(np.int32)
    mask = (np.arange(40)[None] >= np.array([0, 0, 3, 7, 12, 20])[:, None]).astype(np.int32)  # left padding
    return cfg, params, tokens, mask


def _logprobs(cfg, params, tokens, mask, dtype, numerics=Numerics()):
    model = CausalLM(cfg, dtype=dtype, numerics=numerics)
    lp = jax.jit(lambda p, t, m: token_logprobs(model, p, t, m, chunk_size=16))(params, tokens, mask)
    scored = mask.astype(bool)
    scored[:, 0] = False  # entry 0 has no prediction
    return np.asarray(lp)[scored]


@pytest.mark.parametrize("fmt, real, other", [pytest.param("e5m10", jnp.float16, jnp.bfloat16, marks=FP16_CODEGEN),
                                              ("e8m7", jnp.bfloat16, jnp.float16)])
def test_emulated_logprobs_reproduce_the_real_dtype(tiny, fmt, real, other):
    """Each op is rounded where the real dtype rounds it, so the values agree but where XLA computes a real
    half-precision op otherwise (reorders a reduction, keeps an unrounded intermediate): such a 1-ulp event
    moves the log-probs by far less than all the roundings together (the distance to FP32). Measured on
    XLA:CPU: identical (max |d| = 0); FP16 vs FP32 5.9e-4, BF16 vs FP32 4.6e-3."""
    cfg, params, tokens, mask = tiny
    emu = _logprobs(cfg, params, tokens, mask, jnp.float32, Numerics(emulate=fmt))
    ref = _logprobs(cfg, params, tokens, mask, real)
    fp32 = _logprobs(cfg, params, tokens, mask, jnp.float32)
    far = _logprobs(cfg, params, tokens, mask, other)
    rounding = np.abs(ref - fp32)
    assert rounding.max() > 1e-4  # the real dtype does differ from FP32 here
    d = np.abs(emu - ref)
    assert d.max() <= 0.02 * rounding.max() and d.mean() <= 0.01 * rounding.mean(), (d.max(), rounding.max())
    assert np.abs(emu - fp32).mean() > 0.5 * rounding.mean()  # it is not FP32
    assert np.abs(emu - far).mean() > 0.5 * np.abs(ref - far).mean()  # nor the other half-precision dtype


_STRICT_SCORER = """
import sys, json
import numpy as np, jax.numpy as jnp
from jaxrl_fp16.models.config import Numerics
from jaxrl_fp16.models.hf import load_hf_params
from jaxrl_fp16.scoring import Scorer
cfg, params = load_hf_params(sys.argv[1])
rs = np.random.RandomState(0)
tokens = rs.randint(0, cfg.vocab_size, (6, 40)).astype(np.int32)
mask = np.ones_like(tokens)
out = {}
for t in (1.0, 0.7):
    score = lambda dtype, n=Numerics(): np.asarray(Scorer(cfg, dtype=dtype, numerics=n)(params, tokens, mask, t))[:, 1:]
    real, fp32, emu = score(jnp.bfloat16), score(jnp.float32), score(jnp.float32, Numerics(emulate="e8m7"))
    out[t] = [float(np.abs(emu - real).max()), float(np.abs(emu - real).mean()), float(np.abs(real - fp32).max()),
              float(np.abs(real - fp32).mean())]
print(json.dumps(out))
"""


def test_the_trainer_scorer_rounds_as_the_dtype_says_under_strict_rounding(tmp_path):
    """With JAXRL_FP16_STRICT_ROUNDING=1 (a fresh process: XLA reads its flags at start) the trainer's scorer
    (temperature a traced argument) in real BF16 equals e8m7 within the bound of the forward test above. Without
    it, XLA:CPU's YNNPACK fusions may keep the fused LM head in FP32 (measured: max |d| 0.04-0.05 on an AVX-512
    CPU, ten times the whole BF16-vs-FP32 distance); whether they do depends on the CPU, so that is not asserted."""
    import json
    import os
    import subprocess
    import sys

    path = make_tiny(tmp_path / "tiny", "qwen2", num_layers=2, sharp=8.0, seed=0)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAXRL_FP16_STRICT_ROUNDING"] = "1"
    run = subprocess.run([sys.executable, "-c", _STRICT_SCORER, str(path)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    for d_max, d_mean, rounding_max, rounding_mean in json.loads(run.stdout.strip().splitlines()[-1]).values():
        assert rounding_max > 1e-4
        assert d_max <= 0.02 * rounding_max and d_mean <= 0.01 * rounding_mean, (d_max, rounding_max)


def test_float32_format_is_the_fp32_model(tiny):
    cfg, params, tokens, mask = tiny
    np.testing.assert_array_equal(_logprobs(cfg, params, tokens, mask, jnp.float32, Numerics(emulate="float32")),
                                  _logprobs(cfg, params, tokens, mask, jnp.float32))


def test_emulation_needs_fp32_compute(tiny):
    cfg = tiny[0]
    with pytest.raises(ValueError, match="emulate='e5m10' needs the compute dtype float32.*float16"):
        CausalLM(cfg, dtype=jnp.float16, numerics=Numerics(emulate="e5m10"))
    with pytest.raises(ValueError, match="float32"):
        JaxSampler(cfg, dtype="bfloat16", numerics=Numerics(emulate="e8m7"))


def _greedy_logits(cfg, params, prompts, dtype, numerics, steps=8):
    model = CausalLM(cfg, dtype=dtype, numerics=numerics)
    tok, mask = left_pad(prompts, 0)
    P = tok.shape[1]
    logits, cache, pos = jax.jit(lambda p, t, m: prefill(model, p, t, m, P + steps))(params, tok, mask)
    step = jax.jit(lambda p, t, q, c, i: decode_step(model, p, t, q, c, i))
    out = [logits]
    for n in range(steps):
        nxt = jnp.argmax(out[-1], -1).astype(jnp.int32)
        logits, cache = step(params, nxt, pos, cache, P + n)
        pos = pos + 1
        out.append(logits)
    return np.asarray(jnp.stack(out, 1))


@FP16_CODEGEN
def test_kv_cache_path_reproduces_fp16(tiny):
    cfg, params, tokens, _ = tiny
    prompts = [list(tokens[0, :5]), list(tokens[1, :11]), list(tokens[2, :2])]
    emu = _greedy_logits(cfg, params, prompts, jnp.float32, Numerics(emulate="e5m10"))
    ref = _greedy_logits(cfg, params, prompts, jnp.float16, Numerics())
    fp32 = _greedy_logits(cfg, params, prompts, jnp.float32, Numerics())
    rounding = np.abs(ref - fp32).max()
    assert rounding > 1e-4
    assert np.abs(emu - ref).max() <= 0.02 * rounding  # measured: identical on XLA:CPU


@FP16_CODEGEN
def test_jax_sampler_in_an_emulated_format(tiny):
    """The sampler takes `numerics` as the model does: e5m10 samples what FP16 samples. The log-probs may differ
    in the last FP32 bits (the sampler's FP32 post-processing is fused differently in the two programs)."""
    cfg, params, tokens, _ = tiny
    prompts = [list(tokens[i, : 3 + 2 * i]) for i in range(4)]
    settings = SamplingSettings(max_new_tokens=12, samples_per_prompt=2, seed=1)
    emu = JaxSampler(cfg, params, dtype="float32", numerics=Numerics(emulate="e5m10")).generate(prompts, settings)
    ref = JaxSampler(cfg, params, dtype="float16").generate(prompts, settings)
    fp32 = JaxSampler(cfg, params, dtype="float32").generate(prompts, settings)
    on = ref.response_mask == 1
    np.testing.assert_array_equal(emu.tokens, ref.tokens)
    assert np.abs(emu.logprobs - ref.logprobs)[on].max() <= 1e-5 < np.abs(fp32.logprobs - ref.logprobs)[on].max()


@FP16_CODEGEN
def test_emulated_training_gradients(tiny):
    """The trainer's path: gradients flow through the rounding (each use's cotangent rounded, as in a real FP16
    backward). Weight matrices get the real FP16 gradient: identical here on XLA:CPU; on other inputs up to 0.11
    of the FP16-FP32 gap in the first layer's q/k (the FP32 parts of the backward, norm and softmax, are fused
    differently in the two programs and a last-bit FP32 difference can flip an FP16 rounding). Sums over tokens
    (biases, norm scales, the embedding) accumulate in FP32 and round once, where XLA sums FP16 in FP16: not
    compared."""
    cfg, params, tokens, mask = tiny

    def grads(dtype, numerics=Numerics()):
        model = CausalLM(cfg, dtype=dtype, numerics=numerics)
        loss = lambda p: token_logprobs(model, jax.tree_util.tree_map(lambda x: x.astype(dtype), p), tokens,  # noqa
                                        mask).sum()
        return jax.jit(jax.grad(loss))(params)

    emu, ref, fp32 = grads(jnp.float32, Numerics(emulate="e5m10")), grads(jnp.float16), grads(jnp.float32)
    kernels = [k for k in jax.tree_util.tree_leaves_with_path(ref) if "kernel" in jax.tree_util.keystr(k[0])]
    assert len(kernels) == 7
    for path, g in kernels:
        key = jax.tree_util.keystr(path)
        pick = lambda tree: np.asarray(dict(jax.tree_util.tree_leaves_with_path(tree))[path], np.float32)  # noqa
        g = np.asarray(g, np.float32)
        gap = np.linalg.norm(g - pick(fp32))
        assert gap > 0, key
        assert np.linalg.norm(pick(emu) - g) <= 0.25 * gap, key
    for leaf in jax.tree_util.tree_leaves(emu):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_study_override_variants_keep_the_emulated_format():
    from jaxrl_fp16.tools.study import override_variants

    variants = override_variants(Numerics(emulate="e5m10"))
    assert set(variants) >= {"baseline", "none", "all", *Numerics.op_classes()}
    assert {v.emulate for v in variants.values()} == {"e5m10"}
    assert variants["all"].lm_head_f32 and not variants["none"].norm_f32


# ----- FP8: what is the format's own and what the padding and masking add -----

@pytest.mark.parametrize("name", ["e4m3fn", "e4m3", "e5m2", "e5m10"])
def test_masked_scores_stay_out_of_the_emulated_softmax(name):
    """The masked score is -fmt.max; minus a positive row max it leaves the format's range, which an IEEE format
    rounds to -inf (exp: 0) and a finite (fn) one to NaN. Masked entries get probability 0 and gradient 0 in every
    format, a fully masked row is uniform, and a NaN score still gives NaN (nothing real is hidden)."""
    from jaxrl_fp16.models.attention import softmax
    from jaxrl_fp16.models.layers import arith

    fmt = FloatFormat.parse(name)
    ar = arith(jnp.float32, fmt)
    lowest = ar.lowest
    assert lowest == -fmt.max
    x = jnp.asarray([[lowest, 3.0, 40.0], [lowest, lowest, 0.5], [lowest] * 3], jnp.float32)
    p = np.asarray(softmax(x, ar))
    assert np.isfinite(p).all(), p
    assert p[0, 0] == 0 and p[1, 0] == p[1, 1] == 0 and p[0, 2] == 1 and p[1, 2] == 1
    assert np.all(p[2] == p[2, 0]) and abs(p[2].sum() - 1) <= 0.2  # uniform, up to the format's rounding
    g = np.asarray(jax.grad(lambda v: softmax(v, ar)[:2, 1].sum() * 3.0)(x))
    assert np.isfinite(g).all() and g[0, 0] == g[1, 0] == 0, g
    assert np.isnan(np.asarray(softmax(jnp.asarray([[np.nan, 1.0, 2.0]], jnp.float32), ar))).all()


def _scorer_and_plain(cfg, params, tokens, mask, numerics):
    from jaxrl_fp16.scoring import Scorer

    scored = Scorer(cfg, dtype="float32", numerics=numerics, batch_size=4)(params, tokens, mask)
    model = CausalLM(cfg, dtype=jnp.float32, numerics=numerics)
    plain = np.asarray(jax.jit(lambda p, t, m: token_logprobs(model, p, t, m))(params, tokens, mask))
    return scored, plain


@pytest.mark.parametrize("fmt", ["e4m3", "e4m3fn"])
def test_scorer_padding_adds_no_nan_in_fp8(tiny, fmt):
    """The trainer's scoring path in FP8: left padding, responses that stop early (right padding), the bucketed
    width (40 -> 64 columns) and filler rows (6 rows in batches of 4) give the plain forward's log-probs, all
    finite, on every token predicted from a real one; with the softmax in the format too (masked scores in it)."""
    cfg, params, tokens, mask = tiny
    mask = mask.copy()
    mask[1, -9:] = mask[3, -4:] = mask[4, -1:] = 0  # responses that stopped early
    real = np.zeros(mask.shape, bool)  # tokens predicted from a real token (a row's first from a padding slot,
    real[:, 1:] = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)  # which averages every key of the row: width-dependent)
    fp32_model = CausalLM(cfg, dtype=jnp.float32)
    fp32 = np.asarray(jax.jit(lambda p, t, m: token_logprobs(fp32_model, p, t, m))(params, tokens, mask))
    for numerics in (Numerics(emulate=fmt), Numerics(emulate=fmt, softmax_f32=False)):
        scored, plain = _scorer_and_plain(cfg, params, tokens, mask, numerics)
        assert np.isfinite(scored[real]).all() and np.isfinite(plain[real]).all(), numerics
        np.testing.assert_array_equal(scored[real], plain[real])
        assert np.abs(scored[real] - fp32[real]).mean() > 1e-3  # it is the format, not FP32


@pytest.mark.parametrize("name, dtype", [("e4m3fn", jnp.float8_e4m3fn), ("e4m3", jnp.float8_e4m3)])
def test_emulated_sigmoid_is_xla_fp8_logistic(name, dtype):
    """SiLU's sigmoid is XLA's expansion 1 / (1 + exp(-x)), each op in the format. exp(-x) passes the largest
    finite below x = -ln(max): e4m3 rounds it to inf (sigmoid 0), e4m3fn, which has no inf, to NaN, and XLA's own
    float8_e4m3fn logistic gives the same NaN: the format's, not the emulation's."""
    from jaxrl_fp16.models.layers import emulated_sigmoid

    fmt = FloatFormat.parse(name)
    x = _grid(REAL[name])
    x = x[np.abs(x) <= 16]
    emu = np.asarray(emulated_sigmoid(jnp.asarray(x), fmt))
    real = np.asarray(jax.jit(jax.nn.sigmoid)(jnp.asarray(x).astype(dtype)).astype(jnp.float32))
    _assert_same(emu, real)
    overflow = ~np.isfinite(np.asarray(round_to_format(np.exp(-x), fmt)))  # exp(-x) past the largest finite
    assert overflow.any()
    assert np.isnan(emu[overflow]).all() if fmt.finite else np.all(emu[overflow] == 0)
    assert np.isfinite(emu[~overflow]).all()
