"""vLLM as the sampler: an engine in the trainer's compute dtype that takes the trainer's weights every iteration.

This is the only module of the package that imports vllm; the torch tensors handed to vLLM come from
`jaxrl_fp16.torch_bridge`. Both are imported when a sampler is built, so importing `jaxrl_fp16` never imports
them.

The engine runs in this process (vLLM's V1 engine core in-process, `VLLM_ENABLE_V1_MULTIPROCESSING=0` unless the
user set it), so a weight push passes torch tensors to the model directly:

    params (FP32 Flax tree) --cast to the engine dtype--> (HF name, torch tensor (out, in)) one at a time
        --> collective_rpc("reload_weights", weights_iterator=..., is_checkpoint_format=True)
        --> reset_prefix_cache()   (cached KV blocks were computed with the old weights)

On a CUDA host with JAX on the GPU the tensors are cast and transposed in JAX and handed over with DLPack, with
no host round trip; elsewhere they go through numpy. A multi-process engine (tensor parallelism, or the user's
`VLLM_ENABLE_V1_MULTIPROCESSING=1`) cannot take tensors through an RPC: its push writes a checkpoint folder and
asks the workers to reload from it. On vLLM's CPU backend a tied LM head is repacked after each push (see
`_repack_tied_lm_head`): without that, FP32/BF16 engines keep sampling from the old head.

Log-probs. The engine is built with `logprobs_mode="processed_logprobs"`: the log-prob vLLM reports for a
sampled token is log-softmax of the logits after temperature, top-k and top-p (the renormalised distribution the
token was drawn from, mu), computed in FP32 from the engine's logits. With temperature 0 (greedy) vLLM skips the
sampling transforms and reports log-softmax of the untempered logits (top-k/top-p do not apply), which is what
`SamplingSettings` documents for greedy decoding.

Only one in-process engine may be open at a time: vLLM keeps its parallel groups in process-global state, and
shutting one engine down tears that state down under any other in-process engine.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_fp16 import torch_bridge
from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.models.hf import save_hf_params
from jaxrl_fp16.models.hf_table import hf_dtype, iter_hf_tensors
from jaxrl_fp16.precision import as_dtype, dtype_name
from jaxrl_fp16.sampling.base import (FINISH_LENGTH, FINISH_STOP, BaseSampler, Rollout, SamplingSettings,
                                      validate_prompts)
from jaxrl_fp16.sharding import host_streamed, stream_hf_weights

__all__ = ["VLLMSampler", "torch_weights", "row_seed"]

logger = logging.getLogger(__name__)

_VLLM_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
_FINISH_REASONS = {"stop": FINISH_STOP, "length": FINISH_LENGTH}
_LOGPROBS_MODE = "processed_logprobs"
_ENV_MULTIPROC = "VLLM_ENABLE_V1_MULTIPROCESSING"
_ENV_CPU_KV = "VLLM_CPU_KVCACHE_SPACE"

# The open in-process engine, if any (see the module docstring); a sampler dropped without close() leaves it.
_open_lock = threading.Lock()
_open_in_process: "weakref.WeakSet[VLLMSampler]" = weakref.WeakSet()


def row_seed(seed: int, row: int) -> int:
    """The vLLM request seed of rollout row `row` under `SamplingSettings.seed` (independent streams per row)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(row)]).generate_state(1, np.uint32)[0])


def _dlpack_tensor(dtype: np.dtype):
    """A per-tensor converter for `iter_hf_tensors`: cast (and transpose) in JAX, hand over by DLPack (no host copy
    when the arrays live on an accelerator)."""
    return lambda x: torch_bridge.jax_to_torch(jnp.asarray(x).astype(dtype))


def torch_weights(params: Mapping, cfg: ModelConfig, dtype: Any, *, via_dlpack: bool = False
                  ) -> Iterator[tuple[str, Any]]:
    """The trainer's params as (HF name, torch tensor in `dtype`, HF (out, in) layout), one tensor at a time.

    Args:
      params: the Flax parameter tree (FP32 master params; jax or numpy arrays).
      cfg: its model config.
      dtype: the engine dtype (casts round to nearest even).
      via_dlpack: cast and transpose in JAX and hand the result to torch with DLPack (the tensors stay on the
        arrays' device; one layer's slice at a time, so at most one extra tensor is alive); otherwise go through
        numpy on the host (`sharding.stream_hf_weights`: one tensor, one layer's slice of the stacked arrays,
        gathered from the devices' shards at a time, so params sharded over many devices are never unsharded on
        any device).

    Returns:
      An iterator in checkpoint order (`iter_hf_tensors`). The tree and its shapes are checked here, before it is
      returned: an error in the middle of a weight push would leave the engine half loaded.
    """
    dt = hf_dtype(as_dtype(dtype))
    if via_dlpack:
        return iter_hf_tensors(params, cfg, _dlpack_tensor(dt))
    return ((name, torch_bridge.numpy_to_torch(array)) for name, array in stream_hf_weights(params, cfg, dt))


def _params_on_accelerator(params: Mapping) -> bool:
    """Every leaf is a JAX array on one accelerator device (DLPack takes single-device arrays; params sharded
    over several devices go through the host, a layer at a time)."""
    leaves = jax.tree_util.tree_leaves(params)
    return bool(leaves) and all(isinstance(x, jax.Array) and len(x.devices()) == 1 and
                                all(d.platform != "cpu" for d in x.devices()) for x in leaves)


def _repack_tied_lm_head(model) -> None:
    """Rebuilds the CPU GEMM of a tied LM head from the (just reloaded) embedding it shares.

    vLLM's CPU backend prepacks FP32/BF16 linear weights (oneDNN or SGL kernels) when weights are processed.
    `reload_weights` reprocesses every layer it loads, but a tied LM head loads nothing of its own (its weight
    is the embedding's): its packed copy keeps the old embedding and the logits follow the old head.
    """
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if head is not None and hasattr(head, "cpu_linear") and method is not None:
        method.process_weights_after_loading(head)


def _check_cpu_head_dim(cfg: ModelConfig) -> None:
    """vLLM's CPU attention supports a fixed list of head sizes; others fail at the first forward pass."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM layout: let the engine decide
        return
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if sizes and cfg.head_dim not in sizes:
        raise ValueError(f"head_dim={cfg.head_dim} is not supported by vLLM's CPU attention backend; "
                         f"supported head sizes: {sizes}")


class _DropChatWarmupFailure(logging.Filter):
    """vLLM warms a chat template up even without a tokenizer and logs the failure with a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Chat template warmup failed")


class VLLMSampler(BaseSampler):
    """A vLLM engine as a `Sampler`: the trainer's compute dtype, weights pushed in place, token-id prompts.

    Attributes:
      compute_dtype: the engine dtype (numpy dtype).
      cfg: the model config read from `model_dir`.
      max_model_len: the context length prompts are checked against (prompt + max_new_tokens must fit).
      eos_token_ids: ids that end a response unless `SamplingSettings.ignore_eos` (config.json's and
        generation_config.json's).
      pad_token_id: fills the rollout outside the attention mask (the config's pad id, else 0).
      last_push_seconds: wall time of the last `push_weights` (None before the first).
    """

    def __init__(self, model_dir: str | os.PathLike, *, dtype: Any, max_model_len: int | None = None, seed: int = 0,
                 gpu_memory_utilization: float = 0.4, tensor_parallel_size: int = 1, enforce_eager: bool = True,
                 **engine_kwargs: Any):
        """Builds the engine (`create_sampler` checks `dtype` against the trainer's first).

        Args:
          model_dir: a Hugging Face checkpoint folder (config.json and weights); a tokenizer is not needed.
          dtype: the engine's dtype: "float32" | "float16" | "bfloat16" (or "f16", a numpy/jax dtype, ...).
          max_model_len: the context length; defaults to the config's max_position_embeddings.
          seed: the engine's global seed (each request also gets its own seed, see `generate`).
          gpu_memory_utilization: the fraction of GPU memory vLLM may take (weights, activations, KV cache); the
            trainer's JAX process shares the GPU, so cap JAX's with XLA_PYTHON_CLIENT_MEM_FRACTION. Unused on
            CPU, where VLLM_CPU_KVCACHE_SPACE (GiB, default 1 here) sizes the KV cache.
          tensor_parallel_size: GPUs per engine; above 1 the engine has worker processes and weight pushes go
            through a checkpoint folder.
          enforce_eager: no CUDA graphs / torch.compile (faster start; what the CPU backend runs).
          **engine_kwargs: passed to `vllm.LLM` (e.g. enable_prefix_caching, max_num_seqs). `logprobs_mode` is
            fixed to "processed_logprobs"; `skip_tokenizer_init` defaults to True and `generation_config` to
            "vllm" (sampling follows `SamplingSettings` alone, not the checkpoint's generation defaults).
        """
        self._llm = None
        self.compute_dtype = as_dtype(dtype)
        mode = engine_kwargs.pop("logprobs_mode", _LOGPROBS_MODE)
        if mode != _LOGPROBS_MODE:
            raise ValueError(f"logprobs_mode={mode!r}: the sampler reports the log-probs of the distribution it "
                             f"sampled from and needs {_LOGPROBS_MODE!r}")
        self.model_dir = os.fspath(model_dir)
        self.cfg = ModelConfig.from_hf_dir(self.model_dir)
        self.max_model_len = int(max_model_len or self.cfg.max_position_embeddings)
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        self.eos_token_ids = self.cfg.eos_token_ids  # config.json and generation_config.json
        self.pad_token_id = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0

        os.environ.setdefault(_ENV_MULTIPROC, "0")
        self._in_process = (os.environ[_ENV_MULTIPROC] == "0" and tensor_parallel_size == 1
                            and engine_kwargs.get("pipeline_parallel_size", 1) == 1)
        if not torch_bridge.cuda_available():
            os.environ.setdefault(_ENV_CPU_KV, "1")
        import vllm

        _check_cpu_head_dim(self.cfg)
        from vllm.platforms import current_platform

        self._device_type = current_platform.device_type
        engine_kwargs.setdefault("skip_tokenizer_init", True)
        engine_kwargs.setdefault("generation_config", "vllm")
        with _open_lock:
            if self._in_process and _open_in_process:
                raise RuntimeError("another in-process VLLMSampler is open in this process; close() it first "
                                   "(vLLM's parallel state is process-global)")
            renderer_log = logging.getLogger("vllm.renderers.base")
            quiet = _DropChatWarmupFailure()
            if engine_kwargs["skip_tokenizer_init"]:
                renderer_log.addFilter(quiet)
            try:
                self._llm = vllm.LLM(model=self.model_dir, dtype=_VLLM_DTYPES[dtype_name(self.compute_dtype)],
                                     seed=seed, max_model_len=self.max_model_len,
                                     gpu_memory_utilization=gpu_memory_utilization,
                                     tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager,
                                     logprobs_mode=_LOGPROBS_MODE, **engine_kwargs)
            finally:
                renderer_log.removeFilter(quiet)
            if self._in_process:
                _open_in_process.add(self)
        logger.info("vLLM sampler: engine dtype %s; model %s; %s engine on %s", self.compute_dtype.name,
                    self.model_dir, "in-process" if self._in_process else "multi-process", self._device_type)

    # ----- weights -----

    def _push(self, params: Any) -> None:
        """Loads the trainer's FP32 params into the engine, cast to the engine dtype, then drops cached KV."""
        llm = self._llm
        repack_head = self._device_type == "cpu" and self.cfg.tie_word_embeddings
        if repack_head and not self._in_process and os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") != "1":
            raise RuntimeError("a weight push into a multi-process CPU engine of a tied-embedding model must "
                               "also repack the LM head in the workers, which needs "
                               "VLLM_ALLOW_INSECURE_SERIALIZATION=1 (or use the in-process engine)")
        if self._in_process:
            via_dlpack = self._device_type == "cuda" and _params_on_accelerator(params)
            weights = torch_weights(params, self.cfg, self.compute_dtype, via_dlpack=via_dlpack)
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        else:
            with tempfile.TemporaryDirectory(prefix="vllm-push-") as tmp:
                folder = save_hf_params(host_streamed(params), self.cfg, os.path.join(tmp, "weights"),
                                        dtype=_VLLM_DTYPES[dtype_name(self.compute_dtype)])
                llm.collective_rpc("reload_weights", kwargs={"weights_path": folder, "is_checkpoint_format": True})
        if repack_head:
            llm.apply_model(_repack_tied_lm_head)
        if llm.reset_prefix_cache() is False:  # KV blocks of the old weights would be reused
            raise RuntimeError("vLLM could not reset its prefix cache after the weight push")

    # ----- sampling -----

    def _sample(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> Rollout:
        """One vLLM request per row, seeded with `row_seed(settings.seed, row)`, so a seed gives the same rollout."""
        prompts = validate_prompts(prompts, self.cfg.vocab_size, self.max_model_len, settings.max_new_tokens)
        from vllm import SamplingParams

        k = settings.samples_per_prompt
        rows = [(i, p) for i, p in enumerate(prompts) for _ in range(k)]
        stop_ids = list(settings.stop_token_ids)
        if not settings.ignore_eos:
            stop_ids += [t for t in self.eos_token_ids if t not in stop_ids]
        params = [SamplingParams(n=1, temperature=settings.temperature, top_p=settings.top_p,
                                 top_k=settings.top_k if settings.top_k > 0 else -1,
                                 max_tokens=settings.max_new_tokens, stop_token_ids=stop_ids,
                                 ignore_eos=settings.ignore_eos, logprobs=0, seed=row_seed(settings.seed, r),
                                 detokenize=False)
                  for r in range(len(rows))]
        outputs = self._llm.generate([{"prompt_token_ids": p} for _, p in rows], params, use_tqdm=False)
        return self._rollout(rows, outputs, settings.max_new_tokens)

    def _rollout(self, rows: list[tuple[int, list[int]]], outputs: list, max_new_tokens: int) -> Rollout:
        n, width = len(rows), max(len(p) for _, p in rows)
        total = width + max_new_tokens
        tokens_NxT = np.full((n, total), self.pad_token_id, np.int32)
        attention_NxT = np.zeros((n, total), np.int32)
        response_NxT = np.zeros((n, total), np.int32)
        logprobs_NxT = np.zeros((n, total), np.float32)
        finish = []
        for r, ((_, prompt), out) in enumerate(zip(rows, outputs, strict=True)):
            completion = out.outputs[0]
            ids = [int(t) for t in completion.token_ids]
            if completion.finish_reason not in _FINISH_REASONS:
                raise RuntimeError(f"vLLM finished row {r} with reason {completion.finish_reason!r}")
            if not 1 <= len(ids) <= max_new_tokens or completion.logprobs is None:
                raise RuntimeError(f"vLLM returned {len(ids)} tokens for row {r} (max {max_new_tokens}) "
                                   f"{'without' if completion.logprobs is None else 'with'} log-probs")
            start = width - len(prompt)
            tokens_NxT[r, start:width] = prompt
            attention_NxT[r, start:width + len(ids)] = 1
            tokens_NxT[r, width:width + len(ids)] = ids
            response_NxT[r, width:width + len(ids)] = 1
            logprobs_NxT[r, width:width + len(ids)] = [completion.logprobs[j][t].logprob for j, t in enumerate(ids)]
            finish.append(_FINISH_REASONS[completion.finish_reason])
        return Rollout(tokens=tokens_NxT, attention_mask=attention_NxT, response_mask=response_NxT,
                       logprobs=logprobs_NxT, prompt_index=np.array([i for i, _ in rows], np.int32),
                       prompt_width=width, finish_reasons=finish)

    # ----- lifetime -----

    def _release(self) -> None:
        """Shuts the engine down and frees it (weights, KV cache, parallel state)."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            with _open_lock:
                _open_in_process.discard(self)
            gc.collect()
            torch_bridge.empty_cuda_cache()
