"""Orbax checkpoints of the whole train state: params, optimizer state, loss-scale state, counters, plus a JSON
record of the loop's position (iteration, data position, RNG seed) — all that a bitwise resume needs.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a process killed while
saving leaves the previous checkpoints intact and no half-written one that a restore could pick up. Deleting
an old checkpoint (keep-last-N) is not atomic: a process killed then leaves a final-named folder without its
metadata file. Such folders, and the temporary folders of interrupted saves, are removed when a `Checkpointer`
opens the directory.

With several processes every process calls `save` and `restore` (orbax writes each process's shards and its
own metadata from process 0); the folder's housekeeping (left-overs, broken checkpoints set aside) is process 0's
while the others wait.

Failures are one-line `CheckpointError`s (a ValueError): a checkpoint that does not restore (truncated array
data, a garbled JSON file) names its folder and, where it can be told, the file, and the newest other checkpoint
that does restore; a save that fails (a full disk) names the folder and the cause, after removing its temporary
folder.
"""

from __future__ import annotations

import contextlib
import errno as errno_lib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

from jaxrl_fp16 import multiprocess

__all__ = ["CheckpointError", "Checkpointer"]

log = logging.getLogger(__name__)
_FINALIZED_MARKER = "_CHECKPOINT_METADATA"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_BROKEN_SUFFIX = ".broken"
_DATA_DIRS = ("d", "ocdbt.process_")  # array data (binary) inside a checkpoint's `state` folder
_TS_FILE = re.compile(r'local file "([^"]+)"')


class CheckpointError(ValueError):
    """A checkpoint that does not restore or could not be saved (one line: folder, file where known, cause)."""


def _remove_leftovers(directory: str) -> None:
    """Removes final-named folders whose deletion was interrupted and temporary folders of interrupted saves."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if not os.path.isdir(path):
            continue
        if name.isdigit() and not os.path.exists(os.path.join(path, _FINALIZED_MARKER)):
            log.warning("removing %s: a checkpoint whose deletion was interrupted", path)
            shutil.rmtree(path)
        elif _TMP_MARKER in name:
            log.warning("removing %s: the temporary folder of an interrupted save", path)
            shutil.rmtree(path)


def _restore_target(x: Any) -> Any:
    """What orbax restores a leaf as: shape, dtype and, for a JAX array, its sharding."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return ocp.utils.to_shape_dtype_struct(x)


def _first_bad_json(folder: str) -> str | None:
    """The first of a checkpoint's JSON files (not its array data) that does not parse."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(_DATA_DIRS))
        for name in sorted(files):
            if name.endswith((".ocdbt", ".txt")):
                continue
            path = os.path.join(root, name)
            try:
                with open(path) as f:
                    json.load(f)
            except (ValueError, UnicodeDecodeError):
                return path
    return None


def _describe(folder: str, error: BaseException) -> str:
    """`file: cause` (the file where the error tells it, else `folder`), on one line."""
    message = str(error).split(" [tensorstore_spec", 1)[0]
    files = _TS_FILE.findall(message)
    if files:  # tensorstore: the innermost file it was reading, and its innermost reason
        return f"{files[-1]}: {message.rsplit(': ', 1)[-1].strip()}"
    if isinstance(error, json.JSONDecodeError):
        return f"{_first_bad_json(folder) or folder}: not valid JSON ({error})"
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror or error}"
    first = message.strip().splitlines()[0] if message.strip() else ""
    return f"{folder}: {type(error).__name__}{': ' + first[:300] if first else ''}"


class _DropFailedReads(logging.Filter):
    """Drops asyncio's 'Task exception was never retrieved' reports of tensorstore reads (see below)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (error is not None and "tensorstore_spec" in str(error))


def _quiet_failed_read_reports() -> None:
    """When a restore fails, the reads still in flight end later, each reporting on its own: an unraisable
    `RuntimeError: Event loop is closed` (orbax has closed its loop) or asyncio's 'Task exception was never
    retrieved' with a tensorstore error. Noise, as the failure itself is raised: installed before restores, this
    drops those reports only."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropFailedReads) for f in asyncio_log.filters):
        asyncio_log.addFilter(_DropFailedReads())
    previous = sys.unraisablehook
    if getattr(previous, "quiets_failed_reads", False):
        return

    def hook(report):
        if isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed":
            return
        previous(report)

    hook.quiets_failed_reads = True
    sys.unraisablehook = hook


def _save_cause(error: BaseException) -> str:
    """Why a save failed, on one line ('no space left on device', ...)."""
    code = getattr(error, "errno", None)
    if code is None and "No space left on device" in str(error):
        code = errno_lib.ENOSPC
    if code is not None:
        name = getattr(error, "filename", None)
        return os.strerror(code).lower() + (f" (writing {name})" if name else "")
    lines = str(error).split(" [tensorstore_spec", 1)[0].strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


class _HoldErrors(logging.Filter):
    """Holds orbax's ERROR records (tracebacks from its writer threads) while a save runs."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def _orbax_errors_held() -> Iterator[_HoldErrors]:
    """Orbax logs a failed save's traceback from its threads, then raises: the error raised says it in one line,
    so the held records are dropped on failure and passed on after a save that succeeds."""
    logger = logging.getLogger("absl")
    held = _HoldErrors()
    logger.addFilter(held)
    try:
        yield held
    except BaseException:
        held.records.clear()
        raise
    finally:
        logger.removeFilter(held)
        for record in held.records:
            logger.handle(record)


def _join_new_threads(before: set[threading.Thread], timeout: float, start_wait: float = 1.0) -> None:
    """Waits (at most `timeout` seconds in all) for the threads started since `before` to end.

    `threading.enumerate` also lists threads whose start has not completed, which `join` refuses (RuntimeError):
    such a thread is given up to `start_wait` seconds to start (then it is joined), else left alone."""
    deadline = time.monotonic() + timeout
    for t in set(threading.enumerate()) - before:
        started_by = min(deadline, time.monotonic() + start_wait)
        while True:
            try:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
                break
            except RuntimeError:  # not started (yet)
                if time.monotonic() >= started_by:
                    break
                time.sleep(0.01)


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run under `directory` (one sub-folder per iteration)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.keep = keep
        if multiprocess.is_writer():  # several processes: process 0 tidies the folder, the others wait for it
            _remove_leftovers(self.directory)
        multiprocess.barrier("checkpoint-open")
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        return ocp.CheckpointManager(self.directory, options=options)

    def folder(self, iteration: int) -> str:
        return os.path.join(self.directory, str(iteration))

    def save(self, iteration: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves `state` (a pytree of arrays) and `meta` (JSON) as checkpoint `iteration`; blocks until done.

        A failed save (e.g. a full disk) removes its temporary folder and raises a one-line CheckpointError;
        the earlier checkpoints are left as they were.
        """
        threads = set(threading.enumerate())
        try:
            with _orbax_errors_held():
                try:
                    self._manager.save(iteration, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                           meta=ocp.args.JsonSave(meta)), force=True)
                    self._manager.wait_until_finished()
                except (OSError, ValueError):
                    _join_new_threads(threads, timeout=30.0)  # orbax's writer threads: let them end first
                    raise
        except (OSError, ValueError) as e:
            self._remove_partial(iteration)
            raise CheckpointError(f"could not save checkpoint {iteration} in {self.directory}: {_save_cause(e)}; "
                                  f"the earlier checkpoints ({', '.join(map(str, self.all())) or 'none'}) are "
                                  f"intact") from e

    def _remove_partial(self, iteration: int) -> None:
        if not multiprocess.is_writer():  # process 0 removes; a failed save is not a point every process reaches
            self._manager.reload()
            return
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            unfinished = name == str(iteration) and not os.path.exists(os.path.join(path, _FINALIZED_MARKER))
            if (name.startswith(f"{iteration}{_TMP_MARKER}") or unfinished) and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
        self._manager.reload()

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def all(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def meta(self, iteration: int) -> dict[str, Any]:
        """The JSON record of checkpoint `iteration` alone (cheap: no arrays are read)."""
        try:
            out = self._manager.restore(iteration, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(out["meta"])
        except Exception as e:
            raise CheckpointError(f"checkpoint {iteration} in {self.directory} does not restore: "
                                  f"{_describe(self.folder(iteration), e)}") from None

    def _restore(self, abstract: Any, iteration: int) -> tuple[Any, dict[str, Any]]:
        _quiet_failed_read_reports()
        out = self._manager.restore(iteration, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                       meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    def restore(self, like: Any, iteration: int | None = None, *,
                fallback: bool = False) -> tuple[Any, dict[str, Any]]:
        """Restores checkpoint `iteration` (default: the latest) into the structure, dtypes and shardings of `like`.

        `like` holds arrays (each restored array gets that array's sharding) or `jax.ShapeDtypeStruct`s with
        shardings: a checkpoint saved on one device mesh restores onto another, each device reading its shards.

        A checkpoint that does not restore raises a CheckpointError naming its folder (and file where it can be
        told) and the newest other checkpoint that restores. With `fallback`, that one is returned instead,
        with a warning; the broken checkpoints newer than it are kept, renamed `<iteration>.broken`, so that
        the run can save those iterations again.
        """
        steps = self.all()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        iteration = steps[-1] if iteration is None else iteration
        if iteration not in steps:
            raise CheckpointError(f"no checkpoint of iteration {iteration} in {self.directory}; have "
                                  f"{', '.join(map(str, steps))}")
        if fallback and iteration != steps[-1]:
            raise ValueError(f"fallback applies to the latest checkpoint ({steps[-1]}), not to {iteration}")
        abstract = jax.tree_util.tree_map(_restore_target, like)
        try:
            return self._restore(abstract, iteration)
        except Exception as e:
            failure = (f"checkpoint {iteration} in {self.directory} does not restore: "
                       f"{_describe(self.folder(iteration), e)}")
        others = [s for s in reversed(steps) if s != iteration]  # newest first
        tried = []
        for other in others:
            try:
                state, meta = self._restore(abstract, other)
            except Exception as e:
                tried.append(f"{other} ({_describe(self.folder(other), e)})")
                continue
            if not fallback:
                raise CheckpointError(f"{failure}; other checkpoints: {', '.join(map(str, others))}; the newest "
                                      f"that restores is {other} (resume with --fallback, or export with "
                                      f"--iteration {other})")
            kept = self._set_aside([s for s in steps if s > other])
            log.warning("%s; resuming from checkpoint %d, the newest that restores (broken checkpoints kept as %s)",
                        failure, other, ", ".join(kept))
            return state, meta
        listed = f"the others do not restore either: {'; '.join(tried)}" if tried else "there is no other checkpoint"
        raise CheckpointError(f"{failure}; {listed}")

    def _set_aside(self, iterations: list[int]) -> list[str]:
        """Renames broken checkpoints to `<iteration>.broken` (kept, not deleted), so that the run resumed from an
        older one can save those iterations again."""
        kept = []
        for it in iterations:
            target, n = self.folder(it) + _BROKEN_SUFFIX, 1
            while os.path.exists(target):
                target, n = f"{self.folder(it)}{_BROKEN_SUFFIX}.{n}", n + 1
            if multiprocess.is_writer():  # several processes: process 0 renames, the others wait for it
                os.rename(self.folder(it), target)
            kept.append(target)
        multiprocess.barrier("checkpoint-set-aside")
        self._manager.close()
        self._manager = self._open()
        return kept

    def close(self) -> None:
        self._manager.close()
