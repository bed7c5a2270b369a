"""Tests for jaxrl_fp16.rl.advantages against a per-group numpy/Python reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_fp16.rl.advantages import check_rewards, group_advantages


def _reference(rewards, group_size, normalize_std, eps):
    """Advantages in float64, one group at a time in plain Python."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[start:start + group_size]]
        mean = sum(group) / len(group)
        if normalize_std and len(group) > 1:
            std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
            out.extend((r - mean) / (std + eps) for r in group)
        else:
            out.extend(r - mean for r in group)
    return np.array(out)


@pytest.mark.parametrize("normalize_std", [False, True])
@pytest.mark.parametrize("group_size", [1, 2, 5])
def test_matches_reference(group_size, normalize_std):
    rng = np.random.default_rng(group_size)
    rewards = rng.normal(size=4 * group_size) * 3.0
    rewards[:group_size] = np.round(rewards[:group_size])  # some ties
    got = group_advantages(jnp.asarray(rewards, jnp.float32), group_size, normalize_std=normalize_std)
    assert got.dtype == jnp.float32 and got.shape == rewards.shape
    np.testing.assert_allclose(np.asarray(got), _reference(rewards, group_size, normalize_std, 1e-6),
                               rtol=1e-5, atol=1e-5)


def test_binary_rewards_closed_form():
    # One group of 4 with rewards (1, 0, 0, 0): mean 1/4; sample std sqrt(((3/4)^2 + 3 (1/4)^2) / 3) = 1/2.
    rewards = jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(group_advantages(rewards, 4), [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    np.testing.assert_allclose(group_advantages(rewards, 4, normalize_std=True, eps=0.0),
                               [1.5, -0.5, -0.5, -0.5, 0.5 / math.sqrt(1 / 3), 0.5 / math.sqrt(1 / 3),
                                -0.5 / math.sqrt(1 / 3), -0.5 / math.sqrt(1 / 3)], rtol=1e-6)


def test_std_normalisation_gives_unit_sample_std():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=6 * 8) * 5.0 + 2.0
    adv = np.asarray(group_advantages(jnp.asarray(rewards, jnp.float32), 8, normalize_std=True, eps=0.0))
    groups = adv.reshape(6, 8)
    np.testing.assert_allclose(groups.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(groups.std(axis=1, ddof=1), 1.0, rtol=1e-5)
    # Without normalisation the spread is the rewards' own.
    raw = np.asarray(group_advantages(jnp.asarray(rewards, jnp.float32), 8)).reshape(6, 8)
    np.testing.assert_allclose(raw.std(axis=1, ddof=1), rewards.reshape(6, 8).std(axis=1, ddof=1), rtol=1e-5)


def test_constant_group_gives_zero_not_nan():
    adv = group_advantages(jnp.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.0]), 3, normalize_std=True)
    assert np.all(np.isfinite(np.asarray(adv)))
    np.testing.assert_allclose(np.asarray(adv)[:3], 0.0)


def test_group_size_one_gives_zero():
    np.testing.assert_array_equal(group_advantages(jnp.array([3.0, -1.0, 7.0]), 1, normalize_std=True),
                                  [0.0, 0.0, 0.0])


def test_under_jit():
    fn = jax.jit(group_advantages, static_argnames=("group_size", "normalize_std", "eps"))
    rewards = jnp.arange(12, dtype=jnp.float32) ** 2
    for normalize_std in (False, True):
        np.testing.assert_allclose(fn(rewards, group_size=4, normalize_std=normalize_std),
                                   _reference(np.asarray(rewards), 4, normalize_std, 1e-6), rtol=1e-5, atol=1e-5)


def test_integer_rewards_give_float32():
    adv = group_advantages(jnp.array([1, 0, 0, 1], jnp.int32), 2)
    assert adv.dtype == jnp.float32
    np.testing.assert_array_equal(adv, [0.5, -0.5, -0.5, 0.5])


@pytest.mark.parametrize("shape, group_size", [((6,), 4), ((2, 4), 4), ((), 1), ((4,), 0), ((4,), -2),
                                               ((4,), 2.0), ((4,), True)])
def test_bad_shapes_raise(shape, group_size):
    with pytest.raises(ValueError):
        group_advantages(jnp.zeros(shape), group_size)


def test_negative_eps_raises():
    with pytest.raises(ValueError, match="eps"):
        group_advantages(jnp.zeros(4), 2, normalize_std=True, eps=-1.0)


def test_nan_propagates_in_jitted_code():
    adv = group_advantages(jnp.array([1.0, jnp.nan, 0.0, 1.0]), 2)
    assert np.isnan(np.asarray(adv)[:2]).all() and np.isfinite(np.asarray(adv)[2:]).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_rewards_names_the_row(bad):
    rewards = np.zeros(8)
    rewards[3] = bad
    with pytest.raises(ValueError, match=r"row 3\b") as info:
        check_rewards(rewards)
    assert "row 0" not in str(info.value)


def test_check_rewards_lists_several_rows_and_passes_finite():
    rewards = np.zeros(20, np.float32)
    rewards[[2, 11]] = np.nan
    with pytest.raises(ValueError, match=r"2 non-finite.*row 2.*row 11"):
        check_rewards(jnp.asarray(rewards))
    ok = check_rewards([0.0, 1.0, -2.5])
    np.testing.assert_array_equal(ok, [0.0, 1.0, -2.5])
    with pytest.raises(ValueError, match="1-D"):
        check_rewards(np.zeros((2, 2)))
