"""vLLM's request outputs as a `Rollout`: each row's request seed (`row_seed`), the sampled tokens' log-probs
(`sampled_logprobs`) and the left-padded rollout arrays (`rollout_from_outputs`).

Log-probs come in vLLM's flat form (`SamplingParams(flat_logprobs=True)`: a `FlatLogprobs` of plain lists) where the
installed vLLM has it, else as one dict of `Logprob` objects per token; both are read here. vllm is not imported:
the outputs are read through their attributes.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jaxrl_fp16.sampling.base import FINISH_LENGTH, FINISH_STOP, Rollout

__all__ = ["row_seed", "sampled_logprobs", "rollout_from_outputs"]

_FINISH_REASONS = {"stop": FINISH_STOP, "length": FINISH_LENGTH}


def row_seed(seed: int, row: int) -> int:
    """The vLLM request seed of rollout row `row` under `SamplingSettings.seed` (independent streams per row)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(row)]).generate_state(1, np.uint32)[0])


def sampled_logprobs(logprobs: Any, token_ids: Sequence[int]) -> np.ndarray:
    """float32 [n]: the log-prob of each sampled token from a vLLM completion's `logprobs` (requested with
    `logprobs=0`: one entry per position, the sampled token's).

    Takes vLLM's flat form (`FlatLogprobs`: lists of token ids and log-probs with each position's start index;
    the sampled token comes first in a position) and the list of {token id: Logprob} dicts. RuntimeError when a
    position's first token is not the sampled one.
    """
    ids = np.asarray(token_ids, np.int64)
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs
        starts = np.asarray(logprobs.start_indices[:len(ids)], np.int64)
        if len(starts) != len(ids):
            raise RuntimeError(f"vLLM returned log-probs for {len(starts)} of {len(ids)} tokens")
        got = np.asarray(logprobs.token_ids, np.int64)[starts]
        if not np.array_equal(got, ids):
            bad = int(np.flatnonzero(got != ids)[0])
            raise RuntimeError(f"vLLM's log-prob at position {bad} is for token {got[bad]}, not the sampled "
                               f"{ids[bad]}")
        return np.asarray(logprobs.logprobs, np.float64)[starts].astype(np.float32)
    return np.asarray([logprobs[j][int(t)].logprob for j, t in enumerate(ids)], np.float32)


def rollout_from_outputs(rows: list[tuple[int, list[int]]], outputs: list, *, max_new_tokens: int,
                         pad_token_id: int, with_logprobs: bool = True) -> Rollout:
    """The rollout of one `LLM.generate` call: row r is `rows[r]` = (prompt index, prompt tokens) followed by the
    first completion of `outputs[r]`, left-padded with `pad_token_id` to the widest prompt.

    RuntimeError when a row finished for another reason than stop or length, or came back with no tokens, more
    than `max_new_tokens`, or without log-probs when `with_logprobs`."""
    n, width = len(rows), max(len(p) for _, p in rows)
    total = width + max_new_tokens
    tokens_NxT = np.full((n, total), pad_token_id, np.int32)
    attention_NxT = np.zeros((n, total), np.int32)
    response_NxT = np.zeros((n, total), np.int32)
    logprobs_NxT = np.zeros((n, total), np.float32)
    finish = []
    for r, ((_, prompt), out) in enumerate(zip(rows, outputs, strict=True)):
        completion = out.outputs[0]
        ids = [int(t) for t in completion.token_ids]
        if completion.finish_reason not in _FINISH_REASONS:
            raise RuntimeError(f"vLLM finished row {r} with reason {completion.finish_reason!r}")
        if not 1 <= len(ids) <= max_new_tokens or (with_logprobs and completion.logprobs is None):
            raise RuntimeError(f"vLLM returned {len(ids)} tokens for row {r} (max {max_new_tokens}) "
                               f"{'without' if completion.logprobs is None else 'with'} log-probs")
        start = width - len(prompt)
        tokens_NxT[r, start:width] = prompt
        attention_NxT[r, start:width + len(ids)] = 1
        tokens_NxT[r, width:width + len(ids)] = ids
        response_NxT[r, width:width + len(ids)] = 1
        if with_logprobs:
            logprobs_NxT[r, width:width + len(ids)] = sampled_logprobs(completion.logprobs, ids)
        finish.append(_FINISH_REASONS[completion.finish_reason])
    return Rollout(tokens=tokens_NxT, attention_mask=attention_NxT, response_mask=response_NxT,
                   logprobs=logprobs_NxT, prompt_index=np.array([i for i, _ in rows], np.int32),
                   prompt_width=width, finish_reasons=finish, has_logprobs=with_logprobs)
