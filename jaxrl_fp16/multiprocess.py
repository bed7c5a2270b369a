"""Several processes in one run (`distributed.enabled=true`): who samples what, global arrays from host arrays,
host copies of global arrays, barriers, and the one writer.

The RL loop in N processes does what it does in one, with the same numbers:
- each process samples a contiguous block of the iteration's prompts (whole groups: a prompt and all its
  samples), with the random streams of the global rows it samples (`SamplingSettings.first_row`);
- the processes then exchange their rows (`sampling.exchange.gather_rollout`), so every process holds the whole
  rollout in the global row order of a one-process run, and the scorer, the mini-batches and the value scorer
  build global arrays from those host arrays (`global_array`, `input_sharding`); their outputs come back to every
  host (`to_host`);
- files (metrics, config, exports, caches) are written by process 0 (`is_writer`); the others wait at a
  `barrier` where they read what it wrote.
Every function that runs a collective must be called by every process, in the same order. With one process
every function here is the plain single-process operation (no collective, no barrier).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_fp16.sharding import gather_to_host, path_names

__all__ = ["BARRIER_TIMEOUT_S", "is_multiprocess", "is_writer", "process_share", "group_share", "barrier",
           "first_then_others", "allgather_ints", "agree_max", "global_array", "input_sharding", "to_host",
           "host_tree"]

log = logging.getLogger(__name__)
T = TypeVar("T")
BARRIER_TIMEOUT_S = 24 * 3600  # a barrier may wait for process 0 to warm-start a base model
_STACKED = "layers"
_barriers = itertools.count()


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


# ----- who samples what -----

def process_share(num_items: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of process `index`'s contiguous block of `num_items` items split over `count` processes
    (sizes differ by at most one, the larger blocks first). A pure function."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process {index} of {count}: the index must be in [0, count)")
    size, extra = divmod(num_items, count)
    start = index * size + min(index, extra)
    return start, start + size + (index < extra)


def group_share(num_groups: int, source: str = "train.prompts_per_iteration") -> tuple[int, int]:
    """This process's block of `num_groups` prompt groups; a ValueError naming `source` (where the count comes
    from: a config key, or the prompt set) when some process would get none."""
    count = jax.process_count()
    if num_groups < count:
        raise ValueError(f"{num_groups} prompts do not give each of the {count} processes one: {source} must be "
                         f">= the number of processes")
    return process_share(num_groups, jax.process_index(), count)


# ----- barriers -----

def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Waits until every process reaches this point (the distributed runtime's barrier; a no-op in one
    process). Every process passes the same barriers in the same order."""
    if not is_multiprocess():
        return
    from jax._src import distributed

    client = distributed.global_state.client
    key = f"jaxrl_fp16/{next(_barriers)}/{name}"
    if client is None:  # not started by jax.distributed (cannot happen with process_count > 1 today)
        multihost_utils.sync_global_devices(key)
        return
    client.wait_at_barrier(key, int(timeout_s * 1000))


def first_then_others(fn: Callable[[], T], name: str) -> T:
    """`fn()` on process 0, then (after a barrier) on the others: for caches that process 0 builds and the
    others then find (the folder must be shared between hosts)."""
    if not is_multiprocess():
        return fn()
    if is_writer():
        out = fn()
        barrier(name)
        return out
    barrier(name)
    return fn()


# ----- collectives on host values -----

def allgather_ints(values: Any) -> np.ndarray:
    """[process_count, ...] int64: every process's `values` (the same shape everywhere)."""
    values = np.asarray(values, np.int32)
    if not is_multiprocess():
        return values[None].astype(np.int64)
    return np.asarray(multihost_utils.process_allgather(values, tiled=False)).astype(np.int64)


def agree_max(value: int) -> int:
    """The largest of every process's `value` (e.g. a stop signal that reached one process only)."""
    return int(allgather_ints(np.int32(value)).max())


# ----- global arrays from host arrays, and back -----

def global_array(host: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array of `sharding` from a host array that every process holds whole (each process supplies
    its devices' shards)."""
    host = np.asarray(host)
    host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def input_sharding(tree: Any) -> NamedSharding | None:
    """The replicated sharding over the mesh of `tree`'s arrays when they span several processes (a jit that
    takes them also takes host arrays as global arrays of it); None when `tree` is process-local."""
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            sharding = leaf.sharding
            if not isinstance(sharding, NamedSharding):
                raise TypeError(f"a global array with a {type(sharding).__name__}: expected a NamedSharding")
            return NamedSharding(sharding.mesh, PartitionSpec())
    return None


def to_host(x: Any) -> np.ndarray:
    """`x` whole as a numpy array; an array spread over several processes is gathered (a collective)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _host_leaf(path: Any, x: Any) -> np.ndarray:
    if not (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return np.asarray(jax.device_get(x))
    if _STACKED in path_names(path) and x.ndim >= 2:  # one layer at a time: never a whole stack on a device
        out = np.empty(x.shape, x.dtype)
        for layer in range(x.shape[0]):
            out[layer] = gather_to_host(x, layer)
        return out
    return gather_to_host(x)


def host_tree(tree: Any, then: Callable[[np.ndarray], Any] | None = None) -> Any:
    """`tree` as numpy arrays on every host, gathered leaf by leaf (stacked layers one layer at a time); with
    one process, `jax.device_get`. `then` maps each gathered leaf before the next is gathered (e.g. a cast
    and a `device_put`), so at most one whole tensor is on the host at a time."""
    if not is_multiprocess():
        out = jax.device_get(tree)
        return out if then is None else jax.tree_util.tree_map(then, out)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: _host_leaf(path, x) if then is None else then(_host_leaf(path, x)), tree)
