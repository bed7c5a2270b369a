"""The supervised warm start: rounds to a loss target (the first round unchanged by the target, later rounds
restart the schedule, a run that stops above the target says so), the run's forward options, and the base
model's cache key."""

import logging
import os

import jax
import numpy as np
import optax
import pytest

from jaxrl_fp16.config import load_config
from jaxrl_fp16.models.attention import resolve_remat
from jaxrl_fp16.models.hf import load_hf_params
from jaxrl_fp16.models.tiny import make_tiny
from jaxrl_fp16.rl.sft import ModelSection, SFTSection, _restarted, base_model_key, base_model_spec, run_sft
from jaxrl_fp16.rl.tasks import make_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_fp16.yaml")
STEPS = dict(steps=12, batch_size=8, num_problems=32, warmup_steps=2, lr=3e-3)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("sft") / "random", "qwen2", num_layers=1, hidden_size=32,
                     intermediate_size=64, num_heads=2, num_kv_heads=1, max_position_embeddings=64)


@pytest.fixture(scope="module")
def task():
    return make_task("addition", min_digits=1, max_digits=1)


def _weights(path):
    return jax.tree_util.tree_leaves(load_hf_params(str(path))[1])


@pytest.fixture(scope="module")
def one_round(random_model, task, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "plain"
    stats = run_sft(random_model, task, SFTSection(**STEPS), str(out), progress=False)
    return stats, _weights(out)


def test_a_target_met_after_the_first_round_stops_there_with_the_same_weights(random_model, task, tmp_path,
                                                                               one_round):
    plain_stats, plain = one_round
    assert plain_stats["sft/rounds"] == 1 and plain_stats["sft/target_reached"]
    met = plain_stats["sft/loss_window"] * 2  # above the first round's loss: met after it
    stats = run_sft(random_model, task, SFTSection(**STEPS, target_loss=met, max_rounds=3), str(tmp_path / "m"),
                    progress=False)
    assert stats["sft/rounds"] == 1 and stats["sft/target_reached"]
    assert stats["sft/loss_window"] == plain_stats["sft/loss_window"]
    for a, b in zip(plain, _weights(tmp_path / "m")):
        np.testing.assert_array_equal(a, b)


def test_a_missed_target_runs_every_round_and_says_so(random_model, task, tmp_path, one_round, caplog):
    plain_stats, plain = one_round
    missed = plain_stats["sft/loss_window"] / 1e6
    with caplog.at_level(logging.INFO, logger="jaxrl_fp16.rl.sft"):
        stats = run_sft(random_model, task, SFTSection(**STEPS, target_loss=missed, max_rounds=2),
                        str(tmp_path / "m"), progress=False)
    assert stats["sft/rounds"] == 2 and not stats["sft/target_reached"]
    assert stats["sft/loss_window"] > missed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "model.warm_start.target_loss" in warnings[0], warnings
    assert any("round 1" in r.getMessage() and "another round" in r.getMessage() for r in caplog.records)
    assert any((a != b).any() for a, b in zip(plain, _weights(tmp_path / "m")))  # the second round trained


def test_each_round_restarts_the_schedule():
    steps, warmup, lr = 50, 5, 2e-3
    base = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr * 0.1)
    counts = np.arange(3 * steps)
    got = np.array([float(_restarted(base, steps, c)) for c in counts])
    want = np.array([float(base(c % steps)) for c in counts])
    np.testing.assert_array_equal(got, want)
    assert got[steps] == 0.0 and got[steps + warmup] == pytest.approx(lr)  # warmup again from 0 to lr


def test_the_warm_start_runs_the_models_forward_options(random_model, task, tmp_path):
    # cuDNN's fused attention does not exist on a CPU: refused at the first step, so it is what the step runs.
    with pytest.raises(ValueError, match="model.attention='cudnn' needs a GPU"):
        run_sft(random_model, task, SFTSection(**STEPS), str(tmp_path / "m"), forward=ModelSection(attention="cudnn"),
                progress=False)
    lm = ModelSection(remat="dots", attention="blockwise", attention_block=16, layer_loop="unrolled").causal_lm(
        load_hf_params(random_model)[0], "float32")
    assert (lm.remat, lm.attention, lm.attention_block, lm.unroll) == ("dots", "blockwise", 16, True)


def test_the_base_model_key_covers_the_warm_start_and_the_forward():
    def key(*overrides):
        return base_model_key(load_config(TINY, list(overrides)))

    plain = key()
    here = resolve_remat("auto", backend=jax.default_backend())
    assert base_model_spec(load_config(TINY, []))["forward"]["remat"] == here  # "auto" resolved
    assert key(f"model.remat={here}") == plain  # what "auto" runs here: the same base
    remats = [key(f"model.remat={kind}") for kind in ("none", "dots", "full") if kind != here]
    others = [*remats, key("model.layer_loop=unrolled"),
              key("model.attention=blockwise"), key("model.attention_block=64"), key("model.warm_start.steps=7"),
              key("model.warm_start.target_loss=0.1"), key("model.tiny.seed=3"), key("task.options.max_digits=3")]
    assert len({plain, *others}) == len(others) + 1
    assert key("model.cache_dir=elsewhere") == plain and key("optim.lr=0.5") == plain  # not the base's business


def test_the_recorded_warm_start_result_is_read_back_or_empty(tmp_path):
    from jaxrl_fp16.rl.sft import warm_start_result

    (tmp_path / "base_model_spec.json").write_text('{"version": 2, "warm_start_result": {"sft/rounds": 2}}')
    assert warm_start_result(str(tmp_path)) == {"sft/rounds": 2}
    (tmp_path / "base_model_spec.json").write_text('{"version": 2, "warm_st')  # cut short
    assert warm_start_result(str(tmp_path)) == {}
    assert warm_start_result(str(tmp_path / "elsewhere")) == {}
