"""Everything this package does with torch, in one place (torch is optional: it is imported here only, and only
when one of these functions is called).

Used by the `.bin` checkpoint reader, the tiny-model builder and the vLLM weight push.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import numpy as np

__all__ = ["load_state_dict", "is_float_tensor", "tensor_shapes", "to_float32_numpy", "numpy_to_torch",
           "jax_to_torch", "cuda_available", "empty_cuda_cache", "seeded", "scale_parameter"]


def _torch():
    import torch

    return torch


def load_state_dict(path: str) -> Mapping[str, Any]:
    """A `pytorch_model*.bin` state dict, loaded with `weights_only=True` and memory-mapped when possible."""
    torch = _torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def tensor_shapes(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    torch = _torch()
    return {name: tuple(t.shape) for name, t in state_dict.items() if torch.is_tensor(t)}


def is_float_tensor(t: Any) -> bool:
    return bool(t.is_floating_point())


def to_float32_numpy(t: Any) -> np.ndarray:
    return t.detach().to(_torch().float32).numpy()


def numpy_to_torch(array: np.ndarray) -> Any:
    """A torch tensor sharing `array`'s memory (bfloat16 through its bit pattern: numpy has no such dtype)."""
    torch = _torch()
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def jax_to_torch(x: Any) -> Any:
    """A torch tensor on the same device as the JAX array `x`, by DLPack (no host copy)."""
    return _torch().from_dlpack(x)


def cuda_available() -> bool:
    return bool(_torch().cuda.is_available())


def empty_cuda_cache() -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seeds torch's global generator (what transformers' random initialisation draws from)."""
    _torch().manual_seed(seed)
    yield


def scale_parameter(param: Any, factor: float) -> None:
    """Multiplies a torch parameter in place, outside autograd."""
    with _torch().no_grad():
        param.mul_(float(factor))
