"""A per-device memory formula of training under a mesh: a quick guide (the doctor's, the trainer's after loading).

The authority is `jaxrl_fp16.tools.plan` (`jaxrl-fp16 plan`), which compiles the real update step ahead of time and
reads XLA's memory analysis; the terms below follow what that compiled step keeps (README "Memory plan" has
both side by side).

    params        FP32 master parameters on this device            4 B x P_dev
    optimizer     Adam's mu and nu (FP32)                          4 B x slots x P_dev
    gradients     FP32; twice with micro-batches (the accumulator) 4 B x P_dev (x 2 when microbatches > 1)
    compute copy  the parameters cast to the compute dtype         c B x P_dev (none when c = 4)
    frozen        a frozen base (LoRA), kept in the compute dtype  c B x F_dev
    activations   per micro-batch, rows r = micro-batch rows / (data x fsdp), tokens n = r x T; one layer's
                  activations  A = n x c x (6H + 2Q + 2K + 3I) + S, S the attention's FP32 scores:
                  r x Nq x T^2 x 8 (dense) or r x Nq x (T x 8 + block^2 x 8) (blockwise, cudnn: one block and
                  the log-sum-exp);  what each layer keeps for the backward, by `remat`: none A, dots
                  n x c x (2Q + 2K + 2I + 2H), full n x c x H (its input); with remat one layer's A is recomputed
                  at a time;  activations = (L x kept + [remat] A) / tensor + r x min(chunk, T) x V x 12 / tensor
                  (one FP32 logits chunk: logits, log-softmax and its gradient)

P_dev is the number of trained parameter elements a device holds under the sharding rules
(`sharding.param_specs`), F_dev that of the frozen tree (0 without one).
The activation term is a guide (XLA fuses, schedules and frees buffers its own way), not a bound.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from jaxrl_fp16.models.config import ModelConfig

__all__ = ["MemoryEstimate", "DoesNotFitError", "estimate_memory", "run_options", "check_fits",
           "device_bytes_limit", "format_bytes"]

_GIB = 1024 ** 3
_KEPT = ("none", "dots", "full")  # the resolved `model.remat` kinds


class DoesNotFitError(ValueError):
    """The per-device memory a run needs exceeds what the devices have; the command line exits with 3."""

    exit_code = 3


def format_bytes(n: float) -> str:
    return f"{n / _GIB:.2f} GiB" if n >= _GIB / 100 else f"{n / 1024 ** 2:.2f} MiB"


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, by kind (see the module docstring for the formulas)."""

    params: int
    optimizer: int
    gradients: int
    compute_params: int
    activations: int
    frozen: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in dataclasses.fields(self))

    def describe(self) -> str:
        parts = ", ".join(f"{f.name} {format_bytes(getattr(self, f.name))}" for f in dataclasses.fields(self))
        return f"{format_bytes(self.total)} per device ({parts})"


def estimate_memory(cfg: ModelConfig, sizes: Mapping[str, int], *, compute_bytes: int, microbatch_rows: int,
                    seq_len: int, params_per_device: int | None = None, optimizer_slots: int = 2,
                    chunk_size: int = 256, frozen_per_device: int = 0, attention: str = "dense",
                    remat: str = "none", attention_block: int = 512, microbatches: int = 1) -> MemoryEstimate:
    """The per-device estimate of one training step.

    Args:
      cfg: the model.
      sizes: mesh axis sizes {"data", "fsdp", "tensor"} (missing axes count as 1).
      compute_bytes: bytes per element of the compute dtype (2 for float16/bfloat16, 4 for float32).
      microbatch_rows: rows of one micro-batch (all devices together).
      seq_len: tokens per row.
      params_per_device: parameter elements one device holds; default: all parameters / (fsdp x tensor).
      optimizer_slots: FP32 arrays of optimizer state per parameter (Adam: 2).
      chunk_size: positions per log-softmax chunk (`token_logprobs`).
      frozen_per_device: elements of a frozen, untrained tree one device holds (LoRA's base), in the compute
        dtype.
      attention: the resolved attention ("dense", "blockwise", "cudnn", "fused-xla").
      remat: the resolved rematerialisation ("none", "dots", "full").
      attention_block: tokens per block of blockwise attention.
      microbatches: micro-batches per step (more than one: a gradient accumulator beside the gradients).
    """
    data, fsdp, tensor = (int(sizes.get(k, 1)) for k in ("data", "fsdp", "tensor"))
    if min(data, fsdp, tensor, compute_bytes, microbatch_rows, seq_len) < 1 or optimizer_slots < 0:
        raise ValueError(f"estimate_memory: sizes {dict(sizes)}, compute_bytes={compute_bytes}, "
                         f"microbatch_rows={microbatch_rows}, seq_len={seq_len} must all be >= 1")
    p = params_per_device if params_per_device is not None else math.ceil(cfg.num_params() / (fsdp * tensor))
    rows = math.ceil(microbatch_rows / (data * fsdp))
    tokens = rows * seq_len
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    Q, K = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if remat not in _KEPT:
        raise ValueError(f"estimate_memory: remat={remat!r}; valid: {', '.join(_KEPT)}")
    Nq = cfg.num_heads
    scores = (rows * Nq * seq_len ** 2 * 8 if attention == "dense"
              else rows * Nq * (seq_len + min(attention_block, seq_len) ** 2) * 8)
    layer = tokens * compute_bytes * (6 * H + 2 * Q + 2 * K + 3 * I) + scores
    kept = {"none": layer, "dots": tokens * compute_bytes * (2 * Q + 2 * K + 2 * I + 2 * H),
            "full": tokens * compute_bytes * H}[remat]
    recomputed = 0 if remat == "none" else layer
    logits = rows * min(chunk_size, seq_len) * V * 12
    return MemoryEstimate(params=4 * p, optimizer=4 * optimizer_slots * p,
                          gradients=4 * p * (2 if microbatches > 1 else 1),
                          compute_params=0 if compute_bytes == 4 else compute_bytes * p,
                          activations=(L * kept + recomputed + logits) // tensor,
                          frozen=compute_bytes * frozen_per_device)


def run_options(run: Any, cfg: ModelConfig, seq_len: int, backend: str | None = None) -> dict[str, Any]:
    """`estimate_memory`'s attention, remat, attention_block and microbatches of a run config, "auto" resolved
    for `backend` (default: JAX's) as the model resolves them (`models.attention`)."""
    from jaxrl_fp16.models import attention as attn

    if backend is None:
        import jax

        backend = jax.default_backend()
    m = run.model
    kind = attn.resolve_attention(m.attention, backend=backend, seq_len=seq_len, dtype=run.policy.compute_dtype,
                                  numerics=m.numerics(), head_dim=cfg.head_dim)
    return {"attention": kind, "remat": attn.resolve_remat(m.remat, backend=backend),
            "attention_block": m.attention_block, "microbatches": run.train.microbatches}


def check_fits(estimate: MemoryEstimate, bytes_limit: int | None) -> None:
    """Raises DoesNotFitError naming the numbers when the estimate exceeds `bytes_limit` (None: no limit known)."""
    if bytes_limit is None or estimate.total <= bytes_limit:
        return
    raise DoesNotFitError(f"training needs about {estimate.describe()}, more than the {format_bytes(bytes_limit)} "
                          f"a device has: shard further (mesh.fsdp, mesh.tensor), or use more micro-batches "
                          f"(train.microbatches)")


def device_bytes_limit(devices: Any) -> int | None:
    """The smallest `memory_stats()["bytes_limit"]` of `devices`; None where no device reports one (CPU)."""
    limits = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # some backends do not implement memory_stats
            stats = None
        if stats and "bytes_limit" in stats:
            limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None
