"""Everything this package does with torch, in one place (torch is optional: it is imported here only, and only
when one of these functions is called).

Used by the `.bin` checkpoint reader, the tiny-model builder, the vLLM weight push and the transformers sampler.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

__all__ = ["load_state_dict", "is_float_tensor", "tensor_shapes", "to_float32_numpy", "numpy_to_torch",
           "numpy_view", "jax_to_torch", "bits_equal", "as_parameter", "copy_into", "cuda_available",
           "empty_cuda_cache", "seeded", "scale_parameter", "load_causal_lm", "copy_numpy_weights",
           "generate_with_logprobs"]


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


def numpy_view(array: np.ndarray) -> Any:
    """`numpy_to_torch` for a tensor that is only read: a read-only array (a memory-mapped checkpoint) is shared
    without torch's warning that writing to it is undefined."""
    if array.flags.writeable:
        return numpy_to_torch(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return numpy_to_torch(array)


def jax_to_torch(x: Any) -> Any:
    """A torch tensor on the same device as the JAX array `x`, by DLPack (no host copy)."""
    return _torch().from_dlpack(x)


def bits_equal(a: Any, b: Any) -> bool:
    """Whether two torch tensors of one dtype and shape hold the same bits (NaN payloads and signed zeros count)."""
    torch = _torch()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool(torch.equal(a.contiguous().view(ints), b.to(a.device).contiguous().view(ints)))


def as_parameter(tensor: Any) -> Any:
    """`tensor` as a `torch.nn.Parameter` without gradient (what vLLM's layers hold), sharing its memory."""
    return _torch().nn.Parameter(tensor, requires_grad=False)


def copy_into(dst: Any, src: Any) -> None:
    """`dst[...] = src` for torch tensors of one shape; a `src` of another dtype is cast to `dst`'s as it is copied
    (torch's conversion: round to nearest even, numpy's and XLA's bits). Between CPU tensors of one dtype the copy
    goes through numpy on this thread: torch's parallel copy starts its thread pool for each call, which costs
    milliseconds per tensor when the pool's threads wait for a busy core (measured inside a vLLM CPU engine's
    process: 3 ms per tensor). A cast goes through torch (numpy's FP32 -> FP16 cast is ten times slower)."""
    if dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype:
        np.copyto(_numpy_bits(dst), _numpy_bits(src))
    else:
        dst.copy_(src)


def _numpy_bits(t: Any) -> np.ndarray:
    """A numpy view of a CPU tensor's memory (bfloat16, which numpy lacks, as its 16-bit pattern)."""
    return t.view(_torch().int16).numpy() if t.dtype == _torch().bfloat16 else t.numpy()


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


# ----- the transformers sampler's torch side -----

_MODEL_DTYPES = ("float32", "float16", "bfloat16")


def load_causal_lm(model_dir: str, dtype: str, *, device: str | None = None,
                   attn_implementation: str | None = None) -> Any:
    """transformers' AutoModelForCausalLM from `model_dir` in `dtype` on `device` (default: CUDA when available,
    else the CPU), in eval mode without gradients, with a blank generation config: sampling then follows the
    caller's arguments alone, not the checkpoint's generation_config.json defaults (top-k 20, temperature 0.7...)."""
    torch = _torch()
    from transformers import AutoModelForCausalLM, GenerationConfig

    if dtype not in _MODEL_DTYPES:
        raise ValueError(f"dtype={dtype!r}; valid: {', '.join(_MODEL_DTYPES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), **kwargs)
    model.to(device).eval().requires_grad_(False)
    model.generation_config = GenerationConfig()
    return model


def copy_numpy_weights(module: Any, weights: Iterable[tuple[str, np.ndarray]]) -> list[str]:
    """Copies (state-dict name, numpy array) pairs into `module`'s parameters and buffers, strictly.

    Every entry of the module's state dict must be given (a tied parameter through any one of its names), every
    given name must exist and every shape must match; a ValueError names the first offending key. All of it is
    checked before the first copy, so a refused push leaves the module as it was. Values are cast to each
    tensor's dtype and moved to its device. Returns the names copied, in the order given.
    """
    torch = _torch()
    arrays: dict[str, np.ndarray] = {}
    for name, array in weights:
        if name in arrays:
            raise ValueError(f"weight {name} is given twice")
        arrays[name] = array
    state = module.state_dict(keep_vars=True)
    unknown = [name for name in arrays if name not in state]
    if unknown:
        raise ValueError(f"the model has no tensor named {unknown[0]} (unexpected keys: {', '.join(unknown)})")
    aliases: dict[int, list[str]] = {}  # tied parameters appear in the state dict under each of their names
    for name, tensor in state.items():
        aliases.setdefault(id(tensor), []).append(name)
    missing = [names[0] for names in aliases.values() if not any(n in arrays for n in names)]
    if missing:
        raise ValueError(f"the weights lack {missing[0]} (missing keys: {', '.join(missing)})")
    for name, array in arrays.items():
        if tuple(array.shape) != tuple(state[name].shape):
            raise ValueError(f"weight {name} has shape {tuple(array.shape)}, the model's is "
                             f"{tuple(state[name].shape)}")
    with torch.no_grad():
        for name, array in arrays.items():
            state[name].copy_(numpy_to_torch(np.ascontiguousarray(array)))
    return list(arrays)


class _SampledTokenLogprobs:
    """The last logits processor of a `generate` call: keeps log-softmax of the final (processed) scores of a step
    and, once the token drawn from them is known (the next step's input, or the output), its entry.

    One [B, V] block is alive at a time, where `output_scores=True` would keep [B, V] for every step.
    """

    def __init__(self, prompt_width: int):
        self.prompt_width = prompt_width
        self.pending = None
        self.taken: list[Any] = []

    def _take(self, tokens_B: Any) -> None:
        self.taken.append(self.pending.gather(-1, tokens_B[:, None])[:, 0])
        self.pending = None

    def __call__(self, input_ids_BxT: Any, scores_BxV: Any) -> Any:
        if self.pending is not None:
            self._take(input_ids_BxT[:, -1])
        self.pending = _torch().log_softmax(scores_BxV.float(), dim=-1)
        return scores_BxV

    def finish(self, sequences_BxT: Any) -> Any:
        """[B, n] log-probs of the n generated tokens of `sequences_BxT` (prompt width first)."""
        n = sequences_BxT.shape[1] - self.prompt_width
        if self.pending is not None and len(self.taken) < n:
            self._take(sequences_BxT[:, self.prompt_width + len(self.taken)])
        if len(self.taken) < n:
            raise RuntimeError(f"generate produced {n} tokens but scored {len(self.taken)}")
        return _torch().stack(self.taken[:n], dim=1)


def generate_with_logprobs(model: Any, prompt_BxP: np.ndarray, mask_BxP: np.ndarray, *, max_new_tokens: int,
                           temperature: float, top_k: int, top_p: float, stop_token_ids: Sequence[int],
                           pad_token_id: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' `generate` on a left-padded batch, with the log-prob of every sampled token.

    The sampling transforms are transformers' own warpers in vLLM's order, on FP32 logits: / temperature, top-k,
    top-p; the log-prob is log-softmax of their output (the renormalised distribution the token was drawn from).
    `temperature <= 0` is greedy: argmax, and log-softmax of the untempered logits (no filter applies). A row
    ends after its first stop token and is filled with `pad_token_id` until every row has ended or
    `max_new_tokens` were generated. Randomness: torch's default generator seeded with `seed` inside `fork_rng`,
    so a seed reproduces the call and the caller's global RNG state is left as it was.

    Returns:
      (tokens [B, n] int64, log-probs [B, n] float32), n <= max_new_tokens the number of generation steps run.
    """
    torch = _torch()
    from transformers import (GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    greedy = temperature <= 0
    processors: list[Any] = []
    if not greedy:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(temperature)))
        if top_k > 0:
            processors.append(TopKLogitsWarper(top_k=int(top_k)))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=float(top_p)))
    recorder = _SampledTokenLogprobs(prompt_BxP.shape[1])
    processors.append(recorder)
    # Neutral sampling knobs, so that transformers adds no warper of its own after the recorder.
    knobs = {} if greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    config = GenerationConfig(do_sample=not greedy, num_beams=1, max_new_tokens=int(max_new_tokens),
                              eos_token_id=[int(t) for t in stop_token_ids] or None,
                              pad_token_id=int(pad_token_id), **knobs)
    device = model.device
    input_ids = torch.as_tensor(np.asarray(prompt_BxP, np.int64), device=device)
    attention_mask = torch.as_tensor(np.asarray(mask_BxP, np.int64), device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(int(seed))
        sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                   logits_processor=LogitsProcessorList(processors))
    logprobs = recorder.finish(sequences)
    tokens = sequences[:, prompt_BxP.shape[1]:]
    return tokens.cpu().numpy(), logprobs.float().cpu().numpy()
