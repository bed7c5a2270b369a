"""Verifiable rewards: exact match for the synthetic tasks, final-answer checking for math.

A math response's final answer is the content of its last `\\boxed{...}`, or else its last number. Answers are
compared with math-verify (`parse` / `verify`: "\\boxed{1/2}" equals "0.5") when it is installed; this is the
only module that imports it, lazily. Without it, both sides are read as exact rationals (integers, decimals,
"a/b", "\\frac{a}{b}", thousands commas) and compared exactly, or as normalised strings when one is not a number.
"""

from __future__ import annotations

import functools
import re
import threading
from fractions import Fraction

from jaxrl_fp16.models.tiny import EOS_TOKEN

__all__ = ["clean_response", "exact_match_reward", "extract_final_answer", "math_answers_equal",
           "math_verify_available"]

# A number as written in an answer: optional sign, thousands commas or plain digits, optional decimals, and an
# optional "/denominator". Commas only count in groups of three ("1,692"), so "3,4" reads as two numbers.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")


def clean_response(text: str) -> str:
    """The response without surrounding whitespace or a trailing end-of-text marker (when decoded with it)."""
    text = text.strip()
    while text.endswith(EOS_TOKEN):
        text = text[: -len(EOS_TOKEN)].rstrip()
    return text


def exact_match_reward(response_text: str, answer: str, *, partial_credit: bool = False) -> float:
    """1.0 when the cleaned response is exactly `answer`, else 0.0.

    With `partial_credit`, a wrong response gets the fraction of positions (from the left) where it agrees with
    the answer, over the longer of the two lengths: always below 1.0 unless the match is exact.
    """
    got = clean_response(response_text)
    if got == answer:
        return 1.0
    if not partial_credit:
        return 0.0
    width = max(len(got), len(answer))
    return sum(a == b for a, b in zip(got, answer)) / width if width else 0.0


def _last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None when there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
        j += 1
    return None  # unclosed: an unfinished answer


def extract_final_answer(text: str) -> str | None:
    """The last `\\boxed{}` content, else the last number in `text`; None when it has neither."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed or None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _as_rational(text: str) -> Fraction | None:
    """An exact value for a plain numeric answer, else None."""
    s = text.strip().strip("$").replace("\\!", "").replace("\\,", "").replace(" ", "")
    s = s.removesuffix("\\%").removesuffix("%").removesuffix(".")
    if s.startswith("\\text{") and s.endswith("}"):
        s = s[len("\\text{"):-1]
    m = _FRAC.match(s)
    if m:
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _normalise(text: str) -> str:
    return re.sub(r"\s+", "", text).strip("$").rstrip(".")


@functools.cache
def _math_verify():
    """The math_verify module, or None when it is not installed."""
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


def math_verify_available() -> bool:
    """Whether math-verify is installed (it is used by `math_answers_equal` when it is)."""
    return _math_verify() is not None


def math_answers_equal(predicted: str, gold: str, *, use_math_verify: bool | None = None) -> bool:
    """Whether a final answer equals the gold answer (both already extracted, e.g. "1/2" and "0.5").

    Args:
      predicted: the response's final answer (see `extract_final_answer`).
      gold: the reference answer.
      use_math_verify: True requires math-verify, False forces the exact numeric fallback, None uses
        math-verify when it is installed.
    """
    mv = _math_verify()
    if use_math_verify and mv is None:
        raise ImportError("math-verify is not installed: pip install 'jaxrl-fp16[math]'")
    if mv is not None and use_math_verify is not False:
        # math-verify's timeouts use SIGALRM, which only works on the main thread.
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        gold_parsed = mv.parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
        pred_parsed = mv.parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
        if gold_parsed and pred_parsed:
            return bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    a, b = _as_rational(predicted), _as_rational(gold)
    if a is not None and b is not None:
        return a == b
    return _normalise(predicted) == _normalise(gold)
