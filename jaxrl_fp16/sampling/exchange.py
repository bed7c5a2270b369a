"""The rollout exchange of a run in several processes: each samples its block of the iteration's prompts, then every
process gets the whole rollout in the global row order of a one-process run (see `jaxrl_fp16.multiprocess`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from jax.experimental import multihost_utils

from jaxrl_fp16 import multiprocess
from jaxrl_fp16.sampling.base import FINISH_LENGTH, FINISH_STOP, Rollout

__all__ = ["gather_rollout"]


def gather_rollout(rollout: Rollout, first_prompt: int, pad_id: int) -> Rollout:
    """The whole iteration's `Rollout` on every process, from each process's own (its prompts start at global
    prompt `first_prompt`; blocks in process order): rows in global order, prompts left-padded to the widest
    prompt and responses right-padded to the longest response of all processes, as one process sampling every
    row lays them out. With one process, `rollout` itself."""
    if not multiprocess.is_multiprocess():
        return rollout
    n, width = rollout.tokens.shape
    pw = rollout.prompt_width
    shapes = multiprocess.allgather_ints([n, pw, width - pw, int(rollout.has_logprobs)])
    rows, P, R = int(shapes[:, 0].max()), int(shapes[:, 1].max()), int(shapes[:, 2].max())

    def padded(x: np.ndarray, fill: Any) -> np.ndarray:
        out = np.full((rows, P + R), fill, x.dtype)
        out[:n, P - pw:P + width - pw] = x
        return out

    local = {"tokens": padded(rollout.tokens.astype(np.int32), pad_id),
             "attention_mask": padded(rollout.attention_mask.astype(np.int32), 0),
             "response_mask": padded(rollout.response_mask.astype(np.int32), 0),
             "logprobs": padded(rollout.logprobs.astype(np.float32), 0.0),
             "prompt_index": np.pad(np.asarray(rollout.prompt_index, np.int32) + first_prompt, (0, rows - n)),
             "stopped": np.pad(np.array([r == FINISH_STOP for r in rollout.finish_reasons], np.int32),
                               (0, rows - n))}
    every = multihost_utils.process_allgather(local, tiled=False)  # [processes, rows, ...]
    counts = shapes[:, 0]

    def joined(key: str) -> np.ndarray:
        return np.concatenate([np.asarray(every[key])[p, :c] for p, c in enumerate(counts)], axis=0)

    return Rollout(tokens=joined("tokens"), attention_mask=joined("attention_mask"),
                   response_mask=joined("response_mask"), logprobs=joined("logprobs"),
                   prompt_index=joined("prompt_index"), prompt_width=P,
                   finish_reasons=[FINISH_STOP if s else FINISH_LENGTH for s in joined("stopped")],
                   has_logprobs=bool(shapes[:, 3].all()))
