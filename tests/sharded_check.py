"""Sharded training on simulated CPU devices, compared with one device; run by tests/test_sharding.py.

Run as `python tests/sharded_check.py OUT_DIR` with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag
must be set before JAX starts, hence a process of its own). Writes OUT_DIR/result.json.
"""

import json
import os
import sys

import jaxrl_fp16  # noqa: F401  (adds its XLA flag to the device-count flag)
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl_fp16 import sharding
from jaxrl_fp16.checkpoint import Checkpointer
from jaxrl_fp16.loss_scale import DynamicLossScale, NoOpLossScale
from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.models.decoder import CausalLM, causal_inputs, token_logprobs
from jaxrl_fp16.models.hf_table import hf_state_dict
from jaxrl_fp16.step import TrainState, make_train_step

CFG = ModelConfig(arch="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=False)
MESHES = {"8x1": (8, 1, 1), "2x4": (2, 4, 1), "1x8": (1, 8, 1), "2x2x2": (2, 2, 2), "1x2x4": (1, 2, 4)}
# Which meshes each policy runs on (every compile costs seconds on a 2-core machine).
RUNS = {"fp32": ("8x1", "2x4", "1x8", "1x2x4"), "fp16-mixed": ("2x4", "2x2x2")}
STEPS = 3


def init_params():
    model = CausalLM(CFG)
    tokens = jnp.zeros((1, 4), jnp.int32)
    positions, mask = causal_inputs(tokens, None, None)
    params = model.init(jax.random.PRNGKey(0), tokens, positions, mask)["params"]
    # Sharper logits than the random init gives, so FP16 rounding and the gradients are not negligible.
    params = jax.tree_util.tree_map(lambda x: x * 3.0 if x.ndim >= 2 else x, params)
    return jax.tree_util.tree_map(np.asarray, params)


def batches(n=STEPS + 2, rows=16, width=12):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        mask = np.ones((rows, width), np.int32)
        for r in range(rows):
            mask[r, : rng.integers(0, 4)] = 0  # left padding
        out.append({"tokens": rng.integers(0, CFG.vocab_size, (rows, width)).astype(np.int32),
                    "attention_mask": mask})
    return out


def make_loss(policy):
    model = CausalLM(CFG, dtype=jnp.dtype(jnp.float16 if "fp16" in policy else jnp.float32))

    def loss_fn(params, batch):
        logp = token_logprobs(model, params, batch["tokens"], batch["attention_mask"])
        m = batch["attention_mask"][:, 1:].astype(jnp.float32) * batch["attention_mask"][:, :-1]
        return -jnp.sum(logp[:, 1:] * m) / jnp.sum(m), {"tokens": jnp.sum(m)}

    return loss_fn


# eps well above the noise of near-zero gradients: Adam amplifies their rounding differences to full lr-sized
# updates (sign flips), which would hide what the comparison checks.
OPT = optax.adamw(3e-3, b1=0.9, b2=0.95, eps=1e-3, weight_decay=0.01)


def loss_scale(policy):
    # 2**24 overflows FP16 on the first step (skipped on every mesh alike); the scale then drops to 2**16.
    if "fp16" not in policy:
        return NoOpLossScale()
    return DynamicLossScale(loss_scale=2.0 ** 24, period=2, factor=2.0 ** 8, min_loss_scale=1.0)


def new_state(params, policy):
    return TrainState.create(jax.tree_util.tree_map(jnp.asarray, params), OPT, loss_scale(policy))


_STEPS = {}  # one compiled step per (mesh, policy): every compile costs seconds


def setup(mesh_shape, policy, params):
    """(fresh state placed on the mesh, step function, (mesh, batch sharding)); mesh_shape None: one device."""
    state = new_state(params, policy)
    if (mesh_shape, policy) not in _STEPS:
        if mesh_shape is None:
            step = make_train_step(make_loss(policy), OPT, policy, max_grad_norm=1.0, num_microbatches=2)
            _STEPS[None, policy] = (step, None, None)
        else:
            mesh = sharding.make_mesh(*mesh_shape)
            ss = sharding.state_shardings(state, mesh, OPT)
            bs = sharding.batch_sharding(mesh)
            step = make_train_step(make_loss(policy), OPT, policy, max_grad_norm=1.0, num_microbatches=2,
                                   state_sharding=ss, batch_sharding=bs)
            _STEPS[mesh_shape, policy] = (step, (mesh, bs), ss)
    step, placed, ss = _STEPS[mesh_shape, policy]
    return (state if ss is None else sharding.place(state, ss)), step, placed


def run(mesh_shape, policy, params, data):
    state, step, placed = setup(mesh_shape, policy, params)
    losses, skipped = [], []
    for batch in data[:STEPS]:
        if placed is not None:
            batch = sharding.place(batch, placed[1])
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        skipped.append(int(metrics["skipped"]))
    return state, losses, skipped


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def rel_diff(a, b, start):
    """|a - b| / |b - start| over all leaves: the difference relative to the change the steps made."""
    def sq(t):
        return sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree_util.tree_leaves(t))

    diff = jax.tree_util.tree_map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)
    moved = jax.tree_util.tree_map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), b, start)
    return (sq(diff) / sq(moved)) ** 0.5


def sharding_report(state):
    """Per-leaf (path, full shape, per-device shape) of the params and of Adam's mu."""
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    mu = state.opt_state[0].mu
    return {
        "params": {jax.tree_util.keystr(p): [list(x.shape), list(x.sharding.shard_shape(x.shape))]
                   for p, x in leaves},
        "mu": {jax.tree_util.keystr(p): [list(x.shape), list(x.sharding.shard_shape(x.shape))]
               for p, x in jax.tree_util.tree_leaves_with_path(mu)},
        "loss_scale_replicated": all(x.sharding.is_fully_replicated
                                     for x in jax.tree_util.tree_leaves(state.loss_scale)),
    }


def main(out_dir):
    result = {"device_count": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    params = init_params()
    data = batches()
    for policy in ("fp32", "fp16-mixed"):
        ref_state, ref_losses, ref_skipped = run(None, policy, params, data)
        runs = {"single": {"losses": ref_losses, "skipped": ref_skipped}}
        for name in RUNS[policy]:
            shape = MESHES[name]
            state, losses, skipped = run(shape, policy, params, data)
            runs[name] = {"losses": losses, "skipped": skipped,
                          "param_max_diff": max_diff(state.params, ref_state.params),
                          "param_rel_diff": rel_diff(state.params, ref_state.params, params),
                          "opt_max_diff": max_diff(state.opt_state, ref_state.opt_state),
                          "loss_scale": float(state.loss_scale.loss_scale),
                          "ref_loss_scale": float(ref_state.loss_scale.loss_scale),
                          **sharding_report(state)}
        result[policy] = runs

    # A checkpoint saved on one mesh continues on another exactly as on the first.
    policy = "fp16-mixed"
    state_a, step_a, (_, bs_a) = setup(MESHES["2x4"], policy, params)
    for batch in data[:2]:
        state_a, _ = step_a(state_a, sharding.place(batch, bs_a))
    ck = Checkpointer(os.path.join(out_dir, "ck"), keep=2)
    ck.save(2, state_a, {"iteration": 2})
    cont_a, metrics_a = step_a(state_a, sharding.place(data[2], bs_a))
    restores = {}
    for name in ("2x2x2",):
        target, step_b, (_, bs_b) = setup(MESHES[name], policy, params)  # a fresh state: structure + shardings
        restored, meta = ck.restore(target)
        same_shardings = all(r.sharding == t.sharding for r, t in
                             zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(target)))
        restored_diff = max_diff(restored, state_a)
        cont_b, metrics_b = step_b(restored, sharding.place(data[2], bs_b))
        restores[name] = {"same_shardings": same_shardings, "restored_max_diff": restored_diff,
                          "meta": meta, "loss_a": float(metrics_a["loss"]), "loss_b": float(metrics_b["loss"]),
                          "param_max_diff": max_diff(cont_a.params, cont_b.params),
                          "param_rel_diff": rel_diff(cont_b.params, cont_a.params, state_a.params),
                          "step": int(cont_b.step)}
    ck.close()
    result["restore"] = restores

    # The streaming export of sharded params equals the export of the unsharded tree, tensor for tensor.
    mesh = sharding.make_mesh(1, 2, 4)
    sharded = sharding.place(jax.tree_util.tree_map(jnp.asarray, params), sharding.param_shardings(params, mesh))
    streams = {}
    for dtype in ("float32", "float16", "bfloat16"):
        ref = list(hf_state_dict(params, CFG, dtype))
        got = list(sharding.stream_hf_weights(sharded, CFG, dtype))
        streams[dtype] = {"names_equal": [n for n, _ in ref] == [n for n, _ in got],
                          "count": len(ref),
                          "bit_equal": all(a.dtype == b.dtype and a.shape == b.shape and
                                           np.array_equal(a.view(np.uint8), b.view(np.uint8))
                                           for (_, a), (_, b) in zip(ref, got))}
    # The vLLM push's tensors (torch, engine dtype) from the sharded tree: the same bits as the unsharded export.
    from jaxrl_fp16.sampling.vllm_push import torch_weights

    ref = list(hf_state_dict(params, CFG, "float16"))
    pushed = [(name, t.numpy()) for name, t in torch_weights(sharded, CFG, "float16")]
    streams["torch_weights_equal"] = [n for n, _ in ref] == [n for n, _ in pushed] and all(
        np.array_equal(a, b) and b.dtype == np.float16 for (_, a), (_, b) in zip(ref, pushed))
    q = sharded["layers"]["attn"]["q_proj"]["kernel"]
    streams["q_kernel_shard_shape"] = list(q.sharding.shard_shape(q.shape))
    result["stream"] = streams
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
