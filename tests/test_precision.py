"""Policy grammar (jmp's), presets, casting of floating leaves only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_fp16.precision import PRESETS, Policy, get_policy, half_dtype, parse_dtype

F32, F16, BF16 = np.dtype(jnp.float32), np.dtype(jnp.float16), np.dtype(jnp.bfloat16)


@pytest.mark.parametrize("spec, expected", [
    # The examples of jmp's README and docstrings.
    ("params=float32,compute=float16,output=float32", (F32, F16, F32)),
    ("p=f32,c=f16,o=f32", (F32, F16, F32)),
    ("p=f32,c=bf16,o=f32", (F32, BF16, F32)),
    ("c=f16", (F32, F16, F16)),  # params default to f32, output follows compute
    ("p=f16,c=f16", (F16, F16, F16)),
    ("p=f16,c=bf16", (F16, BF16, BF16)),
    ("p=bf16", (BF16, BF16, BF16)),  # compute follows params
    ("f32", (F32, F32, F32)),
    ("full", (F32, F32, F32)),
    ("bf16", (BF16, BF16, BF16)),
    ("float16", (F16, F16, F16)),
    ("params=float32,compute=half,output=float32", (F32, half_dtype(), F32)),
    (" P = f32 , C = F16 ", (F32, F16, F16)),
])
def test_jmp_grammar(spec, expected):
    p = get_policy(spec)
    assert (p.param_dtype, p.compute_dtype, p.output_dtype) == expected


def test_half_is_float16_off_tpu():
    assert parse_dtype("half") == (BF16 if jax.default_backend() == "tpu" else F16)


@pytest.mark.parametrize("name, expected", [
    ("fp16-mixed", (F32, F16, F32)), ("bf16-mixed", (F32, BF16, F32)), ("fp32", (F32, F32, F32)),
    ("fp16-true", (F16, F16, F16)), ("bf16-true", (BF16, BF16, BF16))])
def test_presets(name, expected):
    p = get_policy(name)
    assert (p.param_dtype, p.compute_dtype, p.output_dtype) == expected


@pytest.mark.parametrize("spec", list(PRESETS) + ["c=f16", "p=bf16,c=f32", "f16", "p=f32,c=half,o=f32"])
def test_str_round_trips(spec):
    p = get_policy(spec)
    assert get_policy(str(p)) == p
    assert str(get_policy(str(p))) == str(p)


def test_str_format():
    assert str(get_policy("fp16-mixed")) == "p=f32,c=f16,o=f32"


@pytest.mark.parametrize("spec, words", [
    ("fp17", ["fp16-mixed", "bf16-mixed", "f32"]),
    ("p=f32,x=f16", ["x=f16", "p|params|c|compute|o|output"]),
    ("p=f32,c=f8", ["f8", "float16", "bfloat16"]),
    ("p=f32,p=f16", ["twice"]),
    ("", ["fp16-mixed"]),
    ("p=f32,,c=f16", ["keys"]),
])
def test_bad_strings_raise_helpful_errors(spec, words):
    with pytest.raises(ValueError) as e:
        get_policy(spec)
    for w in words:
        assert w in str(e.value)


def test_casts_touch_floating_leaves_only():
    p = get_policy("fp16-mixed")
    tree = {"w": jnp.ones((2,), jnp.float32), "ids": jnp.arange(3), "flag": jnp.array([True]),
            "np": np.ones(2, np.float64), "py": 3.0, "none": None}
    out = p.cast_to_compute(tree)
    assert out["w"].dtype == F16 and out["np"].dtype == F16
    assert out["ids"].dtype == jnp.arange(3).dtype and out["flag"].dtype == jnp.bool_
    assert out["py"] == 3.0 and out["none"] is None
    back = p.cast_to_param(out)
    assert back["w"].dtype == F32 and back["ids"].dtype == out["ids"].dtype
    assert p.cast_to_output(out)["w"].dtype == F32


def test_casts_work_under_jit():
    p = get_policy("bf16-mixed")
    out = jax.jit(p.cast_to_compute)({"w": jnp.ones((3,)), "i": jnp.zeros((3,), jnp.int32)})
    assert out["w"].dtype == BF16 and out["i"].dtype == jnp.int32


def test_policy_validates_dtypes():
    with pytest.raises(ValueError, match="unsupported dtype"):
        Policy(np.int32, np.float32, np.float32)
