"""`pytest --compile-times=PATH` (tests/compile_times.py): per-test compile seconds, gathered from xdist workers."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow  # a pytest run with two workers, each importing JAX
def test_compile_times_are_recorded_per_test_across_workers(tmp_path):
    (tmp_path / "test_a.py").write_text(textwrap.dedent("""
        import jax, jax.numpy as jnp

        def test_compiles():
            assert float(jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.ones((7, 5))).sum()) > 0

        def test_plain_python():
            assert sum(range(4)) == 6
        """))
    (tmp_path / "test_b.py").write_text("def test_other_file():\n    assert True\n")
    out = tmp_path / "times.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    env["PYTHONPATH"] = os.pathsep.join([TESTS, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "compile_times", "-n", "2", "--dist",
                           "loadfile", "--compile-times", str(out), "-p", "no:cacheprovider", "test_a.py",
                           "test_b.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["tests"]
    assert set(rows) == {"test_a.py::test_compiles", "test_a.py::test_plain_python", "test_b.py::test_other_file"}
    compiled = rows["test_a.py::test_compiles"]
    assert compiled["compiles"] >= 1 and 0 < compiled["compile_s"] <= compiled["wall_s"]
    assert rows["test_a.py::test_plain_python"]["compiles"] == 0
    assert rows["test_b.py::test_other_file"]["compiles"] == 0 == rows["test_b.py::test_other_file"]["compile_s"]
    assert "3 tests:" in proc.stdout and "compiling" in proc.stdout and "test_a.py" in proc.stdout
