"""What the RL and DPO trainers do alike with a run directory: refuse to start over an existing run, write the
resolved config, and keep the metrics log (`metrics.jsonl`, optionally TensorBoard) consistent across resumes.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxrl_fp16.config import RunConfig, to_yaml

__all__ = ["MetricsLog", "checkpoint_dir", "refuse_overwrite", "truncate_metrics", "write_config"]


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def refuse_overwrite(run_dir: str, resume: bool) -> None:
    """Raises FileExistsError when `run_dir` already holds checkpoints and the run is not a resume."""
    ckpt_dir = checkpoint_dir(run_dir)
    if not resume and os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
        raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume to continue that run, "
                              f"or choose another --run-dir")


def write_config(run_dir: str, run: RunConfig) -> None:
    """The resolved config as `run_dir/config.yaml` (what `export` and a resume read back)."""
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(run))


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

    Args:
      run_dir: the run directory.
      start_step: the step the run resumes from (0 for a fresh run).
      tensorboard: also write TensorBoard scalars.
      purge_step: TensorBoard's purge step (events at and after it from an earlier attempt are discarded).
    """

    def __init__(self, run_dir: str, start_step: int, *, tensorboard: bool, purge_step: int):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        truncate_metrics(self.path, start_step)
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step)

    def write(self, metrics: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, metrics["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
