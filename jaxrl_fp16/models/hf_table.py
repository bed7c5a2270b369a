"""The Hugging Face name/layout table: every HF tensor name <-> a path in the Flax parameter tree.

`HF_TABLE` maps every HF tensor name to a path in the Flax parameter tree. Per-layer HF tensors
(`model.layers.{i}.*`) are stacked on a leading axis of length `num_layers`; HF linear weights are stored
(out, in) and Flax kernels (in, out), so those rows are transposed. Optional rows name the `ModelConfig` flag
that enables them ("!flag" means "enabled when the flag is false").

`hf_entries` is the checkpoint order (embeddings, layer by layer, final norm, head) and `iter_hf_tensors` the one
way weights leave the Flax tree in HF layout: it checks the tree against the config, then yields each HF tensor
(one layer's slice of a stacked leaf, transposed where the table says) through a caller's per-tensor converter.
`hf_state_dict` (numpy, in a storage dtype), `sharding.stream_hf_weights` (gathered to the host one slice at a
time) and the vLLM push (torch tensors) are such converters; `models.hf` reads and writes the files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, TypeVar

import ml_dtypes
import numpy as np

from jaxrl_fp16.models.config import ModelConfig

__all__ = ["HF_TABLE", "Row", "CheckpointError", "HF_DTYPES", "hf_dtype", "enabled_rows", "leaf_shape", "hf_shape",
           "hf_entries", "expected_params_shapes", "set_path", "get_path", "check_params", "iter_hf_tensors",
           "hf_state_dict"]

T = TypeVar("T")


class Row(NamedTuple):
    """One HF tensor <-> one Flax leaf (one slice of it when `per_layer`)."""

    hf: str  # HF name; "{i}" stands for the layer index
    path: tuple[str, ...]  # path in the Flax parameter tree
    per_layer: bool  # Flax leaf is stacked [L, ...] over layers
    transpose: bool  # HF (out, in) <-> Flax (in, out)
    shape: tuple[str, ...]  # Flax shape (per layer) in the symbols of `_dims`
    when: str | None = None  # ModelConfig flag enabling the row; "!flag": enabled when the flag is false


_L = "model.layers.{i}."
HF_TABLE: tuple[Row, ...] = (
    Row("model.embed_tokens.weight", ("embed", "embedding"), False, False, ("V", "H")),
    Row(_L + "self_attn.q_proj.weight", ("layers", "attn", "q_proj", "kernel"), True, True, ("H", "Q")),
    Row(_L + "self_attn.q_proj.bias", ("layers", "attn", "q_proj", "bias"), True, False, ("Q",), "qkv_bias"),
    Row(_L + "self_attn.k_proj.weight", ("layers", "attn", "k_proj", "kernel"), True, True, ("H", "K")),
    Row(_L + "self_attn.k_proj.bias", ("layers", "attn", "k_proj", "bias"), True, False, ("K",), "qkv_bias"),
    Row(_L + "self_attn.v_proj.weight", ("layers", "attn", "v_proj", "kernel"), True, True, ("H", "K")),
    Row(_L + "self_attn.v_proj.bias", ("layers", "attn", "v_proj", "bias"), True, False, ("K",), "qkv_bias"),
    Row(_L + "self_attn.o_proj.weight", ("layers", "attn", "o_proj", "kernel"), True, True, ("Q", "H")),
    Row(_L + "self_attn.o_proj.bias", ("layers", "attn", "o_proj", "bias"), True, False, ("H",), "o_bias"),
    Row(_L + "self_attn.q_norm.weight", ("layers", "attn", "q_norm", "scale"), True, False, ("D",), "qk_norm"),
    Row(_L + "self_attn.k_norm.weight", ("layers", "attn", "k_norm", "scale"), True, False, ("D",), "qk_norm"),
    Row(_L + "mlp.gate_proj.weight", ("layers", "mlp", "gate_proj", "kernel"), True, True, ("H", "I")),
    Row(_L + "mlp.gate_proj.bias", ("layers", "mlp", "gate_proj", "bias"), True, False, ("I",), "mlp_bias"),
    Row(_L + "mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), True, True, ("H", "I")),
    Row(_L + "mlp.up_proj.bias", ("layers", "mlp", "up_proj", "bias"), True, False, ("I",), "mlp_bias"),
    Row(_L + "mlp.down_proj.weight", ("layers", "mlp", "down_proj", "kernel"), True, True, ("I", "H")),
    Row(_L + "mlp.down_proj.bias", ("layers", "mlp", "down_proj", "bias"), True, False, ("H",), "mlp_bias"),
    Row(_L + "input_layernorm.weight", ("layers", "input_norm", "scale"), True, False, ("H",)),
    Row(_L + "post_attention_layernorm.weight", ("layers", "post_attn_norm", "scale"), True, False, ("H",)),
    Row("model.norm.weight", ("final_norm", "scale"), False, False, ("H",)),
    Row("lm_head.weight", ("lm_head", "kernel"), False, True, ("H", "V"), "!tie_word_embeddings"),
)

# The storage dtypes of HF tensors.
HF_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
             "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class CheckpointError(ValueError):
    """A checkpoint's tensors do not match the model config (missing, unexpected or mis-shaped tensors)."""


def hf_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype of a storage dtype name or dtype; raises ValueError naming the supported ones."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in HF_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; supported: {', '.join(HF_DTYPES)}")
    return HF_DTYPES[name]


# ----- the table, expanded for one config -----

def _dims(cfg: ModelConfig) -> dict[str, int]:
    return {"V": cfg.vocab_size, "H": cfg.hidden_size, "I": cfg.intermediate_size, "D": cfg.head_dim,
            "Q": cfg.num_heads * cfg.head_dim, "K": cfg.num_kv_heads * cfg.head_dim}


def _enabled(row: Row, cfg: ModelConfig) -> bool:
    if row.when is None:
        return True
    flag = row.when.removeprefix("!")
    return bool(getattr(cfg, flag)) != row.when.startswith("!")


def enabled_rows(cfg: ModelConfig) -> list[Row]:
    """The rows of `HF_TABLE` that `cfg` enables, in table order."""
    return [row for row in HF_TABLE if _enabled(row, cfg)]


def leaf_shape(row: Row, cfg: ModelConfig) -> tuple[int, ...]:
    """The Flax leaf shape of a row (stacked over layers when per_layer)."""
    dims = _dims(cfg)
    shape = tuple(dims[s] for s in row.shape)
    return (cfg.num_layers, *shape) if row.per_layer else shape


def hf_shape(row: Row, cfg: ModelConfig) -> tuple[int, ...]:
    """The shape of one HF tensor of a row (one layer's, transposed where the row says)."""
    dims = _dims(cfg)
    shape = tuple(dims[s] for s in row.shape)
    return shape[::-1] if row.transpose else shape


def hf_entries(cfg: ModelConfig) -> Iterator[tuple[str, Row, int | None]]:
    """(hf_name, row, layer index or None), in export order: embeddings, layer by layer, final norm, head."""
    rows = enabled_rows(cfg)
    for row in rows:
        if not row.per_layer and row.path[0] == "embed":
            yield row.hf, row, None
    for i in range(cfg.num_layers):
        for row in rows:
            if row.per_layer:
                yield row.hf.format(i=i), row, i
    for row in rows:
        if not row.per_layer and row.path[0] != "embed":
            yield row.hf, row, None


def expected_params_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """The nested dict of Flax parameter shapes that `cfg` implies (layers stacked on axis 0)."""
    tree: dict[str, Any] = {}
    for row in enabled_rows(cfg):
        set_path(tree, row.path, leaf_shape(row, cfg))
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """Sets `tree[path[0]][path[1]]...` to `value`, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
    """The leaf at `path`; CheckpointError naming the first missing key."""
    for depth, key in enumerate(path):
        if not isinstance(tree, Mapping) or key not in tree:
            raise CheckpointError(f"params lack the leaf {'/'.join(path[:depth + 1])}")
        tree = tree[key]
    return tree


def _leaf_paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaf_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


# ----- the tree, out in HF layout -----

def check_params(params: Mapping, cfg: ModelConfig) -> None:
    """Raises CheckpointError naming the leaf (and its HF tensor) unless `params` has exactly the leaves and the
    shapes `cfg` implies."""
    rows = enabled_rows(cfg)
    expected = {row.path for row in rows}
    extra = sorted("/".join(p) for p in _leaf_paths(params) if p not in expected)
    if extra:
        raise CheckpointError(f"params have leaves that {cfg.arch} with this config does not use: "
                              f"{', '.join(extra)}")
    for row in rows:
        leaf = get_path(params, row.path)
        want = leaf_shape(row, cfg)
        if tuple(leaf.shape) != want:
            raise CheckpointError(f"params leaf {'/'.join(row.path)} (HF {row.hf}) has shape {tuple(leaf.shape)}, "
                                  f"expected {want}")


def iter_hf_tensors(params: Mapping, cfg: ModelConfig, convert: Callable[[Any], T]) -> Iterator[tuple[str, T]]:
    """(HF name, `convert(tensor)`) for every HF tensor, in checkpoint order, one at a time.

    Args:
      params: the Flax parameter tree; its leaves take `leaf[i]` (one layer's slice) and `.T` (numpy or jax
        arrays, `sharding.HostGathered`).
      cfg: the model config that the tree follows.
      convert: maps one tensor, already in HF layout (a layer's slice of a stacked leaf, transposed to (out, in)
        where the table says so; possibly a view), to what the caller hands on: a cast copy, a torch tensor, ...

    Returns:
      A lazy iterator. The tree's structure and every leaf's shape are checked by this call, before any tensor is
      produced (`check_params`): a mismatch raises CheckpointError naming the leaf and its HF tensor.
    """
    check_params(params, cfg)
    return _iter_hf_tensors(params, cfg, convert)


def _iter_hf_tensors(params: Mapping, cfg: ModelConfig, convert: Callable[[Any], T]) -> Iterator[tuple[str, T]]:
    for name, row, i in hf_entries(cfg):
        leaf = get_path(params, row.path)
        x = leaf if i is None else leaf[i]
        yield name, convert(x.T if row.transpose else x)


def hf_state_dict(params: Mapping, cfg: ModelConfig, dtype: Any = "float32") -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, C-contiguous numpy array in HF (out, in) layout, cast to `dtype`) one tensor at a time.

    Args:
      params: the Flax parameter tree (numpy or jax arrays, any float dtype).
      cfg: the model config that the tree follows.
      dtype: "float32", "float16" or "bfloat16" (or the matching numpy/jax dtype); casts round to nearest even.

    Returns:
      An iterator in checkpoint order, checked as `iter_hf_tensors` checks.
    """
    out_dtype = hf_dtype(dtype)
    return iter_hf_tensors(params, cfg, lambda x: np.array(np.asarray(x), dtype=out_dtype, order="C"))
