"""`rl.loop`: fault injection around the jitted update step, and the shared loop (metrics log, checkpoint
cadence, a stop signal ending it with a checkpoint)."""

import json
import os
import signal

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_fp16.loss_scale import DynamicLossScale
from jaxrl_fp16.rl.loop import export_final, inject_overflows, poisoned, run_loop
from jaxrl_fp16.rl.rundir import Interrupted
from jaxrl_fp16.step import TrainState, make_train_step


def _mse(params, batch):
    err = batch["x"] @ params["w"] - batch["y"]
    return jnp.mean(jnp.square(err)), {}


def _batch(seed):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((8, 3)).astype(np.float32), "y": rng.standard_normal(8).astype(np.float32),
            "ids": np.arange(8, dtype=np.int32)}


def test_poisoned_makes_floating_entries_nan_and_keeps_the_rest():
    batch = {**_batch(0), "dev": jnp.ones((2,), jnp.float16)}
    out = poisoned(batch)
    assert isinstance(out["x"], np.ndarray) and np.isnan(out["x"]).all() and np.isnan(out["y"]).all()
    assert out["ids"] is batch["ids"]
    assert out["dev"].dtype == jnp.float16 and bool(jnp.isnan(out["dev"]).all())


def test_injected_steps_are_skipped_and_back_off_the_loss_scale():
    optimizer = optax.sgd(0.1)
    step_fn = make_train_step(_mse, optimizer, "fp16-mixed", max_grad_norm=None)
    update = inject_overflows(step_fn, [1])
    state = TrainState.create({"w": jnp.ones((3,), jnp.float32)}, optimizer, DynamicLossScale(2.0 ** 10))
    skipped, params = [], []
    for i in range(3):
        before = np.asarray(state.params["w"])
        state, metrics = update(state, _batch(i))
        skipped.append(int(metrics["skipped"]))
        params.append(not np.array_equal(before, np.asarray(state.params["w"])))
    assert skipped == [0, 1, 0] and params == [True, False, True]
    assert float(state.loss_scale.loss_scale) == 2.0 ** 9 and int(state.skipped_steps) == 1
    assert step_fn._cache_size() == 1  # the poisoned batch has the clean one's shapes: no second compile
    assert inject_overflows(step_fn, []) is step_fn


def test_an_injection_the_loss_ignores_is_refused():
    optimizer = optax.sgd(0.1)
    step_fn = make_train_step(lambda p, b: (jnp.sum(jnp.square(p["w"])), {}), optimizer, "fp32")
    state = TrainState.create({"w": jnp.ones((3,), jnp.float32)}, optimizer, DynamicLossScale(2.0 ** 10))
    with pytest.raises(RuntimeError, match="debug.inject_overflow_steps: optimizer step 0 had finite gradients"):
        inject_overflows(step_fn, [0])(state, _batch(0))


def test_the_loop_logs_checkpoints_on_its_cadence_and_stops_on_a_signal(tmp_path):
    saved = []

    def one(i):
        if i == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # taken by the loop's handler: it stops after this iteration
        return {"step": i + 1, "value": float(i)}

    with pytest.raises(Interrupted, match=r"stopped by SIGTERM after iteration 3 of 10; checkpoint 3 saved") as e:
        run_loop(one, run_dir=str(tmp_path), start=0, total=10, every=2, save=saved.append, desc="test",
                 progress=False, first={"step": 0, "value": -1.0})
    assert e.value.exit_code == 128 + signal.SIGTERM
    assert saved == [2, 3]
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1, 2, 3]
    # Resumed from checkpoint 2: the lines past it are logged again, the run ends with a checkpoint.
    history = run_loop(lambda i: {"step": i + 1}, run_dir=str(tmp_path), start=2, total=5,
                       every=2, save=saved.append, desc="test", progress=False)
    assert [m["step"] for m in history] == [3, 4, 5] and saved[2:] == [4, 5]
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1, 2, 3, 4, 5]


def test_the_final_export_runs_when_the_run_trained_or_has_none(tmp_path):
    calls = []

    def export(out_dir, overwrite):
        calls.append(out_dir)
        os.makedirs(out_dir, exist_ok=True)

    export_final(str(tmp_path), export, enabled=False, trained=True)
    export_final(str(tmp_path), export, enabled=True, trained=False)  # none yet: exported
    export_final(str(tmp_path), export, enabled=True, trained=False)  # nothing new, one exists: kept
    export_final(str(tmp_path), export, enabled=True, trained=True)
    assert calls == [str(tmp_path / "hf")] * 2
