"""`ConfigError` and the checks every run-config section shares: typed fields, ranges and choices, each error
naming the dotted key. A leaf module: it imports nothing from the package, so any module may define its section.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["ConfigError", "check_fields", "check_value", "check_positive", "check_non_negative", "check_choice",
           "call_checked", "describe_type", "field_types", "join_key", "unwrap_optional"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def check_positive(section: str, **values: Any) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {value!r}")


def check_non_negative(section: str, **values: Any) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise ConfigError(f"{section}.{name} must be >= 0, got {value!r}")


def check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


def call_checked(key: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`; a ValueError it raises becomes the ConfigError `{key}: {message}`."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def join_key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(X, True) for Optional[X] / X | None, else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def describe_type(tp: Any) -> str:
    """How a field's type reads in an error message."""
    tp, optional = unwrap_optional(tp)
    if dataclasses.is_dataclass(tp):
        text = f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    elif typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        text = f"a list of {({int: 'integers', str: 'strings'}).get(item, str(item))}, e.g. [a, b]"
    elif typing.get_origin(tp) is dict:
        text = "a mapping"
    else:
        text = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(tp, str(tp))
    return text + " or null" if optional else text


def check_value(key: str, tp: Any, value: Any) -> None:
    """Refuses `value` at `key` unless it has the annotated type `tp` (scalars and lists of scalars)."""
    tp, optional = unwrap_optional(tp)
    if value is None:
        if not optional:
            raise ConfigError(f"{key} may not be null; expected {describe_type(tp)}")
        return
    if typing.get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be {describe_type(tp)}, got {value!r}")
        for i, item in enumerate(value):
            check_value(f"{key}[{i}]", typing.get_args(tp)[0], item)
        return
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number (no key takes inf or nan; a limit that "
                              f"can be switched off is null)")
        return
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp in (bool, str):
        ok = isinstance(value, tp)
    else:
        return  # sections and mappings validate themselves
    if not ok:
        raise ConfigError(f"{key} must be {describe_type(tp)}, got {value!r}")


def check_fields(obj: Any, prefix: str) -> None:
    """Refuses a field whose value does not have its annotated type (bools are not ints, floats are finite),
    naming the dotted key; every section calls it first, so its own checks compare numbers only."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        check_value(join_key(prefix, f.name), hints[f.name], getattr(obj, f.name))
