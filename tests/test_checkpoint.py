"""Orbax checkpoints of the train state: bitwise round trip, keep-last-N, and a process killed mid-save."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_fp16.checkpoint import Checkpointer
from jaxrl_fp16.loss_scale import DynamicLossScale
from jaxrl_fp16.step import TrainState


def make_state(seed=0, scale=2.0 ** 13):
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    params = {"w": jax.random.normal(k[0], (16, 8)), "b": {"c": jax.random.normal(k[1], (8,))}}
    opt = optax.adamw(1e-3, b2=0.95, eps=1e-15)
    state = TrainState.create(params, opt, DynamicLossScale(loss_scale=scale, period=7, min_loss_scale=2.0))
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, opt_state = opt.update(grads, state.opt_state, params)
    return state.replace(params=optax.apply_updates(params, updates), opt_state=opt_state,
                         step=jnp.int32(3), skipped_steps=jnp.int32(1))


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bitwise_with_meta(tmp_path):
    state = make_state()
    ck = Checkpointer(tmp_path / "ck", keep=2)
    ck.save(5, state, {"iteration": 5, "data_position": 320, "seed": 0})
    restored, meta = ck.restore(make_state(seed=1, scale=4.0))  # another state only gives the structure
    assert_trees_equal(restored, state)
    assert meta == {"iteration": 5, "data_position": 320, "seed": 0}
    assert float(restored.loss_scale.min_loss_scale) == 2.0 and int(restored.loss_scale.period) == 7


def test_keeps_last_n(tmp_path):
    ck = Checkpointer(tmp_path / "ck", keep=2)
    for i in (1, 2, 3, 4):
        ck.save(i, make_state().replace(step=jnp.int32(i)), {"iteration": i})
    assert ck.all() == [3, 4] and ck.latest() == 4
    state, meta = ck.restore(make_state(), iteration=3)
    assert int(state.step) == 3 and meta["iteration"] == 3
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpointer(tmp_path / "empty").restore(make_state())


def test_killed_while_saving_leaves_only_complete_checkpoints(tmp_path):
    """SIGKILL a process that saves a large state in a loop; every listed checkpoint must restore."""
    directory = tmp_path / "ck"
    script = textwrap.dedent(f"""
        import jax.numpy as jnp, optax
        from jaxrl_fp16.checkpoint import Checkpointer
        from jaxrl_fp16.loss_scale import NoOpLossScale
        from jaxrl_fp16.step import TrainState
        params = {{"w": jnp.ones((1024, 1024))}}
        ck = Checkpointer({str(directory)!r}, keep=3)
        i = 0
        while True:
            i += 1
            state = TrainState.create({{"w": params["w"] * i}}, optax.sgd(0.1), NoOpLossScale())
            ck.save(i, state, {{"iteration": i}})
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # let a few checkpoints complete, then kill it at a random moment of a save
            assert proc.stdout.readline()
        time.sleep(np.random.default_rng().uniform(0.0, 0.3))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    import optax as _optax

    from jaxrl_fp16.loss_scale import NoOpLossScale

    like = TrainState.create({"w": jnp.zeros((1024, 1024))}, _optax.sgd(0.1), NoOpLossScale())
    ck = Checkpointer(directory, keep=3)
    steps = ck.all()
    # keep=3, plus possibly one more when the kill came after a save and before the oldest was deleted.
    assert steps and len(steps) <= 4
    for i in steps:
        state, meta = ck.restore(like, iteration=i)
        assert meta["iteration"] == i
        np.testing.assert_array_equal(np.asarray(state.params["w"]), np.full((1024, 1024), float(i)))
    assert not [d for d in os.listdir(directory) if d.isdigit() and int(d) not in steps]
