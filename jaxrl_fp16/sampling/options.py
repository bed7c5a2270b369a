"""Typed options of each sampler engine, as `create_sampler` takes them (`SamplerSection.engine_options()` builds
them from a run config). Plain data: each engine checks the values it is given."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["JaxOptions", "VLLMOptions", "TransformersOptions", "EngineOptions", "ENGINE_OPTIONS", "SAMPLERS",
           "options_for"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class JaxOptions:
    """The built-in JAX engine: rows per engine call (larger requests are split) and the prompt-width bucket."""

    max_batch_size: int = 256
    prompt_bucket: int = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class VLLMOptions:
    """vLLM: the engine's context length (None: the config's), GPU memory share, GPUs per engine, eager mode, and
    further `vllm.LLM` keyword arguments (see `VLLMSampler`)."""

    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.4
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
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
