"""Output folders that never lose data: what may be replaced, the atomic write, and early writability checks.

A folder written by `atomic_dir` carries a marker file (`OUTPUT_MARKER`, listing its files). An existing
destination is replaced only when it is empty, holds our marker, or (with `overwrite`) is a plain Hugging Face
model folder; a folder holding anything else, a run directory, the working folder or a folder the command reads
from is refused, naming the folder and why. The new folder is written beside the destination and renamed into
place, so a failure at any point leaves the old folder or the new one, never a partial one; temporaries of
killed writes are removed on the next write of the same destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["OUTPUT_MARKER", "HF_MODEL_FILES", "TOKENIZER_FILES", "OutputRefusedError", "OutputNotWritableError", "atomic_dir",
           "check_output_dir", "read_output_marker", "remove_stale_temporaries", "ensure_writable_dir",
           "ensure_writable_file"]

# The files of a Hugging Face model folder besides the weights: what `save_hf_params`, `make_tiny` and
# transformers' `save_pretrained` write.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")
HF_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json", *TOKENIZER_FILES)


OUTPUT_MARKER = ".jaxrl_fp16_output"
# What a Hugging Face model folder holds: the files `save_hf_params`, `make_tiny` and transformers'
# `save_pretrained` write. Only such files are ever replaced in a folder that lacks our marker.
_HF_OUTPUT_NAMES = frozenset((*HF_MODEL_FILES, OUTPUT_MARKER))
_HF_OUTPUT_PATTERN = re.compile(r".+\.safetensors|pytorch_model-\d+-of-\d+\.bin")
_PARTIAL_SHARD = re.compile(r"shard-\d+\.partial")
_SHOWN = 5


class OutputRefusedError(FileExistsError):
    """An output folder would replace files that are not ours to delete (or a run, a source, the working folder)."""


class OutputNotWritableError(PermissionError, ValueError):
    """An output path cannot be written (no permission, read-only file system, a file where a folder must be)."""


def _is_hf_output_file(name: str) -> bool:
    return name in _HF_OUTPUT_NAMES or bool(_HF_OUTPUT_PATTERN.fullmatch(name))


def _is_run_dir(path: str) -> bool:
    """A training run's folder: config.yaml with checkpoints/ or metrics.jsonl beside it."""
    return os.path.isfile(os.path.join(path, "config.yaml")) and (
        os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "metrics.jsonl")))


def _within(path: str, folder: str) -> bool:
    """`path` is `folder` or lies inside it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def read_output_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The marker that `atomic_dir` leaves in the folders it writes, or None when there is none (or it is
    unreadable: then the folder is treated as not ours)."""
    try:
        with open(os.path.join(folder, OUTPUT_MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("writer") != "jaxrl_fp16" or not isinstance(marker.get("files"),
                                                                                                 list):
        return None
    return marker


def _foreign_entries(folder: str, marker: dict[str, Any] | None) -> list[str]:
    """Entries of `folder` that neither the marker lists nor a Hugging Face model folder holds."""
    ours = set(marker["files"]) if marker else set()
    foreign = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        plain_file = os.path.isfile(path) and not os.path.islink(path)
        if name in ours or (plain_file and _is_hf_output_file(name)):
            continue
        foreign.append(name + ("/" if os.path.isdir(path) else ""))
    return foreign


def check_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False,
                     sources: Sequence[str | os.PathLike] = ()) -> str:
    """Checks that `out_dir` may be written (and replaced) as a model folder; returns its absolute path.

    Args:
      out_dir: the folder to write.
      overwrite: also replace an existing folder that lacks our marker, when it holds nothing but the files of
        a Hugging Face model (config.json, *.safetensors, tokenizer files, ...).
      sources: folders the write reads from (a run, a model): `out_dir` may neither be one nor hold one.

    Raises:
      OutputRefusedError naming the folder and why: it is not a folder, it is the working folder or holds it,
      it is or holds a source, it is a run directory or lies in a run's checkpoints, it holds files that we did
      not write and that are not model files, or (without `overwrite`) it is a non-empty folder without our
      marker. A missing or empty folder, or one that holds our marker and nothing else of anyone else's, passes.
    """
    out = os.path.abspath(os.fspath(out_dir))
    real = os.path.realpath(out)
    if os.path.lexists(out) and (os.path.islink(out) or not os.path.isdir(out)):
        raise OutputRefusedError(f"{out} exists and is not a folder")
    if _within(os.path.realpath(os.getcwd()), real):
        raise OutputRefusedError(f"{out} is the current working folder or holds it: choose a new folder")
    for folder in (real, *_ancestors(real)):
        if _is_run_dir(folder):
            if folder == real:
                raise OutputRefusedError(f"{out} is a run directory (config.yaml with checkpoints/ or "
                                         f"metrics.jsonl): choose a new folder")
            if _within(real, os.path.join(folder, "checkpoints")):
                raise OutputRefusedError(f"{out} lies inside the checkpoints of the run {folder}: "
                                         f"choose a folder outside checkpoints/")
    for src in sources:
        real_src = os.path.realpath(os.fspath(src))
        if _within(real_src, real):
            how = "is" if real_src == real else "holds"
            raise OutputRefusedError(f"{out} {how} {os.fspath(src)}, which this command reads: choose another folder")
    if not os.path.isdir(out) or not os.listdir(out):
        return out
    marker = read_output_marker(out)
    foreign = _foreign_entries(out, marker)
    if foreign:
        raise OutputRefusedError(f"{out} holds files that are not part of a model written here ({_names(foreign)}); "
                                 f"refusing to delete them (also with --overwrite): move them or choose another "
                                 f"folder")
    if marker is None and not overwrite:
        raise OutputRefusedError(f"{out} exists and was not written by jaxrl_fp16 (no {OUTPUT_MARKER}): pass "
                                 f"--overwrite (overwrite=True) to replace this model folder, or choose another")
    return out


def _ancestors(path: str) -> Iterator[str]:
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return
        yield parent
        path = parent


def _temp_pattern(base: str) -> re.Pattern:
    """Temporaries of `atomic_dir` for the destination `base`: `.{base}.tmp-{pid}-{hex}` (and its `-old`, the
    replaced folder on its way out); also the pid-less names of older versions (`.{base}.tmp-XXXXXXXX`)."""
    return re.compile(rf"\.{re.escape(base)}\.tmp-(?:(?P<pid>\d+)-[0-9a-f]{{8}}|[a-z0-9_]{{8}})(?:-old)?")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours to signal
        return True
    return True


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[str]:
    """Removes the temporary siblings that killed writes of `out_dir` left behind; returns their paths.

    Only folders named as `atomic_dir` names them, whose writer process is gone (or that an older version
    wrote, without a pid), and that hold nothing but model files, are removed.
    """
    out = os.path.abspath(os.fspath(out_dir))
    parent, base = os.path.split(out)
    if not os.path.isdir(parent):
        return []
    pattern, removed = _temp_pattern(base), []
    for name in os.listdir(parent):
        match = pattern.fullmatch(name)
        path = os.path.join(parent, name)
        if match is None or os.path.islink(path) or not os.path.isdir(path):
            continue
        if match["pid"] is not None and (int(match["pid"]) == os.getpid() or _pid_alive(int(match["pid"]))):
            continue
        if any(not (_is_hf_output_file(f) or _PARTIAL_SHARD.fullmatch(f)) or not os.path.isfile(os.path.join(path, f))
               for f in os.listdir(path)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _make_temp_dir(parent: str, base: str) -> str:
    """A new empty sibling folder, with the user's normal permissions (0777 less the umask)."""
    while True:
        tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(tmp, 0o777)  # the umask applies, unlike tempfile.mkdtemp's 0700
            return tmp
        except FileExistsError:
            continue


def _normal_permissions(folder: str) -> None:
    """Gives the files of a new folder the user's normal permissions (0666 less the umask; safetensors and
    torch write theirs 0600), read off the folder that `_make_temp_dir` created with 0777 less the umask."""
    file_mode = os.stat(folder).st_mode & 0o666
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


def _write_marker(folder: str) -> None:
    files = sorted(f for f in os.listdir(folder) if f != OUTPUT_MARKER)
    with open(os.path.join(folder, OUTPUT_MARKER), "w") as f:
        json.dump({"writer": "jaxrl_fp16", "files": files, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f,
                  indent=2)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False,
               sources: Sequence[str | os.PathLike] = ()) -> Iterator[str]:
    """Yields a fresh temporary sibling of `out_dir`; on success it replaces `out_dir`, on error it is removed.

    `out_dir` is checked first (`check_output_dir`): only a missing or empty folder, one that we wrote (it
    holds our marker file), or with `overwrite` a plain Hugging Face model folder, is replaced; nothing but
    model files is ever deleted. Temporaries that killed writes of `out_dir` left are removed. The new folder
    gets the marker (listing its files) and the user's normal permissions. An existing `out_dir` is moved aside
    only once the new folder is complete, and deleted after the new one is in place, so a failure at any point
    leaves either the old folder or the new one, never a partial one.
    """
    out_dir = check_output_dir(out_dir, overwrite=overwrite, sources=sources)
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp = _make_temp_dir(parent, base)
    try:
        yield tmp
        _write_marker(tmp)
        _normal_permissions(tmp)
        check_output_dir(out_dir, overwrite=overwrite, sources=sources)  # again: the write may have taken hours
        if os.path.isdir(out_dir):
            old = tmp + "-old"
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_writable_dir(path: str | os.PathLike) -> str:
    """Checks, before any work, that the folder `path` can be written (or created); returns its absolute path.

    Raises OutputNotWritableError naming the path: a file stands where a folder must be, or a test file cannot
    be created (no permission, read-only file system). Checked with os.access and a real write, which also
    catches what os.access does not (a read-only mount, root on a read-only folder of a network file system).
    """
    out = os.path.abspath(os.fspath(path))
    existing = out
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "" if existing == out else f" ({existing} is a file)"
        raise OutputNotWritableError(f"cannot write the folder {out}: not a folder{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"cannot write the folder {out}: no write permission on {existing}")
    probe = os.path.join(existing, f".jaxrl_fp16-write-test-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise OutputNotWritableError(f"cannot write the folder {out}: {e.strerror} in {existing}") from None
    return out


def ensure_writable_file(path: str | os.PathLike) -> str:
    """As `ensure_writable_dir`, for a file to be written (its folder is created when missing)."""
    out = os.path.abspath(os.fspath(path))
    if os.path.isdir(out):
        raise OutputNotWritableError(f"cannot write the file {out}: it is a folder")
    if os.path.exists(out):
        try:
            with open(out, "a"):
                pass
        except OSError as e:
            raise OutputNotWritableError(f"cannot write the file {out}: {e.strerror}") from None
    ensure_writable_dir(os.path.dirname(out))
    return out
