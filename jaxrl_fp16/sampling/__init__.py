"""Samplers behind one interface: the built-in JAX engine, vLLM and transformers (the last two imported only
when asked for)."""

from __future__ import annotations

import logging
from typing import Any

from jaxrl_fp16.models.config import ModelConfig, Numerics
from jaxrl_fp16.precision import as_dtype
from jaxrl_fp16.sampling.base import (BaseSampler, Rollout, Sampler, SamplingSettings, check_dtypes_agree,
                                      validate_prompts)
from jaxrl_fp16.sampling.jax_sampler import JaxSampler
from jaxrl_fp16.sampling.options import (SAMPLERS, EngineOptions, JaxOptions, TransformersOptions, VLLMOptions,
                                         options_for)

__all__ = ["Rollout", "Sampler", "BaseSampler", "SamplingSettings", "JaxSampler", "SAMPLERS", "EngineOptions",
           "JaxOptions", "VLLMOptions", "TransformersOptions", "create_sampler", "validate_prompts",
           "check_dtypes_agree"]

log = logging.getLogger(__name__)


def create_sampler(name: str, *, cfg: ModelConfig, params: Any, model_dir: str | None, dtype: Any,
                   trainer_dtype: Any = None, allow_dtype_mismatch: bool = False,
                   numerics: Numerics = Numerics(), seed: int = 0, options: EngineOptions | None = None) -> Sampler:
    """Builds sampler `name` ("jax", "vllm" or "transformers") in `dtype`, loaded with `params` (FP32) unless None.

    Args:
      name: the engine.
      cfg: the model config (the JAX engine's; vLLM and transformers read theirs from `model_dir`).
      params: the trainer's FP32 params, pushed once the engine is built; None: push them later.
      model_dir: the Hugging Face folder vLLM and transformers start from (unused by the JAX engine).
      dtype: the sampler's compute dtype.
      trainer_dtype: the trainer's compute dtype. The sampler's is checked against it here, once, before any
        engine starts: a different `dtype` is refused (ValueError) unless `allow_dtype_mismatch`.
      allow_dtype_mismatch: sample in another dtype than the trainer's (a deliberate mismatch).
      numerics: which sensitive ops run in FP32 (the JAX engine; transformers runs its own numerics).
      seed: the vLLM engine's global seed.
      options: the engine's typed options (`JaxOptions`, `VLLMOptions` or `TransformersOptions`, as
        `SamplerSection.engine_options()` builds them); None: that engine's defaults. Another engine's options
        raise TypeError.
    """
    options = options_for(name, options)
    sampler_dtype = as_dtype(dtype)
    if trainer_dtype is not None:
        check_dtypes_agree(sampler_dtype, trainer_dtype, allow_dtype_mismatch)
    if name != "jax" and model_dir is None:
        raise ValueError(f"the {name} sampler needs a Hugging Face model directory to start from")
    trainer = None if trainer_dtype is None else as_dtype(trainer_dtype)
    log.info("%s sampler: engine dtype %s, trainer dtype %s%s", name, sampler_dtype.name,
             "unknown" if trainer is None else trainer.name,
             " (mismatch allowed)" if trainer is not None and trainer != sampler_dtype else "")
    if name == "jax":
        return JaxSampler(cfg, params, dtype=sampler_dtype, numerics=numerics,
                          max_batch_size=options.max_batch_size, prompt_bucket=options.prompt_bucket)
    if name == "transformers":
        sampler = _transformers(model_dir, sampler_dtype, numerics, options)
    else:
        sampler = _vllm(model_dir, sampler_dtype, seed, options)
    if params is not None:
        sampler.push_weights(params)
    return sampler


def _transformers(model_dir: str, dtype: Any, numerics: Numerics, options: TransformersOptions) -> BaseSampler:
    from jaxrl_fp16.sampling.transformers_sampler import TransformersSampler  # imports torch when built

    if numerics != Numerics():
        log.warning("the transformers sampler runs transformers' own numerics; the FP32 op overrides apply to "
                    "the trainer only")
    return TransformersSampler(model_dir, dtype=dtype, max_batch_size=options.max_batch_size, device=options.device,
                               attn_implementation=options.attn_implementation)


def _vllm(model_dir: str, dtype: Any, seed: int, options: VLLMOptions) -> BaseSampler:
    from jaxrl_fp16.sampling.vllm_sampler import VLLMSampler  # the only path that imports vllm

    return VLLMSampler(model_dir, dtype=dtype, seed=seed, max_model_len=options.max_model_len,
                       gpu_memory_utilization=options.gpu_memory_utilization,
                       tensor_parallel_size=options.tensor_parallel_size, enforce_eager=options.enforce_eager,
                       devices=options.devices, max_num_seqs=options.max_num_seqs,
                       max_num_batched_tokens=options.max_num_batched_tokens,
                       enable_prefix_caching=options.enable_prefix_caching, **options.engine_kwargs)
