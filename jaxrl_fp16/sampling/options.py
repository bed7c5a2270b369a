"""Typed options of each sampler engine, as `create_sampler` takes them (`SamplerSection.engine_options()` builds
them from a run config), and the pure arithmetic of an engine that shares the host's GPUs with the trainer.

Plain data: each engine checks the values it is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["JaxOptions", "VLLMOptions", "TransformersOptions", "EngineOptions", "ENGINE_OPTIONS", "SAMPLERS",
           "options_for", "SHARED_GPU_UTILIZATION", "OWN_GPU_UTILIZATION", "MEMORY_MARGIN", "PROMPT_ALLOWANCE",
           "engine_memory_utilization", "default_max_model_len", "trainer_devices"]

# vLLM's share of a GPU (its `gpu_memory_utilization`) when the trainer's JAX runs on the same GPU, and when the
# engine has GPUs of its own (`sampler.devices`).
SHARED_GPU_UTILIZATION = 0.35
OWN_GPU_UTILIZATION = 0.9
# Of a shared GPU, what neither JAX's preallocated pool nor vLLM's budget may take: the two CUDA contexts (JAX's
# and torch's), cuBLAS/NCCL workspaces, allocator slack. vLLM refuses to start unless the free memory it finds
# is at least its whole budget, so JAX's share is 1 - gpu_memory_utilization - MEMORY_MARGIN at most.
MEMORY_MARGIN = 0.05
# Prompt tokens the default engine context (`default_max_model_len`) leaves room for, before the response.
PROMPT_ALLOWANCE = 1024
_CONTEXT_ROUNDING = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class JaxOptions:
    """The built-in JAX engine: rows per engine call (larger requests are split) and the prompt-width bucket."""

    max_batch_size: int = 256
    prompt_bucket: int = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class VLLMOptions:
    """vLLM (see `VLLMSampler` for each): the engine's context length (None: the model's), GPU memory share (None:
    `engine_memory_utilization`), GPUs per engine, eager mode (None: eager on a CPU, CUDA graphs on a GPU),
    scheduler limits and prefix caching (None: vLLM's defaults), the engine's own GPUs (visible CUDA ordinals; None:
    it shares the trainer's), and further `vllm.LLM` keyword arguments."""

    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    enforce_eager: bool | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool | None = None
    devices: tuple[int, ...] | None = None
    engine_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformersOptions:
    """transformers: rows per `generate` call, the torch device (None: CUDA when available) and attention kernel."""

    max_batch_size: int = 256
    device: str | None = None
    attn_implementation: str | None = None


EngineOptions = JaxOptions | VLLMOptions | TransformersOptions
ENGINE_OPTIONS: dict[str, type] = {"jax": JaxOptions, "vllm": VLLMOptions, "transformers": TransformersOptions}
SAMPLERS = tuple(ENGINE_OPTIONS)


def options_for(name: str, options: EngineOptions | None = None) -> EngineOptions:
    """`options`, or the defaults of sampler `name` when None; ValueError for an unknown name, TypeError for
    another engine's options."""
    if name not in ENGINE_OPTIONS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    kind = ENGINE_OPTIONS[name]
    if options is None:
        return kind()
    if not isinstance(options, kind):
        raise TypeError(f"the {name} sampler takes {kind.__name__}, got {type(options).__name__}")
    return options


def engine_memory_utilization(value: float | None, devices: Sequence[int] | None) -> float:
    """vLLM's `gpu_memory_utilization`: `value`, else SHARED_GPU_UTILIZATION when the engine shares the trainer's
    GPUs (`devices` None) and OWN_GPU_UTILIZATION when it has its own."""
    if value is not None:
        return float(value)
    return SHARED_GPU_UTILIZATION if devices is None else OWN_GPU_UTILIZATION


def default_max_model_len(max_new_tokens: int) -> int:
    """The engine's default context: PROMPT_ALLOWANCE prompt tokens plus the response, rounded up to a multiple of
    256 (the KV cache must hold one whole sequence; a longer prompt is refused naming sampler.max_model_len)."""
    tokens = PROMPT_ALLOWANCE + int(max_new_tokens)
    return -(-tokens // _CONTEXT_ROUNDING) * _CONTEXT_ROUNDING


def trainer_devices(devices: Sequence[Any], engine_devices: Sequence[int] | None, *,
                    jax_visible: str | None = None) -> list[Any]:
    """The devices the trainer's mesh spans when the vLLM engine has GPUs of its own.

    Args:
      devices: JAX devices (`jax.devices()`: all processes'), in order.
      engine_devices: the engine's devices on every host, as local device ordinals (`sampler.devices`); None:
        the engine shares the trainer's devices, and the mesh spans them all.
      jax_visible: JAX's `jax_cuda_visible_devices` setting (None: read it). Anything but "all" means JAX was
        already restricted to the trainer's GPUs (the GPU plan of `jaxrl_fp16.doctor` does that), so `devices`
        are the trainer's.

    Returns:
      `devices` without those whose `local_hardware_id` (the ordinal on its host) is an engine device.

    Raises:
      ValueError naming sampler.devices when no device is left for the trainer.
    """
    devices = list(devices)
    if engine_devices and jax_visible is None:
        import jax

        jax_visible = jax.config.read("jax_cuda_visible_devices")
    if not engine_devices or jax_visible != "all":
        return devices
    engine = {int(i) for i in engine_devices}
    kept = [d for d in devices if int(d.local_hardware_id) not in engine]
    if not kept:
        raise ValueError(f"sampler.devices={sorted(engine)} leaves none of the {len(devices)} devices "
                         f"({', '.join(str(d) for d in devices)}) for the trainer")
    return kept
