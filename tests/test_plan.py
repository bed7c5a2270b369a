"""`jaxrl-fp16 plan` and the trainer's plan-first check: XLA's ahead-of-time memory analysis of the real update
step and scorer, from a folder holding only config.json."""

from __future__ import annotations

import json
import os

import pytest

from jaxrl_fp16 import cli, commands
from jaxrl_fp16.tools import plan, plan_verdict
from jaxrl_fp16.config import load_config
from jaxrl_fp16.memory import DoesNotFitError

CONFIG = "configs/tiny_fp16.yaml"
# A small run: 8 rows per mini-batch, rows of at most 64 tokens (the model's context).
SMALL = ["train.prompts_per_iteration=4", "train.samples_per_prompt=4", "train.minibatches_per_iteration=2",
         "train.microbatches=2", "sampler.max_new_tokens=16"]
TINY_SHAPE = {"model_type": "qwen2", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "tie_word_embeddings": True, "hidden_act": "silu"}
# Far beyond any host: an 8M-token vocabulary x 1024 hidden, untied (17G parameters, ~250 GiB of FP32 state).
HUGE_SHAPE = {**TINY_SHAPE, "vocab_size": 8_000_000, "hidden_size": 1024, "intermediate_size": 1024,
              "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 8,
              "tie_word_embeddings": False}


def _config_folder(path, shape) -> str:
    """A model folder holding config.json and nothing else: no weights, no tokenizer."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(shape, f)
    return str(path)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return _config_folder(tmp_path_factory.mktemp("tiny_config"), TINY_SHAPE)


def _items(result):
    return {k: result["per_device"][k] for k in plan_verdict.ITEMS}


def test_plan_of_a_config_json_folder_fits_and_its_items_sum_to_the_total(tiny_folder, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert sorted(os.listdir(tiny_folder)) == ["config.json"]
    rc = cli.main(["plan", CONFIG, f"model.path={tiny_folder}", *SMALL, "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"fits", "device_bytes", "per_device", "source"}
    assert set(result["per_device"]) == {*plan_verdict.ITEMS, "total"}
    assert result["fits"] is True and result["device_bytes"] > 0
    items = _items(result)
    assert all(items[k] > 0 for k in ("params", "optimizer", "gradients", "activations"))
    assert items["sampler"] == 0  # the JAX sampler on a CPU takes no share of the device
    assert sum(items.values()) == result["per_device"]["total"]
    # FP32 masters of the tiny model: 4 bytes per parameter, all on the one device; Adam's two moments twice that.
    from jaxrl_fp16.models.config import ModelConfig

    n = ModelConfig.from_hf_dir(tiny_folder).num_params()
    assert items["params"] == 4 * n == items["gradients"]
    assert 8 * n <= items["optimizer"] < 8 * n + 1024  # + the loss scale and counters
    assert "memory_analysis" in result["source"] and "64 tokens" in result["source"]
    table = capsys.readouterr().out
    assert "| activations |" in table and "| verdict | fits |" in table


def test_plan_that_does_not_fit_exits_3_naming_the_largest_item(tiny_folder, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = cli.main(["plan", CONFIG, f"model.path={tiny_folder}", *SMALL, "--device-memory-gib", "0.0001",
                   "--json", str(out)])
    assert rc == 3
    result = json.loads(out.read_text())
    assert result["fits"] is False and result["device_bytes"] == int(0.0001 * 2 ** 30)
    largest = max(plan_verdict.ITEMS, key=lambda k: result["per_device"][k])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"the largest item is {largest}" in err
    for key in ("train.microbatches", "model.remat", "mesh.fsdp", "sampler.gpu_memory_utilization"):
        assert key in err


@pytest.mark.slow
def test_more_micro_batches_lower_the_planned_activations(tiny_folder):
    runs = [load_config(CONFIG, [f"model.path={tiny_folder}", *SMALL[:-2], f"train.microbatches={m}",
                                 "sampler.max_new_tokens=16"]) for m in (1, 4)]
    one, four = (plan.plan_run(run, num_devices=1) for run in runs)
    assert one.per_device["params"] == four.per_device["params"]
    assert four.per_device["activations"] < one.per_device["activations"]


def test_plan_width_is_the_prompt_bound_plus_responses_within_the_context(tiny_folder):
    from jaxrl_fp16.models.config import ModelConfig

    cfg = ModelConfig.from_hf_dir(tiny_folder)
    big = plan.model_config(load_config(CONFIG, [f"model.path={tiny_folder}"]))
    assert big == cfg
    long_context = ModelConfig(**{**cfg.__dict__, "max_position_embeddings": 1 << 20})
    run = load_config(CONFIG, ["sampler.max_new_tokens=300"])
    assert plan.plan_width(run, long_context) == 1536  # 1024 prompt tokens + 300, rounded up to 256
    assert plan.plan_width(run, cfg) == 64  # at most the context
    vllm = load_config(CONFIG, ["sampler.name=vllm", "sampler.max_model_len=700", "sampler.max_new_tokens=300"])
    assert plan.plan_width(vllm, long_context) == 700


def test_device_share_is_the_engines_memory_split():
    run = load_config(CONFIG, ["sampler.name=vllm", "sampler.gpu_memory_utilization=0.3"])
    gib = 2 ** 30
    sampler, reserved, _ = plan_verdict.device_share(run, 80 * gib, "gpu", environ={})
    assert sampler == int(0.3 * 80 * gib)
    assert reserved == pytest.approx(0.05 * 80 * gib, abs=1)  # sampling.options.MEMORY_MARGIN
    assert plan_verdict.device_share(run, 80 * gib, "cpu", environ={})[:2] == (0, 0)


def test_the_verdict_is_the_measured_bytes_per_item_without_a_compile():
    shapes = plan_verdict.PlanShapes(mesh={"data": 1, "fsdp": 1, "tensor": 1}, step_rows=8, microbatches=2, width=64,
                                     score_rows=16, score_width=64)
    measured = plan_verdict.Measured(params=100, optimizer=200, gradients=100,
                                     step={"argument": 400, "output": 400, "alias": 400, "temp": 400, "peak": 800},
                                     scorer={"peak": 900, "resident": 400}, shapes=shapes, backend="cpu",
                                     compiled_on="cpu", model_note="attention dense")
    assert plan_verdict.Measured.from_dict(json.loads(json.dumps(measured.to_dict()))) == measured
    run = load_config(CONFIG)
    fits = plan_verdict.make_plan(run, measured, 900)
    # activations: the larger phase's peak (the scorer's) minus params, optimizer and gradients.
    assert dict(fits.per_device) == {"params": 100, "optimizer": 200, "gradients": 100, "activations": 500,
                                     "sampler": 0, "total": 900}
    assert fits.fits and fits.largest == "activations" and "the scorer's peak" in fits.source
    assert "| total | 900 | 0.00 |" in plan_verdict.format_plan(fits, 1)
    short = plan_verdict.make_plan(run, measured, 899)
    assert not short.fits
    with pytest.raises(DoesNotFitError, match="the largest item is activations .* keys that change it: "
                                              "train.microbatches"):
        plan_verdict.check_plan(short)


def test_train_plans_only_large_models_from_a_folder(tiny_folder, tmp_path):
    assert not commands.plan_wanted("auto", load_config(CONFIG))  # the built-in tiny model: no compile added
    assert not commands.plan_wanted("auto", load_config(CONFIG, [f"model.path={tiny_folder}"]))
    huge = _config_folder(tmp_path / "huge", HUGE_SHAPE)
    assert commands.plan_wanted("auto", load_config(CONFIG, [f"model.path={huge}"]))
    assert not commands.plan_wanted("off", load_config(CONFIG, [f"model.path={huge}"]))
    assert commands.plan_wanted("on", load_config(CONFIG, [f"model.path={tiny_folder}"]))


def test_train_refuses_an_oversized_run_before_any_other_work(tmp_path, capsys):
    huge = _config_folder(tmp_path / "huge", HUGE_SHAPE)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    rc = cli.main(["train", CONFIG, f"model.path={huge}", f"model.cache_dir={cache}", *SMALL,
                   "--run-dir", str(run_dir)])
    err = capsys.readouterr().err.strip()
    # Reaching the weights or the tokenizer (the folder has neither) would fail otherwise, with exit 2.
    assert rc == 3, err
    assert err.startswith("jaxrl-fp16 train: error: the run needs") and "the largest item is" in err
    assert not run_dir.exists() and not cache.exists()
    assert sorted(os.listdir(huge)) == ["config.json"]


def test_check_plan_raises_does_not_fit_with_exit_code_3(tiny_folder):
    run = load_config(CONFIG, [f"model.path={tiny_folder}", *SMALL])
    measured = plan.measure(run)
    assert plan_verdict.make_plan(run, measured, 1 << 40).fits
    small = plan_verdict.make_plan(run, measured, 1 << 10)
    with pytest.raises(DoesNotFitError, match="the largest item is") as info:
        plan_verdict.check_plan(small)
    assert info.value.exit_code == plan_verdict.PLAN_EXIT_CODE == 3


@pytest.mark.slow
def test_plan_on_simulated_devices_shards_the_state(tiny_folder, tmp_path):
    """4 devices (a subprocess on simulated CPU devices), the parameters split over mesh.fsdp=4."""
    out = tmp_path / "plan.json"
    rc = cli.main(["plan", CONFIG, f"model.path={tiny_folder}", *SMALL, "mesh.fsdp=4", "mesh.data=1",
                   "--num-devices", "4", "--json", str(out)])
    assert rc == 0
    sharded = json.loads(out.read_text())
    assert sharded["measured"]["shapes"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    one = plan.plan_run(load_config(CONFIG, [f"model.path={tiny_folder}", *SMALL]), num_devices=1)
    assert sharded["per_device"]["params"] < one.per_device["params"] / 2
