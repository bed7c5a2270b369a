"""Sharded training on a device mesh: the mesh, the sharding rules, placement, and host streaming of weights.

The mesh has three axes:
- "data":   replicas of the parameters, each taking its own rows of a batch (data parallelism);
- "fsdp":   the parameters, gradients and optimizer state are split over these devices, and so are the rows
            of a batch (fully sharded data parallelism, ZeRO-3);
- "tensor": the matrices of each layer are split by rows or columns (tensor parallelism, Megatron style).

Rules (pure functions of a parameter's path and shape, applied to the FP32 master parameters):
- tensor: q/k/v/gate/up projections over their output dim (kernel columns and bias), o/down over their input
  dim (kernel rows), the embedding and an untied LM head over the vocabulary (else the hidden dim);
- fsdp: the largest remaining axis that the fsdp size divides;
- never the leading layer axis of the `nn.scan`-stacked arrays; a parameter whose dims do not divide is
  replicated on that mesh axis;
- optimizer state as the parameters it mirrors (`optax.tree_map_params`); loss-scale state and counters
  replicated; batches split on their leading (row) axis over ("data", "fsdp").

XLA's SPMD partitioner inserts the all-gathers and reduce-scatters: the update step is the same function on one
device or many; only its `jax.jit` in/out shardings differ (`make_train_step(..., state_sharding=...)`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.models.hf_table import hf_state_dict

__all__ = ["MESH_AXES", "BATCH_AXES", "resolve_mesh_shape", "make_mesh", "axis_sizes", "param_spec",
           "param_specs", "shard_shape", "elements_per_device", "param_shardings", "state_shardings",
           "batch_sharding", "place", "gather_to_host", "HostGathered", "host_streamed", "stream_hf_weights",
           "initialize_distributed", "path_names"]

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
_TENSOR_OUT = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})  # column parallel
_TENSOR_IN = frozenset({"o_proj", "down_proj"})  # row parallel
_STACKED = "layers"  # key of the nn.scan-stacked parameters (leading axis = layer)


# ----- the mesh -----

def resolve_mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1, tensor: int = 1) -> dict[str, int]:
    """The mesh axis sizes for `num_devices` devices; one size may be -1 ("the rest").

    Raises ValueError naming the sizes when they are not positive or do not multiply to `num_devices`.
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{name}={size!r}: a mesh size is an integer >= 1, or -1 for the rest")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh: only one of {', '.join(rest)} may be -1 (the rest of the devices)")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if rest:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices do not split into "
                             f"{' x '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)} "
                             f"(the rest for mesh.{rest[0]})")
        sizes[rest[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(f"mesh: data x fsdp x tensor = {sizes['data']} x {sizes['fsdp']} x {sizes['tensor']} = "
                         f"{known} devices, but there are {num_devices}")
    return sizes


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Any = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(len(devices), data, fsdp, tensor)
    # Auto axes: the SPMD partitioner propagates shardings; the model code carries no sharding annotations.
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def axis_sizes(mesh: Mesh) -> dict[str, int]:
    return {name: int(size) for name, size in mesh.shape.items()}


# ----- the rules -----

def path_names(path: Any) -> tuple[str, ...]:
    """The names along a pytree key path (dict keys, attribute names, sequence indices), as strings."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
        else:
            names.append(str(entry))
    return tuple(names)


def _tensor_axes(names: tuple[str, ...], ndim: int, first: int) -> tuple[int, ...]:
    """Candidate axes (in order of preference) for the "tensor" mesh axis, by parameter name."""
    module = names[-2] if len(names) >= 2 else ""
    leaf = names[-1]
    if module in _TENSOR_OUT:
        return (ndim - 1,)  # kernel (in, out) and bias (out,): the output features
    if module in _TENSOR_IN and leaf == "kernel":
        return (ndim - 2,)  # kernel (in, out): the input features; the bias stays whole
    if module == "embed":
        return (first, first + 1)  # (V, H): vocabulary, else hidden
    if module == "lm_head":
        return (ndim - 1, ndim - 2)  # (H, V): vocabulary, else hidden
    return ()


def param_spec(path: Any, shape: tuple[int, ...], sizes: Mapping[str, int]) -> PartitionSpec:
    """The PartitionSpec of one parameter (path: names or a jax key path; shape without sharding).

    A pure function of the path, the shape and the mesh axis sizes; see the module docstring for the rules.
    """
    names = path_names(path) if path and not isinstance(path[0], str) else tuple(path)
    spec: list[str | None] = [None] * len(shape)
    first = 1 if _STACKED in names and len(shape) > 0 else 0  # also under a prefix, e.g. PPO's "policy"
    t, f = sizes.get("tensor", 1), sizes.get("fsdp", 1)
    if t > 1:
        for axis in _tensor_axes(names, len(shape), first):
            if first <= axis < len(shape) and shape[axis] % t == 0:
                spec[axis] = "tensor"
                break
    if f > 1:
        free = [a for a in range(first, len(shape)) if spec[a] is None and shape[a] % f == 0]
        if free:
            spec[max(free, key=lambda a: (shape[a], -a))] = "fsdp"
    return PartitionSpec(*spec)


def param_specs(params: Any, sizes: Mapping[str, int]) -> Any:
    """PartitionSpecs for a parameter tree (arrays or anything with `.shape`)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: param_spec(p, tuple(x.shape), sizes), params)


def shard_shape(shape: tuple[int, ...], spec: PartitionSpec, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """The per-device shape of an array of `shape` sharded by `spec` on a mesh of `sizes`."""
    out = list(shape)
    for axis, names in enumerate(tuple(spec)):
        if names is None:
            continue
        for name in (names,) if isinstance(names, str) else names:
            out[axis] //= sizes[name]
    return tuple(out)


def elements_per_device(params: Any, sizes: Mapping[str, int]) -> int:
    """How many parameter elements one device holds when `params` is sharded by the rules on a mesh of `sizes`."""
    specs = jax.tree_util.tree_leaves(param_specs(params, sizes), is_leaf=lambda x: isinstance(x, PartitionSpec))
    return sum(int(np.prod(shard_shape(tuple(x.shape), spec, sizes)))
               for x, spec in zip(jax.tree_util.tree_leaves(params), specs, strict=True))


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """NamedShardings of a parameter tree on `mesh`."""
    sizes = axis_sizes(mesh)
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), param_specs(params, sizes),
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def state_shardings(state: Any, mesh: Mesh, optimizer: optax.GradientTransformation) -> Any:
    """Shardings of a `TrainState` (arrays or `jax.eval_shape` structs), as a pytree of the same structure.

    Params by the rules; optimizer state as the params it mirrors (Adam's mu and nu), its other leaves (counts)
    replicated; the loss scale, step and counters replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    params = param_shardings(state.params, mesh)
    opt_state = optax.tree_map_params(optimizer, lambda _, s: s, state.opt_state, params,
                                      transform_non_params=lambda _: replicated)
    every = jax.tree_util.tree_map(lambda _: replicated, state)
    return every.replace(params=params, opt_state=opt_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (the leading axis of every batch leaf) split over ("data", "fsdp"); a prefix for a whole batch."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def place(tree: Any, shardings: Any) -> Any:
    """Puts every leaf of `tree` (numpy, jax arrays or scalars) on the devices of its sharding.

    `shardings` is a tree of shardings, or a prefix of `tree` (one sharding for a whole batch). With several
    processes every process passes the same global values and keeps the shards its devices hold.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(sharding, x):
        def leaf(v):
            v = np.asarray(v)
            v = v.astype(jax.dtypes.canonicalize_dtype(v.dtype), copy=False)
            return jax.make_array_from_callback(v.shape, sharding, lambda index: v[index])

        return jax.tree_util.tree_map(leaf, x)

    return jax.tree_util.tree_map(put, shardings, tree, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


# ----- weights to the host, one layer at a time -----

def gather_to_host(x: Any, layer: int | None = None) -> np.ndarray:
    """`x` (or its slice `x[layer]`) as one numpy array, assembled on the host from the devices' shards.

    Only the requested layer's part of each shard leaves its device, so no device ever holds more than its own
    shard: the unsharded array exists on the host alone. Arrays spread over several processes are gathered
    with a collective (every process must call this in the same order).
    """
    if not isinstance(x, jax.Array):
        a = np.asarray(x)
        return a if layer is None else a[layer]
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        part = x if layer is None else x[layer]
        return np.asarray(multihost_utils.process_allgather(part, tiled=True))
    shape = x.shape if layer is None else x.shape[1:]
    out = np.empty(shape, x.dtype)
    for shard in x.addressable_shards:
        if shard.replica_id != 0:
            continue
        index = tuple(shard.index)
        if layer is None:
            out[index] = np.asarray(shard.data)
            continue
        start, stop, _ = index[0].indices(x.shape[0])
        if start <= layer < stop:
            out[index[1:]] = np.asarray(shard.data[layer - start])
    return out


class HostGathered:
    """A (sharded) array seen from the host: `leaf[i]` gathers layer i only, `np.asarray(leaf)` all of it, `leaf.T`
    all of it transposed (a view)."""

    __slots__ = ("array",)

    def __init__(self, array: Any):
        self.array = array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, layer: int) -> np.ndarray:
        if not isinstance(layer, (int, np.integer)):
            raise TypeError(f"HostGathered takes one integer layer index, got {layer!r}")
        return gather_to_host(self.array, int(layer))

    @property
    def T(self) -> np.ndarray:
        return gather_to_host(self.array).T

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = gather_to_host(self.array)
        return a if dtype is None else a.astype(dtype)


def host_streamed(params: Any) -> Any:
    """The parameter tree with every leaf wrapped in `HostGathered` (for `iter_hf_tensors`, `hf_state_dict` and
    `save_hf_params`)."""
    return jax.tree_util.tree_map(HostGathered, params)


def stream_hf_weights(params: Any, cfg: ModelConfig, dtype: Any = "float32") -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy array in HF layout and `dtype`) one tensor at a time from a possibly sharded tree.

    `hf_state_dict` over the `host_streamed` tree: the same tensors, in the same order, as of the unsharded tree;
    each layer's slice of the stacked arrays is gathered to the host on its own, so the push of a model sharded
    over many devices never needs an unsharded copy of all parameters on any device, and at most one tensor on
    the host at a time. The tree is checked before this returns (see `iter_hf_tensors`).
    """
    return hf_state_dict(host_streamed(params), cfg, dtype)


# ----- several processes -----

def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Starts JAX's distributed runtime once; returns False when it was already running.

    Unset arguments come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID when those are set,
    otherwise from JAX's cluster detection (SLURM, Open MPI, Kubernetes, Cloud TPU). CPU devices use gloo for
    collectives across processes (unless JAX_CPU_COLLECTIVES_IMPLEMENTATION says otherwise). Must run before any
    JAX computation: a RuntimeError says so when something already started the backends.
    """
    if jax.distributed.is_initialized():
        return False
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("jax.distributed.initialize must run before any JAX computation, but the JAX backends "
                           "are already started (e.g. a `half` precision resolved against the platform, or a "
                           "library that ran JAX at import): start the distributed runtime first")
    env = os.environ
    if not env.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        # CPU devices of several processes talk through gloo (a GPU backend does not read this option).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    log.info("distributed runtime: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
