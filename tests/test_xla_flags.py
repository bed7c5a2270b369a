"""The XLA flags importing jaxrl_fp16 sets for faithful rounding, and that a user's own choice wins."""

import os
import subprocess
import sys

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
