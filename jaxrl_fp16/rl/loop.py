"""What every training loop of this project shares: resume, the loop (progress bar, metrics log, checkpoint
cadence, stop signals), the final export, and fault injection around the jitted update step.

    begin_run(...)                          refuse to overwrite; a resume checks its config before anything is built
    state, start = start_or_resume(...)     restore the latest checkpoint (or write the config of a fresh run)
    history = run_loop(...)                 for i in [start, total): metrics <- one(i); log; checkpoint; stop?
    export_final(...)                       the Hugging Face export, when the run trained or has none yet
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_fp16 import multiprocess
from jaxrl_fp16.checkpoint import Checkpointer
from jaxrl_fp16.config import RunConfig
from jaxrl_fp16.gpu_host import prepare_determinism
from jaxrl_fp16.rl.rundir import (Interrupted, MetricsLog, ResumeOptions, StopSignals, begin_resume, checkpoint_dir,
                                  finish_resume, refuse_overwrite, signal_name, write_config)

__all__ = ["begin_run", "export_final", "inject_overflows", "poisoned", "run_loop", "start_or_resume"]


# ----- resume -----

def begin_run(run_dir: str, run: RunConfig, *, resume: bool, options: ResumeOptions,
              silent: Collection[str]) -> None:
    """Before anything is built: refuse to overwrite a run, and for a resume refuse a missing checkpoint or a
    config change not allowed (`silent`: the keys taken without asking); then apply `debug.deterministic` as
    `jaxrl-fp16` applies it before JAX starts (a run built from Python gets the same setting, or a
    DeterminismError where JAX already runs on a GPU without the flag)."""
    refuse_overwrite(run_dir, resume)
    if resume:
        begin_resume(run_dir, run, options, silent)
    prepare_determinism(run)


def start_or_resume(run_dir: str, run: RunConfig, checkpointer: Checkpointer, state: Any, *, resume: bool,
                    options: ResumeOptions, silent: Collection[str], key: str = "iteration") -> tuple[Any, int]:
    """(state, start): the checkpoint's state and its `meta[key]` on a resume (the config change recorded), or
    `state` and 0 for a fresh run (its config written to the run directory)."""
    if not resume:
        write_config(run_dir, run)
        return state, 0
    state, meta = checkpointer.restore(state, fallback=options.fallback)
    start = int(meta[key])
    finish_resume(run_dir, run, options, meta, start, silent)
    return state, start


# ----- the loop -----

def run_loop(one: Callable[[int], dict[str, Any]], *, run_dir: str, start: int, total: int, every: int,
             save: Callable[[int], None], desc: str, unit: str = "iteration", progress: bool = True,
             tensorboard: bool = False, purge_step: int | None = None,
             postfix: Callable[[dict[str, Any]], dict[str, Any]] = lambda m: {},
             first: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Runs `one(i)` for i in [start, total) and returns its metrics: each logged to `metrics.jsonl` (and
    TensorBoard), shown on the progress bar (`postfix`), and checkpointed (`save(done)`) every `every`, at the
    end and on a stop signal, which then raises `Interrupted`. `first`: a line logged before the first `one`.

    A signal that reached one process stops all of them at the same boundary.
    """
    from tqdm.auto import tqdm

    metrics_log = MetricsLog(run_dir, start, tensorboard=tensorboard,
                             purge_step=start if purge_step is None else purge_step)
    history = []
    bar = tqdm(range(start, total), initial=start, total=total, desc=desc, disable=not progress)
    ckpt_dir = checkpoint_dir(run_dir)
    try:
        if first is not None:
            metrics_log.write(first)
        with StopSignals(ckpt_dir, unit=unit) as stop:
            for i in bar:
                m = one(i)
                history.append(m)
                metrics_log.write(m)
                bar.set_postfix(**postfix(m))
                done = i + 1
                signum = multiprocess.agree_max(stop.signum or 0) or None  # a signal to one process stops all
                if done % every == 0 or done == total or signum is not None:
                    save(done)
                if signum is not None:
                    raise Interrupted(signum, f"stopped by {signal_name(signum)} after {unit} {done} of {total}; "
                                              f"checkpoint {done} saved in {ckpt_dir} (continue with --resume)")
    finally:
        bar.close()
        metrics_log.close()
    return history


def export_final(run_dir: str, export: Callable[..., None], *, enabled: bool, trained: bool) -> None:
    """`export(run_dir/hf, overwrite=True)` when `enabled` (`checkpoint.export_hf`) and the run trained, or has no
    export yet (a resumed run with nothing left to do, killed before its export)."""
    hf_dir = os.path.join(run_dir, "hf")
    if enabled and (trained or not os.path.isdir(hf_dir)):
        export(hf_dir, overwrite=True)  # the run's own folder: also one an older version wrote


# ----- fault injection -----

def poisoned(batch: Any) -> Any:
    """`batch` with every floating entry NaN (host arrays stay on the host, device arrays keep their sharding)."""
    def poison(x):
        if isinstance(x, np.ndarray):
            return np.full_like(x, np.nan) if np.issubdtype(x.dtype, np.floating) else x
        return x * jnp.asarray(jnp.nan, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map(poison, batch)


def inject_overflows(step_fn: Callable[..., Any], steps: Collection[int]) -> Callable[..., Any]:
    """`step_fn(state, batch, ...)` that, at the optimizer steps `steps` (`debug.inject_overflow_steps`), takes a
    poisoned batch (`poisoned`): the gradients are non-finite, so the step is skipped and the loss scale backs
    off, as on a real overflow. `step_fn` itself when `steps` is empty. A poisoned step whose gradients stayed
    finite raises (the loss ignores every floating input)."""
    at = frozenset(int(s) for s in steps)
    if not at:
        return step_fn

    def step(state, batch, *args):
        step_index = int(state.step)
        if step_index not in at:
            return step_fn(state, batch, *args)
        new_state, metrics = step_fn(state, poisoned(batch), *args)
        if int(jax.device_get(metrics["grads_finite"])):
            raise RuntimeError(f"debug.inject_overflow_steps: optimizer step {step_index} had finite gradients "
                               f"with a NaN batch (the loss reads no floating batch entry)")
        return new_state, metrics

    return step
