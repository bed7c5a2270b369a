"""The RL loop: a thin driver around the sampler and the one jitted mixed-precision step (the run's parts are
built by `rl/setup.py`, the loop's bookkeeping is `rl/loop.py`, the trained tree's variants `rl/trainable.py`).

    for each iteration:
        prompts   <- the next slice of the prompt set (deterministic in seed and iteration)
        rollout   <- sampler.generate(prompts)                 tokens + log mu (sampler dtype)
        rewards   <- task.reward(...); A <- group advantages (PPO: critic V_old, per-token GAE; rl/ppo.py)
        log pi    <- trainer forward on the same tokens and weights (trainer compute dtype)
        metrics   <- mismatch(log mu, log pi)
        K times:  state <- step(state, minibatch)              loss scaling, skip on overflow
        sampler.push_weights(state.params)
        log, checkpoint

Everything the loop does is a function of (config, checkpointed state, iteration), so a run killed at any
point and resumed from its last checkpoint ends with the same parameters as an uninterrupted one. A resume
refuses a config that changes the run's course unless the change is allowed (then it is recorded), and SIGINT
or SIGTERM stop the loop at the next iteration boundary with a checkpoint (`rundir.StopSignals`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl_fp16 import mismatch
from jaxrl_fp16 import multiprocess
from jaxrl_fp16 import sharding
from jaxrl_fp16.checkpoint import CheckpointError, Checkpointer
from jaxrl_fp16.config import RunConfig
from jaxrl_fp16.loss_scale import LossScale
from jaxrl_fp16.models.hf import load_hf_params, save_hf_params
from jaxrl_fp16.rl import ppo
from jaxrl_fp16.rl.advantages import group_advantages
from jaxrl_fp16.rl.loop import export_final, run_loop
from jaxrl_fp16.rl.order import epoch_slice
from jaxrl_fp16.rl.prompts import rollout_rewards
from jaxrl_fp16.rl.rundir import ResumeOptions, checkpoint_config, checkpoint_dir, config_dict, stored_config
from jaxrl_fp16.rl.setup import EVAL_SOURCE, RL_SILENT_CHANGES, RunParts, make_run_mesh, setup_run
from jaxrl_fp16.rl.sft import ensure_base_model
from jaxrl_fp16.rl.trainable import Trainable, rl_loss
from jaxrl_fp16.sampling import exchange
from jaxrl_fp16.scoring import bucket_width
from jaxrl_fp16.step import TrainState

__all__ = ["RL_SILENT_CHANGES", "Trainer", "export_checkpoint", "make_loss_scale", "make_optimizer",
           "make_run_mesh", "rollout_arrays", "rollout_span", "resolved_loss_scale_kind"]

log = logging.getLogger(__name__)

EVAL_SEED = 12345  # the sampling seed of every evaluation (`Trainer.evaluate`, `train.eval_every`)


def resolved_loss_scale_kind(run: RunConfig) -> str:
    """`loss_scale.kind` with `auto` resolved (`RunConfig.resolved_loss_scale_kind`)."""
    return run.resolved_loss_scale_kind()


def make_loss_scale(run: RunConfig) -> LossScale:
    """The run's initial loss scale (`RunConfig.build_loss_scale`)."""
    return run.build_loss_scale()


def make_optimizer(run: RunConfig) -> optax.GradientTransformation:
    """The run's optimizer (`RunConfig.build_optimizer`)."""
    return run.build_optimizer()


def _pad_left(x: np.ndarray, width: int, value: Any = 0) -> np.ndarray:
    extra = width - x.shape[1]
    if extra < 0:
        raise ValueError(f"rollout is {x.shape[1]} tokens wide, more than the fixed width {width}")
    return np.pad(x, ((0, 0), (extra, 0)), constant_values=value)


def rollout_span(attention_mask: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the columns holding a real token in some row: outside it every row is padding."""
    cols = np.flatnonzero(np.asarray(attention_mask).any(axis=0))
    if cols.size == 0:
        raise ValueError("rollout has no real token (attention_mask is all 0)")
    return int(cols[0]), int(cols[-1]) + 1


def rollout_arrays(rollout: Any, width: int, pad_id: int) -> dict[str, np.ndarray]:
    """The rollout's `tokens`, `attention_mask`, `response_mask` and `sampler_logp` (the last two float32)
    without their all-padding columns, left-padded to `width`: the same rows, positions and masked tokens at any
    width that holds them (the trainer passes `bucket_width` of the span, so short responses cost short rows)."""
    start, stop = rollout_span(rollout.attention_mask)
    cut = slice(start, stop)
    return {"tokens": _pad_left(rollout.tokens[:, cut], width, pad_id),
            "attention_mask": _pad_left(rollout.attention_mask[:, cut], width),
            "response_mask": _pad_left(rollout.response_mask[:, cut], width).astype(np.float32),
            "sampler_logp": _pad_left(rollout.logprobs[:, cut], width).astype(np.float32)}


class Trainer:
    """Runs the iterations of an RL run whose parts `setup.setup_run` builds from a `RunConfig`; `run()` trains,
    logging to `run_dir`.

    `resume` continues from the run directory's latest checkpoint (an error when there is none); `resume_options`
    says which config changes it takes and whether it falls back to an older checkpoint when the latest does not
    restore. The parts (`sampler`, `scorer`, `width`, ...) read as the trainer's own attributes.
    """

    def __init__(self, run: RunConfig, run_dir: str, *, resume: bool = False,
                 resume_options: ResumeOptions = ResumeOptions()):
        self.run_cfg = run
        self.run_dir = run_dir
        self.policy = run.policy
        self.progress = run.log.progress
        self.parts, self.state, self.start_iteration = setup_run(run, run_dir, resume=resume,
                                                                 resume_options=resume_options)
        self.lora = self.parts.trainable.lora

    def __getattr__(self, name: str) -> Any:
        parts = self.__dict__.get("parts")
        if parts is None or name not in RunParts.__dataclass_fields__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(parts, name)

    # ----- the loss the jitted step differentiates (before LoRA's merge) -----

    def _loss_fn(self, compute_params: Any, batch: dict[str, jax.Array]):
        return rl_loss(self.trainable, self.run_cfg, self.model, compute_params, batch)

    # ----- one iteration -----

    def iteration(self, it: int) -> dict[str, Any]:
        run = self.run_cfg
        t0 = time.perf_counter()
        idx = epoch_slice(len(self.problems), run.train.prompts_per_iteration, it, run.seed)
        problems = [self.problems[i] for i in idx]
        settings = run.sampler.settings(run.train.samples_per_prompt, seed=run.seed * 1_000_003 + it)
        # Several processes: each samples its block of prompts (whole groups) with those rows' random streams,
        # then all exchange their rows: every process holds the rollout of one process sampling them all.
        lo, hi = multiprocess.group_share(len(idx))
        settings = dataclasses.replace(settings, first_row=lo * run.train.samples_per_prompt)
        local = self.sampler.generate([self.prompt_ids[i] for i in idx[lo:hi]], settings)
        rollout = exchange.gather_rollout(local, lo, self.model_cfg.pad_token_id or 0)
        t1 = time.perf_counter()
        rewards = rollout_rewards(self.task, problems, self.tokenizer, rollout)
        advantages = None if run.critic.enabled else np.asarray(group_advantages(
            jnp.asarray(rewards), run.train.samples_per_prompt, normalize_std=run.train.normalize_advantage_std))
        t2 = time.perf_counter()

        # Padded to the bucket of this rollout's own longest row (at most self.width): few compiled widths.
        start, stop = rollout_span(rollout.attention_mask)
        arrays = rollout_arrays(rollout, bucket_width(stop - start, self.width), self.model_cfg.pad_token_id or 0)
        tokens, attention_mask = arrays["tokens"], arrays["attention_mask"]
        response_mask, sampler_logp = arrays["response_mask"], arrays["sampler_logp"]
        old_logp = self.scorer(self.policy_weights(), tokens, attention_mask, run.sampler.temperature,
                               max_width=self.width, memory_gib=run.train.score_memory_gib)
        old_logp = np.where(response_mask > 0, old_logp, 0.0).astype(np.float32)
        critic_batch, critic_metrics = {}, {}
        if run.critic.enabled:  # V_old, then per-token GAE advantages and the value targets
            advantages, critic_batch, critic_metrics = ppo.rollout_targets(
                self.value_scorer, self.trainable.critic_params(self.state.params), rewards, tokens, attention_mask,
                response_mask, run.critic)
        mm = mismatch.summarize(mismatch.mismatch_metrics(sampler_logp, old_logp, response_mask))
        self.last_logprobs = {"sampler_logprobs": sampler_logp, "trainer_logprobs": old_logp,
                              "response_mask": response_mask.astype(np.int32)}
        t3 = time.perf_counter()

        n = tokens.shape[0]
        K = run.train.minibatches_per_iteration
        order = np.random.default_rng([run.seed, it, 7]).permutation(n)
        step_metrics = []
        for k in range(K):
            rows = order[k * (n // K):(k + 1) * (n // K)]
            batch = {"tokens": tokens[rows], "attention_mask": attention_mask[rows],
                     "response_mask": response_mask[rows], "old_logp": old_logp[rows],
                     "sampler_logp": sampler_logp[rows], "advantages": advantages[rows].astype(np.float32),
                     **{key: value[rows] for key, value in critic_batch.items()}}
            batch = sharding.place(batch, self.batch_sharding)  # rows over ("data", "fsdp")
            self.state, metrics = self.update(self.state, batch, self.frozen)
            step_metrics.append(metrics)
        step_metrics = jax.device_get(step_metrics)
        t4 = time.perf_counter()
        self.sampler.push_weights(self.policy_weights())
        t5 = time.perf_counter()

        def mean_of(key):
            return float(np.mean([m[key] for m in step_metrics])) if key in step_metrics[0] else None

        out = {
            "step": it + 1,
            "rollout/local_rows": int(local.num_rows),
            "optimizer_step": int(self.state.step),
            "reward/mean": float(rewards.mean()),
            "reward/accuracy": float(np.mean(rewards >= 1.0)),
            "response_length/mean": float(rollout.response_lengths.mean()),
            "response_length/truncated_frac": float(rollout.truncated.mean()),
            **mm,
            **critic_metrics,
            "loss": mean_of("loss"),
            "grad_norm": mean_of("grad_norm"),
            "loss_scale": float(jax.device_get(self.state.loss_scale.loss_scale)),
            "skipped_steps": int(self.state.skipped_steps),
            "skipped_steps/iteration": int(sum(int(m["skipped"]) for m in step_metrics)),
            **{k: mean_of(k) for k in step_metrics[0] if k not in ("loss", "grad_norm", "loss_scale", "skipped",
                                                                   "grads_finite", "update_finite")},
            "time/sample": t1 - t0,
            "time/score": t2 - t1,
            "time/logprobs": t3 - t2,
            "time/train": t4 - t3,
            "time/sync": t5 - t4,
            "time/iteration": t5 - t0,
        }
        if run.train.eval_every and (it + 1) % run.train.eval_every == 0:  # the pushed weights, on the prompt set
            accuracy, rows = self._evaluate(run.train.eval_samples_per_prompt, EVAL_SEED)
            out.update({"eval/accuracy": accuracy, "eval/local_rows": rows})
            out["time/eval"] = time.perf_counter() - t5
        return out

    # ----- the loop -----

    def run(self, iterations: int | None = None) -> list[dict[str, Any]]:
        run = self.run_cfg
        total = run.train.iterations if iterations is None else iterations
        history = run_loop(self.iteration, run_dir=self.run_dir, start=self.start_iteration, total=total,
                           every=run.checkpoint.every, save=self.save, desc=f"RL {run.precision}",
                           progress=self.progress, tensorboard=run.log.tensorboard,
                           purge_step=self.start_iteration + 1,
                           postfix=lambda m: dict(acc=f"{m['reward/accuracy']:.2f}", kl=f"{m['mismatch/kl_k3']:.1e}",
                                                  skip=m["skipped_steps"]))
        if history and multiprocess.is_writer():
            # The last iteration's log mu / log pi per token, for scatter plots and offline analysis.
            np.savez_compressed(os.path.join(self.run_dir, "last_logprobs.npz"), **self.last_logprobs)
        export_final(self.run_dir, self.export, enabled=run.checkpoint.export_hf, trained=total > self.start_iteration)
        return history

    def evaluate(self, samples_per_prompt: int = 4, seed: int = EVAL_SEED) -> float:
        """Accuracy of the current weights on the whole prompt set (same prompts and seed every call). Several
        processes each sample their block of prompts with those rows' random streams and add up the correct
        answers (a collective: every process calls it): the accuracy of one process sampling them all."""
        return self._evaluate(samples_per_prompt, seed)[0]

    def _evaluate(self, samples_per_prompt: int, seed: int) -> tuple[float, int]:
        """(accuracy, rows this process sampled)."""
        lo, hi = multiprocess.group_share(len(self.prompt_ids), EVAL_SOURCE)
        settings = dataclasses.replace(self.run_cfg.sampler.settings(samples_per_prompt, seed),
                                       first_row=lo * samples_per_prompt)
        local = self.sampler.generate(self.prompt_ids[lo:hi], settings)
        rewards = rollout_rewards(self.task, self.problems[lo:hi], self.tokenizer, local)
        correct = int(multiprocess.allgather_ints(int(np.sum(rewards >= 1.0))).sum())
        return correct / (len(self.prompt_ids) * samples_per_prompt), int(local.num_rows)

    def save(self, iteration: int) -> None:
        meta = {"iteration": iteration, "data_position": iteration * self.run_cfg.train.prompts_per_iteration,
                "seed": self.run_cfg.seed, "base_model": os.path.realpath(self.base_dir),
                "num_prompts": len(self.problems), "config": config_dict(self.run_cfg)}
        self.checkpointer.save(iteration, self.state, meta)

    def policy_weights(self) -> Any:
        """The policy's FP32 weights as the sampler and the scorer take them (LoRA: base and adapters merged)."""
        return self.trainable.policy_weights(self.state.params)

    def export(self, out_dir: str, dtype: str | None = None, *, overwrite: bool = False) -> None:
        base = None if self.lora is None else load_hf_params(self.base_dir)[1]
        params = self.trainable.exported(self.state.params, base)  # every process gathers
        if multiprocess.is_writer():  # process 0 writes, the others wait for the folder
            save_hf_params(params, self.model_cfg, out_dir, dtype=dtype or self.run_cfg.checkpoint.export_dtype,
                           tokenizer_from=self.base_dir, overwrite=overwrite, sources=[self.run_dir])
        multiprocess.barrier("export")

    def close(self) -> None:
        self.sampler.close()
        self.checkpointer.close()


def export_checkpoint(run_dir: str, out_dir: str, *, iteration: int | None = None,
                      dtype: str = "float32", overwrite: bool = False) -> int:
    """Writes a run's checkpoint (default: the latest) as a Hugging Face directory; returns its iteration.

    The model is built from the config that produced that checkpoint (kept in its meta; for older runs, the
    run directory's stored config), also when a resume changed the config since.
    """
    stored = stored_config(run_dir)
    checkpointer = Checkpointer(checkpoint_dir(run_dir), keep=stored.checkpoint.keep)
    try:
        if not checkpointer.all():
            raise FileNotFoundError(f"no checkpoint in {run_dir}")
        if iteration is not None and iteration not in checkpointer.all():
            raise ValueError(f"no checkpoint of iteration {iteration} in {run_dir}; have {checkpointer.all()}")
        chosen = checkpointer.latest() if iteration is None else iteration
        try:
            run = checkpoint_config(run_dir, checkpointer.meta(chosen), chosen)
        except CheckpointError:  # the restore below names what is broken and the newest checkpoint that restores
            run = stored
        base_dir = ensure_base_model(run, progress=False)
        model_cfg, params = load_hf_params(base_dir)
        optimizer = make_optimizer(run)
        trainable = Trainable.for_run(run, model_cfg, params)
        like = TrainState.create(trainable.init(jax.tree_util.tree_map(jnp.asarray, params)), optimizer,
                                 make_loss_scale(run))
        state, meta = checkpointer.restore(like, iteration)
    finally:
        checkpointer.close()
    save_hf_params(trainable.exported(state.params, params), model_cfg, out_dir, dtype=dtype,
                   tokenizer_from=base_dir, overwrite=overwrite, sources=[run_dir])
    return int(meta["iteration"])
