"""Weight push to vLLM vs a plain memory copy of the same bytes (the floor).

The push takes the trainer's FP32 parameters (JAX arrays, as the trainer holds them), casts them to the engine dtype
and transposes them to Hugging Face layout in XLA, writes them into the engine's tensors in place (or through
`reload_weights` where a layer's weights are processed; see `jaxrl_fp16.sampling.vllm_weights`) and drops its
prefix cache. The floor copies the engine-dtype bytes of every tensor into preallocated buffers (`np.copyto`).

Before timing, the engine must decode with the pushed weights: after a push of perturbed weights (through
`reload_weights`, the engine's first push) its greedy tokens follow the JAX sampler run with those weights, not the
old ones; and the same weights pushed again in place give the same greedy tokens. Timed round-robin: the default
push, the `reload_weights` push (`weight_push="reload"`, the route before in-place writes), the cast alone (our
tensors, not handed to the engine) and the copy.
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
from jaxrl_fp16.sampling.vllm_push import torch_weights

__all__ = ["run_weight_push"]

log = logging.getLogger(__name__)


def _perturbed(params, scale: float, seed: int):
    """Each weight plus Gaussian noise of `scale` times that tensor's standard deviation."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        tree, [np.asarray(x + scale * np.std(x) * rng.standard_normal(x.shape), np.float32) for x in leaves])


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_weight_push(model_dir: str, size: str, dtype: str, *, repeats: int) -> list[Comparison]:
    cfg, host = load_hf_params(model_dir)
    new_host = _perturbed(host, 1.0, seed=1)
    params, new = jax.device_put(host), jax.device_put(new_host)
    prompts = random_prompts(8, 16, seed=0)
    settings = SamplingSettings(max_new_tokens=16, temperature=0.0, ignore_eos=True)

    def greedy(sampler):
        return responses(sampler.generate(prompts, settings))

    old_ref, new_ref = (greedy(JaxSampler(cfg, p, dtype=dtype)) for p in (host, new_host))
    sources = dict(hf_state_dict(host, cfg, dtype))
    buffers = {k: np.empty_like(v) for k, v in sources.items()}

    def copy():
        for k, v in sources.items():
            np.copyto(buffers[k], v)

    def cast():
        for _ in torch_weights(params, cfg, dtype):
            pass

    engine = create_sampler("vllm", cfg=cfg, params=None, model_dir=model_dir, dtype=dtype, seed=0)
    try:
        engine.push_weights(new)  # through reload_weights, which the in-place plan is checked against
        reloaded = greedy(engine)
        follows, stale = prefix_agreement(reloaded, new_ref), prefix_agreement(reloaded, old_ref)
        log.info("push %s %s: agreement with the pushed weights %.3f, with the old ones %.3f", size, dtype, follows,
                 stale)
        if not (follows >= 0.9 and follows > stale):
            raise RuntimeError(f"weight push {size} {dtype}: the engine does not decode with the pushed weights "
                               f"(agreement {follows:.3f} with them, {stale:.3f} with the old ones)")
        engine.push_weights(params)
        engine.push_weights(new)
        mode = engine.last_push_mode
        if not np.array_equal(greedy(engine), reloaded):
            raise RuntimeError(f"weight push {size} {dtype}: the {mode} push decodes other greedy tokens than the "
                               f"reload_weights push of the same weights")
        times: dict[str, list[float]] = {"push": [], "reload": [], "cast": [], "copy": []}
        for i in range(repeats):
            weights = new if i % 2 else params
            for route in ("auto", "reload"):
                engine.weight_push = route
                engine.push_weights(weights)
                times["push" if route == "auto" else "reload"].append(engine.last_push_seconds)
            engine.weight_push = "auto"
            times["cast"].append(_timed(cast))
            times["copy"].append(_timed(copy))
    finally:
        engine.close()
    nbytes = sum(v.nbytes for v in sources.values())
    med = {k: statistics.median(v) for k, v in times.items()}
    log.info("push %s %s (%s): %.4f s; reload_weights %.4f s; the cast alone %.4f s; np.copyto %.4f s", size, dtype,
             mode, med["push"], med["reload"], med["cast"], med["copy"])
    return [Comparison.duration(f"weight push {size} {dtype} ({nbytes / 2**20:.1f} MiB) vs memcpy", med["push"],
                                med["copy"], "s", 1 / 3, peer_name="np.copyto of the same bytes",
                                check=f"greedy tokens follow the pushed weights ({follows:.2f} vs {stale:.2f}); "
                                      f"the {mode} push decodes as reload_weights",
                                note=f"{mode}; reload_weights {med['reload']:.3g} s; "
                                     f"cast alone (HF layout) {med['cast']:.3g} s")]
