"""Per-layer attribution: where the inference and training paths' hidden states part ways.

For every layer l and scoring position (see `paths`), with h the residual stream after layer l:

    inf_vs_train     ||h_inf(D) - h_train(D)|| / ||h_train(D)||     the two paths in D: the mismatch itself
    inf_vs_fp32      ||h_inf(D) - h_inf(FP32)|| / ||h_inf(FP32)||     the inference path's own rounding error
    train_vs_fp32    ||h_train(D) - h_train(FP32)|| / ||h_train(FP32)||  the training path's own rounding error
    fp32_inf_vs_train  the two paths in FP32 (the floor: ~1e-7, both compute the same function)

each reduced to its mean and max over the response's scoring positions. `inf_vs_train_nonzero` is the
fraction of those positions where the two paths' hidden states differ at all, `mismatch_to_rounding` is
inf_vs_train_mean / train_vs_fp32_mean: near sqrt(2) when the two paths round independently, near 0 when they
round alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_fp16 import mismatch
from jaxrl_fp16.models.config import ModelConfig, Numerics
from jaxrl_fp16.precision import as_dtype
from jaxrl_fp16.sampling.base import Rollout
from jaxrl_fp16.scoring import Scorer
from jaxrl_fp16.tools.study import paths

__all__ = ["LayerDrift", "layer_drift", "DRIFT_COMPARISONS"]

DRIFT_COMPARISONS = ("inf_vs_train", "inf_vs_fp32", "train_vs_fp32", "fp32_inf_vs_train")
MISMATCH_KEYS = ("mismatch/kl_k3", "mismatch/prob_abs_diff_mean", "mismatch/prob_abs_diff_max",
                 "mismatch/seq_log_ratio_abs_mean", "mismatch/num_tokens")


@dataclasses.dataclass
class LayerDrift:
    """Per-layer drift of one compute dtype: `rows` (one dict per layer) and the final log-prob `mismatch`."""

    dtype: str
    rows: list[dict[str, Any]]
    mismatch: dict[str, float]


@jax.jit
def _relative_drift(a_LxBxRxH: jax.Array, b_LxBxRxH: jax.Array) -> jax.Array:
    """||a - b|| / ||b|| over the hidden axis, in FP32: [L, B, R]."""
    a, b = a_LxBxRxH.astype(jnp.float32), b_LxBxRxH.astype(jnp.float32)
    return jnp.linalg.norm(a - b, axis=-1) / jnp.maximum(jnp.linalg.norm(b, axis=-1), jnp.finfo(jnp.float32).tiny)


def layer_drift(cfg: ModelConfig, params: Any, rollout: Rollout, dtype: Any, *, numerics: Numerics = Numerics(),
                temperature: float = 1.0, max_batch_size: int = 256, prompt_bucket: int = 16) -> LayerDrift:
    """Runs both paths in `dtype` and in FP32 on the rollout's tokens and compares their residual streams.

    Args:
      cfg, params: the model and its FP32 params.
      rollout: the tokens (typically sampled by `JaxSampler` in `dtype` with `numerics`).
      dtype: the compute dtype D of both paths.
      numerics: which op classes run in FP32 in both paths.
      temperature: the sampling temperature (for the log-probs of the final mismatch).
      max_batch_size, prompt_bucket: the sampler's batching, reproduced by the inference path.

    Both paths' residual streams of one batch are held at once, in D and in FP32 ([L, B, R, H] each): lower
    `max_batch_size` for a large model (log mu may then differ from the sampler's in the last bits).

    Returns:
      A `LayerDrift`: one row per layer (see the module docstring for the columns), and the mismatch statistics
      of log mu (the inference path in D on these tokens) against log pi (`Scorer` in D).
    """
    dt = str(as_dtype(dtype))
    model, ref_model = paths.make_model(cfg, dt, numerics), paths.make_model(cfg, "float32", numerics)
    params_d, params_ref = paths.cast_params(params, dt), paths.cast_params(params, "float32")
    P, (N, T) = rollout.prompt_width, rollout.tokens.shape
    R, L = T - P, cfg.num_layers
    drift = {name: np.zeros((L, N, R), np.float32) for name in DRIFT_COMPARISONS}
    mu = np.zeros((N, T), np.float32)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    for b in paths.batches(rollout, pad_id, max_batch_size=max_batch_size, prompt_bucket=prompt_bucket):
        n = b.stop - b.start
        lp, h_inf = paths.inference_batch(model, params_d, b, temperature, collect_hidden=True)
        _, h_inf_ref = paths.inference_batch(ref_model, params_ref, b, temperature, collect_hidden=True)
        h_train = paths.training_batch(model, params_d, b)
        h_train_ref = paths.training_batch(ref_model, params_ref, b)
        pairs = {"inf_vs_train": (h_inf, h_train), "inf_vs_fp32": (h_inf, h_inf_ref),
                 "train_vs_fp32": (h_train, h_train_ref), "fp32_inf_vs_train": (h_inf_ref, h_train_ref)}
        for name, (a, ref) in pairs.items():
            drift[name][:, b.start:b.stop] = np.asarray(_relative_drift(a, ref))[:, :n]
        mu[b.start:b.stop, P:] = np.asarray(lp)[:n]

    on_NxR = rollout.response_mask[:, P:].astype(bool)
    rows = []
    for layer in range(L):
        row: dict[str, Any] = {"layer": layer + 1}
        for name in DRIFT_COMPARISONS:
            values = drift[name][layer][on_NxR]
            row[f"{name}_mean"] = float(values.mean()) if values.size else float("nan")
            row[f"{name}_max"] = float(values.max()) if values.size else float("nan")
        differs = drift["inf_vs_train"][layer][on_NxR] > 0
        row["inf_vs_train_nonzero"] = float(differs.mean()) if differs.size else float("nan")
        row["mismatch_to_rounding"] = (row["inf_vs_train_mean"] / row["train_vs_fp32_mean"]
                                       if row["train_vs_fp32_mean"] > 0 else float("nan"))
        rows.append(row)

    mu = np.where(rollout.response_mask == 1, mu, 0.0).astype(np.float32)
    scoring_temperature = temperature if temperature > 0 else 1.0
    pi = Scorer(cfg, dtype=dt, numerics=numerics)(params, rollout.tokens, rollout.attention_mask,
                                                   scoring_temperature)
    stats = mismatch.summarize(mismatch.mismatch_metrics(mu, pi, rollout.response_mask))
    return LayerDrift(dtype=dt, rows=rows, mismatch={k.removeprefix("mismatch/"): stats[k] for k in MISMATCH_KEYS})
