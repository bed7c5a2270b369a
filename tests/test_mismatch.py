"""Tests for jaxrl_fp16.mismatch against an independent per-sequence numpy/Python reference."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_fp16.mismatch import METRIC_NAMES, mismatch_metrics, summarize

_jit_metrics = jax.jit(mismatch_metrics)


def _reference(logp_mu, logp_pi, mask):
    """The metrics in float64, walking each sequence's response tokens in plain Python."""
    ds, pis, mus, seq_sums = [], [], [], []
    for b in range(mask.shape[0]):
        positions = [t for t in range(mask.shape[1]) if mask[b, t]]
        if not positions:
            continue
        seq = 0.0
        for t in positions:
            mu_log, pi_log = float(logp_mu[b, t]), float(logp_pi[b, t])
            ds.append(mu_log - pi_log)
            mus.append(math.exp(mu_log))
            pis.append(math.exp(pi_log))
            seq += mu_log - pi_log
        seq_sums.append(seq)
    n = len(ds)
    abs_diffs = [abs(p - m) for p, m in zip(pis, mus)]
    diffs = [p - m for p, m in zip(pis, mus)]
    mean_abs = sum(abs_diffs) / n
    return {
        "mismatch/kl_k1": sum(ds) / n,
        "mismatch/kl_k2": sum(d * d / 2 for d in ds) / n,
        "mismatch/kl_k3": sum((p / m) - 1 - math.log(p / m) for p, m in zip(pis, mus)) / n,
        "mismatch/seq_kl": sum(seq_sums) / len(seq_sums),
        "mismatch/prob_abs_diff_mean": mean_abs,
        "mismatch/prob_abs_diff_max": max(abs_diffs),
        "mismatch/prob_abs_diff_std": math.sqrt(sum((a - mean_abs) ** 2 for a in abs_diffs) / n),
        "mismatch/prob_diff_max": max(diffs),
        "mismatch/prob_diff_min": min(diffs),
        "mismatch/log_ratio_abs_max": max(abs(d) for d in ds),
        "mismatch/seq_log_ratio_abs_mean": sum(abs(s) for s in seq_sums) / len(seq_sums),
        "mismatch/seq_log_ratio_abs_max": max(abs(s) for s in seq_sums),
        "mismatch/prob_pearson": float(np.corrcoef(np.array(pis), np.array(mus))[0, 1]),
        "mismatch/num_tokens": n,
    }


def _random_batch(seed, batch=6, length=24, noise=0.3):
    """Log-probs with ragged prompt/response/padding masks, one all-masked row, NaN/inf garbage off-mask."""
    rng = np.random.default_rng(seed)
    logp_mu = np.log(rng.uniform(0.01, 1.0, size=(batch, length)))
    logp_pi = np.minimum(logp_mu + noise * rng.standard_normal((batch, length)), 0.0)
    mask = np.zeros((batch, length), dtype=bool)
    for b in range(batch):
        start = rng.integers(0, length // 2)
        stop = rng.integers(start + 1, length + 1)
        mask[b, start:stop] = True
    mask[rng.integers(0, batch)] = False  # one sequence with no response token
    garbage = rng.choice(np.array([np.nan, np.inf, -np.inf, 1e30]), size=(batch, length))
    logp_mu = np.where(mask, logp_mu, garbage).astype(np.float32)
    logp_pi = np.where(mask, logp_pi, garbage[:, ::-1]).astype(np.float32)
    return logp_mu, logp_pi, mask


@pytest.mark.parametrize("mask_dtype", [bool, np.int32, np.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_independent_reference(seed, mask_dtype):
    logp_mu, logp_pi, mask = _random_batch(seed)
    got = _jit_metrics(logp_mu, logp_pi, mask.astype(mask_dtype))
    # The reference sees the float32 inputs upcast, so only the implementation's float32 rounding differs.
    want = _reference(logp_mu.astype(np.float64), logp_pi.astype(np.float64), mask)
    for name in METRIC_NAMES:
        assert np.isfinite(got[name]), name
        np.testing.assert_allclose(float(got[name]), want[name], rtol=2e-5, atol=1e-6, err_msg=name)
    assert got["mismatch/num_tokens"].dtype == jnp.int32
    assert all(got[name].dtype == jnp.float32 for name in METRIC_NAMES if name != "mismatch/num_tokens")


def test_masked_garbage_does_not_leak():
    logp_mu, logp_pi, mask = _random_batch(3)
    clean = _jit_metrics(np.where(mask, logp_mu, -1.0), np.where(mask, logp_pi, -2.0), mask)
    dirty = _jit_metrics(logp_mu, logp_pi, mask)
    for name in METRIC_NAMES:
        assert float(dirty[name]) == float(clean[name]), name


def test_empty_sequence_is_excluded_from_sequence_stats():
    logp_mu = np.log(np.array([[0.5, 0.25, 0.9], [0.1, 0.2, 0.3]], np.float32))
    logp_pi = logp_mu - np.array([[0.1, 0.2, 7.0], [5.0, 5.0, 5.0]], np.float32)
    mask = np.array([[1, 1, 0], [0, 0, 0]], np.float32)
    got = _jit_metrics(logp_mu, logp_pi, mask)
    np.testing.assert_allclose(float(got["mismatch/seq_kl"]), 0.3, rtol=1e-6)
    np.testing.assert_allclose(float(got["mismatch/seq_log_ratio_abs_mean"]), 0.3, rtol=1e-6)
    np.testing.assert_allclose(float(got["mismatch/seq_log_ratio_abs_max"]), 0.3, rtol=1e-6)
    np.testing.assert_allclose(float(got["mismatch/kl_k1"]), 0.15, rtol=1e-6)
    assert int(got["mismatch/num_tokens"]) == 2


def test_identical_inputs_give_zero_mismatch_and_unit_correlation():
    logp, _, mask = _random_batch(4)
    got = _jit_metrics(logp, logp, mask)
    for name in METRIC_NAMES:
        if name in ("mismatch/prob_pearson", "mismatch/num_tokens"):
            continue
        assert float(got[name]) == 0.0, name
    assert float(got["mismatch/prob_pearson"]) == 1.0
    assert int(got["mismatch/num_tokens"]) == int(mask.sum())


def test_k3_is_nonnegative_per_token():
    rng = np.random.default_rng(5)
    logp_mu = np.log(rng.uniform(1e-4, 1.0, size=4096)).astype(np.float32)
    scales = np.array([1e-8, 1e-6, 1e-4, 1e-2, 1.0, 5.0], np.float32)
    d = rng.standard_normal(4096).astype(np.float32) * rng.choice(scales, size=4096)
    logp_pi = (logp_mu - d).astype(np.float32)
    # One token per call: the metric is that token's k3.
    per_token = jax.jit(jax.vmap(mismatch_metrics))(logp_mu[:, None, None], logp_pi[:, None, None],
                                                    np.ones((4096, 1, 1), bool))
    k3 = np.asarray(per_token["mismatch/kl_k3"])
    assert np.all(k3 >= 0.0)
    assert np.all(np.isfinite(k3))
    big = np.abs(d) > 0.1  # where float32 is accurate enough to compare with the closed form
    np.testing.assert_allclose(k3[big], np.expm1(-d[big].astype(np.float64)) + d[big], rtol=1e-4)


def test_no_tokens_gives_nan_and_zero_count():
    logp_mu, logp_pi, mask = _random_batch(6)
    got = _jit_metrics(logp_mu, logp_pi, np.zeros_like(mask))
    assert int(got["mismatch/num_tokens"]) == 0
    for name in METRIC_NAMES:
        if name != "mismatch/num_tokens":
            assert np.isnan(float(got[name])), name


def test_constant_probabilities_give_nan_pearson():
    logp_mu = np.log(np.full((2, 4), 0.3, np.float32))
    logp_pi = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]], np.float32))
    mask = np.ones((2, 4), bool)
    assert np.isnan(float(_jit_metrics(logp_mu, logp_pi, mask)["mismatch/prob_pearson"]))
    assert np.isnan(float(_jit_metrics(logp_pi, logp_mu, mask)["mismatch/prob_pearson"]))
    single = np.zeros((2, 4), bool)
    single[0, 1] = True
    assert np.isnan(float(_jit_metrics(logp_pi, logp_pi, single)["mismatch/prob_pearson"]))


def test_pearson_tiny_variance_is_finite():
    probs = 0.5 + 1e-7 * np.arange(8, dtype=np.float32)
    logp = np.log(probs)[None, :]
    got = _jit_metrics(logp, logp, np.ones((1, 8), bool))
    assert float(got["mismatch/prob_pearson"]) == 1.0


def test_low_precision_inputs_are_computed_in_float32():
    logp_mu, logp_pi, mask = _random_batch(7)
    clean_mu = np.where(mask, logp_mu, -1.0)
    clean_pi = np.where(mask, logp_pi, -1.0)
    low = _jit_metrics(jnp.asarray(clean_mu, jnp.bfloat16), jnp.asarray(clean_pi, jnp.bfloat16), mask)
    up = _jit_metrics(jnp.asarray(clean_mu, jnp.bfloat16).astype(jnp.float32),
                      jnp.asarray(clean_pi, jnp.bfloat16).astype(jnp.float32), mask)
    for name in METRIC_NAMES:
        assert low[name].dtype == up[name].dtype
        # Same float32 inputs; only reduction order may differ. A bfloat16 computation would be ~1e-2 off.
        np.testing.assert_allclose(float(low[name]), float(up[name]), rtol=1e-6, err_msg=name)


def test_metric_names_are_the_returned_keys_in_order():
    logp_mu, logp_pi, mask = _random_batch(8)
    assert tuple(mismatch_metrics(logp_mu, logp_pi, mask)) == METRIC_NAMES
    assert set(_jit_metrics(logp_mu, logp_pi, mask)) == set(METRIC_NAMES)  # jit sorts dict keys
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)
    assert all(name.startswith("mismatch/") for name in METRIC_NAMES)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        mismatch_metrics(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        mismatch_metrics(np.zeros(3), np.zeros(3), np.ones(3))


def test_summarize_gives_json_ready_python_floats():
    logp_mu, logp_pi, mask = _random_batch(9)
    summary = summarize(_jit_metrics(logp_mu, logp_pi, mask))
    assert tuple(summary) == METRIC_NAMES
    assert all(type(value) is float for value in summary.values())
    assert summary["mismatch/num_tokens"] == float(mask.sum())
    assert json.loads(json.dumps(summary)) == summary
    empty = summarize(_jit_metrics(logp_mu, logp_pi, np.zeros_like(mask)))
    assert math.isnan(empty["mismatch/kl_k1"]) and empty["mismatch/num_tokens"] == 0.0
