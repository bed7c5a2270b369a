"""Training-step throughput (tokens/s): our jitted mixed-precision step vs the equivalent PyTorch step.

Both take one AdamW step of causal-LM NLL (mean over tokens) with FP32 master weights, global-norm clipping at
1.0 and, in FP16, dynamic loss scaling (ours: `DynamicLossScale` in the step; PyTorch: autocast + GradScaler),
on the same transformers model, batch and sequence length. Before timing, three steps of each from the same
weights must give the same losses (FP32: to 1e-4 relative; half dtypes: to 2e-2), so both compute the same
update.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import Comparison, interleaved_median
from jaxrl_fp16.loss_scale import DynamicLossScale, NoOpLossScale
from jaxrl_fp16.models.decoder import CausalLM, token_logprobs
from jaxrl_fp16.models.hf import load_hf_params
from jaxrl_fp16.step import TrainState, make_train_step

__all__ = ["run_train_step", "OurTrainStep"]

log = logging.getLogger(__name__)
POLICIES = {"float32": "fp32", "bfloat16": "bf16-mixed", "float16": "fp16-mixed"}
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.01, 1.0


def nll_loss(model: CausalLM):
    """`loss_fn(compute_params, batch)`: mean NLL of tokens[:, 1:] (what `TorchTrainStep.loss` computes)."""

    def loss_fn(params, batch):
        logp = token_logprobs(model, params, batch["tokens"], batch["mask"])
        m = jnp.asarray(batch["mask"], jnp.float32).at[:, 0].set(0.0)
        return -(logp * m).sum() / m.sum(), {}

    return loss_fn


class OurTrainStep:
    """`make_train_step` with AdamW, in the policy of `compute`; dynamic loss scaling in FP16."""

    def __init__(self, model_dir: str, compute: str, *, loss_scaling: bool | None = None):
        self.cfg, params = load_hf_params(model_dir)
        policy = POLICIES[compute]
        model = CausalLM(self.cfg, dtype=jnp.dtype(compute))
        optimizer = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY)
        scaling = compute == "float16" if loss_scaling is None else loss_scaling
        scale = DynamicLossScale(loss_scale=2.0 ** 15) if scaling else NoOpLossScale()
        self.step_fn = make_train_step(nll_loss(model), optimizer, policy, max_grad_norm=MAX_GRAD_NORM,
                                       donate=True)
        self.state = TrainState.create(jax.tree_util.tree_map(jnp.asarray, params), optimizer, scale)

    def step(self, tokens: np.ndarray, mask: np.ndarray) -> float:
        self.state, metrics = self.step_fn(self.state, {"tokens": tokens, "mask": mask})
        return float(metrics["loss"])  # blocks until the step is done


def batch(vocab: int, rows: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, min(vocab, 250), size=(rows, length)).astype(np.int32), np.ones((rows, length), np.int32)


def run_train_step(model_dir: str, size: str, dtypes: tuple[str, ...], *, rows: int, length: int,
                   repeats: int) -> list[Comparison]:
    from benchmarks.peers import TorchTrainStep

    results = []
    for dtype in dtypes:
        ours = OurTrainStep(model_dir, dtype)
        peer = TorchTrainStep(model_dir, dtype, lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM)
        tokens, mask = batch(ours.cfg.vocab_size, rows, length)
        ours_losses = [ours.step(tokens, mask) for _ in range(3)]  # also compiles
        peer_losses = [peer.step(tokens, mask) for _ in range(3)]
        rel = max(abs(a - b) / abs(b) for a, b in zip(ours_losses, peer_losses))
        log.info("train step %s %s: losses ours %s torch %s (max rel diff %.2e)", size, dtype, ours_losses,
                 peer_losses, rel)
        if not rel <= LOSS_RTOL[dtype]:
            raise RuntimeError(f"train step {size} {dtype}: losses differ (ours {ours_losses}, torch {peer_losses}); "
                               f"timing them would compare different work")
        seconds = interleaved_median({"ours": lambda: ours.step(tokens, mask),
                                      "torch": lambda: peer.step(tokens, mask)}, repeats)
        tps = {k: rows * length / s for k, s in seconds.items()}
        results.append(Comparison.throughput(
            f"train step {size} {dtype}: jitted step vs PyTorch", tps["ours"], tps["torch"], "tokens/s", 1.5,
            peer_name="PyTorch eager + AdamW" + (" + autocast/GradScaler" if dtype == "float16" else
                                                 " + autocast" if dtype == "bfloat16" else ""),
            check=f"3-step losses agree to {rel:.1e} relative", note=f"batch {rows} x {length} tokens"))
    return results
