"""The mixed-precision update step against plain optax, closed forms and FP16 underflow."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_fp16.loss_scale import DynamicLossScale, NoOpLossScale, StaticLossScale
from jaxrl_fp16.precision import get_policy
from jaxrl_fp16.step import TrainState, make_train_step

D = 4


def _params():
    return {"w": jnp.array([0.5, -1.0, 0.25, 2.0], jnp.float32), "b": jnp.array(0.1, jnp.float32)}


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    x_BxD = rng.normal(size=(n, D)).astype(np.float32)
    y_B = (x_BxD @ np.array([1.0, 2.0, -1.0, 0.5], np.float32) + 0.3).astype(np.float32)
    return {"x_BxD": jnp.asarray(x_BxD), "y_B": jnp.asarray(y_B)}


def _mse(params, batch, coeff=1.0):
    """Linear regression in the params' (compute) dtype; the loss itself in float32."""
    w, b = params["w"], params["b"]
    pred_B = batch["x_BxD"].astype(w.dtype) @ w + b
    err_B = pred_B.astype(jnp.float32) - batch["y_B"]
    loss = coeff * jnp.mean(err_B**2)
    return loss, {"mean_pred": jnp.mean(pred_B.astype(jnp.float32))}


def _assert_trees_bit_equal(a, b):
    chex.assert_trees_all_equal_structs(a, b)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_fp32_noop_matches_plain_optax_bit_for_bit():
    optimizer = optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.1)
    step_fn = make_train_step(_mse, optimizer, "fp32", max_grad_norm=None)
    state = TrainState.create(_params(), optimizer, NoOpLossScale())

    @jax.jit
    def reference(params, opt_state, batch):
        grads = jax.grad(lambda p: _mse(p, batch)[0])(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = _params(), optimizer.init(_params())
    for i in range(5):
        batch = _batch(seed=i)
        state, metrics = step_fn(state, batch)
        params, opt_state = reference(params, opt_state, batch)
        _assert_trees_bit_equal(state.params, params)
        _assert_trees_bit_equal(state.opt_state, opt_state)
        assert int(metrics["skipped"]) == 0 and float(metrics["loss_scale"]) == 1.0
    assert int(state.step) == 5 and int(state.skipped_steps) == 0


def test_clipping_matches_optax_chain():
    max_norm = 0.05
    optimizer = optax.adamw(1e-2)
    reference_opt = optax.chain(optax.clip_by_global_norm(max_norm), optax.adamw(1e-2))
    step_fn = make_train_step(_mse, optimizer, "fp32", max_grad_norm=max_norm)
    state = TrainState.create(_params(), optimizer, NoOpLossScale())
    params, opt_state = _params(), reference_opt.init(_params())

    @jax.jit
    def reference(params, opt_state, batch):
        grads = jax.grad(lambda p: _mse(p, batch)[0])(params)
        updates, opt_state = reference_opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    for i in range(4):
        batch = _batch(seed=i)
        params, opt_state, grads = reference(params, opt_state, batch)
        state, metrics = step_fn(state, batch)
        np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-6)
        assert float(metrics["grad_norm"]) > max_norm  # clipping was active
        chex.assert_trees_all_close(state.params, params, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss_scale", [StaticLossScale(2.0**12), DynamicLossScale(loss_scale=2.0**12)])
def test_scaled_fp16_step_matches_fp32_step(loss_scale):
    """The step unscales: FP16 compute with a loss scale gives the FP32 SGD step up to FP16 rounding."""
    optimizer = optax.sgd(0.1)
    states, metrics = {}, {}
    for policy, scale in [("fp32", NoOpLossScale()), ("fp16-mixed", loss_scale)]:
        step_fn = make_train_step(_mse, optimizer, policy, max_grad_norm=None)
        states[policy], metrics[policy] = step_fn(TrainState.create(_params(), optimizer, scale), _batch())
    assert float(metrics["fp16-mixed"]["loss_scale"]) == 2.0**12
    for key in ("loss", "grad_norm", "mean_pred"):
        np.testing.assert_allclose(float(metrics["fp16-mixed"][key]), float(metrics["fp32"][key]), rtol=2e-3)
    chex.assert_trees_all_close(states["fp16-mixed"].params, states["fp32"].params, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("policy,loss_scale,rtol", [
    ("fp32", NoOpLossScale(), 1e-5),
    ("fp16-mixed", DynamicLossScale(loss_scale=2.0**10), 1e-2),
])
def test_gradient_accumulation_matches_full_batch(policy, loss_scale, rtol):
    optimizer = optax.sgd(0.05)
    steps = {m: make_train_step(_mse, optimizer, policy, max_grad_norm=None, num_microbatches=m) for m in (1, 4)}
    states = {m: TrainState.create(_params(), optimizer, loss_scale) for m in steps}
    for i in range(3):
        batch = _batch(n=8, seed=i)
        metrics = {}
        for m, step_fn in steps.items():
            states[m], metrics[m] = step_fn(states[m], batch)
        for key in ("loss", "grad_norm", "mean_pred"):
            np.testing.assert_allclose(float(metrics[4][key]), float(metrics[1][key]), rtol=rtol, err_msg=key)
        chex.assert_trees_all_close(states[4].params, states[1].params, rtol=rtol, atol=rtol * 1e-2)
    moved = np.abs(np.asarray(states[4].params["w"]) - np.asarray(_params()["w"]))
    assert np.all(moved > 1e-3)


def test_microbatches_must_divide_batch():
    optimizer = optax.sgd(0.1)
    step_fn = make_train_step(_mse, optimizer, "fp32", num_microbatches=3)
    with pytest.raises(ValueError, match="not divisible by num_microbatches=3"):
        step_fn(TrainState.create(_params(), optimizer, NoOpLossScale()), _batch(n=8))


def test_step_traces_once_across_loss_scales_and_skips():
    traces = []

    def loss_fn(params, batch):
        traces.append(None)
        return _mse(params, batch)

    optimizer = optax.adam(1e-3)
    step_fn = make_train_step(loss_fn, optimizer, "fp16-mixed", num_microbatches=2)
    # Python numbers on the first call, arrays afterwards; period=1 changes the scale on every step.
    state = TrainState.create(_params(), optimizer, DynamicLossScale(loss_scale=2.0**8, period=1))
    bad = {**_batch(), "x_BxD": _batch()["x_BxD"].at[0, 0].set(jnp.inf)}
    state, metrics = step_fn(state, _batch(seed=0))
    n_traces = len(traces)
    scales = [float(metrics["loss_scale"])]
    for batch in [_batch(seed=1), bad, _batch(seed=2), _batch(seed=3)]:
        state, metrics = step_fn(state, batch)
        scales.append(float(metrics["loss_scale"]))
    assert len(traces) == n_traces  # no retrace
    assert scales == [2.0**8, 2.0**9, 2.0**10, 2.0**9, 2.0**10]
    assert int(state.skipped_steps) == 1 and int(state.step) == 5


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_non_finite_step_is_skipped_bit_for_bit(bad):
    optimizer = optax.adamw(1e-2)
    step_fn = make_train_step(_mse, optimizer, "fp16-mixed")
    state = TrainState.create(_params(), optimizer, DynamicLossScale(loss_scale=2.0**12, period=3))
    state, _ = step_fn(state, _batch(seed=0))  # a non-trivial optimizer state, counter 1
    assert int(state.loss_scale.counter) == 1
    batch = _batch(seed=1)
    batch = {**batch, "x_BxD": batch["x_BxD"].at[3, 1].set(bad)}
    new_state, metrics = step_fn(state, batch)
    _assert_trees_bit_equal(new_state.params, state.params)
    _assert_trees_bit_equal(new_state.opt_state, state.opt_state)
    assert int(metrics["skipped"]) == 1 and int(metrics["grads_finite"]) == 0
    assert float(metrics["loss_scale"]) == 2.0**12 and float(metrics["grad_norm"]) == 0.0
    assert float(new_state.loss_scale.loss_scale) == 2.0**11 and int(new_state.loss_scale.counter) == 0
    assert int(new_state.skipped_steps) == 1 and int(new_state.step) == 2
    recovered, metrics = step_fn(new_state, _batch(seed=2))
    assert int(metrics["skipped"]) == 0 and int(recovered.loss_scale.counter) == 1
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(recovered))


@pytest.mark.parametrize("lr", [np.inf, 1e38])
def test_a_non_finite_update_from_finite_gradients_is_skipped(lr):
    """An infinite learning rate (or one that overflows FP32) makes the update non-finite although every gradient
    is finite: the state keeps its values, the step counts as skipped, the loss scale does not shrink."""
    optimizer = optax.sgd(lr)
    step_fn = make_train_step(_mse, optimizer, "fp16-mixed", max_grad_norm=None)
    state = TrainState.create(_params(), optimizer, DynamicLossScale(loss_scale=2.0**12, period=3))
    new_state, metrics = step_fn(state, _batch(seed=1))
    assert int(metrics["grads_finite"]) == 1 and float(metrics["grad_norm"]) > 0
    assert int(metrics["update_finite"]) == 0 and int(metrics["skipped"]) == 1
    _assert_trees_bit_equal(new_state.params, state.params)
    _assert_trees_bit_equal(new_state.opt_state, state.opt_state)
    assert int(new_state.skipped_steps) == 1 and int(new_state.step) == 1
    assert float(new_state.loss_scale.loss_scale) == 2.0**12 and int(new_state.loss_scale.counter) == 1
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(new_state))


def test_fp16_underflow_needs_loss_scaling():
    """Gradients of a tiny loss underflow to zero in FP16; dynamic loss scaling recovers them."""
    coeff = 1e-8  # loss ~1e-8: dloss/dpred ~1e-9 rounds to zero in float16 (smallest subnormal 6e-8)
    target = _params()

    def loss_fn(params, batch):
        return _mse(params, batch, coeff)

    def data(seed):
        batch = _batch(seed=seed)
        x_BxD = batch["x_BxD"].astype(jnp.float16).astype(jnp.float32)
        return {"x_BxD": x_BxD, "y_B": x_BxD @ target["w"] + target["b"]}

    start = jax.tree_util.tree_map(lambda x: x + 0.5, target)
    optimizer = optax.adam(5e-2, eps=1e-15)  # a tiny eps, as in the paper: the gradients are ~1e-9
    runs = {}
    for name, policy, loss_scale in [("fp32", "fp32", NoOpLossScale()),
                                     ("fp16", "fp16-mixed", NoOpLossScale()),
                                     ("fp16-scaled", "fp16-mixed", DynamicLossScale(loss_scale=2.0**16))]:
        step_fn = make_train_step(loss_fn, optimizer, get_policy(policy), max_grad_norm=None)
        state = TrainState.create(start, optimizer, loss_scale)
        losses = []
        for i in range(40):
            state, metrics = step_fn(state, data(i))
            losses.append(float(metrics["loss"]))
        runs[name] = (state, losses)

    assert 1e-9 < runs["fp16"][1][0] < 1e-7  # the forward loss itself is representable
    _assert_trees_bit_equal(runs["fp16"][0].params, start)  # every FP16 gradient underflowed to zero
    assert runs["fp32"][1][-1] < 0.2 * runs["fp32"][1][0]  # the problem is trainable at all
    scaled_state, scaled_losses = runs["fp16-scaled"]
    assert int(scaled_state.skipped_steps) == 0
    assert scaled_losses[-1] < 0.2 * scaled_losses[0]
    distance = lambda p: float(optax.tree.norm(jax.tree_util.tree_map(jnp.subtract, p, target)))
    assert distance(scaled_state.params) < 0.5 * distance(start)


def test_aux_clash_and_param_dtype_are_checked():
    optimizer = optax.sgd(0.1)
    clash = make_train_step(lambda p, b: (_mse(p, b)[0], {"loss": jnp.zeros(())}), optimizer, "fp32")
    with pytest.raises(ValueError, match="clash"):
        clash(TrainState.create(_params(), optimizer, NoOpLossScale()), _batch())
    step_fn = make_train_step(_mse, optimizer, "fp16-mixed")
    bf16_params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), _params())
    with pytest.raises(ValueError, match="policy.cast_to_param"):
        step_fn(TrainState.create(bf16_params, optimizer, NoOpLossScale()), _batch())


def test_metrics_dtypes_and_donation():
    optimizer = optax.adam(1e-3)
    step_fn = make_train_step(_mse, optimizer, "fp16-mixed", donate=True)
    state = TrainState.create(_params(), optimizer, DynamicLossScale(loss_scale=2.0**10))
    state, metrics = step_fn(state, _batch())
    state, metrics = step_fn(state, _batch(seed=1))
    expected = {"loss": jnp.float32, "grad_norm": jnp.float32, "loss_scale": jnp.float32, "skipped": jnp.int32,
                "grads_finite": jnp.int32, "update_finite": jnp.int32, "mean_pred": jnp.float32}
    assert {k: v.dtype for k, v in metrics.items()} == expected
    assert all(v.shape == () for v in metrics.values())
    assert state.params["w"].dtype == jnp.float32 and int(state.step) == 2
