"""Weight push to vLLM vs a plain memory copy of the same bytes (the floor).

The push takes the trainer's FP32 parameters, casts them to the engine dtype, hands them to the engine
(`reload_weights`) and drops its prefix cache. The floor copies the engine-dtype bytes of every tensor into
preallocated buffers (`np.copyto`). Before timing, the engine must decode with the pushed weights: after a push of
perturbed weights its greedy tokens follow the JAX sampler run with those weights, not the old ones.
"""

from __future__ import annotations

import logging
import statistics
import time

import jax
import numpy as np

from benchmarks.common import Comparison
from benchmarks.decode import prefix_agreement, random_prompts, responses
from jaxrl_fp16.models.hf import load_hf_params
from jaxrl_fp16.models.hf_table import hf_state_dict
from jaxrl_fp16.sampling import JaxSampler, SamplingSettings, create_sampler

__all__ = ["run_weight_push"]

log = logging.getLogger(__name__)


def _perturbed(params, scale: float, seed: int):
    """Each weight plus Gaussian noise of `scale` times that tensor's standard deviation."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        tree, [np.asarray(x + scale * np.std(x) * rng.standard_normal(x.shape), np.float32) for x in leaves])


def run_weight_push(model_dir: str, size: str, dtype: str, *, repeats: int) -> list[Comparison]:
    cfg, params = load_hf_params(model_dir)
    new = _perturbed(params, 1.0, seed=1)
    prompts = random_prompts(8, 16, seed=0)
    settings = SamplingSettings(max_new_tokens=16, temperature=0.0, ignore_eos=True)

    def greedy(sampler):
        return responses(sampler.generate(prompts, settings))

    old_ref, new_ref = (greedy(JaxSampler(cfg, p, dtype=dtype)) for p in (params, new))
    engine = create_sampler("vllm", cfg=cfg, params=params, model_dir=model_dir, dtype=dtype, seed=0)
    try:
        engine.push_weights(new)
        pushed = greedy(engine)
        follows, stale = prefix_agreement(pushed, new_ref), prefix_agreement(pushed, old_ref)
        log.info("push %s %s: agreement with the pushed weights %.3f, with the old ones %.3f", size, dtype, follows,
                 stale)
        if not (follows >= 0.9 and follows > stale):
            raise RuntimeError(f"weight push {size} {dtype}: the engine does not decode with the pushed weights "
                               f"(agreement {follows:.3f} with them, {stale:.3f} with the old ones)")
        pushes = []
        for i in range(repeats):
            engine.push_weights(new if i % 2 else params)
            pushes.append(engine.last_push_seconds)
    finally:
        engine.close()
    sources = dict(hf_state_dict(params, cfg, dtype))
    buffers = {k: np.empty_like(v) for k, v in sources.items()}
    copies = []
    for _ in range(repeats):
        start = time.perf_counter()
        for k, v in sources.items():
            np.copyto(buffers[k], v)
        copies.append(time.perf_counter() - start)
    nbytes = sum(v.nbytes for v in sources.values())
    push, copy = statistics.median(pushes), statistics.median(copies)
    return [Comparison.duration(f"weight push {size} {dtype} ({nbytes / 2**20:.1f} MiB) vs memcpy", push, copy, "s",
                                1 / 3, peer_name="np.copyto of the same bytes",
                                check=f"greedy tokens follow the pushed weights ({follows:.2f} vs {stale:.2f})")]
