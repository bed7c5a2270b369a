"""The memory plan's verdict (`jaxrl-fp16 plan`, train's first check): the bytes `plan.measure` measured on one
device, as items, whether the run fits its devices, the one-line message when it does not, and the table `plan`
prints. Nothing is compiled here: the numbers come in as a `Measured`.

    params       the FP32 master parameters one device holds (the sharding rules; exact)
    optimizer    the optimizer state, loss scale and counters one device holds (exact)
    gradients    the FP32 gradients of the trained tree one device holds (exact; part of XLA's temporaries)
    activations  the larger phase's peak minus the three above: the update step's arguments + outputs not
                 aliased to them + XLA's temporaries, or the scorer's (the state stays resident, plus the compute
                 copy of the parameters, its batch and temporaries)
    sampler      the vLLM engine's share of each device it shares with the trainer (`gpu_host.gpu_plan`)
    reserved     what neither takes: the margin for the two CUDA contexts, or what JAX's pool leaves unused
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from jaxrl_fp16.config import RunConfig
from jaxrl_fp16.gpu_host import JAX_DEFAULT_FRACTION, JAX_FRACTION_ENV, gpu_plan
from jaxrl_fp16.memory import DoesNotFitError, format_bytes

__all__ = ["PLAN_EXIT_CODE", "ITEMS", "PlanShapes", "Measured", "MemoryPlan", "device_share", "make_plan",
           "check_plan", "format_plan"]

PLAN_EXIT_CODE = DoesNotFitError.exit_code  # `jaxrl-fp16 plan` and `train`: the run does not fit its devices
ITEMS = ("params", "optimizer", "gradients", "activations", "sampler")
# The keys that change each item, named when a run does not fit.
_KEYS = {"params": "mesh.fsdp, mesh.tensor", "optimizer": "mesh.fsdp, mesh.tensor",
         "gradients": "mesh.fsdp, mesh.tensor",
         "activations": "train.microbatches, model.remat, model.attention, mesh.fsdp",
         "sampler": "sampler.gpu_memory_utilization, sampler.devices"}
_ALL_KEYS = "train.microbatches, model.remat, mesh.fsdp, sampler.gpu_memory_utilization"
_GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanShapes:
    """The shapes the plan compiles: the mesh, the update step's batch and the scorer's."""

    mesh: Mapping[str, int]
    step_rows: int  # rows of one mini-batch (all devices together), split into `microbatches`
    microbatches: int
    width: int
    score_rows: int  # rows of one scoring batch
    score_width: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Measured:
    """What compiling the update step and the scorer measured, per device, in bytes."""

    params: int
    optimizer: int
    gradients: int
    step: Mapping[str, int]  # memory_analysis of the update step (argument, output, alias, temp, peak)
    scorer: Mapping[str, int]  # of the scorer, and `resident` (the state it runs beside) and `peak`
    shapes: PlanShapes
    backend: str  # the backend whose "auto" attention/remat was resolved
    compiled_on: str  # the platform XLA compiled for ("cpu", "gpu")
    model_note: str

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shapes"] = {**dataclasses.asdict(self.shapes), "mesh": dict(self.shapes.mesh)}
        d["step"], d["scorer"] = dict(self.step), dict(self.scorer)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Measured":
        return cls(**{**d, "shapes": PlanShapes(**d["shapes"])})


def device_share(run: RunConfig, device_bytes: int, backend: str,
                 environ: Mapping[str, str] | None = None) -> tuple[int, int, str]:
    """(sampler bytes, reserved bytes, note) on one trainer device of `device_bytes`, from the GPU plan
    (`gpu_host.gpu_plan`): on a GPU the vLLM engine sharing it takes `sampler.gpu_memory_utilization`, and JAX's pool
    is its `XLA_PYTHON_CLIENT_MEM_FRACTION`; the rest is reserved. On a CPU nothing is split."""
    if backend != "gpu":
        return 0, 0, f"backend {backend}: no GPU split (a vLLM engine on a CPU holds its own KV-cache space)"
    environ = os.environ if environ is None else environ
    plan = gpu_plan(run.sampler, environ)
    jax_fraction = plan.jax_fraction if plan.jax_fraction is not None else float(
        environ.get(JAX_FRACTION_ENV, JAX_DEFAULT_FRACTION))
    engine = plan.engine_fraction if plan.shares_gpu and plan.engine_fraction is not None else 0.0
    sampler = int(device_bytes * engine)
    reserved = max(0, device_bytes - int(device_bytes * jax_fraction) - sampler)
    note = (f"vLLM {engine:g} of the device (sampler.gpu_memory_utilization), JAX's pool {jax_fraction:.4g} "
            f"({plan.jax_fraction_source})" if plan.shares_gpu else
            f"no engine on the trainer's devices; JAX's pool {jax_fraction:.4g} ({plan.jax_fraction_source})")
    return sampler, reserved, note


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """The verdict: bytes per device by item, the device's memory and whether the run fits it."""

    per_device: Mapping[str, int]  # ITEMS and "total" (their sum)
    reserved: int
    device_bytes: int
    fits: bool
    largest: str
    source: str
    measured: Measured

    def to_json(self) -> dict[str, Any]:
        return {"fits": self.fits, "device_bytes": self.device_bytes, "per_device": dict(self.per_device),
                "reserved": self.reserved, "largest": self.largest, "source": self.source,
                "measured": self.measured.to_dict()}

    def message(self) -> str:
        """One line: what does not fit, the largest item and the keys that change it."""
        p = self.per_device
        keys = dict.fromkeys(_KEYS[self.largest].split(", ") + _ALL_KEYS.split(", "))
        return (f"the run needs {format_bytes(p['total'])} per device (+ {format_bytes(self.reserved)} reserved), "
                f"more than the device's {format_bytes(self.device_bytes)}; the largest item is {self.largest} "
                f"({format_bytes(p[self.largest])}); keys that change it: {', '.join(keys)}")


def make_plan(run: RunConfig, measured: Measured, device_bytes: int,
              environ: Mapping[str, str] | None = None) -> MemoryPlan:
    """The verdict of `measured` on devices of `device_bytes` (pure but for the environment's JAX fraction)."""
    sampler, reserved, share_note = device_share(run, device_bytes, measured.backend, environ)
    step, score = measured.step, measured.scorer
    peak = max(step["peak"], score["peak"])
    phase = "update step" if step["peak"] >= score["peak"] else "scorer"
    fixed = measured.params + measured.optimizer + measured.gradients
    items = {"params": measured.params, "optimizer": measured.optimizer, "gradients": measured.gradients,
             "activations": max(0, peak - fixed), "sampler": sampler}
    per_device = {**items, "total": sum(items.values())}
    largest = max(ITEMS, key=lambda k: items[k])
    s = measured.shapes
    source = (f"XLA memory_analysis of the update step and the scorer compiled ahead of time on "
              f"{measured.compiled_on} for mesh {dict(s.mesh)}: step {s.step_rows} rows x {s.width} tokens in "
              f"{s.microbatches} micro-batch(es), scorer {s.score_rows} rows x {s.score_width}; {measured.model_note}; "
              f"params/optimizer/gradients: the sharded state's bytes per device; activations: the {phase}'s peak "
              f"(arguments + unaliased outputs + temporaries{' + resident state' if phase == 'scorer' else ''}) "
              f"minus those; sampler: {share_note}")
    if measured.compiled_on != measured.backend:
        source += (f"; compiled by XLA:{measured.compiled_on.upper()} for a {measured.backend} target: buffer "
                   f"assignment and fusion differ on the target (README 'Memory plan')")
    fits = per_device["total"] + reserved <= device_bytes
    return MemoryPlan(per_device=per_device, reserved=reserved, device_bytes=int(device_bytes), fits=fits,
                      largest=largest, source=source, measured=measured)


def check_plan(plan: MemoryPlan) -> None:
    """Raises DoesNotFitError (exit code PLAN_EXIT_CODE) with the plan's one-line message when it does not fit."""
    if not plan.fits:
        raise DoesNotFitError(plan.message())


def format_plan(plan: MemoryPlan, num_devices: int) -> str:
    """The table `jaxrl-fp16 plan` prints (one device; every device of the mesh holds the same)."""
    p = plan.per_device
    rows = [(k, p[k]) for k in ITEMS] + [("total", p["total"])]
    if plan.reserved:
        rows.append(("reserved", plan.reserved))
    rows.append(("device memory", plan.device_bytes))
    lines = [f"per device (each of {num_devices}; mesh {dict(plan.measured.shapes.mesh)}):", "| item | bytes | GiB |",
             "|---|---|---|"]
    lines += [f"| {name} | {value:,} | {value / _GIB:.2f} |" for name, value in rows]
    lines.append(f"| verdict | {'fits' if plan.fits else 'DOES NOT FIT'} | "
                 f"{(plan.device_bytes - p['total'] - plan.reserved) / _GIB:+.2f} free |")
    lines.append(f"source: {plan.source}")
    return "\n".join(lines)
