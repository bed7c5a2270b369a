"""Independent references the sampler tests (transformers, vLLM) check against: the trainer's FP32 logits, the
log-prob of a token under temperature / top-k / top-p in float64, and a perturbation for weight pushes."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_fp16.models.decoder import CausalLM, causal_inputs


def trainer_logits(cfg, params, rollout):
    """FP32 next-token logits [N, T, V] of the trainer on the rollout: entry t-1 predicts token t."""
    model = CausalLM(cfg)
    tokens = jnp.asarray(rollout.tokens)
    positions, mask = causal_inputs(tokens, None, jnp.asarray(rollout.attention_mask))
    logits, _, _ = jax.jit(model.apply)({"params": params}, tokens, positions, mask)
    return np.asarray(logits, np.float64)


def filtered_logprob(logits_V, token, temperature, top_k, top_p):
    """log of the sampled token's probability after temperature, top-k, then top-p (vLLM's rule), in float64."""
    z = logits_V / temperature
    if top_k:
        z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
    order = np.argsort(z)  # ascending, as vLLM sorts
    probs = np.exp(z[order] - z.max())
    drop = np.cumsum(probs / probs.sum()) <= 1 - top_p
    drop[-1] = False  # keep at least the top token
    z[order[drop]] = -np.inf
    return z[token] - (z.max() + np.log(np.sum(np.exp(z - z.max()))))


def perturbed(params):
    """Every weight x 1.05 plus N(0, 0.02) noise (seeded): weights a push must visibly follow."""
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map(
        lambda x: (np.asarray(x) * 1.05 + 0.02 * rng.standard_normal(x.shape)).astype(np.float32), params)
