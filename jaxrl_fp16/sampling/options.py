"""Typed options of each sampler engine, as `create_sampler` takes them, the pure arithmetic of an engine that
shares the host's GPUs with the trainer, and the run config's `sampler` section (`SamplerSection`), which builds
the engine options (`engine_options()`) and the settings of each generate call (`settings()`).

The options are plain data: each engine checks the values it is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from jaxrl_fp16.models.config import Numerics
from jaxrl_fp16.precision import as_dtype
from jaxrl_fp16.sampling.base import SamplingSettings
from jaxrl_fp16.validation import ConfigError, check_fields, check_positive

__all__ = ["SamplerSection", "JaxOptions", "VLLMOptions", "TransformersOptions", "EngineOptions", "ENGINE_OPTIONS",
           "SAMPLERS", "options_for", "SHARED_GPU_UTILIZATION", "OWN_GPU_UTILIZATION", "MEMORY_MARGIN",
           "PROMPT_ALLOWANCE", "engine_memory_utilization", "default_max_model_len", "trainer_devices"]

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
        already restricted to the trainer's GPUs (the GPU plan of `jaxrl_fp16.gpu_host` does that), so `devices`
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerSection:
    """The sampler; the keys after `tensor_parallel_size` are the vLLM engine's (refused with another sampler):
    null leaves the choice to `VLLMSampler` (see `VLLMOptions` and README "On a GPU")."""

    name: str = "jax"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    allow_dtype_mismatch: bool = False
    dtype: Optional[str] = None  # only with allow_dtype_mismatch: a sampler dtype other than the trainer's
    max_batch_size: int = 256
    tensor_parallel_size: int = 1  # vllm: GPUs per engine (tensor parallelism inside vLLM)
    # vLLM's share of each of its GPUs, in (0, 1); null: 0.35 sharing the trainer's GPUs, 0.9 with `devices`.
    gpu_memory_utilization: Optional[float] = None
    enforce_eager: Optional[bool] = None  # null: CUDA graphs on a GPU, eager on a CPU
    max_num_seqs: Optional[int] = None  # null: vLLM's default
    max_num_batched_tokens: Optional[int] = None  # null: vLLM's default
    max_model_len: Optional[int] = None  # null: 1024 prompt tokens + max_new_tokens, rounded up to 256
    enable_prefix_caching: Optional[bool] = None  # null: vLLM's default
    devices: Optional[list[int]] = None  # the engine's own GPUs (one per tensor_parallel_size); null: shared
    # The JAX sampler only: op classes it computes in FP32 on top of `model.fp32_ops`, as an inference engine's
    # fused kernels keep intermediates unrounded where the trainer's op-by-op forward rounds them (e.g.
    # [rope, attn_scores]: vLLM's rotary kernel rounds q and k once, flash attention never rounds the scores).
    fp32_ops: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        check_fields(self, "sampler")
        try:
            Numerics.from_overrides(self.fp32_ops)
        except ValueError as e:
            raise ConfigError(f"sampler.fp32_ops: {e}") from None
        if self.fp32_ops and self.name != "jax":
            raise ConfigError(f"sampler.fp32_ops={list(self.fp32_ops)} needs sampler.name=jax (got {self.name!r}): "
                              f"the other engines run their own kernels")
        if self.name not in SAMPLERS:
            raise ConfigError(f"sampler.name={self.name!r}; valid: {', '.join(SAMPLERS)}")
        if self.temperature <= 0:
            raise ConfigError(f"sampler.temperature must be > 0 for RL (sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampler.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"sampler.top_k must be >= 0 (0 disables it), got {self.top_k}")
        check_positive("sampler", max_new_tokens=self.max_new_tokens, max_batch_size=self.max_batch_size,
                       tensor_parallel_size=self.tensor_parallel_size)
        if self.tensor_parallel_size != 1 and self.name != "vllm":
            raise ConfigError(f"sampler.tensor_parallel_size={self.tensor_parallel_size} needs sampler.name=vllm "
                              f"(got {self.name!r})")
        if self.dtype is not None:
            try:
                as_dtype(self.dtype)
            except ValueError as e:
                raise ConfigError(f"sampler.dtype={self.dtype!r}: {e}") from None
        self._check_engine_keys()

    def _check_engine_keys(self) -> None:
        """The vLLM engine's keys: only with sampler.name=vllm, in range, one device per tensor-parallel rank."""
        engine_keys = ("gpu_memory_utilization", "enforce_eager", "max_num_seqs", "max_num_batched_tokens",
                       "max_model_len", "enable_prefix_caching", "devices")
        given = {key: getattr(self, key) for key in engine_keys if getattr(self, key) is not None}
        if given and self.name != "vllm":
            key, value = next(iter(given.items()))
            raise ConfigError(f"sampler.{key}={value} is a vLLM engine key and needs sampler.name=vllm "
                              f"(got {self.name!r})")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization < 1:
            raise ConfigError(f"sampler.gpu_memory_utilization must be in (0, 1), got {self.gpu_memory_utilization}")
        check_positive("sampler", **{k: given[k] for k in ("max_num_seqs", "max_num_batched_tokens") if k in given})
        if self.max_model_len is not None and self.max_model_len <= self.max_new_tokens:
            raise ConfigError(f"sampler.max_model_len={self.max_model_len} leaves no room for a prompt before "
                              f"sampler.max_new_tokens={self.max_new_tokens} response tokens")
        if self.devices is not None:
            if any(d < 0 for d in self.devices) or len(set(self.devices)) != len(self.devices):
                raise ConfigError(f"sampler.devices={list(self.devices)} must be distinct GPU ordinals (>= 0)")
            if len(self.devices) != self.tensor_parallel_size:
                raise ConfigError(f"sampler.devices={list(self.devices)} lists {len(self.devices)} GPUs but "
                                  f"sampler.tensor_parallel_size={self.tensor_parallel_size}: give one GPU per "
                                  f"tensor-parallel rank")

    def settings(self, samples_per_prompt: int, seed: int, *, logprobs: bool = True) -> SamplingSettings:
        """The `SamplingSettings` of this section for one generate call (`logprobs=False`: tokens only)."""
        return SamplingSettings(max_new_tokens=self.max_new_tokens, samples_per_prompt=samples_per_prompt,
                                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=seed,
                                logprobs=logprobs)

    def engine_options(self) -> EngineOptions:
        """The typed options of engine `name` that this section sets (`create_sampler(..., options=...)`)."""
        if self.name == "vllm":
            return VLLMOptions(tensor_parallel_size=self.tensor_parallel_size,
                               max_model_len=self.max_model_len or default_max_model_len(self.max_new_tokens),
                               gpu_memory_utilization=self.gpu_memory_utilization, enforce_eager=self.enforce_eager,
                               max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                               enable_prefix_caching=self.enable_prefix_caching,
                               devices=None if self.devices is None else tuple(self.devices))
        if self.name == "transformers":
            return TransformersOptions(max_batch_size=self.max_batch_size)
        return JaxOptions(max_batch_size=self.max_batch_size)
