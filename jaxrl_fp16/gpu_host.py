"""The host's GPUs before JAX starts its backends: the GPU plan (how a run shares each GPU between JAX, the
trainer, and the vLLM engine) and GPU determinism, applied by `prepare_gpus` from `jaxrl-fp16 train` and the GPU
smoke run. The memory plan (`jaxrl-fp16 plan`) reads the split and the host's RAM (`host_memory`);
`jaxrl-fp16 doctor` reports both.

The GPU plan (`gpu_plan`):

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
`--xla_gpu_deterministic_ops=true` in XLA_FLAGS, and vLLM's batch-invariant mode; see `jaxrl_fp16._xla_flags`).

Nothing here starts CUDA or JAX's backends (the GPUs are counted from CUDA_VISIBLE_DEVICES or the driver's
folders), and nothing imports vllm or torch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from jaxrl_fp16._xla_flags import enable_deterministic
from jaxrl_fp16.config import ConfigError, RunConfig, SamplerSection
from jaxrl_fp16.sampling.options import MEMORY_MARGIN, engine_memory_utilization

__all__ = ["JAX_FRACTION_ENV", "PREALLOCATE_ENV", "JAX_DEFAULT_FRACTION", "MIN_JAX_FRACTION", "GpuPlan",
           "memory_split", "count_gpus", "jax_visible_devices", "gpu_plan", "jax_backends_started",
           "apply_gpu_plan", "prepare_gpus", "prepare_determinism", "host_memory"]

log = logging.getLogger(__name__)

JAX_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
PREALLOCATE_ENV = "XLA_PYTHON_CLIENT_PREALLOCATE"
JAX_DEFAULT_FRACTION = 0.75  # JAX's preallocated pool when XLA_PYTHON_CLIENT_MEM_FRACTION is unset
MIN_JAX_FRACTION = 0.05  # below this the trainer cannot hold even a small model's state
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

def jax_backends_started() -> bool:
    """Whether JAX has started its backends (after which the plan's environment variables have no effect)."""
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
    if applied and jax_backends_started():
        log.warning("JAX's backends started before the GPU plan (%s) was applied: it has no effect on them",
                    ", ".join(applied))
    return applied


def prepare_determinism(run: RunConfig) -> list[str]:
    """GPU determinism for a run with `debug.deterministic=true` (`_xla_flags.enable_deterministic`); returns the
    XLA flags added. Call before any JAX computation (DeterminismError, a ValueError, when it is too late)."""
    if not run.debug.deterministic:
        return []
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


# ----- the host's memory -----

def host_memory() -> dict[str, int | None]:
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
