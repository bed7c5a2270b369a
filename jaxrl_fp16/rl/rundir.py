"""What the RL and DPO trainers do alike with a run directory: refuse to start over an existing run, check and
record a resume's config, keep the metrics log (`metrics.jsonl`, optionally TensorBoard) consistent across resumes,
and stop cleanly on SIGINT/SIGTERM.

The run directory's config files:
  config.yaml          the config the run started with (never rewritten by a resume)
  config_changes.jsonl one line per resume that changed the config: {"iteration": ..., "changes": {key: [old, new]}}
  config.resumed.yaml  the config in effect since the latest resume that changed it
Each checkpoint's meta also holds the config that produced it (`export` reads that one).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
from typing import Any, Sequence

import yaml

from jaxrl_fp16 import multiprocess
from jaxrl_fp16.checkpoint import Checkpointer, CheckpointError
from jaxrl_fp16.config import ConfigError, RunConfig, config_from_dict, load_config, to_yaml

__all__ = ["SILENT_CHANGES", "ConfigChangeError", "Interrupted", "MetricsLog", "ResumeOptions", "StopSignals",
           "add_resume_arguments", "begin_resume", "check_changes", "checkpoint_config", "checkpoint_dir",
           "config_diff", "config_dict", "describe_changes", "finish_resume", "refuse_overwrite",
           "resume_options_from_args", "signal_name", "stored_config", "truncate_metrics", "write_config"]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
RESUMED_CONFIG_FILE = "config.resumed.yaml"
CHANGES_FILE = "config_changes.jsonl"
# Keys whose change leaves the trajectory as it was: a resume takes them without asking (a section allows its keys).
SILENT_CHANGES = ("train.iterations", "dpo.steps", "log", "checkpoint.every", "checkpoint.keep",
                  "checkpoint.export_hf", "checkpoint.export_dtype", "distributed",  # any process layout
                  "train.score_memory_gib")  # the scorer's batch split: its log-probs do not depend on it


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def refuse_overwrite(run_dir: str, resume: bool) -> None:
    """Raises FileExistsError when `run_dir` already holds checkpoints and the run is not a resume."""
    ckpt_dir = checkpoint_dir(run_dir)
    if not resume and os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
        raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume to continue that run, "
                              f"or choose another --run-dir")


def write_config(run_dir: str, run: RunConfig) -> None:
    """The resolved config of a new run as `run_dir/config.yaml`; the resume records of a former run in the
    folder (one without checkpoints) are removed. With several processes, process 0 writes."""
    if not multiprocess.is_writer():
        return
    for name in (RESUMED_CONFIG_FILE, CHANGES_FILE):
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    _write_text(os.path.join(run_dir, CONFIG_FILE), to_yaml(run))


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----- resume: the config must be the run's, unless a change is allowed -----

@dataclasses.dataclass(frozen=True, kw_only=True)
class ResumeOptions:
    """How a resume treats a changed config and a checkpoint that does not restore."""

    allow: tuple[str, ...] = ()  # config keys allowed to change (a section allows its keys)
    allow_any: bool = False  # allow any change
    fallback: bool = False  # when the latest checkpoint does not restore, take the newest that does


def add_resume_arguments(parser: Any) -> None:
    """The `train`/`dpo` command-line options of a resume."""
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run directory's last checkpoint (an error when it has none)")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY[,KEY...]",
                        help="with --resume: allow these config keys (a section: all its keys) to differ from the "
                             "run's (recorded in config_changes.jsonl); keys that leave the run's course as it "
                             f"was ({', '.join(SILENT_CHANGES)}) change without it")
    parser.add_argument("--allow-any-change", action="store_true",
                        help="with --resume: allow any config change (recorded)")
    parser.add_argument("--fallback", action="store_true",
                        help="with --resume: when the latest checkpoint does not restore, continue from the newest "
                             "that does (the broken one is kept, renamed <iteration>.broken)")


def resume_options_from_args(args: Any) -> ResumeOptions:
    """`ResumeOptions` from the options of `add_resume_arguments`; they need --resume."""
    allow = tuple(k.strip() for item in args.allow_change for k in item.split(",") if k.strip())
    given = [name for name, on in (("--allow-change", bool(allow)), ("--allow-any-change", args.allow_any_change),
                                   ("--fallback", args.fallback)) if on]
    if given and not args.resume:
        raise ValueError(f"{', '.join(given)}: only with --resume")
    return ResumeOptions(allow=allow, allow_any=args.allow_any_change, fallback=args.fallback)


class ConfigChangeError(ConfigError):
    """A resume whose config changes keys that alter the run's course, not allowed."""


def config_dict(run: RunConfig) -> dict[str, Any]:
    """The config as plain nested dicts (as `config.yaml` holds it): what a resume compares."""
    return yaml.safe_load(to_yaml(run))


def config_diff(old: Any, new: Any, prefix: str = "") -> dict[str, list]:
    """{dotted key: [old, new]} for every leaf that differs (a key absent on one side counts as null)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, list] = {}
        for key in sorted(set(old) | set(new), key=str):
            out.update(config_diff(old.get(key), new.get(key), f"{prefix}{key}."))
        return out
    return {} if old == new else {prefix.rstrip("."): [old, new]}


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def _names_a_key(pattern: str, config: dict[str, Any]) -> bool:
    node: Any = config
    for part in pattern.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def describe_changes(changes: dict[str, list]) -> str:
    return ", ".join(f"{k} {_show(old)} -> {_show(new)}" for k, (old, new) in changes.items())


def check_changes(reference: dict[str, Any], run: RunConfig, options: ResumeOptions,
                  silent: Sequence[str] = SILENT_CHANGES) -> dict[str, list]:
    """The changes from `reference` (the config the checkpoint was made with) to `run`; a ConfigChangeError
    names those that alter the run's course and are not allowed."""
    new = config_dict(run)
    unknown = [k for k in options.allow if not (_names_a_key(k, new) or _names_a_key(k, reference))]
    if unknown:
        raise ConfigError(f"--allow-change {', '.join(unknown)}: no such config key")
    changes = config_diff(reference, new)
    refused = {k: v for k, v in changes.items() if not options.allow_any and not _matches(k, (*silent, *options.allow))}
    if refused:
        raise ConfigChangeError(f"--resume with a config that changes the run's course: {describe_changes(refused)}; "
                                f"allow it with --allow-change {','.join(refused)} (or --allow-any-change), or start "
                                f"a new run in another --run-dir")
    return changes


def stored_config(run_dir: str) -> RunConfig:
    """The config in effect since the latest resume (`config.resumed.yaml`), else the run's `config.yaml`."""
    for name in (RESUMED_CONFIG_FILE, CONFIG_FILE):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            return load_config(path)
    raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")


def checkpoint_config(run_dir: str, meta: dict[str, Any], iteration: int) -> RunConfig:
    """The config that produced a checkpoint: the one in its meta, else (older runs) the stored one."""
    if "config" in meta:
        return config_from_dict(meta["config"], f"checkpoint {iteration} of {run_dir}")
    return stored_config(run_dir)


def _reference(run_dir: str, meta: dict[str, Any] | None, iteration: int) -> dict[str, Any] | None:
    try:
        cfg = checkpoint_config(run_dir, meta or {}, iteration)
    except FileNotFoundError:
        return None
    return config_dict(cfg)


def begin_resume(run_dir: str, run: RunConfig, options: ResumeOptions,
                 silent: Sequence[str] = SILENT_CHANGES) -> None:
    """Before a resume builds anything: the run directory must hold a checkpoint, and the config may change
    only keys that leave the run's course as it was or that `options` allow (checked against the latest
    checkpoint's config; `finish_resume` checks again against the checkpoint actually restored)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"--resume: the run directory {run_dir} does not exist; nothing to resume")
    ckpt_dir = checkpoint_dir(run_dir)
    if not (os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))):
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}; nothing to resume (start the run afresh "
                                f"without --resume)")
    checkpointer = Checkpointer(ckpt_dir, keep=run.checkpoint.keep)
    try:
        latest = checkpointer.latest()
        if latest is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {ckpt_dir}; nothing to resume (start "
                                    f"the run afresh without --resume)")
        try:
            meta = checkpointer.meta(latest)
        except CheckpointError:
            return  # the restore says what is broken (and, with fallback, checks the checkpoint it takes)
    finally:
        checkpointer.close()
    reference = _reference(run_dir, meta, latest)
    if reference is not None:
        check_changes(reference, run, options, silent)


def finish_resume(run_dir: str, run: RunConfig, options: ResumeOptions, meta: dict[str, Any], iteration: int,
                  silent: Sequence[str] = SILENT_CHANGES) -> dict[str, list]:
    """After the restore of checkpoint `iteration` (its `meta`): checks the config against the checkpoint's and
    records the changes (`config_changes.jsonl`, `config.resumed.yaml`; `config.yaml` is left as it was).
    With several processes, process 0 writes."""
    reference = _reference(run_dir, meta, iteration)
    changes = {} if reference is None else check_changes(reference, run, options, silent)
    if not multiprocess.is_writer():
        return changes
    if not os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
        _write_text(os.path.join(run_dir, CONFIG_FILE), to_yaml(run))
    if changes:
        with open(os.path.join(run_dir, CHANGES_FILE), "a") as f:
            f.write(json.dumps({"iteration": iteration, "changes": changes}) + "\n")
        _write_text(os.path.join(run_dir, RESUMED_CONFIG_FILE), to_yaml(run))
        altering = {k: v for k, v in changes.items() if not _matches(k, silent)}
        if altering:
            log.warning("resuming from iteration %d with allowed config changes: %s (recorded in %s)", iteration,
                        describe_changes(altering), os.path.join(run_dir, CHANGES_FILE))
    return changes


# ----- SIGINT/SIGTERM: stop at the next iteration boundary -----

class Interrupted(Exception):
    """The run stopped on a signal; the command line exits with `exit_code` (128 + the signal number)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """While entered (in the main thread), SIGINT and SIGTERM set `signum` instead of stopping the process: the
    loop checks it at its next iteration boundary, saves and raises `Interrupted`. A second signal raises
    `Interrupted` at once. The previous handlers are restored on exit.

    Args:
      where: the checkpoint folder a stop at once leaves the run to resume from, for its message.
      unit: what the loop counts ("iteration", "step"), for its messages.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, where: str, unit: str = "iteration"):
        self.where = where
        self.unit = unit
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise Interrupted(signum, f"stopped at once by a second {signal_name(signum)}: the work since the last "
                                      f"checkpoint in {self.where} is lost (continue with --resume)")
        self.signum = signum
        log.warning("%s: stopping after the current %s, with a checkpoint (send it again to stop at once)",
                    signal_name(signum), self.unit)




def truncate_metrics(path: str, keep_through: int) -> None:
    """Drops metrics lines past the checkpoint a run resumes from (they are logged again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["step"] <= keep_through]
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


class MetricsLog:
    """`run_dir/metrics.jsonl`, one JSON line per logged step (lines past `start_step` are dropped on open, as
    a resume logs them again), and the numeric values as TensorBoard scalars under `run_dir/tb` when asked.

    With several processes only process 0 writes (`enabled` is False on the others: `write` does nothing).

    Args:
      run_dir: the run directory.
      start_step: the step the run resumes from (0 for a fresh run).
      tensorboard: also write TensorBoard scalars.
      purge_step: TensorBoard's purge step (events at and after it from an earlier attempt are discarded).
    """

    def __init__(self, run_dir: str, start_step: int, *, tensorboard: bool, purge_step: int):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = multiprocess.is_writer()
        self.writer = None
        if not self.enabled:
            return
        truncate_metrics(self.path, start_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step)

    def write(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, metrics["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
