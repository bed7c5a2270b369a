"""The weight push into a vLLM engine: the trainer's params as torch tensors in the engine dtype (`torch_weights`),
and the routes that load them into the engine, which `VLLMSampler` picks from.

In this process (vLLM's V1 engine core in-process) a push passes torch tensors to the model directly:

    params (FP32 Flax tree) --cast to the engine dtype, transposed (XLA)--> (HF name, torch tensor (out, in))
        --> copied in place into the engine's parameter slices (`vllm_weights.DirectPlan`, `push_direct`), and
            for the layers whose loaded weights vLLM processes: collective_rpc("reload_weights",
            weights_iterator=..., is_checkpoint_format=True)
        --> reset_prefix_cache()   (cached KV blocks were computed with the old weights; the sampler's step)

The tensors are cast and transposed by XLA, one layer's slice at a time, on the params' device: on a CUDA host
with JAX on the GPU they are handed over with DLPack, with no host round trip; on the host XLA reads numpy or CPU
arrays in place and torch shares its results (DLPack); params sharded over several devices go through numpy, a
layer at a time (`sharding.stream_hf_weights`). Every route gives numpy's bits. The first push of an engine goes
through `reload_weights` (`reload_tensors`) and checks the in-place plan against what vLLM loaded, bit for bit
(`verify_plan`); later pushes write in place, and rebuild the GEMMs of the linears that vLLM's CPU backend packs
(their weights handed over untransposed: the packing reads the (in, out) matrix, the Flax layout). A multi-process
engine cannot take tensors through an RPC: its push
writes a checkpoint folder and asks the workers to reload from it (`reload_from_folder`). On vLLM's CPU backend a
tied LM head is repacked after each push (`repack_tied_lm_head`, and `DirectPlan.repack` in place): without that,
FP32/BF16 engines keep sampling from the old head.

vllm is not imported here: the engine is driven through the `vllm.LLM` its sampler built, and torch tensors come
from `jaxrl_fp16.torch_bridge`.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from jaxrl_fp16 import torch_bridge
from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.models.hf import save_hf_params
from jaxrl_fp16.models.hf_table import Row, enabled_rows, hf_dtype, hf_entries, hf_shape, iter_hf_tensors
from jaxrl_fp16.precision import as_dtype, dtype_name
from jaxrl_fp16.sharding import host_streamed, stream_hf_weights

if TYPE_CHECKING:
    from jaxrl_fp16.sampling.vllm_weights import DirectPlan

__all__ = ["EMBEDDING", "vllm_dtype", "torch_weights", "params_on_accelerator", "repack_tied_lm_head",
           "plan_engine_writes", "verify_plan", "reload_tensors", "push_direct", "reload_from_folder"]

logger = logging.getLogger(__name__)

_VLLM_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
EMBEDDING = "model.embed_tokens.weight"  # what a tied LM head shares
# vLLM's loggers that comment on a partial reload (see _DropPartialReloadNotes)
_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                   "vllm.model_executor.model_loader.reload.inplace")


def vllm_dtype(dtype: Any) -> str:
    """vLLM's name of a supported dtype ("float32", "float16", "bfloat16")."""
    return _VLLM_DTYPES[dtype_name(dtype)]


@functools.partial(jax.jit, static_argnames=("transpose", "dtype"))
def _hf_layout(x: jax.Array, *, transpose: bool, dtype: np.dtype) -> jax.Array:
    """One HF tensor from one Flax leaf: (out, in) where `transpose`, cast to `dtype` (round to nearest even,
    bit-identical to numpy's cast)."""
    return (x.T if transpose else x).astype(dtype)


@functools.partial(jax.jit, static_argnames=("transposes", "stacked", "dtype"))
def _layer_hf_layout(arrays: tuple, layer: jax.Array, *, transposes: tuple[bool, ...], stacked: bool,
                     dtype: np.dtype) -> tuple[jax.Array, ...]:
    """One layer's HF tensors, in one call: from each array its slice `layer` (where `stacked`; otherwise the
    arrays are that slice already), (out, in) where `transposes` says, cast to `dtype` (as `_hf_layout`)."""
    out = []
    for x, transpose in zip(arrays, transposes):
        x = jax.lax.dynamic_index_in_dim(x, layer, keepdims=False) if stacked else x
        out.append((x.T if transpose else x).astype(dtype))
    return tuple(out)


class _Ref:
    """A Flax leaf as `iter_hf_tensors` sees it on the XLA route: `ref[i]` and `.T` are only noted (the layer,
    the transposition); `_XlaRoute` then produces the tensor."""

    __slots__ = ("path", "shape", "layer", "transposed")

    def __init__(self, path: tuple[str, ...], shape: tuple[int, ...], layer: int | None = None,
                 transposed: bool = False):
        self.path, self.shape, self.layer, self.transposed = path, tuple(shape), layer, transposed

    def __getitem__(self, layer: int) -> "_Ref":
        return _Ref(self.path, self.shape[1:], layer, self.transposed)

    @property
    def T(self) -> "_Ref":
        return _Ref(self.path, self.shape[::-1], self.layer, not self.transposed)


class _XlaRoute:
    """The torch tensors of one push, cast and transposed by XLA on the arrays' device, one layer at a time: the
    first tensor asked of layer i produces all of layer i's tensors in one jitted call (`_layer_hf_layout`, one
    dispatch instead of one per tensor); the others are handed out from it, and it is dropped at the next layer.
    Tensors outside the layer stack are produced one by one (`_hf_layout`).

    JAX arrays are read where they are (a stacked array is indexed inside the call). Host numpy arrays are passed
    as numpy views of the layer's slice, which XLA on the host CPU device reads in place. Results are handed to
    torch by DLPack where they live (`on_device`, or the host CPU device), else copied to the host.

    With `cast_on_write` (host params only), a tensor whose HF layout is a view of its Flax leaf (an untransposed
    row, or one of `views`) is handed over as that view, in the params' dtype, with no XLA call: the consumer casts
    it as it copies it (`torch_bridge.copy_into`). Only the other tensors go through XLA."""

    def __init__(self, params: Mapping, cfg: ModelConfig, dtype: np.dtype, on_device: bool,
                 views: frozenset[str] = frozenset(), cast_on_write: bool = False):
        self.dtype, self.on_device, self.views, self.cast_on_write = dtype, on_device, views, cast_on_write
        self.arrays = {tuple(getattr(k, "key", k) for k in path): x
                       for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        self.refs = jax.tree_util.tree_map_with_path(
            lambda path, x: _Ref(tuple(getattr(k, "key", k) for k in path), x.shape), params)
        self.rows = [row for row in enabled_rows(cfg) if row.per_layer]
        self._rows = {row.path: row for row in self.rows}
        self.cfg = cfg
        self._layer: int | None = None
        self._tensors: dict[tuple[str, ...], Any] = {}
        self._sources: dict[tuple[str, ...], Any] = {}  # cast_on_write: each leaf as a torch tensor, no copy

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter_hf_tensors(self.refs, self.cfg, self._tensor)

    def _is_view(self, row: Row, layer: int) -> bool:
        """Whether layer `layer`'s tensor of `row` is handed over as a (transposed) view of the cast Flax slice."""
        return row.transpose and row.hf.format(i=layer) in self.views

    def _uncast(self, path: tuple[str, ...], layer: int | None, transposed: bool) -> bool:
        """Whether a tensor is handed over as a view of its leaf, uncast (`cast_on_write`; only where a cast is
        due, so that the consumer's copy is never skipped)."""
        return self.cast_on_write and self.arrays[path].dtype != self.dtype and (not transposed or (
            layer is not None and self._is_view(self._rows[path], layer)))

    def _source(self, ref: _Ref) -> Any:
        """`ref` as a torch view of its leaf's memory (the leaf in its own dtype)."""
        if ref.path not in self._sources:
            x = self.arrays[ref.path]
            self._sources[ref.path] = torch_bridge.numpy_view(x) if isinstance(x, np.ndarray) else \
                torch_bridge.jax_to_torch(x)
        t = self._sources[ref.path]
        t = t if ref.layer is None else t[ref.layer]
        return t.t() if ref.transposed else t

    def _tensor(self, ref: _Ref) -> Any:
        if self._uncast(ref.path, ref.layer, ref.transposed):
            return self._source(ref)
        if ref.layer is None:
            array = self.arrays[ref.path]
            if isinstance(array, np.ndarray):
                with jax.default_device(jax.local_devices(backend="cpu")[0]):
                    return self._torch(_hf_layout(array, transpose=ref.transposed, dtype=self.dtype))
            return self._torch(_hf_layout(array, transpose=ref.transposed, dtype=self.dtype))
        if ref.layer != self._layer:
            self._tensors = {}  # the previous layer's, before this one's are made
            self._tensors = self._layer_tensors(ref.layer)
            self._layer = ref.layer
        return self._tensors.pop(ref.path)

    def _layer_tensors(self, layer: int) -> dict[tuple[str, ...], Any]:
        """Layer `layer`'s tensors: one jitted call per device the stacked arrays live on (host numpy arrays: the
        host CPU device, given their slices)."""
        groups: dict[Any, list[Row]] = {}
        for row in self.rows:
            if self._uncast(row.path, layer, row.transpose):
                continue  # handed over uncast (`_source`)
            x = self.arrays[row.path]
            groups.setdefault(None if isinstance(x, np.ndarray) else next(iter(x.devices())), []).append(row)
        tensors = {}
        for device, rows in groups.items():
            host = device is None
            views = tuple(self._is_view(row, layer) for row in rows)
            args = tuple(self.arrays[row.path][layer] if host else self.arrays[row.path] for row in rows)
            with jax.default_device(jax.local_devices(backend="cpu")[0] if host else device):
                out = _layer_hf_layout(args, np.int32(layer), dtype=self.dtype, stacked=not host,
                                       transposes=tuple(row.transpose and not v for row, v in zip(rows, views)))
            tensors.update((row.path, self._torch(x).t() if v else self._torch(x))
                           for row, x, v in zip(rows, out, views))
        return tensors

    def _torch(self, out: jax.Array) -> Any:
        if self.on_device or all(d.platform == "cpu" for d in out.devices()):
            return torch_bridge.jax_to_torch(out)
        return torch_bridge.numpy_to_torch(np.asarray(out))


def _on_single_devices(params: Mapping) -> bool:
    """Every leaf is a numpy array or a JAX array on one device (not sharded over several)."""
    return all(isinstance(x, np.ndarray) or (isinstance(x, jax.Array) and len(x.devices()) == 1)
               for x in jax.tree_util.tree_leaves(params))


def _on_host(params: Mapping) -> bool:
    """Every leaf is a numpy array or a JAX array on one CPU device."""
    return all(isinstance(x, np.ndarray) or (isinstance(x, jax.Array) and len(x.devices()) == 1 and
                                             all(d.platform == "cpu" for d in x.devices()))
               for x in jax.tree_util.tree_leaves(params))


def torch_weights(params: Mapping, cfg: ModelConfig, dtype: Any, *, via_dlpack: bool = False,
                  views: frozenset[str] = frozenset(), cast_on_write: bool = False) -> Iterator[tuple[str, Any]]:
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
      views: HF names of transposed layer tensors to hand over untransposed on the XLA routes: as (out, in) views
        (`.t()`) of the cast Flax (in, out) array, for a consumer that repacks the weight anyway (a CPU GEMM that
        keeps its own packed copy reads the (in, out) matrix); same values, other strides.
      cast_on_write: for a consumer that casts as it copies (`torch_bridge.copy_into`, torch's round to nearest
        even: the same bits): the tensors whose HF layout is a view of their Flax leaf (untransposed rows, and
        `views`) are handed over as torch views of the params' memory in the params' dtype, uncast; one pass over
        the weights (the consumer's copy) instead of two (XLA's cast, then the copy). The others are cast and
        transposed by XLA as above. Only for params on the host (numpy or CPU JAX arrays); ignored otherwise.
        The views share the params' memory: the consumer copies them and keeps none.

    Returns:
      An iterator in checkpoint order (`iter_hf_tensors`). The tree and its shapes are checked here, before it is
      returned: an error in the middle of a weight push would leave the engine half loaded.
    """
    dt = hf_dtype(as_dtype(dtype))
    if via_dlpack or _on_single_devices(params):
        return iter(_XlaRoute(params, cfg, dt, via_dlpack, frozenset(views),
                              cast_on_write=cast_on_write and not via_dlpack and _on_host(params)))
    return ((name, torch_bridge.numpy_to_torch(array)) for name, array in stream_hf_weights(params, cfg, dt))


def params_on_accelerator(params: Mapping) -> bool:
    """Every leaf is a JAX array on one accelerator device (DLPack takes single-device arrays; params sharded
    over several devices go through the host, a layer at a time)."""
    leaves = jax.tree_util.tree_leaves(params)
    return bool(leaves) and all(isinstance(x, jax.Array) and len(x.devices()) == 1 and
                                all(d.platform != "cpu" for d in x.devices()) for x in leaves)


def repack_tied_lm_head(model) -> None:
    """Rebuilds the CPU GEMM of a tied LM head from the (just reloaded) embedding it shares (run in the engine by
    `LLM.apply_model`).

    vLLM's CPU backend prepacks FP32/BF16 linear weights (oneDNN or SGL kernels) when weights are processed.
    `reload_weights` reprocesses every layer it loads, but a tied LM head loads nothing of its own (its weight
    is the embedding's): its packed copy keeps the old embedding and the logits follow the old head.
    """
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if head is not None and hasattr(head, "cpu_linear") and method is not None:
        method.process_weights_after_loading(head)


def plan_engine_writes(llm: Any, cfg: ModelConfig, dtype: Any) -> "DirectPlan":
    """The direct-write plan (unverified) of an in-process engine `llm` (a `vllm.LLM`) in `dtype`, built in the
    engine from its model; logs what cannot be written in place."""
    from jaxrl_fp16.sampling.vllm_weights import plan_direct_writes

    shapes = {name: hf_shape(row, cfg) for name, row, _ in hf_entries(cfg)}
    name = vllm_dtype(dtype)
    plan = llm.apply_model(lambda model: plan_direct_writes(model, shapes, name))[0]
    _log_plan(plan, len(shapes))
    return plan


def _log_plan(plan: "DirectPlan", total: int) -> None:
    if not plan.direct:
        logger.info("vLLM sampler: no engine tensor can be written in place; every push uses reload_weights")
    elif plan.reload:
        logger.info("vLLM sampler: direct weight push plans %d of %d tensors in place (%d of them by rebuilding "
                    "packed linears); %d through reload_weights", plan.planned, total, len(plan.rebuilds),
                    len(plan.reload))
    for reason in plan.reasons:
        logger.info("vLLM sampler: direct push: %s", reason)


def verify_plan(plan: "DirectPlan", weights: Iterator[tuple[str, Any]]) -> None:
    """After a reload push of `weights`: checks the plan against what vLLM loaded (bit for bit)."""
    bad = plan.verify(weights)
    if bad:
        logger.warning("vLLM sampler: the direct push would differ from reload_weights for %s; those modules "
                       "are reloaded", bad)
    logger.info("vLLM sampler: direct weight push checked against reload_weights: %d tensors written in "
                "place (%d by rebuilding packed linears), %d reloaded", plan.planned, len(plan.rebuilds),
                len(plan.reload))


def reload_tensors(llm: Any, weights: Iterator[tuple[str, Any]]) -> None:
    """Loads every tensor of `weights` through vLLM's `reload_weights` (an in-process engine)."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})


class _DropPartialReloadNotes(logging.Filter):
    """A partial `reload_weights` warns about every layer it was given nothing for: the direct push wrote those."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.endswith("Failed to load weights") or
                    message.startswith("Following weights were not loaded"))


def push_direct(llm: Any, plan: "DirectPlan", weights: Iterator[tuple[str, Any]]) -> str:
    """Writes the planned tensors in place; the rest go through one `reload_weights` call, in the same pass.
    Returns the push mode: "direct" (nothing reloaded) or "direct+reload". The caller then runs `plan.finish()`."""
    if not plan.reload:
        for name, tensor in weights:
            plan.write(name, tensor)
        return "direct"

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
        reload_tensors(llm, stream)
    finally:
        for log in loggers:
            log.removeFilter(quiet)
    left = [name for name, _ in stream]
    if left:
        raise RuntimeError(f"vLLM's reload_weights stopped before the tensors {left}")
    return "direct+reload"


def reload_from_folder(llm: Any, params: Any, cfg: ModelConfig, dtype: Any) -> None:
    """A multi-process engine's push: `params` saved as a checkpoint in `dtype` to a temporary folder, which the
    workers' `reload_weights` load."""
    with tempfile.TemporaryDirectory(prefix="vllm-push-") as tmp:
        folder = save_hf_params(host_streamed(params), cfg, os.path.join(tmp, "weights"), dtype=vllm_dtype(dtype))
        llm.collective_rpc("reload_weights", kwargs={"weights_path": folder, "is_checkpoint_format": True})
