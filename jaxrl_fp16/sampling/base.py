"""The sampler interface: every inference engine (built-in JAX, vLLM) takes the trainer's weights and returns
rollouts with the log-prob of each sampled token under the distribution it actually sampled from (mu).

Layout of a rollout (N = prompts x samples_per_prompt rows, grouped by prompt; T = P + R columns):
    tokens          int32 [N, T]   left-padded prompt (width P) followed by the response, right-padded
    attention_mask  int32 [N, T]   1 on real tokens (prompt and response, EOS included)
    response_mask   int32 [N, T]   1 on sampled tokens
    logprobs        f32   [N, T]   log mu of the sampled token at t, 0 elsewhere (all 0 when not requested)
Entry t of any per-token array refers to tokens[:, t] given tokens[:, :t], the convention of the trainer's
`token_logprobs`, so the two engines' log-probs compare position by position.

`BaseSampler` holds what every engine shares: the weight push timed, and the lifetime (open until `close()`,
a context manager, every use after close refused).
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import time
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from jaxrl_fp16.precision import as_dtype

__all__ = ["SamplingSettings", "Rollout", "Sampler", "BaseSampler", "validate_prompts", "check_dtypes_agree"]

log = logging.getLogger(__name__)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """How to sample. `temperature=0` is greedy (its log-probs are then the untempered model's).

    `logprobs=False` asks for tokens only (e.g. pass rates): the rollout's `logprobs` are then all 0 and its
    `has_logprobs` is False; an engine that computes them anyway (JAX, transformers) drops them, vLLM does not
    compute them. The sampled tokens are the same either way.

    `first_row`: the global index of the call's first row. Row r of a call draws the random stream of global row
    `first_row + r` under `seed`, so processes that each sample a block of one batch's rows (their first row as
    offset) sample exactly what one call over the whole batch samples.
    """

    max_new_tokens: int
    samples_per_prompt: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS ids
    ignore_eos: bool = False
    seed: int = 0
    logprobs: bool = True
    first_row: int = 0

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.first_row < 0:
            raise ValueError(f"first_row must be >= 0, got {self.first_row}")


@dataclasses.dataclass(kw_only=True)
class Rollout:
    """Sampled responses with their sampler log-probs (see the module docstring for the layout)."""

    tokens: np.ndarray
    attention_mask: np.ndarray
    response_mask: np.ndarray
    logprobs: np.ndarray
    prompt_index: np.ndarray  # int [N]: the prompt each row answers
    prompt_width: int
    finish_reasons: list[str]
    has_logprobs: bool = True  # False: `logprobs` were not requested (SamplingSettings.logprobs) and are all 0

    def __post_init__(self):
        n, t = self.tokens.shape
        for name in ("attention_mask", "response_mask", "logprobs"):
            if getattr(self, name).shape != (n, t):
                raise ValueError(f"rollout field {name} has shape {getattr(self, name).shape}, expected {(n, t)}")
        if len(self.finish_reasons) != n or self.prompt_index.shape != (n,):
            raise ValueError("rollout finish_reasons / prompt_index must have one entry per row")

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def response_lengths(self) -> np.ndarray:
        return self.response_mask.sum(axis=1)

    def responses(self) -> list[list[int]]:
        """Each row's response token ids (EOS included when it stopped on one)."""
        return [row[m.astype(bool)].tolist() for row, m in zip(self.tokens, self.response_mask)]

    @property
    def truncated(self) -> np.ndarray:
        return np.array([r == FINISH_LENGTH for r in self.finish_reasons])


@runtime_checkable
class Sampler(Protocol):
    """An inference engine that runs in one compute dtype and takes new weights every iteration."""

    compute_dtype: np.dtype

    def push_weights(self, params: Any) -> None:
        """Loads the trainer's FP32 params (the sampler casts them to its compute dtype)."""

    def generate(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> Rollout:
        """Samples `settings.samples_per_prompt` responses per prompt."""

    def close(self) -> None:
        """Frees the engine."""


class BaseSampler(abc.ABC):
    """The lifetime and the weight push of every engine; implements the `Sampler` protocol.

    Subclasses set `compute_dtype` and implement `_push` (load FP32 params in that dtype), `_sample` (sample;
    the arguments as `generate`'s) and `_release` (free the engine; called once, by the first `close()`).

    Attributes:
      compute_dtype: the engine's dtype (numpy dtype).
      last_push_seconds: wall time of the last `push_weights` (None before the first).
      closed: whether `close()` ran; a closed sampler refuses `push_weights` and `generate` (RuntimeError).
    """

    compute_dtype: np.dtype
    last_push_seconds: float | None = None
    _closed: bool = False

    @property
    def closed(self) -> bool:
        return self._closed

    def push_weights(self, params: Any) -> None:
        """Loads the trainer's FP32 params, cast to the compute dtype; timed in `last_push_seconds`."""
        self._check_open()
        start = time.perf_counter()
        self._push(params)
        self.last_push_seconds = time.perf_counter() - start
        log.debug("pushed weights to %s (%s) in %.3f s", type(self).__name__, self.compute_dtype.name,
                  self.last_push_seconds)

    def generate(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> Rollout:
        """Samples `settings.samples_per_prompt` responses per prompt (see the module docstring for the layout).

        Prompt i's samples are rows [i*K, (i+1)*K). A response keeps its EOS / stop token (response_mask 1,
        finish reason 'stop'); one that hit max_new_tokens has finish reason 'length'. With
        `settings.logprobs=False` the rollout's log-probs are all 0 (`has_logprobs` False), whatever the engine.
        """
        self._check_open()
        rollout = self._sample(prompts, settings)
        if not settings.logprobs:
            rollout.logprobs = np.zeros_like(rollout.logprobs)
            rollout.has_logprobs = False
        return rollout

    def close(self) -> None:
        """Frees the engine; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} is closed")

    @abc.abstractmethod
    def _push(self, params: Any) -> None: ...

    @abc.abstractmethod
    def _sample(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> Rollout: ...

    @abc.abstractmethod
    def _release(self) -> None: ...


def check_dtypes_agree(sampler_dtype: Any, trainer_dtype: Any, allow_mismatch: bool = False) -> None:
    """Refuses a sampler whose compute dtype differs from the trainer's, unless explicitly allowed."""
    s, t = as_dtype(sampler_dtype), as_dtype(trainer_dtype)
    if s != t and not allow_mismatch:
        raise ValueError(f"sampler dtype {s} differs from the trainer's compute dtype {t}: the rollout policy "
                         f"would not be the training policy. Use the same dtype, or allow the mismatch "
                         f"explicitly (allow_dtype_mismatch / --allow-dtype-mismatch) to study it.")


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_len: int,
                     max_new_tokens: int) -> list[list[int]]:
    """Checks prompts before any work: non-empty, token ids in range, prompt + response fits the context."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        if len(p) + max_new_tokens > max_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                             f"{len(p) + max_new_tokens} positions, more than the context length {max_len}")
        out.append(p)
    return out
