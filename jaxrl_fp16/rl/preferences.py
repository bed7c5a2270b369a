"""Offline preference pairs generated procedurally from a task: (prompt, chosen, rejected), deterministic per seed.

The chosen response is the task's reference response; the rejected one is a plausible wrong answer made from
it by one small edit, the kind of mistake a model that almost solves the task makes:

    answer      edits (one, drawn at random; the result always differs from the answer)
    digits      value +-1 or +-10 (when it stays >= 0), one digit changed by +-1, two adjacent different
                digits swapped, a digit dropped or repeated (never a new leading zero)
    other text  two adjacent characters swapped, one character replaced by another of the answer's, one
                character dropped or repeated

Held-out pairs come from a separate stream of problems and never share a prompt with the training pairs.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["PreferencePair", "PairArrays", "corrupt_answer", "make_preference_pairs", "split_pairs",
           "tokenize_pairs"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferencePair:
    """One prompt with a preferred (correct) and a dispreferred (wrong) response, both without EOS."""

    prompt: str
    chosen: str
    rejected: str


def _digit_edits(answer: str, rng: random.Random) -> str:
    """One numeric slip of a digit string (see the module docstring); never a new leading zero."""
    value, n = int(answer), len(answer)
    shifts = [1, 10] + ([-1] if value >= 1 else []) + ([-10] if value >= 10 else [])
    swaps = [j for j in range(n - 1) if answer[j] != answer[j + 1] and not (j == 0 and answer[1] == "0")]
    drops = [i for i in range(n) if n >= 2 and not (i == 0 and answer[1] == "0")]
    kind = rng.choice(["shift", "digit"] + (["repeat"] if value else []) + (["swap"] if swaps else [])
                      + (["drop"] if drops else []))
    if kind == "shift":
        return str(value + rng.choice(shifts))
    if kind == "swap":
        j = rng.choice(swaps)
        return answer[:j] + answer[j + 1] + answer[j] + answer[j + 2:]
    if kind == "drop":
        i = rng.choice(drops)
        return answer[:i] + answer[i + 1:]
    i = rng.randrange(n)
    if kind == "digit":
        d = int(answer[i])
        new = [x for x in (d - 1, d + 1) if 0 <= x <= 9 and not (i == 0 and n > 1 and x == 0)]
        return answer[:i] + str(rng.choice(new)) + answer[i + 1:]
    return answer[:i] + answer[i] + answer[i:]  # repeat digit i


def _text_edits(answer: str, rng: random.Random) -> str:
    """One slip of a non-numeric answer (see the module docstring)."""
    n = len(answer)
    alphabet = sorted(set(answer))
    edits = ["repeat"] + (["drop"] if n >= 2 else []) + (["replace"] if len(alphabet) >= 2 else []) \
        + (["swap"] if any(answer[j] != answer[j + 1] for j in range(n - 1)) else [])
    kind = rng.choice(edits)
    i = rng.randrange(n)
    if kind == "swap":
        j = rng.choice([j for j in range(n - 1) if answer[j] != answer[j + 1]])
        return answer[:j] + answer[j + 1] + answer[j] + answer[j + 2:]
    if kind == "replace":
        return answer[:i] + rng.choice([c for c in alphabet if c != answer[i]]) + answer[i + 1:]
    if kind == "drop":
        return answer[:i] + answer[i + 1:]
    return answer[:i] + answer[i] + answer[i:]


def corrupt_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: `answer` after one small edit (never equal to `answer`)."""
    if not answer:
        raise ValueError("cannot corrupt an empty answer")
    edit = _digit_edits if answer.isdigit() else _text_edits
    return edit(answer, rng)


def make_preference_pairs(task: Any, n: int, seed: int, *, exclude_prompts: Sequence[str] = ()) -> list[PreferencePair]:
    """`n` pairs from `task`'s problems (distinct prompts, none in `exclude_prompts`), the same for the same seed.

    Raises:
      ValueError: when the task cannot produce `n` distinct new prompts (too few possible problems).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"preferences/{int(seed)}")
    seen = set(exclude_prompts)
    pairs: list[PreferencePair] = []
    round_ = 0
    while len(pairs) < n:
        if round_ >= 20:
            raise ValueError(f"task {task.name!r} gave only {len(pairs)} distinct new prompts of the {n} asked "
                             f"for; ask for fewer pairs or widen the task's options")
        for problem in task.generate(2 * (n - len(pairs)) + 8, seed * 7919 + round_):
            if problem.prompt in seen or len(pairs) == n:
                continue
            seen.add(problem.prompt)
            chosen = task.reference_response(problem)
            pairs.append(PreferencePair(prompt=problem.prompt, chosen=chosen,
                                        rejected=corrupt_answer(chosen, rng)))
        round_ += 1
    return pairs


def split_pairs(task: Any, num_train: int, num_eval: int, seed: int) -> tuple[list[PreferencePair],
                                                                              list[PreferencePair]]:
    """Training pairs and held-out pairs whose prompts the training pairs never show."""
    train = make_preference_pairs(task, num_train, seed)
    held_out = make_preference_pairs(task, num_eval, seed + 1_000_003, exclude_prompts=[p.prompt for p in train])
    return train, held_out


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairArrays:
    """Pairs as right-padded token rows [N, 2, T] (index 0 chosen, 1 rejected): prompt + response + EOS."""

    tokens: np.ndarray  # int32
    attention_mask: np.ndarray  # int32, 1 on real tokens
    response_mask: np.ndarray  # float32, 1 on response tokens (EOS included)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def subset(self, rows: Any) -> "PairArrays":
        """The pairs at `rows` (an index array or a slice)."""
        return PairArrays(tokens=self.tokens[rows], attention_mask=self.attention_mask[rows],
                          response_mask=self.response_mask[rows])

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The batch dict of the given pair rows."""
        return {"tokens": self.tokens[rows], "attention_mask": self.attention_mask[rows],
                "response_mask": self.response_mask[rows]}


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer: Any, width: int | None = None) -> PairArrays:
    """Tokenizes pairs into `PairArrays` of `width` columns (default: the longest row)."""
    if not pairs:
        raise ValueError("no preference pairs to tokenize")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows, masks = [], []
    for p in pairs:
        prompt = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        for response in (p.chosen, p.rejected):
            ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
            rows.append(prompt + ids)
            masks.append([0] * len(prompt) + [1] * len(ids))
    longest = max(len(r) for r in rows)
    width = longest if width is None else width
    if longest > width:
        raise ValueError(f"a preference row has {longest} tokens, more than width={width}")
    n = len(rows)
    tokens = np.full((n, width), pad, np.int32)
    attn = np.zeros((n, width), np.int32)
    resp = np.zeros((n, width), np.float32)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, : len(r)], attn[i, : len(r)], resp[i, : len(m)] = r, 1, m
    shape = (len(pairs), 2, width)
    return PairArrays(tokens=tokens.reshape(shape), attention_mask=attn.reshape(shape),
                      response_mask=resp.reshape(shape))
