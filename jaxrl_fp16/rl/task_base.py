"""The task protocol and shared plumbing: a `Problem`, the `Task` protocol, option type checks (`OptionError`)
and `TaskBase`, the seeding, truncation rule and reference response every task shares."""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = ["OptionError", "Problem", "Task", "TaskBase"]


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
class TaskBase:
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
