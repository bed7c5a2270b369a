"""Orbax checkpoints of the whole train state: params, optimizer state, loss-scale state, counters, plus a JSON
record of the loop's position (iteration, data position, RNG seed) — all that a bitwise resume needs.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a process killed while
saving leaves the previous checkpoints intact and no half-written one that a restore could pick up. Deleting
an old checkpoint (keep-last-N) is not atomic: a process killed then leaves a final-named folder without its
metadata file. Such folders are removed when a `Checkpointer` opens the directory, and left-over temporary
folders are cleaned up by orbax.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)
_FINALIZED_MARKER = "_CHECKPOINT_METADATA"


def _remove_partial_deletions(directory: str) -> None:
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.isdigit() and os.path.isdir(path) and not os.path.exists(os.path.join(path, _FINALIZED_MARKER)):
            log.warning("removing %s: a checkpoint whose deletion was interrupted", path)
            shutil.rmtree(path)


def _restore_target(x: Any) -> Any:
    """What orbax restores a leaf as: shape, dtype and, for a JAX array, its sharding."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return ocp.utils.to_shape_dtype_struct(x)


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run under `directory` (one sub-folder per iteration)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = os.path.abspath(directory)
        _remove_partial_deletions(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, iteration: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves `state` (a pytree of arrays) and `meta` (JSON) as checkpoint `iteration`; blocks until done."""
        self._manager.save(iteration, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def all(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, like: Any, iteration: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores checkpoint `iteration` (default: the latest) into the structure, dtypes and shardings of `like`.

        `like` holds arrays (each restored array gets that array's sharding) or `jax.ShapeDtypeStruct`s with
        shardings: a checkpoint saved on one device mesh restores onto another, each device reading its shards.
        """
        iteration = self.latest() if iteration is None else iteration
        if iteration is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(_restore_target, like)
        out = self._manager.restore(iteration, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                       meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    def close(self) -> None:
        self._manager.close()
