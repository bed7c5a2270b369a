"""Everything an RL run is built from, from its `RunConfig`: `setup_run` returns the parts, the state to train
from and the iteration it starts at; `trainer.Trainer` only runs iterations with them.

    mesh, base model, tokenizer, task, sampler, prompt set, scorer, model, trainable (full / PPO / LoRA),
    optimizer, sharded state, memory estimate, the jitted step (fault injection around it), checkpointer, resume
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import jax
import numpy as np

from jaxrl_fp16 import multiprocess
from jaxrl_fp16 import sharding
from jaxrl_fp16.checkpoint import Checkpointer
from jaxrl_fp16.config import ConfigError, RunConfig
from jaxrl_fp16.memory import MemoryEstimate, check_fits, device_bytes_limit, estimate_memory, run_options
from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.models.decoder import CausalLM
from jaxrl_fp16.models.hf import load_hf_params, load_tokenizer
from jaxrl_fp16.rl import ppo
from jaxrl_fp16.rl.loop import begin_run, inject_overflows, start_or_resume
from jaxrl_fp16.rl.prompts import build_prompt_set
from jaxrl_fp16.rl.rundir import SILENT_CHANGES, ResumeOptions, checkpoint_dir
from jaxrl_fp16.rl.sft import ensure_base_model
from jaxrl_fp16.rl.trainable import Trainable, make_rl_step
from jaxrl_fp16.sampling import create_sampler
from jaxrl_fp16.sampling.options import trainer_devices
from jaxrl_fp16.scoring import Scorer
from jaxrl_fp16.step import TrainState

__all__ = ["RL_SILENT_CHANGES", "RunParts", "make_run_mesh", "setup_run"]

log = logging.getLogger(__name__)
# Config keys a resume of an RL run takes without asking: SILENT_CHANGES, and the DPO section it does not read.
RL_SILENT_CHANGES = (*SILENT_CHANGES, "dpo")


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


EVAL_SOURCE = "the prompt set's size (an evaluation samples every prompt)"  # as group_share names it


def _check_processes(run: RunConfig) -> None:
    """Several processes: each must get prompts to sample, with a sampler that seeds per row."""
    if not multiprocess.is_multiprocess():
        return
    if run.sampler.name == "transformers":
        raise ConfigError(f"sampler.name=transformers runs in one process only (it seeds per batch, not per row); "
                          f"with {jax.process_count()} processes use sampler.name=jax or vllm")
    _check_share(run.train.prompts_per_iteration, "train.prompts_per_iteration")


def _check_share(num_groups: int, source: str, why: str = "") -> None:
    """`multiprocess.group_share`'s refusal (some process would get no prompt) as a ConfigError, before any work."""
    try:
        multiprocess.group_share(num_groups, source)
    except ValueError as e:
        raise ConfigError(f"{e}{why}") from None


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunParts:
    """What an RL run's iterations use; built once by `setup_run` (the train state is not a part: it changes)."""

    mesh: Any
    base_dir: str  # the base model's Hugging Face folder
    model_cfg: ModelConfig
    tokenizer: Any
    task: Any
    sampler: Any
    problems: list  # the prompt set
    prompt_stats: Any
    prompt_ids: list[list[int]]
    width: int  # the fixed width: longest prompt + sampler.max_new_tokens
    scorer: Scorer
    model: CausalLM
    trainable: Trainable
    frozen: Any  # LoRA's base in the compute dtype, sharded (None without LoRA)
    optimizer: Any
    state_sharding: Any
    batch_sharding: Any
    memory: MemoryEstimate
    step_fn: Callable[..., Any]  # the jitted update step
    update: Callable[..., Any]  # `step_fn` with the run's fault injection (debug.inject_overflow_steps)
    value_scorer: ppo.ValueScorer | None  # PPO's V_old
    checkpointer: Checkpointer


def _prompt_ids(tokenizer: Any, problems: list) -> list[list[int]]:
    return [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]


def _value_scorer(run: RunConfig, model: CausalLM, scorer: Scorer) -> ppo.ValueScorer | None:
    """PPO's V_old scorer, in batches of the rows the policy scorer takes under `train.score_memory_gib`."""
    if not run.critic.enabled:
        return None
    budget = run.train.score_memory_gib
    return ppo.ValueScorer(model, run.policy, rows=lambda width, num_rows: scorer.rows(width, num_rows, budget))


def setup_run(run: RunConfig, run_dir: str, *, resume: bool = False,
              resume_options: ResumeOptions = ResumeOptions()) -> tuple[RunParts, TrainState, int]:
    """(parts, state, start iteration) of an RL run in `run_dir`; a resume restores the latest checkpoint (after
    refusing a config change not allowed, before anything is built) and pushes its weights to the sampler."""
    begin_run(run_dir, run, resume=resume, options=resume_options, silent=RL_SILENT_CHANGES)
    mesh = make_run_mesh(run)
    _check_processes(run)

    base_dir = ensure_base_model(run, progress=run.log.progress)
    model_cfg, params = load_hf_params(base_dir)
    tokenizer = load_tokenizer(base_dir)
    task = run.task.build()
    numerics = run.model.numerics()
    compute = run.policy.compute_dtype
    sampler = create_sampler(run.sampler.name, cfg=model_cfg, params=params, model_dir=base_dir,
                             dtype=run.sampler.dtype or str(compute), trainer_dtype=compute,
                             allow_dtype_mismatch=run.sampler.allow_dtype_mismatch, numerics=run.sampler_numerics(),
                             seed=run.seed, options=run.sampler.engine_options())
    problems, prompt_stats = build_prompt_set(run, base_dir, model_cfg, params, tokenizer, task, sampler)
    if run.train.eval_every and multiprocess.is_multiprocess():  # an evaluation splits the prompt set
        _check_share(len(problems), EVAL_SOURCE, f" (train.eval_every={run.train.eval_every})")
    prompt_ids = _prompt_ids(tokenizer, problems)
    width = max(len(p) for p in prompt_ids) + run.sampler.max_new_tokens
    if width > model_cfg.max_position_embeddings:
        raise ValueError(f"longest prompt + sampler.max_new_tokens = {width} tokens exceeds the model's "
                         f"context ({model_cfg.max_position_embeddings})")
    log.info("trainer compute dtype %s, sampler dtype %s (%s)", compute, sampler.compute_dtype, run.sampler.name)
    scorer = Scorer(model_cfg, dtype=compute, numerics=numerics, **run.model.forward_options())
    model = run.model.causal_lm(model_cfg, compute, numerics)
    optimizer = run.build_optimizer()
    # LoRA: the step trains the adapters; the base rides along in the compute dtype as `frozen`.
    trainable = Trainable.for_run(run, model_cfg, params)
    # Sharded from the start: params placed by the rules, then the state (Adam's moments follow the params).
    placed = sharding.place(params, sharding.param_shardings(params, mesh))
    state = TrainState.create(trainable.init(placed), optimizer, run.build_loss_scale())
    state_sharding = sharding.state_shardings(state, mesh, optimizer)
    batch_sharding = sharding.batch_sharding(mesh)
    state = sharding.place(state, state_sharding)
    frozen = trainable.frozen
    if frozen is not None:
        frozen = sharding.place(frozen, sharding.param_shardings(frozen, mesh))
    memory = _memory_estimate(run, model_cfg, state.params, mesh, compute, width, frozen)
    step_fn = make_rl_step(trainable, run, model, optimizer, state_sharding=state_sharding,
                           batch_sharding=batch_sharding)
    os.makedirs(run_dir, exist_ok=True)
    checkpointer = Checkpointer(checkpoint_dir(run_dir), keep=run.checkpoint.keep)
    state, start = start_or_resume(run_dir, run, checkpointer, state, resume=resume, options=resume_options,
                                   silent=RL_SILENT_CHANGES)
    parts = RunParts(mesh=mesh, base_dir=base_dir, model_cfg=model_cfg, tokenizer=tokenizer, task=task,
                     sampler=sampler, problems=problems, prompt_stats=prompt_stats, prompt_ids=prompt_ids,
                     width=width, scorer=scorer, model=model, trainable=trainable, frozen=frozen,
                     optimizer=optimizer, state_sharding=state_sharding, batch_sharding=batch_sharding,
                     memory=memory, step_fn=step_fn, update=inject_overflows(step_fn, run.debug.inject_overflow_steps),
                     value_scorer=_value_scorer(run, model, scorer),
                     checkpointer=checkpointer)
    if resume:
        sampler.push_weights(trainable.policy_weights(state.params))
        log.info("resumed from iteration %d", start)
    return parts, state, start
