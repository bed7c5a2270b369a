"""How a vLLM engine lays out the HF tensors its modules load: the `Slot` of each HF tensor in an engine parameter
(fused q/k/v and gate/up rows, tensor-parallel blocks, vocabulary rows), read from the modules' attributes. Pure
rules over module attributes and torch tensor methods (nothing imported from torch or vllm); `vllm_weights` plans
the direct weight push with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["Slot", "LayerLayout", "slot_for", "packed_shards", "layer_layout", "narrow", "slot_shape", "fits",
           "slot_view"]


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


def narrow(tensor: Any, slot: Slot) -> Any:
    """The part of an HF tensor that this engine holds (its block along `src_dim`), as a view."""
    if slot.src_dim is None:
        return tensor
    start, stop = slot.src_range
    return tensor.narrow(slot.src_dim, start, stop - start)


def slot_shape(hf_shape: tuple[int, ...], slot: Slot) -> tuple[int, ...]:
    """The shape of `narrow`'s result for an HF tensor of `hf_shape`; ValueError if the block is outside it."""
    if slot.src_dim is None:
        return tuple(hf_shape)
    shape = list(hf_shape)
    start, stop = slot.src_range
    if not 0 <= start <= stop <= shape[slot.src_dim]:
        raise ValueError(f"rows [{start}, {stop}) of axis {slot.src_dim} are outside the HF tensor {hf_shape}")
    shape[slot.src_dim] = stop - start
    return tuple(shape)


def fits(slot: Slot, src_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether the HF tensor's part `src_shape` fills its slot of a parameter of `shape`."""
    if slot.rows is None:
        return tuple(shape) == tuple(src_shape)
    start, stop = slot.rows
    return bool(shape) and stop <= shape[0] and (stop - start, *tuple(shape)[1:]) == tuple(src_shape)


def slot_view(tensor: Any, slot: Slot) -> Any:
    """The part of engine parameter `tensor` that a slot fills (its rows, or all of it), as a view."""
    data = tensor.data
    return data if slot.rows is None else data.narrow(0, slot.rows[0], slot.rows[1] - slot.rows[0])
