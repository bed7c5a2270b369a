"""Loss scales against closed forms, under jax.jit."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_fp16.loss_scale import DynamicLossScale, NoOpLossScale, StaticLossScale, all_finite, select_tree

FIELD_DTYPES = {"loss_scale": jnp.float32, "counter": jnp.int32, "period": jnp.int32, "factor": jnp.float32,
                "min_loss_scale": jnp.float32, "max_loss_scale": jnp.float32}

# (s0, factor, period, min_loss_scale, max_loss_scale)
CONFIGS = [
    (2.0**15, 2.0, 3, 1.0, 2.0**24),
    (1000.0, 3.0, 2, 10.0, 1e5),
    (2.0**16, 2.0, 1, 2.0**14, 2.0**17),
    (1.0, 1.5, 4, 1.0, 10.0),
]


def _make(s0, factor, period, low, high):
    return DynamicLossScale(loss_scale=s0, factor=factor, period=period, min_loss_scale=low, max_loss_scale=high)


def _assert_fields(scale, expected):
    """Every field of `scale` has the expected value and its fixed dtype (strong-typed)."""
    for name, dtype in FIELD_DTYPES.items():
        value = getattr(scale, name)
        assert isinstance(value, jax.Array), name
        assert value.dtype == dtype and not value.weak_type, (name, value.dtype, value.weak_type)
        np.testing.assert_allclose(np.asarray(value), expected[name], rtol=1e-6, err_msg=name)


def _adjust_jit():
    """A jitted `adjust` that fails when it is traced a second time."""
    traces = []

    def adjust(scale, finite):
        traces.append(None)
        assert len(traces) == 1, "adjust was retraced"
        return scale.adjust(finite)

    return jax.jit(adjust)


def test_constructor_converts_numbers_to_fixed_dtypes():
    scale = DynamicLossScale(loss_scale=2.0**15)
    _assert_fields(scale, dict(loss_scale=2.0**15, counter=0, period=2000, factor=2.0, min_loss_scale=1.0,
                               max_loss_scale=2.0**24))
    assert StaticLossScale(4).loss_scale.dtype == jnp.float32


def test_dynamic_survives_jit_identity_and_adjust():
    scale = DynamicLossScale(loss_scale=2.0**10, counter=2, period=5, factor=4.0, min_loss_scale=2.0,
                             max_loss_scale=2.0**20)
    fields = {f.name: np.asarray(getattr(scale, f.name)) for f in dataclasses.fields(scale)}
    _assert_fields(jax.jit(lambda s: s)(scale), fields)
    _assert_fields(jax.jit(lambda s: s.adjust(jnp.array(True)))(scale), {**fields, "counter": 3})
    _assert_fields(jax.jit(lambda s: s.adjust(jnp.array(False)))(scale),
                   {**fields, "counter": 0, "loss_scale": 2.0**8})


def test_jitted_adjust_traces_once_from_python_numbers():
    adjust = _adjust_jit()
    scale = DynamicLossScale(loss_scale=2.0**15, period=2)  # python numbers on the first call
    for finite in [True, True, False, True]:
        scale = adjust(scale, jnp.array(finite))
    assert float(scale.loss_scale) == 2.0**15 and int(scale.counter) == 1


def test_changing_constants_does_not_retrace():
    adjust = _adjust_jit()
    adjust(_make(*CONFIGS[0]), jnp.array(True))
    adjust(_make(*CONFIGS[1]), jnp.array(False))


@pytest.mark.parametrize("s0,factor,period,low,high", CONFIGS)
def test_overflow_trajectory(s0, factor, period, low, high):
    adjust = _adjust_jit()
    scale = _make(s0, factor, period, low, high)
    if period > 1:
        scale = adjust(scale, jnp.array(True))  # a non-zero counter that the overflow must reset
        assert int(scale.counter) == 1
    for k in range(1, 8):
        scale = adjust(scale, jnp.array(False))
        np.testing.assert_allclose(float(scale.loss_scale), max(low, s0 / factor**k), rtol=1e-6)
        assert int(scale.counter) == 0


@pytest.mark.parametrize("s0,factor,period,low,high", CONFIGS)
def test_growth_trajectory(s0, factor, period, low, high):
    adjust = _adjust_jit()
    scale = _make(s0, factor, period, low, high)
    for i in range(1, 5 * period + 1):
        scale = adjust(scale, jnp.array(True))
        np.testing.assert_allclose(float(scale.loss_scale), min(high, s0 * factor ** (i // period)), rtol=1e-6)
        assert int(scale.counter) == i % period
    assert float(scale.loss_scale) == pytest.approx(min(high, s0 * factor**5), rel=1e-6)


@pytest.mark.parametrize("s0,factor,period,low,high", CONFIGS)
def test_overflow_restarts_growth_count(s0, factor, period, low, high):
    adjust = _adjust_jit()
    scale = _make(s0, factor, period, low, high)
    for _ in range(period - 1):
        scale = adjust(scale, jnp.array(True))
    scale = adjust(scale, jnp.array(False))
    backed_off = max(low, s0 / factor)
    for _ in range(period - 1):
        scale = adjust(scale, jnp.array(True))
        np.testing.assert_allclose(float(scale.loss_scale), backed_off, rtol=1e-6)
    scale = adjust(scale, jnp.array(True))
    np.testing.assert_allclose(float(scale.loss_scale), min(high, backed_off * factor), rtol=1e-6)
    assert int(scale.counter) == 0


def test_adjust_inside_scan_matches_python_loop():
    flags = np.array([1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1], dtype=bool)
    scale0 = DynamicLossScale(loss_scale=8.0, period=3, min_loss_scale=2.0, max_loss_scale=64.0)
    scanned, _ = jax.lax.scan(lambda s, f: (s.adjust(f), None), scale0, jnp.asarray(flags))
    value, counter = 8.0, 0
    for f in flags:
        if f:
            counter += 1
            if counter == 3:
                value, counter = min(64.0, value * 2), 0
        else:
            value, counter = max(2.0, value / 2), 0
    assert float(scanned.loss_scale) == value and int(scanned.counter) == counter


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_scale=0.0), "loss_scale must be finite and > 0"),
    (dict(loss_scale=-1.0), "loss_scale must be finite and > 0"),
    (dict(loss_scale=float("inf")), "loss_scale must be finite"),
    (dict(loss_scale=4.0, period=0), "period must be an integer >= 1"),
    (dict(loss_scale=4.0, period=1.5), "period must be an integer"),
    (dict(loss_scale=4.0, factor=1.0), "factor must be finite and > 1"),
    (dict(loss_scale=4.0, counter=-1), "counter must be an integer >= 0"),
    (dict(loss_scale=4.0, min_loss_scale=8.0), "loss_scale .* must be >= min_loss_scale"),
    (dict(loss_scale=4.0, max_loss_scale=2.0), "loss_scale .* must be <= max_loss_scale"),
    (dict(loss_scale=4.0, min_loss_scale=8.0, max_loss_scale=2.0), "min_loss_scale .* must be <= max"),
    (dict(loss_scale=4.0, min_loss_scale=0.0), "min_loss_scale must be finite and > 0"),
])
def test_dynamic_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicLossScale(**kwargs)


def test_static_validation():
    with pytest.raises(ValueError, match="loss_scale must be finite and > 0"):
        StaticLossScale(0.0)


def test_tracers_and_placeholders_are_left_alone():
    out = jax.jit(lambda x: DynamicLossScale(loss_scale=x, period=3).loss_scale * 2)(jnp.float32(3.0))
    assert float(out) == 6.0
    leaves, treedef = jax.tree_util.tree_flatten(DynamicLossScale(loss_scale=4.0))
    placeholders = [object() for _ in leaves]
    rebuilt = jax.tree_util.tree_unflatten(treedef, placeholders)
    assert jax.tree_util.tree_leaves(rebuilt) == placeholders


def test_static_round_trip_and_adjust():
    scale = StaticLossScale(2.0**12)
    tree = {"a": jnp.array([1.5, -3.0, 1e-3], jnp.float32), "b": jnp.array([0.25, 2.0], jnp.float16),
            "i": jnp.array([3], jnp.int32)}
    scaled = jax.jit(scale.scale)(tree)
    np.testing.assert_array_equal(scaled["a"], np.float32(tree["a"]) * np.float32(2.0**12))
    np.testing.assert_array_equal(scaled["i"], tree["i"])
    back = jax.jit(scale.unscale)(scaled)
    for name in tree:
        assert back[name].dtype == tree[name].dtype
        np.testing.assert_array_equal(back[name], tree[name])
    for finite in (True, False):
        adjusted = jax.jit(lambda s, f: s.adjust(f))(scale, jnp.array(finite))
        assert adjusted.loss_scale.dtype == jnp.float32 and float(adjusted.loss_scale) == 2.0**12


def test_unscale_computes_in_float32():
    x32 = jnp.array([3.0, 7.0], jnp.float32)
    np.testing.assert_array_equal(StaticLossScale(3.0).unscale(x32), np.float32([3.0, 7.0]) * np.float32(1 / 3))
    # 1/2**25 underflows to zero in float16, the result 1024/2**25 = 2**-15 does not.
    x16 = jnp.array([1024.0], jnp.float16)
    out = DynamicLossScale(loss_scale=2.0**25, max_loss_scale=2.0**25).unscale(x16)
    assert out.dtype == jnp.float16 and float(out[0]) == 2.0**-15


def test_noop():
    scale = NoOpLossScale()
    tree = {"a": jnp.arange(3.0)}
    assert scale.scale(tree) is tree and scale.unscale(tree) is tree
    assert scale.adjust(jnp.array(False)) == scale
    assert scale.loss_scale.dtype == jnp.float32 and float(scale.loss_scale) == 1.0
    assert float(jax.jit(lambda s: s.loss_scale)(scale)) == 1.0


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_all_finite(bad):
    tree = {"a": jnp.ones((2, 3), jnp.float32), "b": jnp.ones((4,), jnp.float16), "i": jnp.arange(3)}
    finite = jax.jit(all_finite)
    assert finite(tree).dtype == jnp.bool_ and bool(finite(tree))
    assert not bool(finite({**tree, "b": tree["b"].at[2].set(bad)}))
    assert not bool(finite({**tree, "a": tree["a"].at[1, 1].set(bad)}))
    assert bool(all_finite({}))


def test_select_tree():
    a = {"x": jnp.array([1.0, 2.0]), "n": jnp.array(3, jnp.int32)}
    b = {"x": jnp.array([5.0, 6.0]), "n": jnp.array(7, jnp.int32)}
    select = jax.jit(select_tree)
    chex.assert_trees_all_equal(select(jnp.array(True), a, b), a)
    chex.assert_trees_all_equal(select(jnp.array(False), a, b), b)
    with pytest.raises(ValueError, match="same structure"):
        select_tree(jnp.array(True), a, {"x": b["x"]})
    with pytest.raises(ValueError, match="scalar bool"):
        select_tree(jnp.array([True, False]), a, b)
