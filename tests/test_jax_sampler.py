"""The built-in JAX sampler: mu equals the trainer's pi in FP32, determinism, no recompiles, stops, errors,
and the paper's BF16-vs-FP16 gap on a sharp tiny model."""

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_fp16 import mismatch
from jaxrl_fp16.config import SamplerSection
from jaxrl_fp16.models.hf import load_hf_params
from jaxrl_fp16.models.tiny import make_tiny
from jaxrl_fp16.sampling import (JaxOptions, SamplingSettings, TransformersOptions, VLLMOptions,
                                 create_sampler)
from jaxrl_fp16.sampling import jax_sampler
from jaxrl_fp16.sampling.jax_sampler import JaxSampler, processed_logits
from jaxrl_fp16.scoring import Scorer


# Each (dtype, row bucket, max_new_tokens) is a program of its own: the tests whose point is not a length share
# the FP32 programs of 2, 4 and 8 rows with 16 tokens, and the FP32 check and the tokens-only check share the
# BF16/FP16 test's FP32 and FP16 programs (32 rows, 48 tokens).
NEW_TOKENS = 16
LONG_TOKENS = 48


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp("m") / "tiny", "qwen2", num_layers=3, sharp=8.0, seed=3)
    cfg, params = load_hf_params(path)
    return path, cfg, params


def prompts_for(cfg, n=6, seed=0, lo=2, hi=12):
    rs = np.random.RandomState(seed)
    return [list(rs.randint(10, 200, rs.randint(lo, hi))) for _ in range(n)]


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 0), (1.3, 0)])
def test_fp32_mu_equals_trainer_pi(tiny, temperature, top_k):
    _, cfg, params = tiny
    sampler = JaxSampler(cfg, params, dtype="float32")
    settings = SamplingSettings(max_new_tokens=LONG_TOKENS, samples_per_prompt=3, temperature=temperature, seed=1)
    r = sampler.generate(prompts_for(cfg), settings)
    pi = Scorer(cfg, dtype="float32")(params, r.tokens, r.attention_mask, temperature)
    on = r.response_mask == 1
    assert on.sum() > 100
    np.testing.assert_allclose(r.logprobs[on], pi[on], atol=1e-4, rtol=0)
    assert np.all(r.logprobs[~on] == 0)


def test_layout_and_grouping(tiny):
    _, cfg, params = tiny
    prompts = prompts_for(cfg, n=4)
    r = JaxSampler(cfg, params).generate(prompts, SamplingSettings(max_new_tokens=NEW_TOKENS, samples_per_prompt=2))
    P = max(len(p) for p in prompts)
    assert r.tokens.shape == (8, P + NEW_TOKENS) and r.prompt_width == P
    assert r.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for row in range(8):
        p = prompts[r.prompt_index[row]]
        assert r.tokens[row, P - len(p):P].tolist() == p  # left-padded prompt
        assert r.attention_mask[row, :P].sum() == len(p)
        assert np.all(r.response_mask[row, :P] == 0)
        resp = r.response_mask[row, P:]
        assert np.all(np.diff(resp) <= 0)  # responses are contiguous from the prompt's end


def test_deterministic_and_independent_of_batching(tiny):
    _, cfg, params = tiny
    prompts = prompts_for(cfg, n=3)  # 6 rows: one call padded to 8 rows against calls of 4 and 2
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS, samples_per_prompt=2, seed=7)
    a = JaxSampler(cfg, params).generate(prompts, settings)
    b = JaxSampler(cfg, params, max_batch_size=4).generate(prompts, settings)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
    c = JaxSampler(cfg, params).generate(prompts, SamplingSettings(max_new_tokens=NEW_TOKENS, samples_per_prompt=2,
                                                                   seed=8))
    assert not np.array_equal(a.tokens, c.tokens)


def test_no_recompile_within_buckets(tiny):
    _, cfg, params = tiny
    sampler = JaxSampler(cfg, params)
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS)
    sampler.generate(prompts_for(cfg, n=3, seed=1), settings)
    size = jax_sampler._generate._cache_size()
    # Different prompt lengths, counts in the same bucket, other temperatures/seeds: no new program.
    sampler.generate(prompts_for(cfg, n=4, seed=2), SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=0.5,
                                                                     seed=3))
    sampler.generate(prompts_for(cfg, n=3, seed=3), SamplingSettings(max_new_tokens=NEW_TOKENS, top_k=5, top_p=0.9))
    assert jax_sampler._generate._cache_size() == size


def test_stop_tokens_are_kept_and_finish_reasons(tiny):
    _, cfg, params = tiny
    sampler = JaxSampler(cfg, params)
    prompts = prompts_for(cfg, n=6)
    free = sampler.generate(prompts, SamplingSettings(max_new_tokens=NEW_TOKENS, seed=2, ignore_eos=True))
    # Stop on the token each row drew 4th: every row must stop there (or earlier on another such token).
    stops = sorted({int(row[free.prompt_width + 3]) for row in free.tokens})
    r = sampler.generate(prompts, SamplingSettings(max_new_tokens=NEW_TOKENS, seed=2, ignore_eos=True,
                                                   stop_token_ids=stops))
    for row in range(r.num_rows):
        resp = r.responses()[row]
        assert r.finish_reasons[row] == "stop" and resp[-1] in stops and len(resp) <= 4
        assert not any(t in stops for t in resp[:-1])
        assert resp == free.responses()[row][: len(resp)]  # same draws up to the stop
        assert np.all(r.tokens[row, r.prompt_width + len(resp):] == cfg.pad_token_id)
    assert set(free.finish_reasons) == {"length"} and np.all(free.response_lengths == NEW_TOKENS)


def test_greedy_is_argmax_and_reports_untempered_logprobs(tiny):
    _, cfg, params = tiny
    r = JaxSampler(cfg, params).generate(prompts_for(cfg, n=3), SamplingSettings(max_new_tokens=NEW_TOKENS,
                                                                                  temperature=0.0))
    pi = Scorer(cfg)(params, r.tokens, r.attention_mask)
    on = r.response_mask == 1
    np.testing.assert_allclose(r.logprobs[on], pi[on], atol=1e-4)


def test_processed_logits_match_numpy_top_k_top_p():
    rs = np.random.RandomState(0)
    logits = rs.randn(5, 40).astype(np.float32) * 3
    for temperature, top_p, top_k in [(0.8, 0.9, 0), (1.0, 1.0, 7), (1.2, 0.5, 10), (1.0, 1.0, 0)]:
        out = np.asarray(processed_logits(jnp.asarray(logits), jnp.float32(temperature), jnp.float32(top_p),
                                          jnp.int32(top_k)))
        for row, o in zip(logits, out):
            lg = row / temperature
            order = np.argsort(-lg)
            keep = np.zeros(40, bool)
            keep[order[: top_k or 40]] = True
            kept = lg[order[: top_k or 40]]
            p = np.exp(kept - kept.max())
            p /= p.sum()
            n_top_p = np.searchsorted(np.cumsum(p) - p, top_p, side="left")  # mass before < top_p
            final = np.zeros(40, bool)
            final[order[:max(1, n_top_p)]] = True
            np.testing.assert_array_equal(np.isfinite(o), final & keep)
            np.testing.assert_allclose(o[final], lg[final], rtol=1e-6)


def test_bad_input_fails_before_work(tiny):
    _, cfg, params = tiny
    sampler = JaxSampler(cfg, params)
    settings = SamplingSettings(max_new_tokens=8)
    with pytest.raises(ValueError, match="context length"):
        sampler.generate([[5] * (cfg.max_position_embeddings - 4)], settings)
    with pytest.raises(ValueError, match="no prompts"):
        sampler.generate([], settings)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sampler.generate([[5, cfg.vocab_size]], settings)
    with pytest.raises(ValueError, match="trainer's compute dtype"):
        create_sampler("jax", cfg=cfg, params=params, model_dir=None, dtype="bfloat16", trainer_dtype="float16")
    with pytest.raises(ValueError, match="unknown dtype"):
        JaxSampler(cfg, params, dtype="fp8")
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(max_new_tokens=4, temperature=-1)


def test_engine_options_come_from_the_run_config(tiny):
    _, cfg, params = tiny
    assert SamplerSection(name="jax", max_batch_size=4).engine_options() == JaxOptions(max_batch_size=4)
    assert SamplerSection(name="transformers", max_batch_size=8).engine_options() == TransformersOptions(
        max_batch_size=8)
    assert SamplerSection(name="vllm", tensor_parallel_size=2).engine_options() == VLLMOptions(
        tensor_parallel_size=2, max_model_len=1280)  # 1024 prompt tokens + max_new_tokens 16, rounded up to 256
    options = SamplerSection(name="jax", max_batch_size=4).engine_options()
    sampler = create_sampler("jax", cfg=cfg, params=params, model_dir=None, dtype="float32",
                             trainer_dtype="float32", options=options)
    assert isinstance(sampler, JaxSampler) and sampler.max_batch_size == 4 and sampler.prompt_bucket == 16
    assert sampler.last_push_seconds is not None  # the params were pushed
    with pytest.raises(TypeError, match="the jax sampler takes JaxOptions, got VLLMOptions"):
        create_sampler("jax", cfg=cfg, params=params, model_dir=None, dtype="float32", options=VLLMOptions())
    with pytest.raises(ValueError, match="unknown sampler 'sglang'; valid: jax, vllm, transformers"):
        create_sampler("sglang", cfg=cfg, params=params, model_dir=None, dtype="float32")


def test_an_allowed_dtype_mismatch_is_built_and_logged(tiny, caplog):
    _, cfg, params = tiny
    with caplog.at_level(logging.INFO, logger="jaxrl_fp16.sampling"):
        sampler = create_sampler("jax", cfg=cfg, params=params, model_dir=None, dtype="bfloat16",
                                 trainer_dtype="float16", allow_dtype_mismatch=True)
    assert sampler.compute_dtype == jnp.bfloat16
    assert "jax sampler: engine dtype bfloat16, trainer dtype float16 (mismatch allowed)" in caplog.messages


def test_a_closed_sampler_refuses_use(tiny):
    _, cfg, params = tiny
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS)
    with JaxSampler(cfg, params) as sampler:
        assert not sampler.closed
        assert sampler.generate([[11, 12], [13, 14]], settings).num_rows == 2
    assert sampler.closed
    sampler.close()  # twice is fine
    with pytest.raises(RuntimeError, match="this JaxSampler is closed"):
        sampler.generate([[11, 12]], settings)
    with pytest.raises(RuntimeError, match="this JaxSampler is closed"):
        sampler.push_weights(params)


def test_bf16_rounds_far_more_than_fp16_and_the_mismatch_stays_within_the_roundings(tiny):
    """The paper's effect on the built-in engine, measured where it cannot vanish: each engine's log-probs
    against the FP32 model on the same tokens (its rounding error) are >= 5x larger in BF16 than in FP16 (3 fewer
    mantissa bits: 8x per op), and FP32's are ~0. The mismatch of the two paths in one dtype (decode vs
    teacher-forced) depends on the CPU's code (the paths can be bit-identical: no lower bound), but is never more
    than the two paths' roundings together (the triangle inequality through the FP32 model, per token)."""
    _, cfg, params = tiny
    prompts = prompts_for(cfg, n=16, seed=5)
    settings = SamplingSettings(max_new_tokens=LONG_TOKENS, samples_per_prompt=2, seed=0, ignore_eos=True)
    drift, same = {}, {}
    for dtype in ("float32", "float16", "bfloat16"):
        r = JaxSampler(cfg, params, dtype=dtype).generate(prompts, settings)
        pi = Scorer(cfg, dtype=dtype)(params, r.tokens, r.attention_mask)
        pi32 = Scorer(cfg, dtype="float32")(params, r.tokens, r.attention_mask)
        drift[dtype] = mismatch.summarize(mismatch.mismatch_metrics(r.logprobs, pi32, r.response_mask))
        same[dtype] = mismatch.summarize(mismatch.mismatch_metrics(r.logprobs, pi, r.response_mask))
        trainer_drift = mismatch.summarize(mismatch.mismatch_metrics(pi, pi32, r.response_mask))
        key = "mismatch/prob_abs_diff_mean"
        assert same[dtype][key] <= drift[dtype][key] + trainer_drift[key] + 1e-7, (dtype, same, drift)
    print({d: (f"{same[d]['mismatch/kl_k3']:.2e}", f"{drift[d]['mismatch/kl_k3']:.2e}") for d in same})
    for key in ("mismatch/kl_k3", "mismatch/prob_abs_diff_mean"):
        assert drift["bfloat16"][key] >= 5 * drift["float16"][key] > 0, (key, drift)
        assert drift["float32"][key] < drift["float16"][key] / 20, (key, drift)
        assert same["float32"][key] < drift["float16"][key] / 20, (key, same)
    assert drift["float32"]["mismatch/kl_k3"] < 1e-9 and same["float32"]["mismatch/kl_k3"] < 1e-9


def test_tokens_only_gives_the_same_tokens_and_zero_logprobs(tiny):
    """SamplingSettings.logprobs=False: the same rollout, its log-probs all 0 and flagged (base.BaseSampler)."""
    _, cfg, params = tiny
    sampler = JaxSampler(cfg, params, dtype="float16")
    prompts = prompts_for(cfg, n=16, seed=5)
    settings = SamplingSettings(max_new_tokens=LONG_TOKENS, samples_per_prompt=2, seed=4)
    full = sampler.generate(prompts, settings)
    tokens_only = sampler.generate(prompts, SamplingSettings(max_new_tokens=LONG_TOKENS, samples_per_prompt=2,
                                                             seed=4, logprobs=False))
    np.testing.assert_array_equal(tokens_only.tokens, full.tokens)
    np.testing.assert_array_equal(tokens_only.response_mask, full.response_mask)
    assert full.has_logprobs and np.any(full.logprobs != 0)
    assert not tokens_only.has_logprobs and not np.any(tokens_only.logprobs)


def test_bf16_weights_held_in_fp32_on_cpus_sample_what_bf16_weights_sample(tiny):
    """On CPUs the BF16 sampler holds its weights as FP32 arrays of BF16 values (`JaxSampler.f32_weights`: no
    conversion of every weight at every decode step); the rollout is that of BF16-held weights: the same tokens and
    log-probs, sampled and greedy. The matmuls give the same bits where XLA:CPU upcasts a BF16 matmul itself (as on
    the CPUs measured; `test_decoder` checks the model alone), but the FP32 log-softmax after the last one may be
    compiled otherwise (measured: 2 of 1888 log-probs 4 FP32 ulps apart), so log-probs are compared to FP32
    rounding."""
    import jax

    _, cfg, params = tiny
    auto = JaxSampler(cfg, params, dtype="bfloat16")
    assert auto.f32_weights == (jax.default_backend() == "cpu")
    assert not JaxSampler(cfg, params, dtype="float16").f32_weights  # FP16: see the docstring
    held = JaxSampler(cfg, params, dtype="bfloat16", f32_weights=True)
    plain = JaxSampler(cfg, params, dtype="bfloat16", f32_weights=False)
    assert {x.dtype for x in jax.tree_util.tree_leaves(held._params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree_util.tree_leaves(plain._params)} == {jnp.dtype(jnp.bfloat16)}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b)),
                           plain._params, held._params)
    prompts = prompts_for(cfg, n=16, seed=5)
    for temperature in (1.0, 0.0):
        settings = SamplingSettings(max_new_tokens=LONG_TOKENS, samples_per_prompt=2, seed=2,
                                    temperature=temperature, ignore_eos=True)
        a, b = plain.generate(prompts, settings), held.generate(prompts, settings)
        np.testing.assert_array_equal(b.tokens, a.tokens)
        np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="half-precision compute dtype"):
        JaxSampler(cfg, params, dtype="float32", f32_weights=True)
