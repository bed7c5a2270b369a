"""Verifiable tasks for RL fine-tuning: the registry (`TASKS`, `make_task`), the synthetic tasks and scoring.

A task generates problems procedurally (deterministic per seed, no downloads) and scores responses. The
synthetic tasks suit a tiny character-level model (one token per character): the response is the bare answer
followed by EOS, rewarded 1.0 on an exact match (after stripping whitespace and a trailing EOS marker) and 0.0
otherwise.

    task         prompt                response                          response chars (defaults)
    addition     "23+58="              "81"                              1-3
    reverse      "rev hello="          "olleh"                           3-8
    sort_digits  "sort 93151="         "11359"                           3-8
    count        "count 17 to 60:"     "17 18 19 ... 60"                 134-189 (long: mismatch grows with length)
    digit_string "copy 4821...="       "4821..." (or reversed, or the running sum mod 10)  100 (partial credit)
    math         a reasoning-gym word problem and an instruction to box the answer; any reasoning that ends in
                 "\\boxed{answer}" (or whose last number is the answer), checked by `rewards.math_answers_equal`

Every task gives a response that hit the length limit (`truncated=True`) its `truncated_reward` (0.0 by
default, as in the paper), whatever its text. `reference_response` is the text for a supervised warm start; the
caller appends the tokenizer's EOS token.

The math task lives in `math_task`, the perfectible-set selection in `prompts`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import string
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from jaxrl_fp16.rl.math_task import MATH_DATASETS, MathWordProblems
from jaxrl_fp16.rl.rewards import clean_response, exact_match_reward
from jaxrl_fp16.rl.task_base import OptionError, Problem, Task, TaskBase
from jaxrl_fp16.validation import ConfigError, check_fields, check_positive

__all__ = ["Problem", "Task", "Addition", "Reverse", "SortDigits", "Count", "DigitString", "MathWordProblems",
           "MATH_DATASETS", "DIGIT_MODES", "TASKS", "OptionError", "make_task", "TaskSection", "score_responses"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _SyntheticTask(TaskBase):
    """Exact-match reward on a bare answer; `partial_credit` rewards agreeing characters instead."""

    partial_credit: bool = False

    def _score(self, problem: Problem, response_text: str) -> float:
        return exact_match_reward(response_text, problem.answer, partial_credit=self.partial_credit)

    @property
    def max_response_chars(self) -> int:
        """The longest reference response (characters = tokens for a character-level tokenizer), EOS excluded."""
        raise NotImplementedError


def _check_range(task: str, lo_name: str, lo: int, hi_name: str, hi: int, minimum: int) -> None:
    if not minimum <= lo <= hi:
        raise OptionError(f"{task}: need {minimum} <= {lo_name} <= {hi_name}, got {lo_name}={lo}, {hi_name}={hi}",
                          lo_name, hi_name)


def _random_number(rng: random.Random, digits: int) -> int:
    """A uniform number with exactly `digits` digits (0-9 for one digit)."""
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Addition(_SyntheticTask):
    """"23+58=" -> "81"; each operand has between `min_digits` and `max_digits` digits."""

    name: ClassVar[str] = "addition"
    min_digits: int = 1
    max_digits: int = 2

    def __post_init__(self):
        super().__post_init__()
        _check_range(self.name, "min_digits", self.min_digits, "max_digits", self.max_digits, 1)

    def _make(self, rng: random.Random) -> Problem:
        a, b = (_random_number(rng, rng.randint(self.min_digits, self.max_digits)) for _ in range(2))
        answer = str(a + b)
        return Problem(prompt=f"{a}+{b}=", answer=answer, reference=answer, metadata={"a": a, "b": b})

    @property
    def max_response_chars(self) -> int:
        return self.max_digits + 1


def _check_alphabet(task: str, alphabet: str) -> None:
    bad = [c for c in alphabet if c.isspace() or c == "=" or not c.isascii() or not c.isprintable()]
    if not alphabet or bad or len(set(alphabet)) != len(alphabet):
        raise OptionError(f"{task}: alphabet must be distinct printable ASCII characters, no whitespace or '=', "
                          f"got {alphabet!r}", "alphabet")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reverse(_SyntheticTask):
    """"rev hello=" -> "olleh"; strings of `min_len`..`max_len` characters drawn from `alphabet`."""

    name: ClassVar[str] = "reverse"
    min_len: int = 3
    max_len: int = 8
    alphabet: str = string.ascii_lowercase

    def __post_init__(self):
        super().__post_init__()
        _check_range(self.name, "min_len", self.min_len, "max_len", self.max_len, 1)
        _check_alphabet(self.name, self.alphabet)

    def _make(self, rng: random.Random) -> Problem:
        s = "".join(rng.choices(self.alphabet, k=rng.randint(self.min_len, self.max_len)))
        return Problem(prompt=f"rev {s}=", answer=s[::-1], reference=s[::-1], metadata={"input": s})

    @property
    def max_response_chars(self) -> int:
        return self.max_len


@dataclasses.dataclass(frozen=True, kw_only=True)
class SortDigits(_SyntheticTask):
    """"sort 93151=" -> "11359" (or "95311" with `descending`); `min_len`..`max_len` random digits."""

    name: ClassVar[str] = "sort_digits"
    min_len: int = 3
    max_len: int = 8
    descending: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check_range(self.name, "min_len", self.min_len, "max_len", self.max_len, 1)

    def _make(self, rng: random.Random) -> Problem:
        s = "".join(rng.choices(string.digits, k=rng.randint(self.min_len, self.max_len)))
        answer = "".join(sorted(s, reverse=self.descending))
        return Problem(prompt=f"sort {s}=", answer=answer, reference=answer, metadata={"input": s})

    @property
    def max_response_chars(self) -> int:
        return self.max_len


@dataclasses.dataclass(frozen=True, kw_only=True)
class Count(_SyntheticTask):
    """"count 17 to 60:" -> "17 18 19 ... 60": a long response (134-189 characters with the defaults).

    The first number is drawn from [min_start, max_start] and the response has `min_count`..`max_count` numbers,
    separated by single spaces. Easy per step (add one, stop at the number in the prompt) but long, so
    sequence-level mismatch, which grows with length, shows.
    """

    name: ClassVar[str] = "count"
    min_start: int = 10
    max_start: int = 50
    min_count: int = 45
    max_count: int = 60

    def __post_init__(self):
        super().__post_init__()
        _check_range(self.name, "min_start", self.min_start, "max_start", self.max_start, 0)
        _check_range(self.name, "min_count", self.min_count, "max_count", self.max_count, 2)

    def _make(self, rng: random.Random) -> Problem:
        start = rng.randint(self.min_start, self.max_start)
        stop = start + rng.randint(self.min_count, self.max_count) - 1
        answer = " ".join(map(str, range(start, stop + 1)))
        return Problem(prompt=f"count {start} to {stop}:", answer=answer, reference=answer,
                       metadata={"start": start, "stop": stop})

    @property
    def max_response_chars(self) -> int:
        return len(" ".join(map(str, range(self.max_start, self.max_start + self.max_count))))


DIGIT_MODES = ("copy", "reverse", "running_sum")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DigitString(_SyntheticTask):
    """A long response with a dense reward: "copy 4821...=" -> "4821..." for a string of `min_len`..`max_len`
    random digits (100 by default), in one of `DIGIT_MODES`: the string itself, reversed, or its running sum mod
    10 ("running_sum 4821=" -> "4203").

    Reward: 1.0 on an exact match; otherwise the fraction of correct characters over the longer of the response
    and the answer (so a missing or an extra character costs as a wrong one). A character is correct when it
    equals the answer's at its position (copy, reverse) or, for running_sum, when it is the response's own
    previous digit (0 before the first) plus the input digit at its position, mod 10: one slip costs one
    character, not the rest of the string. `partial_credit=False` gives the exact-match reward.
    """

    name: ClassVar[str] = "digit_string"
    mode: str = "copy"
    min_len: int = 100
    max_len: int = 100

    def __post_init__(self):
        super().__post_init__()
        _check_range(self.name, "min_len", self.min_len, "max_len", self.max_len, 1)
        if self.mode not in DIGIT_MODES:
            raise OptionError(f"{self.name}: mode must be one of {', '.join(DIGIT_MODES)}, got {self.mode!r}", "mode")

    def _make(self, rng: random.Random) -> Problem:
        s = "".join(rng.choices(string.digits, k=rng.randint(self.min_len, self.max_len)))
        answer = digit_string_answer(self.mode, s)
        return Problem(prompt=f"{self.mode} {s}=", answer=answer, reference=answer, metadata={"input": s})

    def _score(self, problem: Problem, response_text: str) -> float:
        got = clean_response(response_text)
        if got == problem.answer:
            return 1.0
        if not self.partial_credit:
            return 0.0
        return digit_string_credit(self.mode, problem.metadata["input"], problem.answer, got)

    @property
    def max_response_chars(self) -> int:
        return self.max_len


def digit_string_answer(mode: str, digits: str) -> str:
    """The answer of `DigitString` in `mode` to the digit string `digits`."""
    if mode == "copy":
        return digits
    if mode == "reverse":
        return digits[::-1]
    total, out = 0, []
    for c in digits:
        total = (total + int(c)) % 10
        out.append(str(total))
    return "".join(out)


def digit_string_credit(mode: str, digits: str, answer: str, got: str) -> float:
    """`DigitString`'s partial credit: correct characters of `got` over max(len(got), len(answer))."""
    width = max(len(got), len(answer))
    if not width:
        return 0.0
    if mode != "running_sum":
        return sum(a == b for a, b in zip(got, answer)) / width
    correct, previous = 0, 0
    for c, d in zip(got, digits):
        correct += c.isdigit() and int(c) == (previous + int(d)) % 10
        previous = int(c) if c.isdigit() else previous
    return correct / width


TASKS: dict[str, Callable[..., Task]] = {
    cls.name: cls for cls in (Addition, Reverse, SortDigits, Count, MathWordProblems)
}
TASKS[DigitString.name] = DigitString  # the long-response task with partial credit (precision sweep's long arm)


def make_task(name: str, **options: Any) -> Task:
    """The task registered as `name`, built with `options` (its keyword fields, e.g. max_digits=2).

    Cheap (problems are made by `generate`), so the run config builds its task to validate the options.

    Raises:
      OptionError: an unknown option, or one of the wrong type or out of range (`keys` names them).
      ValueError: an unknown task.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}")
    factory = TASKS[name]
    if dataclasses.is_dataclass(factory):
        valid = sorted(f.name for f in dataclasses.fields(factory) if f.init)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise OptionError(f"task {name!r} has no option(s) {', '.join(unknown)}; valid: {', '.join(valid)}",
                              *unknown)
    return factory(**options)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSection:
    """A registered task and its options (e.g. `max_digits`, `truncated_reward`: the reward of a response cut
    at the length limit, default 0)."""

    name: str = "addition"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_problems: int = 1024  # candidate problems drawn before the perfectible filter
    seed: int = 1234

    def __post_init__(self):
        check_fields(self, "task")
        if self.name not in TASKS:
            raise ConfigError(f"task.name={self.name!r}; valid: {', '.join(sorted(TASKS))}")
        check_positive("task", num_problems=self.num_problems)
        try:
            self.build()  # cheap: validates the options' names, types and ranges
        except OptionError as e:
            keys = ", ".join(f"task.options.{k}" for k in e.keys) or "task.options"
            raise ConfigError(f"{keys}: {e}") from None

    def build(self) -> Task:
        """The task of this section (`make_task`)."""
        return make_task(self.name, **dict(self.options))


def _response_and_truncated(item: Any) -> tuple[str, bool]:
    if isinstance(item, str):
        return item, False
    text, truncated = item
    return str(text), bool(truncated)


def score_responses(task: Task, problems: Sequence[Problem],
                    responses: Sequence[Sequence[str | tuple[str, bool]]]) -> np.ndarray:
    """Rewards [P, K] of K responses per problem; a response is its text or a (text, truncated) pair.

    Raises:
      ValueError: on a shape mismatch, or when the task returns a non-finite reward (naming the problem).
    """
    if len(responses) != len(problems):
        raise ValueError(f"got responses for {len(responses)} prompts, expected {len(problems)}")
    widths = {len(r) for r in responses}
    if len(widths) > 1:
        raise ValueError(f"every prompt needs the same number of responses, got counts {sorted(widths)}")
    k = widths.pop() if widths else 0
    rewards_PxK = np.zeros((len(problems), k), np.float64)
    for i, (problem, group) in enumerate(zip(problems, responses)):
        for j, item in enumerate(group):
            text, truncated = _response_and_truncated(item)
            r = float(task.reward(problem, text, truncated))
            if not math.isfinite(r):
                raise ValueError(f"task {task.name!r} gave a non-finite reward ({r}) to response {j} of problem "
                                 f"{i} (prompt {problem.prompt!r}, answer {problem.answer!r})")
            rewards_PxK[i, j] = r
    return rewards_PxK
