"""The DPO loop: offline preference optimisation through the one jitted mixed-precision step.

    pairs            <- (prompt, chosen, rejected) from the task; held-out pairs on prompts never trained on
    ref log-probs    <- the frozen reference (the base model) scores every pair once, in the compute dtype
    for each step:
        rows         <- the next slice of a per-epoch permutation (a function of seed and step)
        state        <- step(state, pairs[rows])      policy log-probs in the compute dtype, DPO loss in FP32,
                                                      loss scaling, skip on overflow
        log; every eval_every steps: held-out loss, preference accuracy and margins; checkpoint
    export the final policy as a Hugging Face directory

The reference and the held-out evaluation go through the same jitted scoring function, so at step 0 every
held-out pair is a tie and the preference accuracy is exactly 0.5. Resume and SIGINT/SIGTERM behave as in the RL
loop (`rl/rundir.py`): a changed config is refused unless allowed and recorded, and a signal stops the loop at the
next step boundary with a checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_fp16.checkpoint import Checkpointer
from jaxrl_fp16.config import ConfigError, RunConfig
from jaxrl_fp16.models.decoder import CausalLM, token_logprobs
from jaxrl_fp16.models.hf import load_hf_params, load_tokenizer, save_hf_params
from jaxrl_fp16.rl.dpo import DPO_DIAG_NAMES, dpo_loss, sequence_logps
from jaxrl_fp16.rl.order import epoch_slice
from jaxrl_fp16.rl.preferences import PairArrays, split_pairs, tokenize_pairs
from jaxrl_fp16.rl.sft import ensure_base_model
from jaxrl_fp16.rl.loop import begin_run, export_final, inject_overflows, run_loop, start_or_resume
from jaxrl_fp16.rl.rundir import SILENT_CHANGES, ResumeOptions, checkpoint_dir, config_dict
from jaxrl_fp16.step import TrainState, make_train_step

__all__ = ["DPOTrainer", "pair_logps"]

log = logging.getLogger(__name__)
_EVAL_BATCH = 128  # pairs per scoring call (a fixed shape: one compiled program)
# Config keys a resume of a DPO run takes without asking: SILENT_CHANGES, and the RL sections it does not read.
DPO_SILENT_CHANGES = (*SILENT_CHANGES, "train", "sampler", "loss", "perfectible")


def pair_logps(model: CausalLM, params: Any, tokens_Nx2xT: jax.Array, attention_mask_Nx2xT: jax.Array,
               response_mask_Nx2xT: jax.Array) -> jax.Array:
    """Summed response log-probs [N, 2] (chosen, rejected) of pairs, in FP32; params in the compute dtype."""
    N, two, T = tokens_Nx2xT.shape
    logp_MxT = token_logprobs(model, params, tokens_Nx2xT.reshape(N * two, T),
                              attention_mask_Nx2xT.reshape(N * two, T))
    return sequence_logps(logp_MxT, response_mask_Nx2xT.reshape(N * two, T)).reshape(N, two)


def _check_supported(run: RunConfig) -> None:
    """DPO trains the full policy on one device: refuse the RL-only settings instead of ignoring them."""
    if run.lora is not None:
        raise ConfigError("lora: the dpo trainer trains full weights; remove the lora section (LoRA is supported by "
                          "the RL trainer)")
    if run.critic.enabled:
        raise ConfigError("critic.enabled=true: DPO has no value model; set critic.enabled=false")
    if run.mesh.fsdp != 1 or run.mesh.tensor != 1:
        raise ConfigError(f"mesh.fsdp={run.mesh.fsdp}, mesh.tensor={run.mesh.tensor}: the dpo trainer runs on one "
                          f"device and does not shard parameters; leave them at 1")


class DPOTrainer:
    """Builds a DPO run from a `RunConfig` (its `dpo` section); `run()` trains, logging to `run_dir`."""

    def __init__(self, run: RunConfig, run_dir: str, *, resume: bool = False,
                 resume_options: ResumeOptions = ResumeOptions()):
        self.run_cfg = run
        self.run_dir = run_dir
        self.policy = run.policy
        d = run.dpo
        _check_supported(run)
        begin_run(run_dir, run, resume=resume, options=resume_options, silent=DPO_SILENT_CHANGES)
        self.base_dir = ensure_base_model(run, progress=run.log.progress)
        self.model_cfg, params = load_hf_params(self.base_dir)
        tokenizer = load_tokenizer(self.base_dir)
        task = run.task.build()
        self.train_pairs, self.eval_pairs = split_pairs(task, d.num_pairs, d.eval_pairs, d.seed)
        data = tokenize_pairs(self.train_pairs + self.eval_pairs, tokenizer)  # one width for both
        if data.tokens.shape[-1] > self.model_cfg.max_position_embeddings:
            raise ValueError(f"preference rows are {data.tokens.shape[-1]} tokens long, more than the model's "
                             f"context ({self.model_cfg.max_position_embeddings})")
        self.train_data = data.subset(slice(0, d.num_pairs))
        self.eval_data = data.subset(slice(d.num_pairs, None))

        self.model = run.model.causal_lm(self.model_cfg, self.policy.compute_dtype, run.model.numerics())
        self.loss_cfg = d.loss_config()
        self._score = jax.jit(functools.partial(pair_logps, self.model))
        params = jax.tree_util.tree_map(jnp.asarray, params)
        # The frozen reference: the starting weights, scored once in the policy's compute dtype.
        self.ref_train = self.score(params, self.train_data)
        self.ref_eval = self.score(params, self.eval_data)

        self.optimizer = run.build_optimizer()
        self.step_fn = make_train_step(self._loss_fn, self.optimizer, self.policy,
                                       max_grad_norm=run.optim.max_grad_norm, num_microbatches=d.microbatches,
                                       donate=True)
        self.update = inject_overflows(self.step_fn, run.debug.inject_overflow_steps)
        os.makedirs(run_dir, exist_ok=True)
        self.checkpointer = Checkpointer(checkpoint_dir(run_dir), keep=run.checkpoint.keep)
        self.state, self.start_step = start_or_resume(
            run_dir, run, self.checkpointer, TrainState.create(params, self.optimizer, run.build_loss_scale()),
            resume=resume, options=resume_options, silent=DPO_SILENT_CHANGES, key="step")
        if resume:
            log.info("resumed from step %d", self.start_step)

    # ----- the loss the jitted step differentiates -----

    def _loss_fn(self, compute_params: Any, batch: dict[str, jax.Array]):
        logp_Bx2 = pair_logps(self.model, compute_params, batch["tokens"], batch["attention_mask"],
                              batch["response_mask"])
        ref_Bx2 = batch["ref_logps"]
        return dpo_loss(self.loss_cfg, logp_Bx2[:, 0], logp_Bx2[:, 1], ref_Bx2[:, 0], ref_Bx2[:, 1])

    # ----- scoring and evaluation -----

    def score(self, params: Any, data: PairArrays) -> np.ndarray:
        """Summed response log-probs [N, 2] of `data` under FP32 master `params`, in the compute dtype."""
        compute_params = self.policy.cast_to_compute(params)
        n = len(data)
        out = []
        for start in range(0, n, _EVAL_BATCH):
            rows = np.arange(start, start + _EVAL_BATCH) % n  # the last batch wraps around: one fixed shape
            b = data.take(rows)
            lp = self._score(compute_params, b["tokens"], b["attention_mask"], b["response_mask"])
            out.append(np.asarray(lp)[: min(_EVAL_BATCH, n - start)])
        return np.concatenate(out, axis=0)

    def evaluate(self) -> dict[str, float]:
        """Held-out DPO loss and diagnostics (`eval/loss`, `eval/accuracy`, `eval/margin`, ...)."""
        logp = self.score(self.state.params, self.eval_data)
        loss, diag = dpo_loss(self.loss_cfg, logp[:, 0], logp[:, 1], self.ref_eval[:, 0], self.ref_eval[:, 1])
        return {"eval/loss": float(loss), **{f"eval/{k}": float(v) for k, v in diag.items()}}

    # ----- one step -----

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step on the pairs of `step`; returns its metrics."""
        d = self.run_cfg.dpo
        t0 = time.perf_counter()
        rows = epoch_slice(len(self.train_data), d.batch_size, step, d.seed)
        batch = {**self.train_data.take(rows), "ref_logps": self.ref_train[rows]}
        self.state, metrics = self.update(self.state, batch)
        metrics = jax.device_get(metrics)
        return {
            "step": step + 1,
            "loss": float(metrics["loss"]),
            **{k: float(metrics[k]) for k in DPO_DIAG_NAMES},
            "grad_norm": float(metrics["grad_norm"]),
            "loss_scale": float(jax.device_get(self.state.loss_scale.loss_scale)),
            "skipped": int(metrics["skipped"]),
            "skipped_steps": int(self.state.skipped_steps),
            "time/step": time.perf_counter() - t0,
        }

    # ----- the loop -----

    def run(self, steps: int | None = None) -> dict[str, Any]:
        """Trains to `steps` (default `dpo.steps`); returns a summary (also written to `summary.json`)."""
        run = self.run_cfg
        total = run.dpo.steps if steps is None else steps
        t_start = time.perf_counter()
        first_eval, first_line = self._first_eval()
        last = {"eval": first_eval if self.start_step == 0 else None}  # the latest held-out metrics of this call

        def one(step: int) -> dict[str, Any]:
            m = self.train_step(step)
            if (step + 1) % run.dpo.eval_every == 0 or step + 1 == total:
                last["eval"] = self.evaluate()
                m.update(last["eval"])
            return m

        run_loop(one, run_dir=self.run_dir, start=self.start_step, total=total, every=run.checkpoint.every,
                 save=self.save, desc=f"DPO {run.precision}", unit="step", progress=run.log.progress,
                 tensorboard=run.log.tensorboard, purge_step=self.start_step,
                 postfix=lambda m: dict(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}", skip=m["skipped_steps"]),
                 first=first_line)
        export_final(self.run_dir, self.export, enabled=run.checkpoint.export_hf, trained=total > self.start_step)
        summary = {"precision": run.precision, "steps": int(self.state.step),
                   "skipped_steps": int(self.state.skipped_steps),
                   "loss_scale": float(jax.device_get(self.state.loss_scale.loss_scale)),
                   "time/total": time.perf_counter() - t_start, "start": first_eval,
                   "end": last["eval"] if last["eval"] is not None else self.evaluate()}
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        return summary

    def _first_eval(self) -> tuple[dict[str, float] | None, dict[str, Any] | None]:
        """(the held-out metrics at step 0, the metrics line to log for them): evaluated on a fresh run, read back
        from `metrics.jsonl` on a resume (no line to log; None when the file has none)."""
        if self.start_step == 0:
            first = self.evaluate()
            return first, {"step": 0, **first}
        path = os.path.join(self.run_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return None, None
        with open(path) as f:
            return next(({k: v for k, v in m.items() if k != "step"} for m in map(json.loads, f) if m["step"] == 0),
                        None), None

    def save(self, step: int) -> None:
        # `iteration` too, so that `jaxrl-fp16 export` reads DPO runs as it reads RL runs.
        meta = {"step": step, "iteration": step, "seed": self.run_cfg.dpo.seed,
                "base_model": os.path.realpath(self.base_dir), "config": config_dict(self.run_cfg)}
        self.checkpointer.save(step, self.state, meta)

    def export(self, out_dir: str, dtype: str | None = None, *, overwrite: bool = False) -> None:
        save_hf_params(jax.device_get(self.state.params), self.model_cfg, out_dir,
                       dtype=dtype or self.run_cfg.checkpoint.export_dtype, tokenizer_from=self.base_dir,
                       overwrite=overwrite, sources=[self.run_dir])

    def close(self) -> None:
        self.checkpointer.close()
