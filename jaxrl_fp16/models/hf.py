"""Import and export of Hugging Face checkpoints through one declarative name/layout table.

`HF_TABLE` maps every HF tensor name to a path in the Flax parameter tree. Per-layer HF tensors
(`model.layers.{i}.*`) are stacked on a leading axis of length `num_layers`; HF linear weights are stored
(out, in) and Flax kernels (in, out), so those rows are transposed. Optional rows name the `ModelConfig` flag
that enables them ("!flag" means "enabled when the flag is false"). The same table drives
`expected_params_shapes`, `load_hf_params`, `hf_state_dict` (export and weight pushes) and `save_hf_params`.

Loading is lazy: each tensor is read on its own from the memory-mapped file and written into a preallocated
FP32 array, so peak memory is the FP32 model plus one tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.outputs import TOKENIZER_FILES, atomic_dir

__all__ = ["HF_TABLE", "Row", "CheckpointError", "CorruptCheckpointError", "NonFiniteWeightsError",
           "TokenizerNotFoundError", "expected_params_shapes", "hf_state_dict", "load_hf_params", "save_hf_params",
           "check_tokenizer_files", "load_tokenizer"]


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

# Tensors some checkpoints carry that are buffers, not parameters.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.\w*inv_freq$")
_TIED_HEAD = "lm_head.weight"
_EMBED = "model.embed_tokens.weight"
_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
           "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_ST_SINGLE, _ST_INDEX = "model.safetensors", "model.safetensors.index.json"
_PT_SINGLE, _PT_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000


class CheckpointError(ValueError):
    """A checkpoint's tensors do not match the model config (missing, unexpected or mis-shaped tensors)."""


class CorruptCheckpointError(CheckpointError):
    """A weights file cannot be read (truncated, or not a safetensors / torch file)."""


class NonFiniteWeightsError(CheckpointError):
    """A checkpoint holds NaN or infinite weights."""


# ----- the table, expanded for one config -----

def _dims(cfg: ModelConfig) -> dict[str, int]:
    return {"V": cfg.vocab_size, "H": cfg.hidden_size, "I": cfg.intermediate_size, "D": cfg.head_dim,
            "Q": cfg.num_heads * cfg.head_dim, "K": cfg.num_kv_heads * cfg.head_dim}


def _enabled(row: Row, cfg: ModelConfig) -> bool:
    if row.when is None:
        return True
    flag = row.when.removeprefix("!")
    return bool(getattr(cfg, flag)) != row.when.startswith("!")


def _rows(cfg: ModelConfig) -> list[Row]:
    return [row for row in HF_TABLE if _enabled(row, cfg)]


def _leaf_shape(row: Row, cfg: ModelConfig) -> tuple[int, ...]:
    """The Flax leaf shape of a row (stacked over layers when per_layer)."""
    dims = _dims(cfg)
    shape = tuple(dims[s] for s in row.shape)
    return (cfg.num_layers, *shape) if row.per_layer else shape


def _hf_shape(row: Row, cfg: ModelConfig) -> tuple[int, ...]:
    dims = _dims(cfg)
    shape = tuple(dims[s] for s in row.shape)
    return shape[::-1] if row.transpose else shape


def _hf_entries(cfg: ModelConfig) -> Iterator[tuple[str, Row, int | None]]:
    """(hf_name, row, layer index or None), in export order: embeddings, layer by layer, final norm, head."""
    rows = _rows(cfg)
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
    for row in _rows(cfg):
        _set_path(tree, row.path, _leaf_shape(row, cfg))
    return tree


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
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


def _dtype(dtype: Any) -> np.dtype:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; supported: {', '.join(_DTYPES)}")
    return _DTYPES[name]


# ----- export -----

def hf_state_dict(params: Mapping, cfg: ModelConfig, dtype: Any = "float32") -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, numpy array in HF (out, in) layout, cast to `dtype`) one tensor at a time.

    Args:
      params: the Flax parameter tree (numpy or jax arrays, any float dtype).
      cfg: the model config that the tree follows.
      dtype: "float32", "float16" or "bfloat16" (or the matching numpy/jax dtype); casts round to nearest even.

    Returns:
      An iterator in checkpoint order. The tree's structure and every leaf's shape are checked by this call,
      before any tensor is produced; a mismatch raises CheckpointError naming the leaf and its HF tensor.
    """
    out_dtype = _dtype(dtype)
    rows = _rows(cfg)
    expected = {row.path: row for row in rows}
    extra = sorted("/".join(p) for p in _leaf_paths(params) if p not in expected)
    if extra:
        raise CheckpointError(f"params have leaves that {cfg.arch} with this config does not use: "
                              f"{', '.join(extra)}")
    for row in rows:
        leaf = _get_path(params, row.path)
        want = _leaf_shape(row, cfg)
        if tuple(leaf.shape) != want:
            raise CheckpointError(f"params leaf {'/'.join(row.path)} (HF {row.hf}) has shape {tuple(leaf.shape)}, "
                                  f"expected {want}")
    return _iter_state_dict(params, cfg, out_dtype)


def _iter_state_dict(params: Mapping, cfg: ModelConfig, out_dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    for name, row, i in _hf_entries(cfg):
        leaf = _get_path(params, row.path)
        x = np.asarray(leaf if i is None else leaf[i])
        yield name, np.array(x.T if row.transpose else x, dtype=out_dtype, order="C")


def save_hf_params(params: Mapping, cfg: ModelConfig, out_dir: str | os.PathLike, *, dtype: Any = "float32",
                   tokenizer_from: str | os.PathLike | None = None,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                   sources: Sequence[str | os.PathLike] = ()) -> str:
    """Writes a Hugging Face checkpoint folder that transformers and vLLM load.

    Args:
      params: the Flax parameter tree.
      cfg: its model config.
      out_dir: the folder to write: new, empty, or one written here before (it holds our marker), which is
        replaced atomically; anything else is refused (see `check_output_dir` and `atomic_dir`).
      dtype: storage dtype of the weights: "float32", "float16" or "bfloat16"; also written to config.json.
      tokenizer_from: a folder whose tokenizer files (tokenizer.json, tokenizer_config.json, vocab/merges,
        chat template, ...) are copied beside the weights.
      max_shard_bytes: above this size the weights are split into `model-0000k-of-0000N.safetensors` shards
        with a `model.safetensors.index.json`.
      overwrite: also replace a folder without our marker that holds nothing but Hugging Face model files.
      sources: folders the caller read from (a run directory, ...): `out_dir` may neither be nor hold one;
        `tokenizer_from` is one.

    Returns:
      The absolute path of the written folder.
    """
    out_dtype = _dtype(dtype)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    tensors = hf_state_dict(params, cfg, out_dtype)  # validates before anything is written
    tok_files = _tokenizer_files(tokenizer_from) if tokenizer_from is not None else []
    out_dir = os.path.abspath(os.fspath(out_dir))
    sources = (*sources, *([tokenizer_from] if tokenizer_from is not None else []))
    with atomic_dir(out_dir, overwrite=overwrite, sources=sources) as tmp:
        _write_weights(tensors, tmp, max_shard_bytes)
        hf_config = cfg.to_hf_dict()
        hf_config["torch_dtype"] = hf_config["dtype"] = out_dtype.name
        _write_json(os.path.join(tmp, "config.json"), hf_config)
        generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if hf_config.get(k) is not None}
        _write_json(os.path.join(tmp, "generation_config.json"), generation)
        for file in tok_files:
            shutil.copy2(file, os.path.join(tmp, os.path.basename(file)))
    return out_dir


def _tokenizer_files(folder: str | os.PathLike) -> list[str]:
    files = [os.path.join(folder, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))]
    if not files:
        raise FileNotFoundError(f"tokenizer_from={os.fspath(folder)!r} holds none of {', '.join(TOKENIZER_FILES)}")
    return files


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_shard(tensors: dict[str, np.ndarray], path: str) -> None:
    save_file(tensors, path, metadata={"format": "pt"})


def _write_weights(tensors: Iterator[tuple[str, np.ndarray]], folder: str, max_shard_bytes: int) -> None:
    """Streams tensors into shards of at most `max_shard_bytes` (a larger single tensor gets its own shard)."""
    shards: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
    current: dict[str, np.ndarray] = {}
    current_bytes = total_bytes = 0

    def flush():
        path = os.path.join(folder, f"shard-{len(shards):05d}.partial")
        _write_shard(current, path)
        shards.append((path, list(current)))
        current.clear()

    for name, array in tensors:
        if current and current_bytes + array.nbytes > max_shard_bytes:
            flush()
            current_bytes = 0
        current[name] = array
        current_bytes += array.nbytes
        total_bytes += array.nbytes
    if current or not shards:
        flush()
    if len(shards) == 1:
        os.rename(shards[0][0], os.path.join(folder, _ST_SINGLE))
        return
    weight_map = {}
    for k, (path, names) in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(path, os.path.join(folder, final))
        weight_map.update((name, final) for name in names)
    _write_json(os.path.join(folder, _ST_INDEX), {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})


# ----- tokenizer -----

class TokenizerNotFoundError(FileNotFoundError):
    """A model folder holds no tokenizer files."""


_VOCAB_FILES = ("vocab.json", "vocab.txt", "tokenizer.model")


def check_tokenizer_files(folder: str | os.PathLike) -> str:
    """Raises TokenizerNotFoundError naming `folder` unless it holds tokenizer.json, or tokenizer_config.json with
    a vocabulary (transformers would otherwise build an empty tokenizer, silently)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise TokenizerNotFoundError(f"{folder} is not a folder, so it holds no tokenizer")
    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    if has("tokenizer.json") or (has("tokenizer_config.json") and any(has(v) for v in _VOCAB_FILES)):
        return folder
    raise TokenizerNotFoundError(f"{folder} holds no tokenizer: expected tokenizer.json, or tokenizer_config.json "
                                 f"with {' or '.join(_VOCAB_FILES)}")


def load_tokenizer(folder: str | os.PathLike, **kwargs: Any):
    """`AutoTokenizer.from_pretrained(folder)` once `check_tokenizer_files` has found its files."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(check_tokenizer_files(folder), **kwargs)


# ----- import -----

class _SafetensorsFile:
    """Lazy reader of one safetensors file (memory-mapped, one tensor at a time)."""

    def __init__(self, path: str):
        self.path = path
        with _reading(path):
            self._f = safe_open(path, framework="np")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        with _reading(self.path):
            return {name: tuple(self._f.get_slice(name).get_shape()) for name in self._f.keys()}

    def read(self, name: str) -> np.ndarray:
        with _reading(self.path, name):
            return self._f.get_tensor(name)  # bf16 comes back as an ml_dtypes.bfloat16 array

    def close(self) -> None:
        self._f = None


# What a truncated or foreign file raises: SafetensorError (an Exception subclass) from safetensors; from torch.load
# RuntimeError (bad zip), UnpicklingError (not a pickle), EOFError, OSError (mmap of a truncated file).
_READ_ERRORS = (SafetensorError, RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError)


@contextlib.contextmanager
def _reading(path: str, name: str | None = None) -> Iterator[None]:
    """Turns a reader's failure on a damaged file into a CorruptCheckpointError naming the file (and tensor)."""
    try:
        yield
    except (CheckpointError, PermissionError):
        raise
    except _READ_ERRORS as e:
        what = f"tensor {name!r} of " if name else ""
        detail = " ".join(str(e).split())[:200]
        raise CorruptCheckpointError(f"cannot read {what}{path}: the file is truncated or not a valid "
                                     f"{'safetensors' if path.endswith('.safetensors') else 'PyTorch'} file "
                                     f"({type(e).__name__}: {detail})") from None


class _TorchBinFile:
    """Lazy reader of one pytorch_model*.bin file (memory-mapped with weights_only=True)."""

    def __init__(self, path: str):
        from jaxrl_fp16 import torch_bridge  # the .bin format is the only reason to need torch here

        self.path = path
        self._bridge = torch_bridge
        with _reading(path):
            self._sd = torch_bridge.load_state_dict(path)
        if not isinstance(self._sd, Mapping):
            raise CheckpointError(f"{path} does not hold a state dict")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._bridge.tensor_shapes(self._sd)

    def read(self, name: str) -> np.ndarray:
        t = self._sd[name]
        if not self._bridge.is_float_tensor(t):
            raise CheckpointError(f"tensor {name!r} in {self.path} has dtype {t.dtype}, expected a float dtype")
        with _reading(self.path, name):
            return self._bridge.to_float32_numpy(t)

    def close(self) -> None:
        self._sd = None


def _checkpoint_files(path: str) -> tuple[type, list[str], dict[str, str] | None]:
    """(reader class, files, index weight_map or None) for a checkpoint folder; safetensors preferred."""
    for index, single, reader in ((_ST_INDEX, _ST_SINGLE, _SafetensorsFile), (_PT_INDEX, _PT_SINGLE, _TorchBinFile)):
        index_file = os.path.join(path, index)
        if os.path.isfile(index_file):
            try:
                with open(index_file) as f:
                    weight_map = json.load(f).get("weight_map")
            except (ValueError, AttributeError) as e:
                raise CorruptCheckpointError(f"{index_file} is not a valid index: {e}") from None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_file} has no weight_map")
            files = sorted(set(weight_map.values()))
            for file in files:
                if not os.path.isfile(os.path.join(path, file)):
                    raise FileNotFoundError(f"{index_file} names the shard {file}, which does not exist")
            return reader, [os.path.join(path, f) for f in files], weight_map
        if os.path.isfile(os.path.join(path, single)):
            return reader, [os.path.join(path, single)], None
    raise FileNotFoundError(f"no {_ST_SINGLE}, {_ST_INDEX}, {_PT_SINGLE} or {_PT_INDEX} in {path}")


def load_hf_params(path: str | os.PathLike, cfg: ModelConfig | None = None, *,
                   allow_nonfinite: bool = False) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads a local HF checkpoint folder into the FP32 Flax parameter tree.

    Args:
      path: a folder with `model.safetensors`, sharded safetensors plus `model.safetensors.index.json`,
        `pytorch_model.bin`, or sharded .bin files plus `pytorch_model.bin.index.json`. Any float storage
        dtype (f32, f16, bf16) is converted exactly to FP32.
      cfg: the model config; read from the folder's config.json when None.
      allow_nonfinite: load NaN or infinite weights (for deliberate studies) instead of refusing them.

    Returns:
      (cfg, params) with params a nested dict of float32 numpy arrays (see `expected_params_shapes`).

    Raises:
      CheckpointError naming each missing, unexpected or mis-shaped tensor and its file. Rotary `inv_freq`
      buffers are ignored; a tied model's `lm_head.weight` is accepted only if it equals the embedding.
      CorruptCheckpointError naming the file when a weights file is truncated or not a weights file.
      NonFiniteWeightsError naming every tensor (and its file) that holds NaN or inf, unless `allow_nonfinite`.
    """
    path = os.fspath(path)
    if cfg is None:
        cfg = ModelConfig.from_hf_dir(path)
    reader_cls, files, weight_map = _checkpoint_files(path)
    entries = {name: (row, i) for name, row, i in _hf_entries(cfg)}
    readers = [reader_cls(f) for f in files]
    nonfinite: list[str] = []
    try:
        located = _locate(readers, entries, cfg, weight_map, path)
        params_np = {row.path: np.empty(_leaf_shape(row, cfg), np.float32) for row in _rows(cfg)}
        tied_head = located.get(_TIED_HEAD) if cfg.tie_word_embeddings else None
        for reader in readers:  # file by file, unmapping each file once it has been read
            for name, (row, i) in entries.items():
                if located[name] is reader:
                    x = _as_f32(reader.read(name), name, reader.path)
                    if not allow_nonfinite:
                        nonfinite += _nonfinite(x, name, reader.path)
                    dest = params_np[row.path] if i is None else params_np[row.path][i]
                    dest[...] = x.T if row.transpose else x
                    del x
            if reader is not tied_head:
                reader.close()
        if tied_head is not None:
            reader = located[_TIED_HEAD]
            head = _as_f32(reader.read(_TIED_HEAD), _TIED_HEAD, reader.path)
            if not np.array_equal(head, params_np[("embed", "embedding")], equal_nan=True):
                raise CheckpointError(f"tensor {_TIED_HEAD!r} in {reader.path} differs from {_EMBED!r} but the "
                                      f"config has tie_word_embeddings=true")
    finally:
        for reader in readers:
            reader.close()
    if nonfinite:
        shown = nonfinite[:20] + ([f"... and {len(nonfinite) - 20} more"] if len(nonfinite) > 20 else [])
        raise NonFiniteWeightsError(f"checkpoint {path} holds non-finite weights (allow_nonfinite=True, or "
                                    f"--allow-nonfinite, loads them anyway): " + "; ".join(shown))
    params: dict[str, Any] = {}
    for leaf_path, array in params_np.items():
        _set_path(params, leaf_path, array)
    return cfg, params


def _locate(readers: list, entries: dict[str, tuple[Row, int | None]], cfg: ModelConfig,
            weight_map: dict[str, str] | None, path: str) -> dict[str, Any]:
    """Maps every tensor the model needs to the reader holding it; checks names and shapes from headers only."""
    located: dict[str, Any] = {}
    problems: list[str] = []
    embed_shape = _hf_shape(entries[_EMBED][0], cfg)
    for reader in readers:
        file = os.path.basename(reader.path)
        for name, shape in reader.shapes().items():
            if name in entries:
                want = _hf_shape(entries[name][0], cfg)
            elif name == _TIED_HEAD and cfg.tie_word_embeddings:
                want = embed_shape
            elif _IGNORED.search(name):
                continue
            else:
                problems.append(f"unexpected tensor {name!r} in {file}")
                continue
            if name in located:
                problems.append(f"tensor {name!r} appears in both {os.path.basename(located[name].path)} and {file}")
            elif shape != want:
                problems.append(f"tensor {name!r} in {file} has shape {shape}, expected {want}")
            located[name] = reader
    for name in entries:
        if name not in located:
            where = f" (the index names {weight_map[name]})" if weight_map and name in weight_map else ""
            problems.append(f"missing tensor {name!r}{where}")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError(f"checkpoint {path} does not match the {cfg.arch} config:\n  " + "\n  ".join(shown))
    return located


def _nonfinite(x: np.ndarray, name: str, file: str) -> list[str]:
    """[a line naming the tensor, its file and its NaN/inf counts] when `x` is not all finite, else []."""
    if np.isfinite(x).all():
        return []
    return [f"tensor {name!r} in {os.path.basename(file)} has {int(np.isnan(x).sum())} NaN and "
            f"{int(np.isinf(x).sum())} inf values"]


def _as_f32(x: np.ndarray, name: str, file: str) -> np.ndarray:
    if not (np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16):
        raise CheckpointError(f"tensor {name!r} in {file} has dtype {x.dtype}, expected a float dtype")
    return x.astype(np.float32, copy=False)
