"""The RL loop: a thin driver around the sampler and the one jitted mixed-precision step.

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
from jaxrl_fp16.config import ConfigError, RunConfig
from jaxrl_fp16.lora import LoRA
from jaxrl_fp16.loss_scale import DynamicLossScale, NoOpLossScale, StaticLossScale
from jaxrl_fp16.memory import check_fits, device_bytes_limit, estimate_memory, run_options
from jaxrl_fp16.models.decoder import CausalLM, token_logprobs
from jaxrl_fp16.models.hf import load_hf_params, save_hf_params
from jaxrl_fp16.rl import ppo
from jaxrl_fp16.rl.advantages import group_advantages
from jaxrl_fp16.rl.losses import LossInputs, compute_loss
from jaxrl_fp16.rl.order import epoch_slice
from jaxrl_fp16.rl.prompts import build_prompt_set, rollout_rewards
from jaxrl_fp16.rl.rundir import (SILENT_CHANGES, Interrupted, MetricsLog, ResumeOptions, StopSignals, begin_resume,
                                  checkpoint_config, checkpoint_dir, config_dict, finish_resume, refuse_overwrite,
                                  signal_name, stored_config, write_config)
from jaxrl_fp16.rl.sft import ensure_base_model
from jaxrl_fp16.rl.tasks import make_task
from jaxrl_fp16.sampling import create_sampler
from jaxrl_fp16.sampling.options import trainer_devices
from jaxrl_fp16.scoring import Scorer, bucket_width
from jaxrl_fp16.step import TrainState, make_train_step

__all__ = ["RL_SILENT_CHANGES", "Trainer", "export_checkpoint", "make_loss_scale", "make_optimizer",
           "rollout_arrays", "rollout_span", "resolved_loss_scale_kind"]

log = logging.getLogger(__name__)
# Config keys a resume of an RL run takes without asking: SILENT_CHANGES, and the DPO section it does not read.
RL_SILENT_CHANGES = (*SILENT_CHANGES, "dpo")


# An emulated format with this many exponent bits or fewer underflows small gradients as FP16 (e5m10) does.
AUTO_SCALE_MAX_EXPONENT_BITS = 5


def resolved_loss_scale_kind(run: RunConfig) -> str:
    """`loss_scale.kind`, with `auto` resolved: dynamic when the compute dtype is float16 or the emulated format
    (`model.emulate`) has at most `AUTO_SCALE_MAX_EXPONENT_BITS` exponent bits (e5m10, e5m2, e4m3), else none."""
    if run.loss_scale.kind != "auto":
        return run.loss_scale.kind
    fmt = run.model.numerics().float_format
    if fmt is not None:
        return "dynamic" if fmt.exponent_bits <= AUTO_SCALE_MAX_EXPONENT_BITS else "none"
    return "dynamic" if run.policy.compute_dtype == np.float16 else "none"


def make_loss_scale(run: RunConfig):
    ls = run.loss_scale
    kind = resolved_loss_scale_kind(run)
    if kind == "dynamic":
        return DynamicLossScale(loss_scale=ls.init_scale, period=ls.period, factor=ls.factor,
                                min_loss_scale=ls.min_scale, max_loss_scale=ls.max_scale)
    if kind == "static":
        return StaticLossScale(ls.init_scale)
    return NoOpLossScale()


def make_optimizer(run: RunConfig) -> optax.GradientTransformation:
    o = run.optim
    lr = o.lr if o.warmup_steps == 0 else optax.linear_schedule(0.0, o.lr, o.warmup_steps)
    optimizer = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if run.critic.enabled:  # PPO: one transformation over {"policy", "critic"}, each group clipped on its own
        return ppo.make_optimizer(optimizer, run.critic, o.max_grad_norm)
    return optimizer


def _trainable(run: RunConfig, params: Any, lora: LoRA | None = None) -> Any:
    """The tree the step trains: the policy's params, or for PPO {"policy": ..., "critic": ...}; with LoRA the
    policy's part is its adapters."""
    tree = ppo.init_params(params) if run.critic.enabled else params
    return tree if lora is None else lora.trainable(tree)


def _policy_params(run: RunConfig, params: Any) -> Any:
    """The policy's (Hugging Face-shaped) params within the trained tree: what is sampled and exported."""
    return ppo.policy_params(params) if run.critic.enabled else params


def _exported_policy(run: RunConfig, trainable: Any, lora: LoRA | None, base: Any) -> Any:
    """The policy's FP32 weights for export, on the host; LoRA: the FP32 adapters merged into the FP32 base."""
    params = _policy_params(run, trainable)
    # Several processes: gathered by all (collectives), one tensor at a time.
    return multiprocess.host_tree(params if lora is None else lora.export_params(params, base))


def make_run_mesh(run: RunConfig):
    """The run's device mesh (`mesh.*` over all devices); a ConfigError names the keys when the devices or a
    mini-batch's rows do not split over it."""
    devices = trainer_devices(jax.devices(), run.sampler.devices)  # without the vLLM engine's own GPUs, if any
    mesh = sharding.make_mesh(**run.mesh.shape(len(devices)), devices=devices)
    t = run.train
    rows = t.prompts_per_iteration * t.samples_per_prompt // t.minibatches_per_iteration
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % split:
        raise ConfigError(f"a mini-batch of {rows} rows (train.prompts_per_iteration x train.samples_per_prompt / "
                          f"train.minibatches_per_iteration) does not split over mesh.data x mesh.fsdp = {split} "
                          f"devices")
    return mesh


def _check_processes(run: RunConfig) -> None:
    """Several processes: each must get prompts to sample, with a sampler that seeds per row."""
    if not multiprocess.is_multiprocess():
        return
    if run.sampler.name == "transformers":
        raise ConfigError(f"sampler.name=transformers runs in one process only (it seeds per batch, not per row); "
                          f"with {jax.process_count()} processes use sampler.name=jax or vllm")
    try:
        multiprocess.group_share(run.train.prompts_per_iteration)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _memory_estimate(run: RunConfig, model_cfg, params: Any, mesh, compute, seq_len: int, frozen: Any = None):
    """The per-device estimate of training `params` (the trained tree; `frozen`: LoRA's base) on `mesh`, logged
    and checked."""
    sizes = sharding.axis_sizes(mesh)
    rows = run.train.prompts_per_iteration * run.train.samples_per_prompt // run.train.minibatches_per_iteration
    estimate = estimate_memory(model_cfg, sizes, compute_bytes=np.dtype(compute).itemsize,
                               microbatch_rows=rows // run.train.microbatches, seq_len=seq_len,
                               params_per_device=sharding.elements_per_device(params, sizes),
                               frozen_per_device=0 if frozen is None else sharding.elements_per_device(frozen, sizes),
                               **run_options(run, model_cfg, seq_len))
    log.info("mesh %s; training memory estimate: %s", dict(sizes), estimate.describe())
    check_fits(estimate, device_bytes_limit(mesh.devices.flat))
    return estimate


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
    """Builds everything a run needs from a `RunConfig`; `run()` trains, logging to `run_dir`.

    `resume` continues from the run directory's latest checkpoint (an error when there is none); `resume_options`
    says which config changes it takes and whether it falls back to an older checkpoint when the latest does not
    restore.
    """

    def __init__(self, run: RunConfig, run_dir: str, *, resume: bool = False,
                 resume_options: ResumeOptions = ResumeOptions()):
        self.run_cfg = run
        self.run_dir = run_dir
        self.policy = run.policy
        self.progress = run.log.progress
        refuse_overwrite(run_dir, resume)
        if resume:  # before anything is built: nothing to resume, or a config change not allowed
            begin_resume(run_dir, run, resume_options, RL_SILENT_CHANGES)
        self.mesh = make_run_mesh(run)
        _check_processes(run)

        self.base_dir = ensure_base_model(run, progress=self.progress)
        self.model_cfg, params = load_hf_params(self.base_dir)
        from jaxrl_fp16.models.hf import load_tokenizer

        self.tokenizer = load_tokenizer(self.base_dir)
        self.task = make_task(run.task.name, **dict(run.task.options))
        numerics = run.model.numerics()
        compute = self.policy.compute_dtype
        sampler_dtype = run.sampler.dtype or str(compute)
        self.sampler = create_sampler(run.sampler.name, cfg=self.model_cfg, params=params, model_dir=self.base_dir,
                                      dtype=sampler_dtype, trainer_dtype=compute,
                                      allow_dtype_mismatch=run.sampler.allow_dtype_mismatch, numerics=numerics,
                                      seed=run.seed, options=run.sampler.engine_options())
        self.problems, self.prompt_stats = build_prompt_set(run, self.base_dir, self.model_cfg, params,
                                                            self.tokenizer, self.task, self.sampler)
        self.prompt_ids = [self.tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in self.problems]
        self.width = max(len(p) for p in self.prompt_ids) + run.sampler.max_new_tokens
        if self.width > self.model_cfg.max_position_embeddings:
            raise ValueError(f"longest prompt + sampler.max_new_tokens = {self.width} tokens exceeds the model's "
                             f"context ({self.model_cfg.max_position_embeddings})")
        log.info("trainer compute dtype %s, sampler dtype %s (%s)", compute, self.sampler.compute_dtype,
                 run.sampler.name)
        attention = dict(attention=run.model.attention, attention_block=run.model.attention_block)
        self.scorer = Scorer(self.model_cfg, dtype=compute, numerics=numerics, **attention)
        self.model = CausalLM(self.model_cfg, dtype=compute, numerics=numerics, remat=run.model.remat, **attention)
        self.loss_cfg = run.loss
        self.optimizer = make_optimizer(run)
        # LoRA: the step trains the adapters; the base rides along in the compute dtype as `frozen`.
        self.lora = LoRA.for_run(run, self.model_cfg, params)
        self.frozen = None if self.lora is None else self.lora.frozen
        # Sharded from the start: params placed by the rules, then the state (Adam's moments follow the params).
        placed = sharding.place(params, sharding.param_shardings(params, self.mesh))
        self.state = TrainState.create(_trainable(run, placed, self.lora), self.optimizer, make_loss_scale(run))
        self.state_sharding = sharding.state_shardings(self.state, self.mesh, self.optimizer)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.state = sharding.place(self.state, self.state_sharding)
        if self.frozen is not None:
            self.frozen = sharding.place(self.frozen, sharding.param_shardings(self.frozen, self.mesh))
        self.memory = _memory_estimate(run, self.model_cfg, self.state.params, self.mesh, compute, self.width,
                                       self.frozen)
        self.step_fn = make_train_step(self._loss_fn if self.lora is None else self.lora.wrap_loss(self._loss_fn),
                                       self.optimizer, self.policy,
                                       max_grad_norm=None if run.critic.enabled else run.optim.max_grad_norm,
                                       num_microbatches=run.train.microbatches, donate=True,
                                       state_sharding=self.state_sharding, batch_sharding=self.batch_sharding)
        self.value_scorer = ppo.ValueScorer(self.model, self.policy) if run.critic.enabled else None
        os.makedirs(run_dir, exist_ok=True)
        self.checkpointer = Checkpointer(checkpoint_dir(run_dir), keep=run.checkpoint.keep)
        self.start_iteration = 0
        if resume:
            self.state, meta = self.checkpointer.restore(self.state, fallback=resume_options.fallback)
            self.start_iteration = int(meta["iteration"])
            finish_resume(run_dir, run, resume_options, meta, self.start_iteration, RL_SILENT_CHANGES)
            self.sampler.push_weights(self.policy_weights())
            log.info("resumed from iteration %d", self.start_iteration)
        else:
            write_config(run_dir, run)

    # ----- the loss the jitted step differentiates -----

    def _loss_fn(self, compute_params: Any, batch: dict[str, jax.Array]):
        logp = token_logprobs(self.model, _policy_params(self.run_cfg, compute_params), batch["tokens"],
                              batch["attention_mask"], temperature=self.run_cfg.sampler.temperature)
        adv = batch["advantages"]  # [B] (group advantages) or [B, T] (PPO's GAE)
        inputs = LossInputs(logp_BxT=logp, old_logp_BxT=batch["old_logp"], sampler_logp_BxT=batch["sampler_logp"],
                            mask_BxT=batch["response_mask"],
                            **({"advantages_BxT": adv} if adv.ndim == 2 else {"advantages_B": adv}))
        loss, diag = compute_loss(self.loss_cfg, inputs)
        if self.run_cfg.critic.enabled:
            value_term, value_diag = ppo.value_loss_term(self.model, compute_params["critic"], batch,
                                                         self.run_cfg.critic, self.loss_cfg.aggregation,
                                                         self.loss_cfg.max_response_len)
            loss, diag = loss + value_term, {**diag, **value_diag}
        # Fault injection for tests and drills: a poisoned mini-batch makes every gradient non-finite.
        loss = loss * jnp.where(jnp.any(batch["poison"] > 0), jnp.inf, 1.0)
        return loss, diag

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
        rollout = multiprocess.gather_rollout(local, lo, self.model_cfg.pad_token_id or 0)
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
                self.value_scorer, self.state.params["critic"], rewards, tokens, attention_mask, response_mask,
                run.critic)
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
            global_step = int(self.state.step)
            poison = float(global_step in run.debug.inject_overflow_steps)
            batch = {"tokens": tokens[rows], "attention_mask": attention_mask[rows],
                     "response_mask": response_mask[rows], "old_logp": old_logp[rows],
                     "sampler_logp": sampler_logp[rows], "advantages": advantages[rows].astype(np.float32),
                     "poison": np.full((len(rows),), poison, np.float32),
                     **{key: value[rows] for key, value in critic_batch.items()}}
            batch = sharding.place(batch, self.batch_sharding)  # rows over ("data", "fsdp")
            self.state, metrics = self.step_fn(self.state, batch, self.frozen)
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
        return out

    # ----- the loop -----

    def run(self, iterations: int | None = None) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        run = self.run_cfg
        total = run.train.iterations if iterations is None else iterations
        metrics_log = MetricsLog(self.run_dir, self.start_iteration, tensorboard=run.log.tensorboard,
                                 purge_step=self.start_iteration + 1)
        history = []
        bar = tqdm(range(self.start_iteration, total), initial=self.start_iteration, total=total,
                   desc=f"RL {run.precision}", disable=not self.progress)
        ckpt_dir = checkpoint_dir(self.run_dir)
        try:
            with StopSignals(ckpt_dir) as stop:
                for it in bar:
                    m = self.iteration(it)
                    history.append(m)
                    metrics_log.write(m)
                    bar.set_postfix(acc=f"{m['reward/accuracy']:.2f}", kl=f"{m['mismatch/kl_k3']:.1e}",
                                    skip=m["skipped_steps"])
                    done = it + 1
                    signum = multiprocess.agree_max(stop.signum or 0) or None  # a signal to one process stops all
                    if done % run.checkpoint.every == 0 or done == total or signum is not None:
                        self.save(done)
                    if signum is not None:
                        raise Interrupted(signum, f"stopped by {signal_name(signum)} after iteration "
                                                       f"{done} of {total}; checkpoint {done} saved in {ckpt_dir} "
                                                       f"(continue with --resume)")
        finally:
            bar.close()
            metrics_log.close()
        if history and multiprocess.is_writer():
            # The last iteration's log mu / log pi per token, for scatter plots and offline analysis.
            np.savez_compressed(os.path.join(self.run_dir, "last_logprobs.npz"), **self.last_logprobs)
        hf_dir = os.path.join(self.run_dir, "hf")
        # Also when a resumed run had nothing left to do but was killed before its export.
        if run.checkpoint.export_hf and (total > self.start_iteration or not os.path.isdir(hf_dir)):
            self.export(hf_dir, overwrite=True)  # the run's own folder: also one an older version wrote
        return history

    def evaluate(self, samples_per_prompt: int = 4, seed: int = 12345) -> float:
        """Accuracy of the current weights on the whole prompt set (same prompts and seed every call)."""
        rollout = self.sampler.generate(self.prompt_ids, self.run_cfg.sampler.settings(samples_per_prompt, seed))
        rewards = rollout_rewards(self.task, self.problems, self.tokenizer, rollout)
        return float(np.mean(rewards >= 1.0))

    def save(self, iteration: int) -> None:
        meta = {"iteration": iteration, "data_position": iteration * self.run_cfg.train.prompts_per_iteration,
                "seed": self.run_cfg.seed, "base_model": os.path.realpath(self.base_dir),
                "num_prompts": len(self.problems), "config": config_dict(self.run_cfg)}
        self.checkpointer.save(iteration, self.state, meta)

    def policy_weights(self) -> Any:
        """The policy's FP32 weights as the sampler and the scorer take them (LoRA: base and adapters merged)."""
        params = _policy_params(self.run_cfg, self.state.params)
        return params if self.lora is None else self.lora.policy_params(params)

    def export(self, out_dir: str, dtype: str | None = None, *, overwrite: bool = False) -> None:
        base = None if self.lora is None else load_hf_params(self.base_dir)[1]
        params = _exported_policy(self.run_cfg, self.state.params, self.lora, base)  # every process gathers
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
        lora = LoRA.for_run(run, model_cfg, params)
        like = TrainState.create(_trainable(run, jax.tree_util.tree_map(jnp.asarray, params), lora), optimizer,
                                 make_loss_scale(run))
        state, meta = checkpointer.restore(like, iteration)
    finally:
        checkpointer.close()
    save_hf_params(_exported_policy(run, state.params, lora, params), model_cfg, out_dir, dtype=dtype,
                   tokenizer_from=base_dir, overwrite=overwrite, sources=[run_dir])
    return int(meta["iteration"])
