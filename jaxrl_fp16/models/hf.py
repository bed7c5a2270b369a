"""Reading and writing Hugging Face checkpoint folders, through the name/layout table of `models.hf_table`.

`load_hf_params` reads safetensors (single or sharded) or `pytorch_model*.bin` files into the FP32 Flax tree;
`save_hf_params` writes the tree (`hf_state_dict`, cast to a storage dtype) as safetensors with config.json and
the tokenizer files; `load_tokenizer` checks a folder's tokenizer files before transformers reads them.

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
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.models.hf_table import (CheckpointError, Row, enabled_rows, hf_dtype, hf_entries, hf_shape,
                                        hf_state_dict, leaf_shape, set_path)
from jaxrl_fp16.outputs import TOKENIZER_FILES, atomic_dir

__all__ = ["CheckpointError", "CorruptCheckpointError", "NonFiniteWeightsError", "TokenizerNotFoundError",
           "load_hf_params", "save_hf_params", "check_tokenizer_files", "load_tokenizer"]


# Tensors some checkpoints carry that are buffers, not parameters.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.\w*inv_freq$")
_TIED_HEAD = "lm_head.weight"
_EMBED = "model.embed_tokens.weight"
_ST_SINGLE, _ST_INDEX = "model.safetensors", "model.safetensors.index.json"
_PT_SINGLE, _PT_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000


class CorruptCheckpointError(CheckpointError):
    """A weights file cannot be read (truncated, or not a safetensors / torch file)."""


class NonFiniteWeightsError(CheckpointError):
    """A checkpoint holds NaN or infinite weights."""


# ----- export -----

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
    out_dtype = hf_dtype(dtype)
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


# The class AutoTokenizer loads, by model type, for a folder whose tokenizer_config.json names the generic
# "TokenizersBackend" (as transformers saves a tokenizer built from a tokenizer.json, e.g. the tiny models'):
# transformers overrides that name for Qwen2. tests/test_hf.py checks each entry against AutoTokenizer.
_GENERIC_TOKENIZER_CLASSES = {"qwen2": "Qwen2Tokenizer", "qwen3": "TokenizersBackend", "llama": "TokenizersBackend"}


def _read_json_or_empty(path: str) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def generic_tokenizer_class(folder: str | os.PathLike) -> str | None:
    """The transformers class AutoTokenizer would load `folder`'s generic tokenizer with (see above), else None."""
    tok = _read_json_or_empty(os.path.join(folder, "tokenizer_config.json"))
    if tok.get("tokenizer_class") != "TokenizersBackend" or "auto_map" in tok:
        return None
    return _GENERIC_TOKENIZER_CLASSES.get(_read_json_or_empty(os.path.join(folder, "config.json")).get("model_type"))


def load_tokenizer(folder: str | os.PathLike, **kwargs: Any):
    """`AutoTokenizer.from_pretrained(folder)` once `check_tokenizer_files` has found its files.

    A generic tokenizer (`generic_tokenizer_class`) is loaded with AutoTokenizer's class for it directly: the
    same tokenizer, without AutoTokenizer's import of torch and of every model config (about 4 s per process)."""
    folder = check_tokenizer_files(folder)
    name = generic_tokenizer_class(folder)
    if name is not None:
        import transformers

        cls = getattr(transformers, name, None)  # None in a transformers without the class: AutoTokenizer decides
        if cls is not None:
            return cls.from_pretrained(folder, **kwargs)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, **kwargs)


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
    entries = {name: (row, i) for name, row, i in hf_entries(cfg)}
    readers = [reader_cls(f) for f in files]
    nonfinite: list[str] = []
    try:
        located = _locate(readers, entries, cfg, weight_map, path)
        params_np = {row.path: np.empty(leaf_shape(row, cfg), np.float32) for row in enabled_rows(cfg)}
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
        set_path(params, leaf_path, array)
    return cfg, params


def _locate(readers: list, entries: dict[str, tuple[Row, int | None]], cfg: ModelConfig,
            weight_map: dict[str, str] | None, path: str) -> dict[str, Any]:
    """Maps every tensor the model needs to the reader holding it; checks names and shapes from headers only."""
    located: dict[str, Any] = {}
    problems: list[str] = []
    embed_shape = hf_shape(entries[_EMBED][0], cfg)
    for reader in readers:
        file = os.path.basename(reader.path)
        for name, shape in reader.shapes().items():
            if name in entries:
                want = hf_shape(entries[name][0], cfg)
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
