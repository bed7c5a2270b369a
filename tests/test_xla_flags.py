"""The XLA flags importing jaxrl_fp16 sets for faithful rounding and GPU determinism, and that a user's own choice
wins."""

import os
import subprocess
import sys

import pytest

from jaxrl_fp16 import _xla_flags


def test_by_default_only_excess_precision_is_switched_off(monkeypatch):
    monkeypatch.delenv(_xla_flags.STRICT_ENV, raising=False)
    monkeypatch.setattr(_xla_flags, "_jaxlib_minor", lambda: (0, 10))
    assert _xla_flags._wanted("") == ["--xla_allow_excess_precision=false"]


def test_strict_rounding_also_switches_off_ynn_fusions(monkeypatch):
    monkeypatch.setenv(_xla_flags.STRICT_ENV, "1")
    monkeypatch.setattr(_xla_flags, "_jaxlib_minor", lambda: (0, 10))
    assert _xla_flags._wanted("") == ["--xla_allow_excess_precision=false", "--xla_cpu_experimental_ynn_fusion_type="]


def test_the_users_flags_win(monkeypatch):
    monkeypatch.setenv(_xla_flags.STRICT_ENV, "1")
    monkeypatch.setattr(_xla_flags, "_jaxlib_minor", lambda: (0, 10))
    assert _xla_flags._wanted("--xla_allow_excess_precision=true") == ["--xla_cpu_experimental_ynn_fusion_type="]
    assert _xla_flags._wanted("--xla_cpu_experimental_ynn_fusion_type=+x") == ["--xla_allow_excess_precision=false"]


def test_the_ynn_flag_only_where_xla_knows_it(monkeypatch):
    """XLA aborts on a flag it does not know: outside the tested jaxlib range the flag is not set."""
    monkeypatch.setenv(_xla_flags.STRICT_ENV, "1")
    for version in [(0, 9), (0, 11), None]:
        monkeypatch.setattr(_xla_flags, "_jaxlib_minor", lambda v=version: v)
        assert _xla_flags._wanted("") == ["--xla_allow_excess_precision=false"]


def test_a_fresh_strict_process_gets_the_flags_and_starts():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env[_xla_flags.STRICT_ENV] = "1"
    code = "import jaxrl_fp16, os, jax; jax.numpy.zeros(1).block_until_ready(); print(os.environ['XLA_FLAGS'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "--xla_allow_excess_precision=false" in out
    jaxlib = _xla_flags._jaxlib_minor()
    if jaxlib is not None and _xla_flags.YNN_JAXLIB[0] <= jaxlib < _xla_flags.YNN_JAXLIB[1]:
        assert "--xla_cpu_experimental_ynn_fusion_type=" in out


# ----- GPU determinism (debug.deterministic / JAXRL_FP16_DETERMINISTIC) -----

def test_determinism_adds_the_gpu_flag_after_the_rounding_flags():
    assert _xla_flags.compose_flags("", strict_rounding=True, deterministic_ops=True, jaxlib=(0, 10)) == [
        "--xla_allow_excess_precision=false", "--xla_cpu_experimental_ynn_fusion_type=",
        "--xla_gpu_deterministic_ops=true"]
    assert _xla_flags.compose_flags("", strict_rounding=False, deterministic_ops=False, jaxlib=(0, 10)) == [
        "--xla_allow_excess_precision=false"]


def test_determinism_leaves_a_flag_the_user_set_and_knows_the_last_value_wins():
    flags = "--xla_gpu_deterministic_ops=false --xla_allow_excess_precision=true"
    assert _xla_flags.compose_flags(flags, strict_rounding=False, deterministic_ops=True, jaxlib=(0, 10)) == []
    assert _xla_flags.flag_value("--xla_gpu_deterministic_ops=false --xla_gpu_deterministic_ops",
                                 _xla_flags.DETERMINISTIC_FLAG) == "true"
    assert _xla_flags.flag_value("--xla_gpu_deterministic_ops_x=1", _xla_flags.DETERMINISTIC_FLAG) is None


def test_the_removed_reductions_flag_is_never_set():
    """XLA dropped --xla_gpu_deterministic_reductions (jaxlib 0.10 aborts on it): only the ops flag is used."""
    out = _xla_flags.compose_flags("", strict_rounding=True, deterministic_ops=True, jaxlib=None)
    assert "--xla_gpu_deterministic_ops=true" in out
    assert not any("deterministic_reductions" in f for f in out)


def test_the_environment_variable_turns_determinism_on(monkeypatch):
    monkeypatch.setattr(_xla_flags, "_jaxlib_minor", lambda: (0, 10))
    monkeypatch.delenv(_xla_flags.STRICT_ENV, raising=False)
    monkeypatch.setenv(_xla_flags.DETERMINISTIC_ENV, "1")
    assert _xla_flags._wanted("") == ["--xla_allow_excess_precision=false", "--xla_gpu_deterministic_ops=true"]
    monkeypatch.setenv(_xla_flags.DETERMINISTIC_ENV, "0")
    assert _xla_flags._wanted("") == ["--xla_allow_excess_precision=false"]


def test_a_contrary_flag_is_refused_by_name():
    environ = {"XLA_FLAGS": "--xla_gpu_deterministic_ops=false"}
    message = r"debug.deterministic=true.*--xla_gpu_deterministic_ops=false"
    with pytest.raises(_xla_flags.DeterminismError, match=message):
        _xla_flags.enable_deterministic(environ=environ)
    assert _xla_flags.DETERMINISTIC_ENV not in environ


def test_after_a_cpu_backend_started_determinism_is_noted_not_refused():
    """In this test process JAX runs on the CPU (started by now): XLA:CPU is deterministic, the flag is for GPUs."""
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("JAX runs on an accelerator here: enable_deterministic refuses once its backend started")
    jax.numpy.zeros(1).block_until_ready()
    assert "cpu" in _xla_flags.started_backends()
    environ = {"XLA_FLAGS": "--xla_allow_excess_precision=false"}
    assert _xla_flags.enable_deterministic(environ=environ) == []
    assert environ == {"XLA_FLAGS": "--xla_allow_excess_precision=false", _xla_flags.DETERMINISTIC_ENV: "1"}


def test_the_config_key_is_a_bool():
    from jaxrl_fp16.config import ConfigError, load_config

    assert load_config(None, ["debug.deterministic=true"]).debug.deterministic is True
    assert load_config(None, []).debug.deterministic is False
    with pytest.raises(ConfigError, match="debug.deterministic"):
        load_config(None, ["debug.deterministic=sometimes"])


def test_a_run_built_from_python_applies_the_config_key(tmp_path, monkeypatch):
    """The RL and DPO trainers start with `loop.begin_run`, which applies `debug.deterministic` as the CLI does
    before JAX starts: from Python, the key sets the engine's variable, and a contrary flag is refused by name
    before anything is written."""
    from jaxrl_fp16.config import load_config
    from jaxrl_fp16.rl.loop import begin_run
    from jaxrl_fp16.rl.rundir import ResumeOptions

    def begin(name: str, *overrides: str) -> None:
        begin_run(str(tmp_path / name), load_config(None, list(overrides)), resume=False, options=ResumeOptions(),
                  silent=())

    monkeypatch.delenv(_xla_flags.DETERMINISTIC_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored: a flag added never outlives it
    begin("off")
    assert _xla_flags.DETERMINISTIC_ENV not in os.environ
    begin("on", "debug.deterministic=true")
    assert os.environ[_xla_flags.DETERMINISTIC_ENV] == "1"
    monkeypatch.delenv(_xla_flags.DETERMINISTIC_ENV)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=false")
    with pytest.raises(_xla_flags.DeterminismError, match="debug.deterministic=true.*=false"):
        begin("contrary", "debug.deterministic=true")
    assert not (tmp_path / "contrary").exists()


def _effective_debug_options(dump: str) -> str:
    """The non-default XLA debug options of the dumped train step (XLA writes them next to the HLO)."""
    files = [f for f in os.listdir(dump) if f.endswith(".debug_options")]
    assert files, f"no debug options dumped in {dump}: {sorted(os.listdir(dump))[:5]}"
    with open(os.path.join(dump, files[0])) as f:
        return f.read()


def test_the_config_key_reaches_xla_before_jax_starts(tmp_path):
    """`jaxrl-fp16 sft ... debug.deterministic=true` with the flag nowhere in the environment: XLA compiled the
    train step with xla_gpu_deterministic_ops on (its dumped debug options say so), so the CLI set XLA_FLAGS
    after reading the config and before JAX read it."""
    env = {k: v for k, v in os.environ.items() if k not in (_xla_flags.DETERMINISTIC_ENV,)}
    env["XLA_FLAGS"] = f"--xla_dump_to={tmp_path / 'dump'} --xla_dump_hlo_module_re=train_step"
    cli = os.path.join(os.path.dirname(sys.executable), "jaxrl-fp16")
    cmd = [cli, "sft", os.path.join(os.path.dirname(_xla_flags.__file__), "presets", "tiny.yaml"),
           f"model.cache_dir={tmp_path / 'cache'}", "model.warm_start.steps=1", "model.tiny.num_layers=1",
           "--out", str(tmp_path / "out"), "debug.deterministic=true"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    options = _effective_debug_options(str(tmp_path / "dump"))
    assert "xla_gpu_deterministic_ops: true" in options
    assert "xla_allow_excess_precision: false" in options


def test_the_cli_refuses_a_contrary_flag_in_one_line(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_gpu_deterministic_ops=false")
    cli = os.path.join(os.path.dirname(sys.executable), "jaxrl-fp16")
    cmd = [cli, "sft", os.path.join(os.path.dirname(_xla_flags.__file__), "presets", "tiny.yaml"),
           f"model.cache_dir={tmp_path / 'cache'}", "--out", str(tmp_path / "out"), "debug.deterministic=true"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "jaxrl-fp16 sft: error: debug.deterministic=true but XLA_FLAGS sets --xla_gpu_deterministic_ops=false: "
        "remove it from XLA_FLAGS or set it to true"]
    assert not (tmp_path / "cache").exists()
