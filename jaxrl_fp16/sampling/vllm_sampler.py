"""vLLM as the sampler: an engine in the trainer's compute dtype that takes the trainer's weights every iteration.

This is the only module of the package that imports vllm; the torch tensors handed to vLLM come from
`jaxrl_fp16.torch_bridge`. Both are imported when a sampler is built, so importing `jaxrl_fp16` never imports
them. Its job is the engine: its options and environment, its start (after the installed vLLM is checked,
`vllm_api`), sampling requests and shutdown. The weight push's routes are in `vllm_push` (with the in-place write
plan in `vllm_weights`), and the requests' outputs become a rollout in `vllm_rollout`.

The engine runs in this process (vLLM's V1 engine core in-process, `VLLM_ENABLE_V1_MULTIPROCESSING=0` unless the
user set it), so a weight push passes torch tensors to the model directly: the first push of an engine goes
through `reload_weights` and checks the in-place plan against what vLLM loaded, bit for bit; later pushes write in
place (`weight_push="reload"` turns this off). A multi-process engine (tensor parallelism, or the user's
`VLLM_ENABLE_V1_MULTIPROCESSING=1`) cannot take tensors through an RPC: its push writes a checkpoint folder and
asks the workers to reload from it. On vLLM's CPU backend a tied LM head is repacked after each push. After every
push the engine's prefix cache is reset (cached KV blocks were computed with the old weights).

Log-probs. The engine is built with `logprobs_mode="processed_logprobs"`: the log-prob vLLM reports for a
sampled token is log-softmax of the logits after temperature, top-k and top-p (the renormalised distribution the
token was drawn from, mu), computed in FP32 from the engine's logits. With temperature 0 (greedy) vLLM skips the
sampling transforms and reports log-softmax of the untempered logits (top-k/top-p do not apply), which is what
`SamplingSettings` documents for greedy decoding.

Log-probs are requested in vLLM's flat form (`SamplingParams(flat_logprobs=True)`: a `FlatLogprobs` of plain lists
instead of one dict of `Logprob` objects per token), and not at all when `SamplingSettings.logprobs` is False.

Only one in-process engine may be open at a time: vLLM keeps its parallel groups in process-global state, and
shutting one engine down tears that state down under any other in-process engine.

Determinism. With GPU determinism on (`debug.deterministic=true`, which sets JAXRL_FP16_DETERMINISTIC=1) a CUDA
engine is built with VLLM_BATCH_INVARIANT=1 (unless the user set it): vLLM's batch-invariant kernels, whose
results do not depend on the batch a request lands in; a vLLM without them is refused (`vllm_api`). On a CPU the
variable is not set: vLLM's batch-invariant mode is for GPUs (it replaces torch's matmuls with Triton kernels), and
vLLM's CPU engine runs one batch the same way every time.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Sequence

from jaxrl_fp16 import torch_bridge
from jaxrl_fp16._xla_flags import deterministic
from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.precision import as_dtype
from jaxrl_fp16.sampling.base import BaseSampler, Rollout, SamplingSettings, validate_prompts
from jaxrl_fp16.sampling.options import engine_memory_utilization
from jaxrl_fp16.sampling.vllm_api import (BATCH_INVARIANT_ENV, TESTED_VLLM_VERSION, VLLMVersionError,
                                          check_installed_vllm)
from jaxrl_fp16.sampling.vllm_push import (EMBEDDING, params_on_accelerator, plan_engine_writes, push_direct,
                                           reload_from_folder, reload_tensors, repack_tied_lm_head, torch_weights,
                                           verify_plan, vllm_dtype)
from jaxrl_fp16.sampling.vllm_rollout import rollout_from_outputs, row_seed

if TYPE_CHECKING:
    from jaxrl_fp16.sampling.vllm_weights import DirectPlan

__all__ = ["VLLMSampler", "engine_environment"]

logger = logging.getLogger(__name__)

_LOGPROBS_MODE = "processed_logprobs"
_ENV_MULTIPROC = "VLLM_ENABLE_V1_MULTIPROCESSING"
_ENV_CPU_KV = "VLLM_CPU_KVCACHE_SPACE"
_ENV_WORKER_METHOD = "VLLM_WORKER_MULTIPROC_METHOD"
_WEIGHT_PUSH = ("auto", "reload")

# The open in-process engine, if any (see the module docstring); a sampler dropped without close() leaves it.
_open_lock = threading.Lock()
_open_in_process: "weakref.WeakSet[VLLMSampler]" = weakref.WeakSet()


def engine_environment(environ: Mapping[str, str], *, tensor_parallel_size: int = 1,
                       pipeline_parallel_size: int = 1, cuda: bool = True) -> tuple[dict[str, str], bool]:
    """(the variables to set, whether the engine runs in this process); pure. Only variables the user has not set:
    the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0); for an engine with worker processes
    (tensor or pipeline parallelism, or the user's multiprocessing), VLLM_WORKER_MULTIPROC_METHOD=spawn, since
    forking a process whose JAX already holds CUDA is unsafe; on a CPU, a 1 GiB KV cache; on a GPU with
    determinism on (JAXRL_FP16_DETERMINISTIC), VLLM_BATCH_INVARIANT=1."""
    defaults = {} if _ENV_MULTIPROC in environ else {_ENV_MULTIPROC: "0"}
    if cuda and deterministic(environ) and BATCH_INVARIANT_ENV not in environ:
        defaults[BATCH_INVARIANT_ENV] = "1"
    in_process = ({**environ, **defaults}[_ENV_MULTIPROC] == "0" and tensor_parallel_size == 1
                  and pipeline_parallel_size == 1)
    if not in_process and _ENV_WORKER_METHOD not in environ:
        defaults[_ENV_WORKER_METHOD] = "spawn"
    if not cuda and _ENV_CPU_KV not in environ:
        defaults[_ENV_CPU_KV] = "1"
    return defaults, in_process


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


def _device_ids(devices: Sequence[int], version: str) -> list[int]:
    """vLLM's `device_ids` for `sampler.devices`; VLLMVersionError when the installed vLLM has no such option."""
    from vllm.engine.arg_utils import EngineArgs

    if "device_ids" not in {f.name for f in dataclasses.fields(EngineArgs)}:
        raise VLLMVersionError(f"sampler.devices={list(devices)} needs vLLM's device_ids option, which the installed "
                               f"vLLM {version} does not have (tested with {TESTED_VLLM_VERSION}); leave "
                               f"sampler.devices unset to share the trainer's GPUs")
    return [int(d) for d in devices]


def _has_flat_logprobs() -> bool:
    """Whether this vLLM's SamplingParams takes `flat_logprobs` (the flat log-prob container)."""
    from vllm import SamplingParams

    return "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ())


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
                 gpu_memory_utilization: float | None = None, tensor_parallel_size: int = 1,
                 enforce_eager: bool | None = None, devices: Sequence[int] | None = None, weight_push: str = "auto",
                 **engine_kwargs: Any):
        """Builds the engine (`create_sampler` checks `dtype` against the trainer's first).

        Args:
          model_dir: a Hugging Face checkpoint folder (config.json and weights); a tokenizer is not needed.
          dtype: the engine's dtype: "float32" | "float16" | "bfloat16" (or "f16", a numpy/jax dtype, ...).
          max_model_len: the context length (the KV cache must hold one such sequence); default and upper bound:
            the config's max_position_embeddings.
          seed: the engine's global seed (each request also gets its own seed, see `generate`).
          gpu_memory_utilization: the fraction of each of its GPUs vLLM may take (weights, activations, KV cache);
            None: `engine_memory_utilization` (0.35 beside the trainer's JAX, whose share
            `jaxrl_fp16.gpu_host.gpu_plan` caps with XLA_PYTHON_CLIENT_MEM_FRACTION; 0.9 with `devices`). Unused on
            CPU, where VLLM_CPU_KVCACHE_SPACE (GiB, default 1 here) sizes the KV cache.
          tensor_parallel_size: GPUs per engine; above 1 the engine has worker processes (started with
            VLLM_WORKER_MULTIPROC_METHOD=spawn unless set: forking a process whose JAX holds CUDA is unsafe) and
            weight pushes go through a checkpoint folder.
          enforce_eager: no CUDA graphs / torch.compile; None: eager on a CPU (vLLM's CPU backend would compile
            with inductor), CUDA graphs on a GPU.
          devices: the engine's own GPUs, as ordinals of the visible devices (vLLM's `device_ids`, vLLM >= the
            version that has it); None: vLLM's default, the first `tensor_parallel_size` visible GPUs. Ignored on
            a CPU.
          weight_push: "auto": an in-process engine's pushes write the tensors that its layers use as loaded
            straight into its parameters and reload the others (`vllm_weights`; checked against `reload_weights`
            on the first push); "reload": every push goes through vLLM's `reload_weights`. A multi-process engine
            always reloads. Also reachable as `VLLMOptions(engine_kwargs={"weight_push": ...})`.
          **engine_kwargs: passed to `vllm.LLM` (e.g. enable_prefix_caching, max_num_seqs); None values are
            dropped (vLLM's defaults). `logprobs_mode` is fixed to "processed_logprobs"; `skip_tokenizer_init`
            defaults to True and `generation_config` to "vllm" (sampling follows `SamplingSettings` alone, not
            the checkpoint's generation defaults).

        Raises:
          VLLMVersionError: the installed vLLM is older than MIN_VLLM_VERSION or has no weight-push API.
        """
        self._llm = None
        self._plan = None
        if weight_push not in _WEIGHT_PUSH:
            raise ValueError(f"weight_push={weight_push!r}; valid: {', '.join(_WEIGHT_PUSH)}")
        self.weight_push = weight_push
        self.last_push_mode: str | None = None
        self.compute_dtype = as_dtype(dtype)
        mode = engine_kwargs.pop("logprobs_mode", _LOGPROBS_MODE)
        if mode != _LOGPROBS_MODE:
            raise ValueError(f"logprobs_mode={mode!r}: the sampler reports the log-probs of the distribution it "
                             f"sampled from and needs {_LOGPROBS_MODE!r}")
        engine_kwargs = {k: v for k, v in engine_kwargs.items() if v is not None}
        self.model_dir = os.fspath(model_dir)
        self.cfg = ModelConfig.from_hf_dir(self.model_dir)
        context = self.cfg.max_position_embeddings
        self.max_model_len = min(int(max_model_len or context), context)
        if max_model_len and max_model_len > context:
            logger.info("vLLM sampler: max_model_len %d capped at the model's context %d", max_model_len, context)
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        self.eos_token_ids = self.cfg.eos_token_ids  # config.json and generation_config.json
        self.pad_token_id = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0

        cuda = torch_bridge.cuda_available()
        defaults, self._in_process = engine_environment(os.environ, tensor_parallel_size=tensor_parallel_size,
                                                        pipeline_parallel_size=engine_kwargs.get(
                                                            "pipeline_parallel_size", 1), cuda=cuda)
        os.environ.update(defaults)
        import vllm

        batch_invariant = os.environ.get(BATCH_INVARIANT_ENV, "0") not in ("", "0")
        check_installed_vllm(vllm.__version__, batch_invariant=batch_invariant)
        if batch_invariant:
            logger.info("vLLM sampler: batch-invariant mode (%s=1)", BATCH_INVARIANT_ENV)
        _check_cpu_head_dim(self.cfg)
        from vllm.platforms import current_platform

        self._device_type = current_platform.device_type
        if devices is not None and self._device_type == "cuda":
            engine_kwargs["device_ids"] = _device_ids(devices, vllm.__version__)
        elif devices is not None:
            logger.info("vLLM sampler: devices %s name GPUs; on %s only the trainer's mesh leaves them out",
                        list(devices), self._device_type)
        engine_kwargs.setdefault("skip_tokenizer_init", True)
        engine_kwargs.setdefault("generation_config", "vllm")
        self.engine_settings = {"gpu_memory_utilization": engine_memory_utilization(gpu_memory_utilization, devices),
                                "enforce_eager": (not cuda) if enforce_eager is None else bool(enforce_eager),
                                "tensor_parallel_size": int(tensor_parallel_size),
                                "max_model_len": self.max_model_len, **engine_kwargs}
        with _open_lock:
            if self._in_process and _open_in_process:
                raise RuntimeError("another in-process VLLMSampler is open in this process; close() it first "
                                   "(vLLM's parallel state is process-global)")
            renderer_log = logging.getLogger("vllm.renderers.base")
            quiet = _DropChatWarmupFailure()
            if engine_kwargs["skip_tokenizer_init"]:
                renderer_log.addFilter(quiet)
            try:
                self._llm = vllm.LLM(model=self.model_dir, dtype=vllm_dtype(self.compute_dtype),
                                     seed=seed, logprobs_mode=_LOGPROBS_MODE, **self.engine_settings)
            finally:
                renderer_log.removeFilter(quiet)
            if self._in_process:
                _open_in_process.add(self)
        self._flat_logprobs = _has_flat_logprobs()
        logger.info("vLLM sampler: engine dtype %s; model %s; %s engine on %s; %s", self.compute_dtype.name,
                    self.model_dir, "in-process" if self._in_process else "multi-process", self._device_type,
                    {k: v for k, v in self.engine_settings.items() if k != "generation_config"})

    # ----- weights -----

    def _push(self, params: Any) -> None:
        """Loads the trainer's FP32 params into the engine, cast to the engine dtype, then drops cached KV.

        In-process with `weight_push="auto"`: the first push (and the first after the engine replaced a tensor)
        goes through `reload_weights` and checks the direct plan against what it loaded; later pushes write the
        planned tensors in place and reload the rest (see `vllm_push`, `vllm_weights`). Otherwise every push
        reloads."""
        llm = self._llm
        repack_head = self._device_type == "cpu" and self.cfg.tie_word_embeddings
        if repack_head and not self._in_process and os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") != "1":
            raise RuntimeError("a weight push into a multi-process CPU engine of a tied-embedding model must "
                               "also repack the LM head in the workers, which needs "
                               "VLLM_ALLOW_INSECURE_SERIALIZATION=1 (or use the in-process engine)")
        head_reloaded = True
        if self._in_process:
            via_dlpack = self._device_type == "cuda" and params_on_accelerator(params)
            plan = self._direct_plan() if self.weight_push == "auto" else None
            # the rebuilt linears repack their weight: it is handed over untransposed (see torch_weights)
            views = frozenset(plan.rebuilds) if plan is not None else frozenset()
            if plan is not None and plan.verified:
                # the plan's writes cast as they copy: on the host, the weights are handed over uncast where that
                # saves a pass (see torch_weights); not when some go to reload_weights, which gets the engine dtype
                weights = torch_weights(params, self.cfg, self.compute_dtype, via_dlpack=via_dlpack, views=views,
                                        cast_on_write=self._device_type == "cpu" and not plan.reload)
                self.last_push_mode = push_direct(llm, plan, weights)
                plan.finish()
                head_reloaded = EMBEDDING in plan.reload
            else:
                reload_tensors(llm, torch_weights(params, self.cfg, self.compute_dtype, via_dlpack=via_dlpack))
                self.last_push_mode = "reload"
                if plan is not None:
                    verify_plan(plan, torch_weights(params, self.cfg, self.compute_dtype, via_dlpack=via_dlpack,
                                                    views=views))
        else:
            reload_from_folder(llm, params, self.cfg, self.compute_dtype)
            self.last_push_mode = "reload"
        if repack_head and head_reloaded:
            llm.apply_model(repack_tied_lm_head)
        if llm.reset_prefix_cache() is False:  # KV blocks of the old weights would be reused
            raise RuntimeError("vLLM could not reset its prefix cache after the weight push")

    def _direct_plan(self) -> "DirectPlan | None":
        """The engine's direct-write plan, built (unverified) on first use and again when the engine no longer
        holds the tensors it writes into; None when nothing can be written directly."""
        plan = self._plan
        if plan is not None and not plan.current():
            logger.info("vLLM sampler: the engine replaced parameter tensors; planning the direct push again")
            plan = None
        if plan is None:
            plan = self._plan = plan_engine_writes(self._llm, self.cfg, self.compute_dtype)
        return plan if plan.direct else None

    # ----- sampling -----

    def _sample(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> Rollout:
        """One vLLM request per row, seeded with `row_seed(settings.seed, settings.first_row + row)`, so a seed
        gives the same rollout (and a block of rows sampled on its own, the same rows).

        Log-probs are asked for (`logprobs=0`: the sampled token's) only when `settings.logprobs`, in the flat
        form where this vLLM has it."""
        try:
            prompts = validate_prompts(prompts, self.cfg.vocab_size, self.max_model_len, settings.max_new_tokens)
        except ValueError as e:
            if "context length" not in str(e):
                raise
            raise ValueError(f"{e} (the engine's max_model_len; raise sampler.max_model_len)") from None
        from vllm import SamplingParams

        k = settings.samples_per_prompt
        rows = [(i, p) for i, p in enumerate(prompts) for _ in range(k)]
        stop_ids = list(settings.stop_token_ids)
        if not settings.ignore_eos:
            stop_ids += [t for t in self.eos_token_ids if t not in stop_ids]
        logprobs = {"logprobs": 0, **({"flat_logprobs": True} if self._flat_logprobs else {})} \
            if settings.logprobs else {}
        params = [SamplingParams(n=1, temperature=settings.temperature, top_p=settings.top_p,
                                 top_k=settings.top_k if settings.top_k > 0 else -1,
                                 max_tokens=settings.max_new_tokens, stop_token_ids=stop_ids,
                                 ignore_eos=settings.ignore_eos,
                                 seed=row_seed(settings.seed, settings.first_row + r),
                                 detokenize=False, **logprobs)
                  for r in range(len(rows))]
        outputs = self._llm.generate([{"prompt_token_ids": p} for _, p in rows], params, use_tqdm=False)
        return rollout_from_outputs(rows, outputs, max_new_tokens=settings.max_new_tokens,
                                    pad_token_id=self.pad_token_id, with_logprobs=settings.logprobs)

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
