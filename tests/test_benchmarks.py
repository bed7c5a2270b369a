"""The benchmark harness: its records, files and checks (the timings themselves are not asserted)."""

import json

import numpy as np
import pytest

import jaxrl_fp16  # noqa: F401
from benchmarks import __main__ as bench_main
from benchmarks import gpu, models
from benchmarks.common import Comparison, markdown_table, write_results
from benchmarks.decode import prefix_agreement
from jaxrl_fp16.models.tiny import make_tiny


def test_comparison_ratio_is_higher_is_better_for_us():
    faster = Comparison.throughput("decode", 300.0, 100.0, "tokens/s", 1.0)
    assert faster.ratio == pytest.approx(3.0) and faster.met
    slower = Comparison.duration("push", 0.9, 0.3, "s", 1 / 3)  # 3x slower than the floor: exactly on target
    assert slower.ratio == pytest.approx(1 / 3) and slower.met
    missed = Comparison.duration("push", 1.2, 0.3, "s", 1 / 3)
    assert missed.ratio == pytest.approx(0.25) and not missed.met


def test_results_files_and_readme_table(tmp_path):
    results = [Comparison.throughput("decode tiny float16: JAX sampler vs vllm", 2000.0, 1000.0, "tokens/s", 1.0,
                                     peer_name="vllm"),
               Comparison.duration("weight push", 0.5, 0.1, "s", 1 / 3, peer_name="memcpy")]
    machine = {"cpu": "test cpu", "cores": 2, "jax_backend": "cpu", "jax": "0", "date": "2026-01-01"}
    json_path, md_path = write_results(str(tmp_path), results, machine)
    rows = json.loads(open(json_path).read())
    assert [set(r) >= {"name", "ours", "peer", "unit", "ratio", "target", "met"} for r in rows] == [True, True]
    assert [r["met"] for r in rows] == [True, False]
    table = open(md_path).read()
    assert "test cpu" in table and "| 2.00 |" in table and ">= 0.333 |" in table and "**no**" in table

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench_main.START}\nold table\n{bench_main.END}\noutro\n")
    bench_main.update_readme(str(readme), markdown_table(results, machine))
    text = readme.read_text()
    assert "old table" not in text and "JAX sampler vs vllm" in text and text.endswith("outro\n")
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        bench_main.update_readme(str(readme), "table")


def test_prefix_agreement():
    a = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
    b = np.array([[1, 2, 9, 4], [1, 2, 3, 4]])  # row 0 agrees on 2 of 4 tokens (the 4th comes after a split)
    assert prefix_agreement(a, b) == pytest.approx((2 / 4 + 1) / 2)
    assert prefix_agreement(a, a) == 1.0


def test_param_count_matches_the_model(tmp_path):
    from jaxrl_fp16.models.decoder import param_count
    from jaxrl_fp16.models.hf import load_hf_params

    path = make_tiny(tmp_path / "m", "qwen2", hidden_size=64, intermediate_size=96, num_layers=2, num_heads=2,
                     num_kv_heads=1)
    _, params = load_hf_params(path)
    assert models.param_count(path) == param_count(params)


def test_gpu_flops_and_peaks():
    cfg = gpu.model_config("qwen2-0.5b")
    assert 0.45e9 < cfg.num_params() < 0.55e9
    # 6 N + 12 L H T with N the matmul parameters (tied head counted once, norms left out).
    n = cfg.num_params() - cfg.hidden_size * (2 * cfg.num_layers + 1)
    assert gpu.flops_per_token(cfg, 1024) == pytest.approx(6 * n + 12 * 24 * 896 * 1024)
    assert gpu.peak_flops("NVIDIA H100 PCIe") == 756.0e12
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu.peak_flops("NVIDIA H200") == 989.4e12
    assert gpu.peak_flops("cpu") is None


def test_our_step_and_the_pytorch_step_compute_the_same_losses(tmp_path):
    """What the training-step benchmark checks before timing, here in FP32 and FP16 on a tiny model."""
    from benchmarks import train_step
    from benchmarks.peers import TorchTrainStep

    path = make_tiny(tmp_path / "m", "qwen2", num_layers=1)
    for dtype, rtol in (("float32", 1e-5), ("float16", 2e-2)):
        ours = train_step.OurTrainStep(path, dtype)
        peer = TorchTrainStep(path, dtype, lr=train_step.LR, weight_decay=train_step.WEIGHT_DECAY,
                              max_grad_norm=train_step.MAX_GRAD_NORM)
        tokens, mask = train_step.batch(ours.cfg.vocab_size, 2, 32)
        a = [ours.step(tokens, mask) for _ in range(3)]
        b = [peer.step(tokens, mask) for _ in range(3)]
        np.testing.assert_allclose(a, b, rtol=rtol)
        assert a[2] < a[0]  # both really train


@pytest.mark.slow  # four compiles (train and decode, two dtypes)
def test_gpu_script_runs_in_smoke_mode(tmp_path):
    out = gpu.main(["--smoke", "--steps", "1", "--out", str(tmp_path)])
    entry = out["models"]["smoke"]
    for dtype in ("bfloat16", "float16"):
        assert entry["train"][dtype]["tokens_per_s"] > 0 and np.isfinite(entry["train"][dtype]["losses"]).all()
        assert entry["decode"][dtype]["tokens_per_s"] > 0
    written = json.loads(next(tmp_path.glob("gpu_*.json")).read_text())
    assert written["device_kind"] == out["device_kind"]
