"""The GPU plan (`jaxrl_fp16.gpu_host`): the memory split between JAX and vLLM, the engine's config keys, the
trainer's devices beside an engine with GPUs of its own, applying the plan, and `jaxrl-fp16 train` refusing shares
that do not fit."""

import ast
import inspect
import os
import subprocess
import sys

import pytest

from jaxrl_fp16 import cli, gpu_host
from jaxrl_fp16.config import ConfigError, SamplerSection, load_config
from jaxrl_fp16.gpu_host import (JAX_FRACTION_ENV, PREALLOCATE_ENV, apply_gpu_plan, count_gpus, gpu_plan,
                                 jax_visible_devices, memory_split)
from jaxrl_fp16.sampling.options import VLLMOptions, default_max_model_len, engine_memory_utilization

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----- the memory split -----

def test_jax_takes_what_vllm_and_the_margin_leave():
    assert memory_split(0.35, None) == pytest.approx(0.6)
    assert memory_split(0.5, None) == pytest.approx(0.45)
    assert memory_split(0.35, "0.5") == 0.5  # the user's, when it fits
    assert memory_split(0.35, ".6") == 0.6


def test_shares_that_do_not_fit_the_card_are_refused_naming_both():
    with pytest.raises(ConfigError, match=rf"sampler.gpu_memory_utilization=0.35 and {JAX_FRACTION_ENV}=0.7 take "
                                          r"1.05 of each GPU"):
        memory_split(0.35, "0.7")
    with pytest.raises(ConfigError, match=rf"sampler.gpu_memory_utilization=0.95 leaves JAX 0.00 .*"
                                          rf"{JAX_FRACTION_ENV}"):
        memory_split(0.95, None)
    with pytest.raises(ConfigError, match=rf"{JAX_FRACTION_ENV}='lots' must be a fraction in \(0, 1\]"):
        memory_split(0.35, "lots")
    with pytest.raises(ConfigError, match=rf"{JAX_FRACTION_ENV}='0' must be a fraction"):
        memory_split(0.35, "0")


def test_the_plan_of_each_sampler_setup():
    plan = gpu_plan(SamplerSection(name="jax"), {})
    assert plan.engine_fraction is None and not plan.env and plan.jax_visible is None
    plan = gpu_plan(SamplerSection(name="vllm"), {})
    assert plan.shares_gpu and plan.engine_fraction == 0.35 and plan.env == {JAX_FRACTION_ENV: "0.6"}
    plan = gpu_plan(SamplerSection(name="vllm", gpu_memory_utilization=0.25), {JAX_FRACTION_ENV: "0.5"})
    assert plan.jax_fraction == 0.5 and plan.jax_fraction_source == "user" and plan.env == {}
    plan = gpu_plan(SamplerSection(name="vllm", devices=[0]), {}, gpu_count=4)
    assert not plan.shares_gpu and plan.engine_fraction == 0.9 and plan.jax_visible == "1,2,3" and not plan.env
    plan = gpu_plan(SamplerSection(name="vllm", tensor_parallel_size=2, devices=[3, 1]), {}, gpu_count=4)
    assert plan.jax_visible == "0,2"
    plan = gpu_plan(SamplerSection(name="vllm", devices=[0]), {}, gpu_count=None)  # JAX cannot be kept off GPU 0
    assert plan.jax_visible is None and plan.env == {PREALLOCATE_ENV: "false"}
    assert gpu_plan(SamplerSection(name="vllm", devices=[0]), {PREALLOCATE_ENV: "true"}).env == {}


def test_engine_devices_must_be_visible_and_leave_one_for_the_trainer():
    with pytest.raises(ConfigError, match=r"sampler.devices=\[2\]: GPU 2 is not one of the 2 visible GPUs"):
        jax_visible_devices([2], 2)
    with pytest.raises(ConfigError, match=r"sampler.devices=\[0\] takes all 1 visible GPUs"):
        gpu_plan(SamplerSection(name="vllm", devices=[0]), {}, gpu_count=1)


def test_gpus_are_counted_without_starting_cuda(tmp_path):
    assert count_gpus({"CUDA_VISIBLE_DEVICES": "0,1,3"}) == 3
    assert count_gpus({"CUDA_VISIBLE_DEVICES": "GPU-4a1b,GPU-77c2"}) == 2
    assert count_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert count_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == 1  # CUDA stops at an invalid entry
    for bus in ("0000:17:00.0", "0000:65:00.0"):
        (tmp_path / bus).mkdir()
    assert count_gpus({}, proc_dir=str(tmp_path)) == 2
    assert count_gpus({}, proc_dir=str(tmp_path / "absent")) is None


# ----- the engine's config keys -----

def test_vllm_engine_keys_need_the_vllm_sampler():
    for key, value in [("gpu_memory_utilization", "0.5"), ("enforce_eager", "true"), ("max_num_seqs", "64"),
                       ("max_model_len", "4096"), ("enable_prefix_caching", "false"), ("devices", "[1]"),
                       ("max_num_batched_tokens", "8192")]:
        with pytest.raises(ConfigError, match=rf"sampler.{key}=.* is a vLLM engine key and needs "
                                              rf"sampler.name=vllm \(got 'jax'\)"):
            load_config(None, [f"sampler.{key}={value}"])


@pytest.mark.parametrize("override, message", [
    ("sampler.gpu_memory_utilization=1.0", r"sampler.gpu_memory_utilization must be in \(0, 1\), got 1.0"),
    ("sampler.gpu_memory_utilization=0", r"sampler.gpu_memory_utilization must be in \(0, 1\), got 0"),
    ("sampler.max_num_seqs=0", r"sampler.max_num_seqs must be > 0, got 0"),
    ("sampler.max_model_len=16", r"sampler.max_model_len=16 leaves no room for a prompt before "
                                 r"sampler.max_new_tokens=16"),
    ("sampler.devices=[1,1]", r"sampler.devices=\[1, 1\] must be distinct GPU ordinals"),
    ("sampler.devices=[0,1]", r"sampler.devices=\[0, 1\] lists 2 GPUs but sampler.tensor_parallel_size=1"),
    ("sampler.enforce_eager=maybe", r"sampler.enforce_eager"),
])
def test_vllm_engine_keys_are_checked_at_load_time(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["sampler.name=vllm", override])


def test_engine_options_carry_the_engine_keys():
    run = load_config(None, ["sampler.name=vllm", "sampler.max_new_tokens=500", "sampler.gpu_memory_utilization=0.3",
                             "sampler.enforce_eager=false", "sampler.max_num_seqs=64", "sampler.tensor_parallel_size=2",
                             "sampler.devices=[2,3]", "sampler.enable_prefix_caching=true"])
    assert run.sampler.engine_options() == VLLMOptions(
        max_model_len=1536, gpu_memory_utilization=0.3, tensor_parallel_size=2, enforce_eager=False, max_num_seqs=64,
        enable_prefix_caching=True, devices=(2, 3))
    assert load_config(None, ["sampler.name=vllm", "sampler.max_model_len=700"]).sampler.engine_options() \
        .max_model_len == 700
    assert default_max_model_len(16) == 1280 and default_max_model_len(8192) == 9216
    assert engine_memory_utilization(None, None) == 0.35 and engine_memory_utilization(None, (1,)) == 0.9
    assert engine_memory_utilization(0.2, (1,)) == 0.2


# ----- the trainer's devices beside an engine with GPUs of its own (5 CPU devices in a subprocess) -----

MESH_CHECK = """
import jax
from jaxrl_fp16.config import load_config
from jaxrl_fp16.rl.trainer import make_run_mesh
from jaxrl_fp16.sampling.options import trainer_devices

assert jax.device_count() == 5
run = load_config(None, ["sampler.name=vllm", "sampler.devices=[2]"])
print([d.id for d in trainer_devices(jax.devices(), run.sampler.devices)])
print([d.id for d in make_run_mesh(run).devices.flat])
shared = load_config(None, ["sampler.name=vllm", "mesh.fsdp=5", "train.prompts_per_iteration=5"])
print([d.id for d in make_run_mesh(shared).devices.flat])
print([d.id for d in trainer_devices(jax.devices(), [2], jax_visible="0,1,3,4")])
try:
    trainer_devices(jax.devices()[2:3], [2])
except ValueError as e:
    print(e)
"""


def test_the_trainers_mesh_leaves_out_the_engines_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=5", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", MESH_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "[0, 1, 3, 4]" and lines[1] == "[0, 1, 3, 4]"  # the mesh spans the trainer's four
    assert lines[2] == "[0, 1, 2, 3, 4]"  # no engine devices: all five
    assert lines[3] == "[0, 1, 2, 3, 4]"  # JAX already restricted to the trainer's GPUs: nothing left out
    assert lines[4].startswith("sampler.devices=[2] leaves none of the 1 devices")


# ----- applying it -----

def test_the_plan_sets_only_what_the_user_left_unset():
    plan = gpu_plan(SamplerSection(name="vllm"), {})
    environ = {"CUDA_VISIBLE_DEVICES": "0"}
    assert apply_gpu_plan(plan, environ) == [f"{JAX_FRACTION_ENV}=0.6"]
    assert environ == {"CUDA_VISIBLE_DEVICES": "0", JAX_FRACTION_ENV: "0.6"}
    assert apply_gpu_plan(gpu_plan(SamplerSection(name="vllm", devices=[0]), {}), {PREALLOCATE_ENV: "true"}) == []
    assert apply_gpu_plan(gpu_plan(SamplerSection(name="jax"), {}), environ) == []


def test_the_gpu_plan_imports_no_tool_and_no_jax_at_module_level():
    tree = ast.parse(inspect.getsource(gpu_host))
    names = [n.module if isinstance(n, ast.ImportFrom) else a.name
             for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names]
    assert not [n for n in names if n and n.startswith("jaxrl_fp16.tools")], names
    top = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
    top += [n.module for n in tree.body if isinstance(n, ast.ImportFrom)]
    assert not [n for n in top if n and n.split(".")[0] in ("jax", "vllm", "torch")], top


def test_train_refuses_shares_that_do_not_fit_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(JAX_FRACTION_ENV, "0.9")
    config = os.path.join(REPO, "configs", "tiny_fp16.yaml")
    assert cli.main(["train", config, "--run-dir", str(tmp_path / "run"), "sampler.name=vllm"]) == 2
    assert f"sampler.gpu_memory_utilization=0.35 and {JAX_FRACTION_ENV}=0.9" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
