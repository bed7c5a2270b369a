"""Samplers behind one interface: the built-in JAX engine, vLLM and transformers (the last two imported only
when asked for)."""

from __future__ import annotations

import logging
from typing import Any

from jaxrl_fp16.models.config import ModelConfig, Numerics
from jaxrl_fp16.sampling.base import Rollout, Sampler, SamplingSettings, check_dtypes_agree, validate_prompts
from jaxrl_fp16.sampling.jax_sampler import JaxSampler

__all__ = ["Rollout", "Sampler", "SamplingSettings", "JaxSampler", "SAMPLERS", "create_sampler",
           "validate_prompts", "check_dtypes_agree"]

SAMPLERS = ("jax", "vllm", "transformers")


def create_sampler(name: str, *, cfg: ModelConfig, params: Any, model_dir: str | None, dtype: Any,
                   trainer_dtype: Any = None, allow_dtype_mismatch: bool = False,
                   numerics: Numerics = Numerics(), seed: int = 0, **kwargs: Any) -> Sampler:
    """Builds sampler `name` ("jax", "vllm" or "transformers") in `dtype`, loaded with `params` (FP32)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    if trainer_dtype is not None:
        check_dtypes_agree(dtype, trainer_dtype, allow_dtype_mismatch)
    if name == "jax":
        return JaxSampler(cfg, params, dtype=dtype, numerics=numerics, **kwargs)
    if model_dir is None:
        raise ValueError(f"the {name} sampler needs a Hugging Face model directory to start from")
    if name == "transformers":
        from jaxrl_fp16.sampling.transformers_sampler import TransformersSampler  # imports torch when built

        if numerics != Numerics():
            logging.getLogger(__name__).warning("the transformers sampler runs transformers' own numerics; "
                                                "the FP32 op overrides apply to the trainer only")
        sampler = TransformersSampler(model_dir, dtype=dtype, trainer_dtype=trainer_dtype,
                                      allow_dtype_mismatch=allow_dtype_mismatch, **kwargs)
        if params is not None:
            sampler.push_weights(params)
        return sampler
    from jaxrl_fp16.sampling.vllm_sampler import VLLMSampler  # the only path that imports vllm

    sampler = VLLMSampler(model_dir, dtype=dtype, trainer_dtype=trainer_dtype,
                          allow_dtype_mismatch=allow_dtype_mismatch, seed=seed, **kwargs)
    if params is not None:
        sampler.push_weights(params)
    return sampler
