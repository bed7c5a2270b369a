"""Hugging Face transformers as the sampler: `AutoModelForCausalLM.generate` in the policy's dtype (PyTorch, on
CUDA when available, else the CPU), loaded with the trainer's weights at every push.

A third engine beside the built-in JAX one and vLLM: the reference implementation most checkpoints are written
for, so the mismatch it shows against the trainer is the one a PyTorch inference stack brings. Everything that
touches torch (the model, the weight copy, `generate` and the log-probs) lives in `jaxrl_fp16.torch_bridge`;
this module holds the layout, the validation and the bookkeeping, and does not import torch itself.

    push:      params (FP32 Flax tree) --hf_state_dict, cast to the sampler dtype--> (HF name, numpy (out, in))
               --strict copy (every key, tied names once, shapes checked first)--> the torch model
    generate:  left-padded prompt batch --generate (temperature, top-k, top-p as transformers' warpers)-->
               tokens + log-softmax of the processed FP32 scores at the sampled token (mu)

Log-probs follow the other samplers: the log-prob of a sampled token is log-softmax of the logits after
temperature, then top-k, then top-p (the renormalised distribution it was drawn from), in FP32; temperature 0 is
greedy with the untempered log-probs. Rows are generated in batches of at most `max_batch_size`; batch b of a
call with seed s draws from torch's generator seeded with `batch_seed(s, b)`, so a seed reproduces a rollout
(for a given `max_batch_size`).
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any, Sequence

import numpy as np

from jaxrl_fp16 import torch_bridge
from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.models.hf_table import CheckpointError, hf_state_dict
from jaxrl_fp16.models.inference import left_pad
from jaxrl_fp16.precision import as_dtype
from jaxrl_fp16.sampling.base import (FINISH_LENGTH, FINISH_STOP, BaseSampler, Rollout, SamplingSettings,
                                      validate_prompts)

__all__ = ["TransformersSampler", "batch_seed"]

log = logging.getLogger(__name__)


def batch_seed(seed: int, batch: int) -> int:
    """The torch seed of batch `batch` of a `generate` call with `SamplingSettings.seed` = `seed`."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(batch)]).generate_state(1, np.uint32)[0])


def response_lengths(tokens_BxN: np.ndarray, stop_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(length [B], stopped [B]): a row ends after its first stop token (kept), else it runs all N columns."""
    is_stop = np.isin(tokens_BxN, np.asarray(list(stop_ids), np.int64))
    stopped = is_stop.any(axis=1)
    return np.where(stopped, is_stop.argmax(axis=1) + 1, tokens_BxN.shape[1]), stopped


class TransformersSampler(BaseSampler):
    """A transformers causal LM as a `Sampler`: one compute dtype, weights pushed in place, token-id prompts.

    Attributes:
      compute_dtype: the model's dtype (numpy dtype).
      cfg: the model config read from `model_dir`.
      max_model_len: the context length prompts are checked against (prompt + max_new_tokens must fit).
      eos_token_ids: ids that end a response unless `SamplingSettings.ignore_eos`.
      pad_token_id: fills the rollout outside the attention mask (the config's pad id, else 0).
      max_batch_size: rows per `generate` call; larger requests are split.
      device: where the model runs ("cpu" or "cuda").
      last_push_seconds: wall time of the last `push_weights` (None before the first).
    """

    def __init__(self, model_dir: str | os.PathLike, *, dtype: Any, max_batch_size: int = 256,
                 device: str | None = None, attn_implementation: str | None = None):
        """Loads the model (`create_sampler` checks `dtype` against the trainer's first).

        Args:
          model_dir: a Hugging Face checkpoint folder (config.json and weights); a tokenizer is not needed.
          dtype: the model's dtype: "float32" | "float16" | "bfloat16" (or "f16", a numpy/jax dtype, ...).
          max_batch_size: rows per `generate` call.
          device: "cpu", "cuda", "cuda:1", ...; default CUDA when available, else the CPU.
          attn_implementation: transformers' attention kernel ("sdpa", "eager", ...); default transformers'.
        """
        self._model = None
        self.compute_dtype = as_dtype(dtype)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model_dir = os.fspath(model_dir)
        self.cfg = ModelConfig.from_hf_dir(self.model_dir)
        self.max_model_len = self.cfg.max_position_embeddings
        self.eos_token_ids = self.cfg.eos_token_ids
        self.pad_token_id = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0
        self.max_batch_size = int(max_batch_size)
        self._model = torch_bridge.load_causal_lm(self.model_dir, self.compute_dtype.name, device=device,
                                                  attn_implementation=attn_implementation)
        self.device = str(self._model.device)
        log.info("transformers sampler: dtype %s; model %s on %s", self.compute_dtype.name, self.model_dir,
                 self.device)

    # ----- weights -----

    def _push(self, params: Any) -> None:
        """Loads the trainer's FP32 params, cast to the model's dtype; every tensor of the model must be given.

        The tree is checked against the config (`hf_state_dict`) and the names and shapes against the torch
        model before anything is copied: a refused push (CheckpointError naming the key) leaves the model as
        it was.
        """
        try:
            torch_bridge.copy_numpy_weights(self._model, hf_state_dict(params, self.cfg, self.compute_dtype))
        except CheckpointError:
            raise
        except ValueError as err:  # the torch side: a key or shape the config's table and the model disagree on
            raise CheckpointError(str(err)) from err

    # ----- sampling -----

    def _sample(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> Rollout:
        if settings.first_row:
            raise ValueError(f"SamplingSettings.first_row={settings.first_row}: the transformers sampler seeds "
                             f"per batch, not per row, so it cannot sample a block of a batch's rows (several "
                             f"processes): use sampler.name=jax or vllm")
        prompts = validate_prompts(prompts, self.cfg.vocab_size, self.max_model_len, settings.max_new_tokens)
        k, new = settings.samples_per_prompt, settings.max_new_tokens
        rows = [p for p in prompts for _ in range(k)]
        width = max(len(p) for p in rows)
        stop = list(settings.stop_token_ids)
        if not settings.ignore_eos:
            stop += [t for t in self.eos_token_ids if t not in stop]

        out_tok = np.full((len(rows), new), self.pad_token_id, np.int32)
        out_lp = np.zeros((len(rows), new), np.float32)
        for b, start in enumerate(range(0, len(rows), self.max_batch_size)):
            chunk = rows[start:start + self.max_batch_size]
            tok_BxP, mask_BxP = left_pad(chunk, self.pad_token_id, width)
            tokens, logprobs = torch_bridge.generate_with_logprobs(
                self._model, tok_BxP, mask_BxP, max_new_tokens=new, temperature=settings.temperature,
                top_k=settings.top_k, top_p=settings.top_p, stop_token_ids=stop, pad_token_id=self.pad_token_id,
                seed=batch_seed(settings.seed, b))
            if tokens.shape != logprobs.shape or not 1 <= tokens.shape[1] <= new:
                raise RuntimeError(f"generate returned {tokens.shape[1]} tokens per row (max {new})")
            out_tok[start:start + len(chunk), :tokens.shape[1]] = tokens
            out_lp[start:start + len(chunk), :tokens.shape[1]] = logprobs
        return self._rollout(prompts, rows, width, out_tok, out_lp, stop)

    def _rollout(self, prompts: list[list[int]], rows: list[list[int]], width: int, out_tok_NxR: np.ndarray,
                 out_lp_NxR: np.ndarray, stop: list[int]) -> Rollout:
        new = out_tok_NxR.shape[1]
        lengths, stopped = response_lengths(out_tok_NxR, stop)
        resp_NxR = (np.arange(new)[None, :] < lengths[:, None]).astype(np.int32)
        prompt_NxP, prompt_mask_NxP = left_pad(rows, self.pad_token_id, width)
        return Rollout(
            tokens=np.concatenate([prompt_NxP, np.where(resp_NxR == 1, out_tok_NxR, self.pad_token_id)],
                                  axis=1).astype(np.int32),
            attention_mask=np.concatenate([prompt_mask_NxP, resp_NxR], axis=1),
            response_mask=np.concatenate([np.zeros_like(prompt_mask_NxP), resp_NxR], axis=1),
            logprobs=np.concatenate([np.zeros(prompt_NxP.shape, np.float32),
                                     np.where(resp_NxR == 1, out_lp_NxR, 0.0).astype(np.float32)], axis=1),
            prompt_index=np.repeat(np.arange(len(prompts)), len(rows) // len(prompts)).astype(np.int32),
            prompt_width=width,
            finish_reasons=[FINISH_STOP if s else FINISH_LENGTH for s in stopped],
        )

    # ----- lifetime -----

    def _release(self) -> None:
        self._model = None
        gc.collect()
        torch_bridge.empty_cuda_cache()
