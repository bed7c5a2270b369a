"""Model configuration read from a Hugging Face `config.json` (Qwen2, Qwen3, Llama, Mistral without sliding window).

Anything the decoder does not implement (sliding-window attention, mixture of experts, an unknown RoPE type,
another activation) is refused with an error that names the field, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from jaxrl_fp16.emulation import FloatFormat

__all__ = ["ModelConfig", "RopeScaling", "Numerics", "UnsupportedConfigError", "SUPPORTED_ARCHS"]

SUPPORTED_ARCHS = ("qwen2", "qwen3", "llama", "mistral")
_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                  "mistral": "MistralForCausalLM"}
_ROPE_TYPES = ("default", "linear", "llama3")
# Keys whose presence with a truthy value means a feature the decoder does not implement.
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


class UnsupportedConfigError(ValueError):
    """A config.json field names an architecture or feature this decoder does not implement."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` (positions / factor) or `llama3` (band-wise, Llama 3.1)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise UnsupportedConfigError(f"rope_scaling.rope_type={self.rope_type!r} is not supported; "
                                         f"supported: {', '.join(_ROPE_TYPES)}")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Numerics:
    """Which numerically sensitive steps run in FP32 while the rest runs in the compute dtype.

    The defaults follow what transformers does in a half-precision dtype: RMSNorm statistics, the attention
    softmax and the final log-softmax in FP32; attention scores, the LM head and RoPE application in the
    compute dtype. Flipping a flag is how a precision study attributes mismatch to an op class.

    `emulate` runs the model in an emulated float format instead of a real low-precision dtype: the compute
    dtype must be float32, and every weight and every op's output that the real dtype would round is rounded
    with `jaxrl_fp16.emulation.round_to_format` to that format (e.g. "e5m10" = float16, "e8m7" = bfloat16,
    "e4m3fn" = OCP FP8, "e8m3"); ops the flags above force to FP32 are not rounded. Normalised to the
    format's canonical name ("float16" -> "e5m10"). None (the default) leaves the compiled code untouched.

    `scale_q` (default off, transformers' eager order) is not an op class: it reorders dense attention's scaling.
    Blockwise and cuDNN attention keep scores in FP32 whatever the flags (`jaxrl_fp16.models.attention`).
    """

    norm_f32: bool = True  # RMSNorm mean-square and normalisation (then cast back, then * weight)
    softmax_f32: bool = True  # attention softmax
    attn_scores_f32: bool = False  # q.k^T (and the probs.v product) in FP32
    lm_head_f32: bool = False  # final projection to the vocabulary in FP32
    rope_f32: bool = False  # apply the rotary embedding in FP32 (cos/sin are always computed in FP32)
    residual_f32: bool = False  # keep the residual stream in FP32
    # Dense attention: scale q by D^-0.5 before q.k^T instead of scaling the product, so the unscaled q.k^T
    # (up to sqrt(D) times larger) is never rounded to the compute dtype, where it can overflow FP16.
    scale_q: bool = False
    emulate: str | None = None  # emulated float format ("e5m10", "e4m3fn", ...); needs compute dtype float32

    def __post_init__(self):
        if self.emulate is not None:
            try:
                name = FloatFormat.parse(self.emulate).name
            except ValueError as e:
                raise ValueError(f"Numerics.emulate={self.emulate!r}: {e}") from None
            object.__setattr__(self, "emulate", name)

    @property
    def float_format(self) -> FloatFormat | None:
        """The emulated format, or None when the model computes in its real compute dtype."""
        return None if self.emulate is None else FloatFormat.parse(self.emulate)

    @classmethod
    def op_classes(cls) -> tuple[str, ...]:
        """The op classes a flag can force to FP32 ("norm", "softmax", ...)."""
        return tuple(f.name.removesuffix("_f32") for f in dataclasses.fields(cls) if f.name.endswith("_f32"))

    @classmethod
    def all_f32(cls) -> "Numerics":
        return cls(norm_f32=True, softmax_f32=True, attn_scores_f32=True, lm_head_f32=True, rope_f32=True,
                   residual_f32=True)

    @classmethod
    def from_overrides(cls, names: str | list[str] | tuple[str, ...], *, emulate: str | None = None) -> "Numerics":
        """Defaults plus the op classes named (e.g. "lm_head,attn_scores") forced to FP32, in `emulate`."""
        if isinstance(names, str):
            names = [n for n in names.split(",") if n.strip()]
        valid = set(cls.op_classes())
        kw = {}
        for name in names:
            key = name.strip().removesuffix("_f32")
            if key not in valid:
                raise ValueError(f"unknown op class {name!r}; valid: {', '.join(sorted(valid))}")
            kw[f"{key}_f32"] = True
        return cls(**kw, emulate=emulate)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The architecture of a decoder-only causal LM (hashable: it configures jitted code)."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedConfigError(f"model_type={self.arch!r} is not supported; "
                                         f"supported: {', '.join(SUPPORTED_ARCHS)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        attn += (self.num_heads + 2 * self.num_kv_heads) * d * self.qkv_bias + h * self.o_bias
        attn += 2 * d * self.qk_norm
        mlp = 3 * h * i + (2 * i + h) * self.mlp_bias
        layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + h

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim/2] in float32 (numpy: computed once, at trace time)."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
        inv = 1.0 / (self.rope_theta ** exponents)
        rs = self.rope_scaling
        if rs is not None and rs.rope_type == "linear":
            inv = inv / rs.factor
        elif rs is not None and rs.rope_type == "llama3":
            low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
            high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
            smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor)
            smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv = np.where(medium, smoothed, scaled)
        return inv.astype(np.float32)

    # ----- Hugging Face config.json -----

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        arch = d.get("model_type")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedConfigError(f"model_type={arch!r} is not supported; "
                                         f"supported: {', '.join(SUPPORTED_ARCHS)}")
        for key in _MOE_KEYS:
            if d.get(key):
                raise UnsupportedConfigError(f"{key}={d[key]!r}: mixture-of-experts models are not supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedConfigError(f"hidden_act={act!r} is not supported; supported: silu")
        num_layers = d["num_hidden_layers"]
        _check_no_sliding_window(d, num_layers)
        if d.get("pretraining_tp", 1) not in (1, None):
            raise UnsupportedConfigError(f"pretraining_tp={d['pretraining_tp']!r} is not supported; use 1")
        num_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
        rope_theta, rope_scaling = _parse_rope(d)
        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        attention_bias = bool(d.get("attention_bias", False))
        return cls(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            # As transformers builds them: Qwen2 always has q/k/v biases and no o bias; Llama and Qwen3 put a
            # bias on q/k/v/o when `attention_bias`; Mistral has none.
            qkv_bias=True if arch == "qwen2" else (attention_bias and arch != "mistral"),
            o_bias=attention_bias and arch in ("llama", "qwen3"),
            mlp_bias=bool(d.get("mlp_bias", False)) and arch == "llama",
            qk_norm=arch == "qwen3",
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "ModelConfig":
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json in {path}")
        with open(file) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} is not valid JSON: {e}") from None
        try:
            cfg = cls.from_hf_dict(d)
        except KeyError as e:
            raise ValueError(f"{file} lacks the required field {e.args[0]!r}") from None
        # Chat models list their end-of-turn ids in generation_config.json: generation stops on any of them.
        gen_file = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_file):
            with open(gen_file) as f:
                eos = json.load(f).get("eos_token_id")
            extra = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
            merged = tuple(dict.fromkeys(cfg.eos_token_ids + tuple(int(t) for t in extra)))
            cfg = dataclasses.replace(cfg, eos_token_ids=merged)
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict that transformers and vLLM load as the same architecture."""
        d: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (self.eos_token_ids[0] if len(self.eos_token_ids) == 1
                             else list(self.eos_token_ids) or None),
            "pad_token_id": self.pad_token_id,
        }
        if self.arch != "qwen2":
            d["attention_bias"] = self.qkv_bias
        if self.arch == "llama":
            d["mlp_bias"] = self.mlp_bias
        if self.arch in ("qwen2", "qwen3"):
            d["use_sliding_window"] = False
        if self.arch in ("qwen2", "qwen3", "mistral"):
            d["sliding_window"] = None
        rope = {"rope_type": "default"} if self.rope_scaling is None else {
            k: v for k, v in dataclasses.asdict(self.rope_scaling).items()}
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(rope)
        d["rope_parameters"] = dict(rope, rope_theta=self.rope_theta)
        return d


def _check_no_sliding_window(d: dict[str, Any], num_layers: int) -> None:
    layer_types = d.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise UnsupportedConfigError(f"layer_types={sorted(set(layer_types))}: only full_attention is supported")
    window = d.get("sliding_window")
    if window is None:
        return
    if d.get("model_type") in ("qwen2", "qwen3"):
        if not d.get("use_sliding_window", False):
            return  # Qwen keeps a window size in the config but only uses it with use_sliding_window
        if d.get("max_window_layers", num_layers) >= num_layers:
            return  # the window applies to no layer
        raise UnsupportedConfigError("use_sliding_window=true: sliding-window attention is not supported")
    if window >= d.get("max_position_embeddings", 0):
        return  # the window never bites within the context
    raise UnsupportedConfigError(f"sliding_window={window}: sliding-window attention is not supported")


def _parse_rope(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Reads RoPE settings from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    spec = {**scaling, **params} if (scaling or params) else {}
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedConfigError(f"rope_scaling.rope_type={rope_type!r} is not supported; "
                                     f"supported: {', '.join(_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    if "factor" not in spec:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks the field 'factor'")
    kw = {k: spec[k] for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
          if k in spec and rope_type == "llama3"}
    return theta, RopeScaling(rope_type=rope_type, factor=float(spec["factor"]), **kw)
