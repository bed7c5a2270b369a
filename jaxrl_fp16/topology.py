"""The run config's device sections, beside the code they configure: `mesh` (the trainer's device mesh,
`jaxrl_fp16.sharding`) and `distributed` (several processes in one run: JAX's distributed runtime)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from jaxrl_fp16.sharding import initialize_distributed, resolve_mesh_shape
from jaxrl_fp16.validation import ConfigError, check_fields

__all__ = ["MeshSection", "DistributedSection"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSection:
    """The device mesh the trainer shards over (`jaxrl_fp16.sharding`): data x fsdp x tensor devices, all of
    them (over all processes) together. One size may be -1: the rest of the devices (default: all on data)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        check_fields(self, "mesh")
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            if size < 1 and size != -1:
                raise ConfigError(f"mesh.{name}={size}: a mesh size is an integer >= 1, or -1 for the rest")
        rest = [f"mesh.{name}" for name, size in sizes.items() if size == -1]
        if len(rest) > 1:
            raise ConfigError(f"{' and '.join(rest)} are both -1; at most one mesh size may be the rest")

    def shape(self, num_devices: int) -> dict[str, int]:
        """The axis sizes for `num_devices` devices; a ConfigError names the keys when they do not fit."""
        try:
            return resolve_mesh_shape(num_devices, self.data, self.fsdp, self.tensor)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedSection:
    """Several processes (hosts) in one run: JAX's distributed runtime, started before any JAX computation.
    Unset keys come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, else from JAX's cluster
    detection (SLURM, Open MPI, Kubernetes, Cloud TPU)."""

    enabled: bool = False
    coordinator_address: Optional[str] = None  # "host:port" of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None

    def __post_init__(self):
        check_fields(self, "distributed")
        given = [k for k in ("coordinator_address", "num_processes", "process_id") if getattr(self, k) is not None]
        if given and not self.enabled:
            raise ConfigError(f"distributed.{given[0]} is set but distributed.enabled=false; set "
                              f"distributed.enabled=true to start several processes")
        if self.num_processes is not None and self.num_processes < 1:
            raise ConfigError(f"distributed.num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and (self.process_id < 0 or (
                self.num_processes is not None and self.process_id >= self.num_processes)):
            raise ConfigError(f"distributed.process_id={self.process_id} must be in [0, num_processes="
                              f"{self.num_processes})")
        address = self.coordinator_address
        if address is not None and not address.rpartition(":")[2].isdigit():
            raise ConfigError(f"distributed.coordinator_address={address!r} must be host:port")

    def initialize(self) -> bool:
        """Starts JAX's distributed runtime with this section's keys when `enabled`, before any JAX computation
        (`sharding.initialize_distributed`); False when it is off or was already running."""
        return self.enabled and initialize_distributed(self.coordinator_address, self.num_processes, self.process_id)
