"""The one module that touches torch: bit-exact conversions and the lazy .bin reader."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxrl_fp16 import torch_bridge  # noqa: E402


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_numpy_to_torch_is_bit_exact(dtype):
    x = (np.random.RandomState(0).randn(5, 7) * 100).astype(dtype)
    t = torch_bridge.numpy_to_torch(x)
    assert str(t.dtype).removeprefix("torch.") == np.dtype(dtype).name
    back = t.view(torch.int16).numpy() if t.element_size() == 2 else t.view(torch.int32).numpy()
    np.testing.assert_array_equal(back, x.view(np.int16 if x.itemsize == 2 else np.int32))


def test_jax_to_torch_and_state_dict_round_trip(tmp_path):
    x = jnp.arange(12, dtype=jnp.float16).reshape(3, 4)
    t = torch_bridge.jax_to_torch(x)
    np.testing.assert_array_equal(t.numpy(), np.asarray(x))
    path = tmp_path / "w.bin"
    torch.save({"a": torch.ones(2, 3, dtype=torch.bfloat16), "step": 3}, path)
    sd = torch_bridge.load_state_dict(str(path))
    assert torch_bridge.tensor_shapes(sd) == {"a": (2, 3)}
    assert torch_bridge.is_float_tensor(sd["a"])
    out = torch_bridge.to_float32_numpy(sd["a"])
    assert out.dtype == np.float32 and np.all(out == 1)


def test_seeded_and_scale_parameter():
    with torch_bridge.seeded(3):
        a = torch.randn(4)
    with torch_bridge.seeded(3):
        b = torch.nn.Parameter(torch.randn(4))
    torch_bridge.scale_parameter(b, 2.0)
    np.testing.assert_array_equal(b.detach().numpy(), 2 * a.numpy())
    assert not b.grad_fn
