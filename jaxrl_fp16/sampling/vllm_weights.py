"""Direct weight writes into an in-process vLLM engine: each HF tensor copied into its slice of the engine's own
parameter tensors, in place, without vLLM's reload machinery.

vLLM's `reload_weights` re-runs every layer's loading and processing for each push (it moves the layers to the meta
device, materialises them, runs their weight loaders and `process_weights_after_loading`, then copies the results
back). For layers whose processing leaves the loaded weight as it is (unquantized linears and embeddings whose
kernel reads `layer.weight` at call time) the same bytes land in the same tensors with one copy each. A
`DirectPlan`, built once per engine from the model's modules, says where:

- fused modules (`packed_modules_mapping`: `qkv_proj` <- q, k, v; `gate_up_proj` <- gate, up) take each HF tensor
  in rows [offset, offset + size) of the fused weight, in that order; with tensor parallelism each rank's rows of
  the HF tensor (a KV head replicated over ranks is read from rank // replicas);
- row-parallel linears (o_proj, down_proj) take a column block per rank, their bias whole;
- vocabulary-parallel embeddings and LM heads take the rank's vocabulary rows; the padding rows beyond the
  vocabulary stay as the loader left them (zeros); a tied LM head shares the embedding's tensor;
- norms and everything else: the whole tensor.

What cannot be written in place goes through `reload_weights` (`DirectPlan.reload`, logged with the reason once):
a quantized or otherwise processed layer (a quant method other than vLLM's unquantized ones), a parameter whose
shape or dtype is not the HF tensor's (vLLM's CPU backend replaces prepacked linear weights with empty tensors), a
linear whose CPU GEMM keeps its own packed copy (oneDNN, SGL, zentorch), a parameter the HF tensors do not cover
exactly once. An embedding or LM head whose CPU GEMM keeps a packed copy is written in place and its GEMM is
rebuilt after the push (`DirectPlan.repack`, what vLLM's loader does after loading it). A module goes one way as a
whole: vLLM's layerwise reload rebuilds every tensor of a module it loads, so a module it reloads is not written
directly.

`DirectPlan.verify` checks the plan against vLLM's own loaders: after a `reload_weights` push, every direct slice
must hold exactly (bit for bit) the HF tensor it would receive; the names of any that do not go to the reload path.

Only torch tensor methods are used here (no torch or vllm import at module level): the engine's tensors come from
its model, the HF tensors from `vllm_push.torch_weights`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from jaxrl_fp16 import torch_bridge

__all__ = ["Slot", "LayerLayout", "slot_for", "packed_shards", "layer_layout", "DirectPlan", "plan_direct_writes"]

log = logging.getLogger(__name__)

# vLLM's quant methods that load a weight as it is (their CPU processing may only add a packed copy).
UNQUANTIZED_LINEAR = "UnquantizedLinearMethod"
UNQUANTIZED_EMBEDDING = "UnquantizedEmbeddingMethod"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Slot:
    """Where one HF tensor goes in one engine parameter.

    rows: [start, stop) of the parameter's first axis it fills (None: all of the parameter).
    src_dim / src_range: the part of the HF tensor this engine holds, [start, stop) along src_dim (None: all of it).
    """

    rows: tuple[int, int] | None = None
    src_dim: int | None = None
    src_range: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerLayout:
    """How a vLLM module lays out the HF tensors it loads (read from its attributes by `layer_layout`).

    kind: "qkv" | "merged" (fused column-parallel), "column", "row", "vocab", "plain" (loaded whole).
    shard_sizes: fused kinds: each shard's rows in this rank's fused weight, in checkpoint order.
    shard_ranks: fused kinds: whose rows of each HF shard this rank holds (a replicated KV head: rank // replicas).
    part: column: output rows per rank; row: input columns per rank.
    vocab: [start, stop) of the vocabulary rows this rank holds.
    """

    kind: str
    tp_rank: int = 0
    tp_size: int = 1
    shard_sizes: tuple[int, ...] = ()
    shard_ranks: tuple[int, ...] = ()
    part: int = 0
    vocab: tuple[int, int] = (0, 0)


def slot_for(layout: LayerLayout, param: str, shard: int | None) -> Slot:
    """The slot of the HF tensor for parameter `param` ("weight", "bias") of a module laid out as `layout`;
    `shard`: its index among a fused module's HF tensors (None: not fused). Pure."""
    if layout.kind in ("qkv", "merged"):
        if shard is None or not 0 <= shard < len(layout.shard_sizes):
            raise ValueError(f"a fused {layout.kind} module takes shards 0..{len(layout.shard_sizes) - 1}, "
                             f"got {shard!r}")
        size = layout.shard_sizes[shard]
        start = sum(layout.shard_sizes[:shard])
        src = layout.shard_ranks[shard] * size
        return Slot(rows=(start, start + size), src_dim=0, src_range=(src, src + size))
    if shard is not None:
        raise ValueError(f"a {layout.kind} module is not fused, got shard {shard}")
    if layout.kind == "vocab":
        start, stop = layout.vocab
        return Slot(rows=(0, stop - start), src_dim=0, src_range=(start, stop))
    if layout.tp_size > 1 and layout.kind == "column":
        start = layout.tp_rank * layout.part
        return Slot(src_dim=0, src_range=(start, start + layout.part))
    if layout.tp_size > 1 and layout.kind == "row" and param == "weight":
        start = layout.tp_rank * layout.part
        return Slot(src_dim=1, src_range=(start, start + layout.part))
    return Slot()


def packed_shards(packed_modules_mapping: Mapping[str, Iterable[str]]) -> dict[str, tuple[str, int]]:
    """{HF module name: (fused module name, shard index)} from a vLLM model's `packed_modules_mapping`. Pure."""
    return {part: (fused, i) for fused, parts in packed_modules_mapping.items() for i, part in enumerate(parts)}


def layer_layout(module: Any) -> LayerLayout:
    """The `LayerLayout` of a vLLM module (QKV, merged, column/row-parallel linear, vocabulary embedding, other).

    The kind is read from the names of the module's classes (vLLM's `QKVParallelLinear`, ... and their
    subclasses), so that vllm stays imported by `vllm_sampler` alone."""
    classes = {c.__name__ for c in type(module).__mro__}
    rank, size = int(getattr(module, "tp_rank", 0)), int(getattr(module, "tp_size", 1))
    if "QKVParallelLinear" in classes:
        kv_rank = rank // int(module.num_kv_head_replicas)
        return LayerLayout(kind="qkv", tp_rank=rank, tp_size=size,
                           shard_sizes=(module.num_heads * module.head_size, module.num_kv_heads * module.head_size,
                                        module.num_kv_heads * module.v_head_size),
                           shard_ranks=(rank, kv_rank, kv_rank))
    if "MergedColumnParallelLinear" in classes:
        sizes = tuple(int(s) // size for s in module.output_sizes)
        return LayerLayout(kind="merged", tp_rank=rank, tp_size=size, shard_sizes=sizes,
                           shard_ranks=(rank,) * len(sizes))
    if "ColumnParallelLinear" in classes:
        return LayerLayout(kind="column", tp_rank=rank, tp_size=size, part=int(module.output_size_per_partition))
    if "RowParallelLinear" in classes:
        return LayerLayout(kind="row", tp_rank=rank, tp_size=size, part=int(module.input_size_per_partition))
    if "VocabParallelEmbedding" in classes:
        indices = module.shard_indices
        return LayerLayout(kind="vocab", tp_rank=rank, tp_size=size,
                           vocab=(int(indices.org_vocab_start_index), int(indices.org_vocab_end_index)))
    return LayerLayout(kind="plain")


def _narrow(tensor: Any, slot: Slot) -> Any:
    if slot.src_dim is None:
        return tensor
    start, stop = slot.src_range
    return tensor.narrow(slot.src_dim, start, stop - start)


def _slot_shape(hf_shape: tuple[int, ...], slot: Slot) -> tuple[int, ...]:
    if slot.src_dim is None:
        return tuple(hf_shape)
    shape = list(hf_shape)
    start, stop = slot.src_range
    if not 0 <= start <= stop <= shape[slot.src_dim]:
        raise ValueError(f"rows [{start}, {stop}) of axis {slot.src_dim} are outside the HF tensor {hf_shape}")
    shape[slot.src_dim] = stop - start
    return tuple(shape)


def _keeps_packed_copy(module: Any) -> bool:
    """Whether the module's CPU GEMM holds its own (packed) copy of the weight: vLLM's CPU dispatch closes over it
    (oneDNN handler, SGL packed weight, zentorch weight); its plain torch-linear fallback reads `layer.weight`."""
    fn = getattr(module, "cpu_linear", None)
    return fn is not None and bool(getattr(fn, "__closure__", None) or getattr(fn, "__defaults__", None))


def _method_name(module: Any) -> str | None:
    method = getattr(module, "quant_method", None)
    return None if method is None else type(method).__name__


@dataclasses.dataclass(eq=False, kw_only=True)
class DirectPlan:
    """Where each HF tensor of a push goes in one engine (see the module docstring); built by `plan_direct_writes`.

    writes: HF name -> [(the engine tensor's view it fills, its slot)].
    reload: HF names left to `reload_weights`.
    repack: modules whose CPU GEMM is rebuilt after a direct write (embeddings/LM heads with a packed copy).
    reasons: why names went to `reload` (one line per engine parameter or module).
    verified: whether `verify` confirmed the plan against vLLM's loaders.
    """

    writes: dict[str, list[tuple[Any, Slot]]]
    reload: frozenset[str]
    repack: tuple[Any, ...]
    reasons: tuple[str, ...]
    verified: bool = False
    # (module, parameter name, tensor, data pointer) of every written tensor, checked by `current`
    owners: tuple[tuple[Any, str, Any, int], ...] = ()
    # HF name -> the modules its tensor lands in (for moving whole modules to the reload path)
    modules_of: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @property
    def direct(self) -> bool:
        """Whether any tensor is written directly."""
        return bool(self.writes)

    def current(self) -> bool:
        """Whether the engine still holds the tensors the plan writes into (the same objects, the same memory)."""
        return all(getattr(module, "_parameters", {}).get(name) is tensor and tensor.data_ptr() == ptr
                   for module, name, tensor, ptr in self.owners)

    def write(self, name: str, tensor: Any) -> None:
        """Copies HF tensor `name` (HF layout, the engine dtype) into its engine slices."""
        for view, slot in self.writes[name]:
            torch_bridge.copy_into(view, _narrow(tensor, slot))

    def finish(self) -> None:
        """After the direct writes: rebuilds the packed CPU GEMMs of the written embeddings / LM heads."""
        for module in self.repack:
            module.quant_method.process_weights_after_loading(module)

    def verify(self, tensors: Iterable[tuple[str, Any]]) -> list[str]:
        """After a `reload_weights` push of `tensors`: the names whose engine slices do not hold exactly those
        bytes; they and the rest of their modules move to the reload path. Marks the plan verified."""
        bad = [name for name, tensor in tensors if name in self.writes and not all(
            torch_bridge.bits_equal(view, _narrow(tensor, slot)) for view, slot in self.writes[name])]
        if bad:
            moved = _close_over_modules(set(bad), self.modules_of)
            self.writes = {n: w for n, w in self.writes.items() if n not in moved}
            self.reload = self.reload | moved
            self.reasons = (*self.reasons, f"the engine's loaders put other bytes than the direct path for {bad}")
        self.verified = True
        return bad


def _close_over_modules(names: set[str], modules_of: Mapping[str, tuple[str, ...]]) -> frozenset[str]:
    """`names` plus every name that lands in a module one of them lands in (to a fixpoint: tied tensors link
    modules)."""
    names = set(names)
    while True:
        modules = {m for n in names for m in modules_of.get(n, ())}
        more = {n for n, ms in modules_of.items() if n not in names and modules.intersection(ms)}
        if not more:
            return frozenset(names)
        names |= more


def plan_direct_writes(model: Any, hf_shapes: Mapping[str, tuple[int, ...]], dtype: str) -> DirectPlan:
    """The `DirectPlan` of a vLLM model (the engine's `nn.Module`) for HF tensors of `hf_shapes` in `dtype`
    ("float16", ...), checked: every written parameter is covered exactly once by HF tensors of its shape and
    dtype (vocabulary padding rows excepted), else its names go to the reload path with the reason."""
    packed = packed_shards(getattr(model, "packed_modules_mapping", None) or {})
    modules = dict(model.named_modules())
    holders: dict[int, list[tuple[str, str]]] = {}  # id(tensor) -> [(module path, parameter name)]
    for path, module in modules.items():
        for pname, tensor in module._parameters.items():
            if tensor is not None:
                holders.setdefault(id(tensor), []).append((path, pname))
    reasons: list[str] = []
    reload: set[str] = set()
    planned: dict[str, tuple[Any, Any, Slot, str]] = {}  # HF name -> (module, tensor, slot, module path)
    modules_of: dict[str, tuple[str, ...]] = {}  # HF name -> the modules holding its engine tensor
    for name, hf_shape in hf_shapes.items():
        path, _, pname = name.rpartition(".")
        head, _, last = path.rpartition(".")
        shard = None
        if last in packed:
            fused, shard = packed[last]
            path = f"{head}.{fused}" if head else fused
        module = modules.get(path)
        tensor = None if module is None else module._parameters.get(pname)
        modules_of[name] = tuple(p for p, _ in holders.get(id(tensor), ())) if tensor is not None else \
            ((path,) if module is not None else ())
        if tensor is None:
            reload.add(name)
            reasons.append(f"{name}: no engine parameter {path}.{pname}")
            continue
        try:
            slot = slot_for(layer_layout(module), pname, shard)
            src_shape = _slot_shape(hf_shape, slot)
        except (ValueError, AttributeError) as e:
            reload.add(name)
            reasons.append(f"{name}: {e}")
            continue
        rows = slot.rows or (0, tensor.shape[0] if tensor.ndim else 0)
        want = (rows[1] - rows[0], *tuple(tensor.shape)[1:]) if tensor.ndim else ()
        if str(tensor.dtype) != f"torch.{dtype}" or (slot.rows is None and tuple(tensor.shape) != src_shape) or \
                (slot.rows is not None and (want != src_shape or rows[1] > tensor.shape[0])):
            reload.add(name)
            reasons.append(f"{name}: engine parameter {path}.{pname} is {tuple(tensor.shape)} {tensor.dtype}, the "
                           f"HF tensor gives {src_shape} {dtype}")
            continue
        planned[name] = (module, tensor, slot, path)

    # coverage, per engine tensor: whole, or row blocks tiling it (a vocabulary's padding rows excepted)
    by_tensor: dict[int, list[str]] = {}
    for name, (_, tensor, _, _) in planned.items():
        by_tensor.setdefault(id(tensor), []).append(name)
    for names in by_tensor.values():
        module, tensor, _, path = planned[names[0]]
        blocks = sorted((planned[n][2].rows or (0, tensor.shape[0] if tensor.ndim else 0), n) for n in names)
        whole = any(planned[n][2].rows is None for n in names)
        end, ok = 0, not (whole and len(names) > 1)
        for (start, stop), _ in blocks:
            ok = ok and start == end
            end = stop
        padding = layer_layout(module).kind == "vocab"
        if not (ok and (end == (tensor.shape[0] if tensor.ndim else 0) or padding or whole)):
            reload.update(names)
            reasons.append(f"{path}: the HF tensors {sorted(names)} do not cover its {tuple(tensor.shape)} "
                           f"parameter exactly once")

    # the modules holding each written tensor: plain, or an embedding whose packed GEMM is rebuilt afterwards
    repack: dict[str, Any] = {}
    for name in list(planned):
        for path in modules_of[name]:
            module, method = modules[path], _method_name(modules[path])
            if method not in (None, UNQUANTIZED_LINEAR, UNQUANTIZED_EMBEDDING):
                reload.add(name)
                reasons.append(f"{path}: its weights are processed by {method}")
            elif _keeps_packed_copy(module):
                if method == UNQUANTIZED_EMBEDDING:
                    repack[path] = module
                else:
                    reload.add(name)
                    reasons.append(f"{path}: its CPU GEMM keeps a packed copy of the weight")
    reload = set(_close_over_modules(reload, modules_of))
    writes = {name: [(_view(tensor, slot), slot)] for name, (_, tensor, slot, _) in planned.items()
              if name not in reload}
    written = {id(planned[n][1]) for n in writes}
    repack = {p: m for p, m in repack.items() if any(id(t) in written for t in m._parameters.values())}
    owners = tuple((modules[p], pname, planned[n][1], planned[n][1].data_ptr())
                   for n in writes for p, pname in holders[id(planned[n][1])])
    unwritten = sorted(f"{path}.{pname}" for path, module in modules.items()
                       for pname, tensor in module._parameters.items()
                       if tensor is not None and id(tensor) not in {id(planned[n][1]) for n in planned})
    if unwritten:
        reasons.append(f"engine parameters no HF tensor maps to (left as loaded): {unwritten}")
    return DirectPlan(writes=writes, reload=frozenset(reload), repack=tuple(repack.values()),
                      reasons=tuple(reasons), owners=owners, modules_of=modules_of)


def _view(tensor: Any, slot: Slot) -> Any:
    data = tensor.data
    return data if slot.rows is None else data.narrow(0, slot.rows[0], slot.rows[1] - slot.rows[0])
