"""Orbax checkpoints of the train state: bitwise round trip, keep-last-N, a process killed mid-save, corrupted
checkpoints (named, and the newest one that restores found or taken), a save on a full disk, and left-over
temporary folders."""

import errno
import glob
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_fp16.checkpoint import CheckpointError, Checkpointer
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
        from jaxrl_fp16.checkpoint import CheckpointError, Checkpointer
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


def two_checkpoints(directory):
    """Checkpoints 2 and 4 of two different states, really saved; returns the states."""
    states = {2: make_state(seed=2), 4: make_state(seed=4)}
    ck = Checkpointer(directory, keep=3)
    for i, state in states.items():
        ck.save(i, state, {"iteration": i})
    ck.close()
    return states


def truncate_array_data(folder):
    """Cuts every array-data file of a checkpoint to half its size (what a partial copy or a full disk leaves)."""
    files = [f for f in glob.glob(os.path.join(folder, "state", "**", "d", "*"), recursive=True) if os.path.isfile(f)]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    return files


def test_truncated_array_data_names_the_file_and_the_newest_checkpoint_that_restores(tmp_path, caplog):
    directory = tmp_path / "ck"
    states = two_checkpoints(directory)
    files = truncate_array_data(directory / "4")
    ck = Checkpointer(directory, keep=3)
    with pytest.raises(CheckpointError) as e:
        ck.restore(make_state())
    message = str(e.value)
    assert "\n" not in message and len(message) < 600
    assert message.startswith(f"checkpoint 4 in {directory} does not restore: ")
    assert any(f in message for f in files)  # the data file it could not read
    assert "other checkpoints: 2; the newest that restores is 2" in message
    assert ck.all() == [2, 4]  # an error changes nothing

    with caplog.at_level(logging.WARNING, logger="jaxrl_fp16.checkpoint"):
        state, meta = ck.restore(make_state(), fallback=True)
    assert meta == {"iteration": 2}
    assert_trees_equal(state, states[2])
    warning = [r.getMessage() for r in caplog.records if r.name == "jaxrl_fp16.checkpoint"]
    assert len(warning) == 1 and "checkpoint 4" in warning[0] and "resuming from checkpoint 2" in warning[0]
    assert os.path.isdir(directory / "4.broken") and sorted(os.listdir(directory / "4.broken")) == sorted(
        os.listdir(directory / "2"))  # kept, not deleted
    assert ck.all() == [2]
    ck.save(4, states[4], {"iteration": 4})  # the run saves that iteration again
    assert_trees_equal(ck.restore(make_state())[0], states[4])


def test_garbage_meta_json_names_the_file(tmp_path):
    directory = tmp_path / "ck"
    two_checkpoints(directory)
    meta_file = directory / "4" / "meta" / "metadata"
    assert meta_file.is_file()
    meta_file.write_text("\x00garbage{")
    ck = Checkpointer(directory, keep=3)
    with pytest.raises(CheckpointError, match=f"checkpoint 4 in {directory} does not restore: {meta_file}: not "
                                              f"valid JSON .*the newest that restores is 2"):
        ck.restore(make_state())
    with pytest.raises(CheckpointError, match=f"{meta_file}: not valid JSON"):
        ck.meta(4)
    assert ck.meta(2) == {"iteration": 2}
    # Both broken: said so, each named; nothing to fall back to.
    (directory / "2" / "meta" / "metadata").write_text("")
    with pytest.raises(CheckpointError, match=r"the others do not restore either: 2 \(.*2/meta/metadata"):
        ck.restore(make_state(), fallback=True)


def test_the_wait_for_orbax_threads_takes_threads_that_are_still_starting(monkeypatch):
    """`threading.enumerate` lists threads whose start has not completed; `join` refuses them (RuntimeError). The
    failed-save path waits for such a thread to start, then joins it, and gives up on one that never starts."""
    from jaxrl_fp16.checkpoint import _join_new_threads

    running = threading.Thread(target=time.sleep, args=(0.2,))
    late = threading.Thread(target=time.sleep, args=(0.3,))  # started 0.1 s from now
    never = threading.Thread(target=time.sleep, args=(0.0,))
    running.start()
    starter = threading.Timer(0.1, late.start)
    starter.start()
    monkeypatch.setattr(threading, "enumerate", lambda: [running, late, never])
    t0 = time.monotonic()
    _join_new_threads(set(), timeout=10.0, start_wait=0.5)
    took = time.monotonic() - t0
    starter.join()
    assert late.ident is not None and not running.is_alive() and not late.is_alive()  # both waited for
    assert took < 3.0, took  # the one that never starts cost at most about start_wait


def test_a_save_on_a_full_disk_is_one_line_and_leaves_no_temporary_folder(tmp_path, monkeypatch, capfd):
    """Fault injection: orbax's JSON writer raises ENOSPC, as the OS does on a full disk, in the middle of a
    save (after the array data went to the temporary folder)."""
    import orbax.checkpoint as ocp

    directory = tmp_path / "ck"
    states = two_checkpoints(directory)

    async def disk_full(self, x, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path / "metadata"))

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", disk_full)
    ck = Checkpointer(directory, keep=3)
    with pytest.raises(CheckpointError) as e:
        ck.save(6, make_state(seed=6), {"iteration": 6})
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"could not save checkpoint 6 in {directory}: no space left on device")
    assert "the earlier checkpoints (2, 4) are intact" in message
    assert sorted(os.listdir(directory)) == ["2", "4"]  # its temporary folder removed
    assert "Traceback" not in capfd.readouterr().err  # orbax's own report of it held back
    monkeypatch.undo()
    assert ck.all() == [2, 4]
    assert_trees_equal(ck.restore(make_state())[0], states[4])
    ck.save(6, make_state(seed=6), {"iteration": 6})  # with space again, the same Checkpointer saves
    assert ck.all() == [2, 4, 6]


def test_leftover_temporary_folders_are_removed_on_open(tmp_path):
    directory = tmp_path / "ck"
    two_checkpoints(directory)
    leftover = directory / "6.orbax-checkpoint-tmp-1234567"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "_METADATA").write_text("{}")
    ck = Checkpointer(directory, keep=3)
    assert not leftover.exists()
    assert ck.all() == [2, 4] and sorted(os.listdir(directory)) == ["2", "4"]
