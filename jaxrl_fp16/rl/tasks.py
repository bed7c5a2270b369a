"""Verifiable tasks for RL fine-tuning, and the builder of the paper's "perfectible" training set.

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

The perfectible set: sample k responses per problem with any sampler, keep the problems whose pass rate (mean
reward) lies in [low, high] (20-80% in the paper); a sound pipeline then drives training accuracy above 95%.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import string
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from jaxrl_fp16.rl.rewards import clean_response, exact_match_reward, extract_final_answer, math_answers_equal
from jaxrl_fp16.validation import ConfigError, check_fields, check_positive

__all__ = ["Problem", "Task", "Addition", "Reverse", "SortDigits", "Count", "DigitString", "MathWordProblems",
           "MATH_DATASETS", "DIGIT_MODES",
           "TASKS", "OptionError", "make_task", "TaskSection", "score_responses", "pass_rates", "select_perfectible",
           "PerfectibleSet", "build_perfectible_set"]

# reasoning-gym datasets whose answers are single numbers (what the math checker compares).
MATH_DATASETS = ("gsm_symbolic", "basic_arithmetic", "chain_sum")


class OptionError(ValueError):
    """A task option that cannot be used; `keys` names the options at fault."""

    def __init__(self, message: str, *keys: str):
        super().__init__(message)
        self.keys = keys


def _type_name(tp: Any) -> str:
    """How an option's annotated type reads in an error ("an integer", "true or false or null", ...)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join([_type_name(a) for a in args] + ["null"] * (len(args) < len(typing.get_args(tp))))
    if typing.get_origin(tp) in (Mapping, dict):
        return "a mapping of names to values"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _matches(tp: Any, value: Any) -> bool:
    """Whether `value` has the annotated type `tp` (ints are not bools, floats are finite numbers)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_matches(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(tp) in (Mapping, dict):
        return isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
    return isinstance(value, tp)


def _non_finite(value: Any) -> bool:
    """Whether a nested option value holds a float that is not finite."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, Mapping):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


@functools.cache
def _option_types(factory: type) -> dict[str, Any]:
    return typing.get_type_hints(factory)


def _check_option_types(factory: type, options: Mapping[str, Any]) -> None:
    """Refuses an option whose value does not have its field's type (ints are ints, floats finite numbers)."""
    hints = _option_types(factory)
    for key, value in options.items():
        tp = hints[key]
        if not _matches(tp, value):
            raise OptionError(f"{factory.name}: option {key} must be {_type_name(tp)}, got {value!r}", key)
        if _non_finite(value):
            raise OptionError(f"{factory.name}: option {key} holds a non-finite number: {value!r}", key)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Problem:
    """One prompt with its gold answer and a reference response (the warm-start target, without EOS)."""

    prompt: str
    answer: str
    reference: str
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """A family of verifiable problems."""

    name: str
    truncated_reward: float

    def generate(self, n: int, seed: int) -> list[Problem]:
        """`n` problems, the same for the same seed."""
        ...

    def reward(self, problem: Problem, response_text: str, truncated: bool = False) -> float:
        """The reward of a response (its decoded text, without the prompt)."""
        ...

    def reference_response(self, problem: Problem) -> str:
        """A response that gets reward 1.0 (without EOS)."""
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class _TaskBase:
    """Shared plumbing: seeding, the truncation rule and the reference response."""

    name: ClassVar[str]
    truncated_reward: float = 0.0

    def __post_init__(self):
        _check_option_types(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def generate(self, n: int, seed: int) -> list[Problem]:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}/{int(seed)}")  # str seeds are hashed with SHA-512: stable everywhere
        return [self._make(rng) for _ in range(n)]

    def reward(self, problem: Problem, response_text: str, truncated: bool = False) -> float:
        if truncated:
            return float(self.truncated_reward)
        return self._score(problem, response_text)

    def reference_response(self, problem: Problem) -> str:
        return problem.reference

    def _make(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def _score(self, problem: Problem, response_text: str) -> float:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class _SyntheticTask(_TaskBase):
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


_MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(frozen=True, kw_only=True)
class MathWordProblems(_TaskBase):
    """Math problems from reasoning-gym's procedural generators, for real models.

    Args:
      dataset: one of `MATH_DATASETS`.
      dataset_options: fields of that dataset's reasoning-gym config (e.g. {"min_terms": 2, "max_digits": 3}
        for basic_arithmetic / chain_sum, {"difficulty": 1.0} for gsm_symbolic); `seed` and `size` are set by
        `generate`.
      instruction: appended to the question on a new line.
      use_math_verify: None uses math-verify when installed, False forces the exact numeric comparison.
      truncated_reward: the reward of a response that hit the length limit.
    """

    name: ClassVar[str] = "math"
    dataset: str = "gsm_symbolic"
    dataset_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    instruction: str = _MATH_INSTRUCTION
    use_math_verify: bool | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.dataset not in MATH_DATASETS:
            raise OptionError(f"math: unknown dataset {self.dataset!r}; valid: {', '.join(MATH_DATASETS)}", "dataset")
        reserved = {"seed", "size"} & set(self.dataset_options)
        if reserved:
            raise OptionError(f"math: dataset_options may not set {sorted(reserved)} (generate sets them)",
                              "dataset_options")

    def generate(self, n: int, seed: int) -> list[Problem]:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return []
        import reasoning_gym

        try:
            data = reasoning_gym.create_dataset(self.dataset, size=n, seed=int(seed), **self.dataset_options)
        except TypeError as e:
            raise ValueError(f"math: bad dataset_options for {self.dataset!r}: {e}") from e
        problems = []
        for entry in data:
            meta = {k: v for k, v in entry["metadata"].items() if k != "answer_cot"}
            answer = str(entry["answer"]).strip()
            reference = self._reference(answer, entry["metadata"].get("answer_cot"))
            prompt = f"{entry['question']}\n{self.instruction}" if self.instruction else entry["question"]
            problems.append(Problem(prompt=prompt, answer=answer, reference=reference,
                                    metadata={"dataset": self.dataset, "seed": int(seed), **meta}))
        return problems

    @staticmethod
    def _reference(answer: str, cot: str | None) -> str:
        """The dataset's worked solution (gsm_symbolic) with its "#### n" line turned into a boxed answer."""
        final = f"The final answer is \\boxed{{{answer}}}."
        if not cot:
            return final
        lines = [line for line in cot.rstrip().splitlines() if not line.lstrip().startswith("####")]
        return "\n".join(lines).rstrip() + "\n" + final

    def _score(self, problem: Problem, response_text: str) -> float:
        predicted = extract_final_answer(clean_response(response_text))
        if predicted is None:
            return 0.0
        return float(math_answers_equal(predicted, problem.answer, use_math_verify=self.use_math_verify))


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


def pass_rates(rewards_N: Any, group_size: int) -> np.ndarray:
    """Per-prompt mean reward [P] of rewards [N = P * group_size] grouped by prompt (prompt i: rows i*K..i*K+K-1)."""
    r = np.asarray(rewards_N, np.float64).reshape(-1)
    if group_size < 1 or r.size % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of group_size={group_size}")
    bad = np.flatnonzero(~np.isfinite(r))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"non-finite reward {r[i]} at row {i} (prompt {i // group_size}); "
                         f"{bad.size} non-finite in all")
    return r.reshape(-1, group_size).mean(axis=1)


def _check_window(low: float, high: float) -> None:
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")


def _in_window(rates: np.ndarray, low: float, high: float) -> np.ndarray:
    """The mask of pass rates in [low, high], bounds included."""
    _check_window(low, high)
    return (rates >= low) & (rates <= high)


def select_perfectible(problems: Sequence[Problem], pass_rates: Any, low: float = 0.2,
                       high: float = 0.8) -> list[Problem]:
    """The problems whose pass rate lies in [low, high] (bounds included), in their original order."""
    rates = np.asarray(pass_rates, np.float64).reshape(-1)
    if rates.size != len(problems):
        raise ValueError(f"{rates.size} pass rates for {len(problems)} problems")
    if not np.isfinite(rates).all():
        i = int(np.flatnonzero(~np.isfinite(rates))[0])
        raise ValueError(f"non-finite pass rate {rates[i]} for problem {i} (prompt {problems[i].prompt!r})")
    return [p for p, kept in zip(problems, _in_window(rates, low, high)) if kept]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerfectibleSet:
    """The selected problems with their pass rates, the pass rates of every candidate and summary stats."""

    problems: list[Problem]
    pass_rates: np.ndarray  # [S] of the selected problems
    candidate_pass_rates: np.ndarray  # [P] of all candidates, in their order
    stats: dict[str, float]


def build_perfectible_set(task: Task, problems: Sequence[Problem],
                          solve: Callable[[list[str], int], Sequence[Sequence[str | tuple[str, bool]]]], *,
                          k: int = 8, low: float = 0.2, high: float = 0.8,
                          batch_size: int | None = None) -> PerfectibleSet:
    """Estimates each problem's pass rate from `k` sampled responses and keeps those in [low, high].

    Args:
      task: scores the responses.
      problems: the candidates (e.g. `task.generate(n, seed)`).
      solve: `solve(prompts, k)` returns k responses for each prompt: decoded texts, or (text, truncated) pairs
        so that responses that hit the length limit get the task's truncated reward. Any sampler + tokenizer.
      k: samples per prompt.
      low, high: the pass-rate window (the paper's 20-80%).
      batch_size: prompts per `solve` call (None: all at once).

    Returns:
      A `PerfectibleSet`; stats: num_candidates, num_selected, fraction_selected, mean_pass_rate (all candidates),
      mean_pass_rate_selected, fraction_never_solved (rate 0), fraction_always_solved (rate 1), samples_per_prompt.
    """
    _check_window(low, high)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    step = max(1, len(problems)) if batch_size is None else batch_size
    chunks = []
    for start in range(0, len(problems), step):
        batch = list(problems[start:start + step])
        responses = solve([p.prompt for p in batch], k)
        if any(len(group) != k for group in responses):
            raise ValueError(f"solve must return {k} responses per prompt")
        chunks.append(score_responses(task, batch, responses))
    rewards_PxK = np.concatenate(chunks) if chunks else np.zeros((0, k))
    rates = pass_rates(rewards_PxK.reshape(-1), k)
    keep = _in_window(rates, low, high)
    selected = [p for p, kept in zip(problems, keep) if kept]
    n = len(problems)
    stats = {
        "num_candidates": float(n),
        "num_selected": float(len(selected)),
        "fraction_selected": len(selected) / n if n else 0.0,
        "mean_pass_rate": float(rates.mean()) if n else 0.0,
        "mean_pass_rate_selected": float(rates[keep].mean()) if selected else 0.0,
        "fraction_never_solved": float((rates == 0).mean()) if n else 0.0,
        "fraction_always_solved": float((rates == 1).mean()) if n else 0.0,
        "samples_per_prompt": float(k),
    }
    return PerfectibleSet(problems=selected, pass_rates=rates[keep], candidate_pass_rates=rates, stats=stats)
