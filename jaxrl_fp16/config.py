"""The run config: typed, validated dataclasses composed from YAML with dotted `key=value` overrides.

One key, `precision` (a policy string such as `fp16-mixed`), sets the trainer's compute dtype and the sampler's.
Unknown keys, wrong types and bad values fail before any work, naming the key and the valid choices: every
section checks its own fields and `RunConfig` the rules across sections, so whatever the trainers later build
from the config (loss scale, optimizer, sampler, task) cannot fail on a config value.

Every float field holds a finite number: none takes inf to mean "no limit" (a disabled limit is null where the
key allows it, e.g. `optim.max_grad_norm`, `critic.value_clip`). Interpolations may reference other keys
(`${train.iterations}`), but resolvers (`${oc.env:VAR}`, any `${name:...}`) are refused: the resolved config is
written to the run folder, and a shared config must not copy the environment (secrets) there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from typing import Any, Optional, Sequence

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, GrammarParseError, OmegaConfBaseException

from jaxrl_fp16.models.config import Numerics
from jaxrl_fp16.precision import get_policy
from jaxrl_fp16.rl.losses import LossConfig
from jaxrl_fp16.rl.ppo import CriticConfig
from jaxrl_fp16.sampling.options import SAMPLERS, EngineOptions, JaxOptions, TransformersOptions, VLLMOptions

__all__ = ["RunConfig", "TinyModelConfig", "ModelSection", "TaskSection", "PerfectibleSection", "SamplerSection",
           "OptimSection", "LossScaleSection", "TrainSection", "SFTSection", "CheckpointSection", "LogSection",
           "DebugSection", "DPOSection", "LoRASection", "MeshSection", "DistributedSection",
           "load_config", "to_yaml", "ConfigError"]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def _positive(section: str, **values: Any) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {value!r}")


def _non_negative(section: str, **values: Any) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise ConfigError(f"{section}.{name} must be >= 0, got {value!r}")


ATTENTION_CHOICES = ("auto", "dense", "blockwise", "cudnn")
REMAT_CHOICES = ("auto", "none", "full", "dots")


def _choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(X, True) for Optional[X] / X | None, else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _describe(tp: Any) -> str:
    """How a field's type reads in an error message."""
    tp, optional = _unwrap_optional(tp)
    if dataclasses.is_dataclass(tp):
        text = f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    elif typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        text = f"a list of {({int: 'integers', str: 'strings'}).get(item, str(item))}, e.g. [a, b]"
    elif typing.get_origin(tp) is dict:
        text = "a mapping"
    else:
        text = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(tp, str(tp))
    return text + " or null" if optional else text


def _check_value(key: str, tp: Any, value: Any) -> None:
    """Refuses `value` at `key` unless it has the annotated type `tp` (scalars and lists of scalars)."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if not optional:
            raise ConfigError(f"{key} may not be null; expected {_describe(tp)}")
        return
    if typing.get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be {_describe(tp)}, got {value!r}")
        for i, item in enumerate(value):
            _check_value(f"{key}[{i}]", typing.get_args(tp)[0], item)
        return
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number (no key takes inf or nan; a limit that "
                              f"can be switched off is null)")
        return
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp in (bool, str):
        ok = isinstance(value, tp)
    else:
        return  # sections and mappings validate themselves
    if not ok:
        raise ConfigError(f"{key} must be {_describe(tp)}, got {value!r}")


def _check_fields(obj: Any, prefix: str) -> None:
    """Refuses a field whose value does not have its annotated type (bools are not ints, floats are finite),
    naming the dotted key; every section calls it first, so its own checks compare numbers only."""
    hints = _field_types(type(obj))
    for f in dataclasses.fields(obj):
        _check_value(_join(prefix, f.name), hints[f.name], getattr(obj, f.name))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyModelConfig:
    """A tiny random model built locally when `model.path` is not set (see `jaxrl-fp16 make-tiny`)."""

    arch: str = "qwen2"
    vocab_size: int = 320
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    seed: int = 0

    def __post_init__(self):
        from jaxrl_fp16.models.tiny import EOS_TOKEN, PAD_TOKEN

        _check_fields(self, "model.tiny")
        if self.arch not in ("qwen2", "qwen3", "llama"):
            raise ConfigError(f"model.tiny.arch={self.arch!r}; valid: qwen2, qwen3, llama")
        _positive("model.tiny", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                  intermediate_size=self.intermediate_size, num_layers=self.num_layers, num_heads=self.num_heads,
                  num_kv_heads=self.num_kv_heads, max_position_embeddings=self.max_position_embeddings)
        tokens = 256 + len((EOS_TOKEN, PAD_TOKEN))  # the character tokenizer: one token per byte, EOS and PAD
        if self.vocab_size < tokens:
            raise ConfigError(f"model.tiny.vocab_size={self.vocab_size} is smaller than the tokenizer's {tokens} "
                              f"tokens")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(f"model.tiny.hidden_size={self.hidden_size} must be num_heads={self.num_heads} "
                              f"times an even head size (RoPE rotates pairs)")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.tiny.num_heads={self.num_heads} must be a multiple of "
                              f"model.tiny.num_kv_heads={self.num_kv_heads}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTSection:
    """Supervised warm start on the task's reference responses (the same mixed-precision step)."""

    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 20
    precision: str = "fp32"
    num_problems: int = 4096
    seed: int = 0

    def __post_init__(self):
        _check_fields(self, "model.warm_start")
        _positive("model.warm_start", steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                  num_problems=self.num_problems)
        _non_negative("model.warm_start", warmup_steps=self.warmup_steps)
        _check_policy("model.warm_start.precision", self.precision)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    """The base policy: an existing Hugging Face directory, or a tiny model built and warm-started locally
    (cached under `cache_dir`, keyed by everything that determines it, so every arm of a comparison starts
    from the same weights)."""

    path: Optional[str] = None
    tiny: TinyModelConfig = dataclasses.field(default_factory=TinyModelConfig)
    warm_start: SFTSection = dataclasses.field(default_factory=SFTSection)
    cache_dir: str = ".cache/jaxrl_fp16"
    fp32_ops: list[str] = dataclasses.field(default_factory=list)  # Numerics overrides (op classes in FP32)
    # An emulated float format ("e5m10", "e4m3fn", "bfloat16", ...) for the trainer's compute and the JAX
    # sampler (`Numerics.emulate`); needs `precision` with compute dtype float32 (e.g. `fp32`).
    emulate: Optional[str] = None
    # Attention implementation for the training and scoring forward: "dense" (the [T, S] score tensor, written
    # out op by op), "blockwise" (online softmax over key blocks of `attention_block` keys: O(T) memory),
    # "cudnn" (jax.nn.dot_product_attention's fused kernel, GPUs only), "auto" (chosen per backend and length).
    attention: str = "auto"
    attention_block: int = 512
    # Rematerialisation of each scanned decoder layer in the backward pass: "none", "full" (recompute the whole
    # layer), "dots" (save matmul outputs, recompute the rest), "auto" (chosen per backend).
    remat: str = "auto"

    def __post_init__(self):
        _check_fields(self, "model")
        try:
            Numerics.from_overrides(self.fp32_ops, emulate=self.emulate)  # validates the names and the format
        except ValueError as e:
            key = "model.emulate" if "emulate" in str(e) else "model.fp32_ops"
            raise ConfigError(f"{key}: {e}") from None
        _choice("model.attention", self.attention, ATTENTION_CHOICES)
        _choice("model.remat", self.remat, REMAT_CHOICES)
        _positive("model", attention_block=self.attention_block)

    def numerics(self) -> Numerics:
        """The `Numerics` the trainer, scorer and JAX sampler run with."""
        return Numerics.from_overrides(self.fp32_ops, emulate=self.emulate)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSection:
    """A registered task and its options (e.g. `max_digits`, `truncated_reward`: the reward of a response cut
    at the length limit, default 0)."""

    name: str = "addition"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_problems: int = 1024  # candidate problems drawn before the perfectible filter
    seed: int = 1234

    def __post_init__(self):
        from jaxrl_fp16.rl.tasks import TASKS, OptionError, make_task

        _check_fields(self, "task")
        if self.name not in TASKS:
            raise ConfigError(f"task.name={self.name!r}; valid: {', '.join(sorted(TASKS))}")
        _positive("task", num_problems=self.num_problems)
        try:
            make_task(self.name, **self.options)  # cheap: validates the options' names, types and ranges
        except OptionError as e:
            keys = ", ".join(f"task.options.{k}" for k in e.keys) or "task.options"
            raise ConfigError(f"{keys}: {e}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerfectibleSection:
    """Keep prompts the base model solves with a pass rate in [low, high] (the paper: 20%-80%)."""

    enabled: bool = True
    low: float = 0.2
    high: float = 0.8
    samples_per_prompt: int = 8
    max_prompts: int = 256
    # "jax": the built-in sampler in FP32 (embedded; the same prompts for every precision arm).
    # "run": the run's own sampler (e.g. vLLM on a GPU host, for large models); the set is cached on first use
    # and shared by later arms.
    sampler: str = "jax"

    def __post_init__(self):
        _check_fields(self, "perfectible")
        if self.sampler not in ("jax", "run"):
            raise ConfigError(f"perfectible.sampler={self.sampler!r}; valid: jax, run")
        if not 0 <= self.low <= self.high <= 1:
            raise ConfigError(f"perfectible.low/high must satisfy 0 <= low <= high <= 1, got {self.low}, "
                              f"{self.high}")
        _positive("perfectible", samples_per_prompt=self.samples_per_prompt, max_prompts=self.max_prompts)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerSection:
    """The sampler; the keys after `tensor_parallel_size` are the vLLM engine's (refused with another sampler):
    null leaves the choice to `VLLMSampler` (see `VLLMOptions` and README "On a GPU")."""

    name: str = "jax"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    allow_dtype_mismatch: bool = False
    dtype: Optional[str] = None  # only with allow_dtype_mismatch: a sampler dtype other than the trainer's
    max_batch_size: int = 256
    tensor_parallel_size: int = 1  # vllm: GPUs per engine (tensor parallelism inside vLLM)
    # vLLM's share of each of its GPUs, in (0, 1); null: 0.35 sharing the trainer's GPUs, 0.9 with `devices`.
    gpu_memory_utilization: Optional[float] = None
    enforce_eager: Optional[bool] = None  # null: CUDA graphs on a GPU, eager on a CPU
    max_num_seqs: Optional[int] = None  # null: vLLM's default
    max_num_batched_tokens: Optional[int] = None  # null: vLLM's default
    max_model_len: Optional[int] = None  # null: 1024 prompt tokens + max_new_tokens, rounded up to 256
    enable_prefix_caching: Optional[bool] = None  # null: vLLM's default
    devices: Optional[list[int]] = None  # the engine's own GPUs (one per tensor_parallel_size); null: shared

    def __post_init__(self):
        from jaxrl_fp16.precision import as_dtype

        _check_fields(self, "sampler")
        if self.name not in SAMPLERS:
            raise ConfigError(f"sampler.name={self.name!r}; valid: {', '.join(SAMPLERS)}")
        if self.temperature <= 0:
            raise ConfigError(f"sampler.temperature must be > 0 for RL (sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampler.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"sampler.top_k must be >= 0 (0 disables it), got {self.top_k}")
        _positive("sampler", max_new_tokens=self.max_new_tokens, max_batch_size=self.max_batch_size,
                  tensor_parallel_size=self.tensor_parallel_size)
        if self.tensor_parallel_size != 1 and self.name != "vllm":
            raise ConfigError(f"sampler.tensor_parallel_size={self.tensor_parallel_size} needs sampler.name=vllm "
                              f"(got {self.name!r})")
        if self.dtype is not None:
            try:
                as_dtype(self.dtype)
            except ValueError as e:
                raise ConfigError(f"sampler.dtype={self.dtype!r}: {e}") from None
        self._check_engine_keys()

    def _check_engine_keys(self) -> None:
        """The vLLM engine's keys: only with sampler.name=vllm, in range, one device per tensor-parallel rank."""
        engine_keys = ("gpu_memory_utilization", "enforce_eager", "max_num_seqs", "max_num_batched_tokens",
                       "max_model_len", "enable_prefix_caching", "devices")
        given = {key: getattr(self, key) for key in engine_keys if getattr(self, key) is not None}
        if given and self.name != "vllm":
            key, value = next(iter(given.items()))
            raise ConfigError(f"sampler.{key}={value} is a vLLM engine key and needs sampler.name=vllm "
                              f"(got {self.name!r})")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization < 1:
            raise ConfigError(f"sampler.gpu_memory_utilization must be in (0, 1), got {self.gpu_memory_utilization}")
        _positive("sampler", **{k: given[k] for k in ("max_num_seqs", "max_num_batched_tokens") if k in given})
        if self.max_model_len is not None and self.max_model_len <= self.max_new_tokens:
            raise ConfigError(f"sampler.max_model_len={self.max_model_len} leaves no room for a prompt before "
                              f"sampler.max_new_tokens={self.max_new_tokens} response tokens")
        if self.devices is not None:
            if any(d < 0 for d in self.devices) or len(set(self.devices)) != len(self.devices):
                raise ConfigError(f"sampler.devices={list(self.devices)} must be distinct GPU ordinals (>= 0)")
            if len(self.devices) != self.tensor_parallel_size:
                raise ConfigError(f"sampler.devices={list(self.devices)} lists {len(self.devices)} GPUs but "
                                  f"sampler.tensor_parallel_size={self.tensor_parallel_size}: give one GPU per "
                                  f"tensor-parallel rank")

    def settings(self, samples_per_prompt: int, seed: int, *, logprobs: bool = True):
        """The `SamplingSettings` of this section for one generate call (`logprobs=False`: tokens only)."""
        from jaxrl_fp16.sampling import SamplingSettings

        return SamplingSettings(max_new_tokens=self.max_new_tokens, samples_per_prompt=samples_per_prompt,
                                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=seed,
                                logprobs=logprobs)

    def engine_options(self) -> EngineOptions:
        """The typed options of engine `name` that this section sets (`create_sampler(..., options=...)`)."""
        if self.name == "vllm":
            from jaxrl_fp16.sampling.options import default_max_model_len

            return VLLMOptions(tensor_parallel_size=self.tensor_parallel_size,
                               max_model_len=self.max_model_len or default_max_model_len(self.max_new_tokens),
                               gpu_memory_utilization=self.gpu_memory_utilization, enforce_eager=self.enforce_eager,
                               max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                               enable_prefix_caching=self.enable_prefix_caching,
                               devices=None if self.devices is None else tuple(self.devices))
        if self.name == "transformers":
            return TransformersOptions(max_batch_size=self.max_batch_size)
        return JaxOptions(max_batch_size=self.max_batch_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimSection:
    """AdamW; the reference run: lr 1e-6, betas (0.9, 0.95), eps 1e-15, no weight decay, clip 1.0."""

    lr: float = 1e-6
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-15
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    warmup_steps: int = 0

    def __post_init__(self):
        _check_fields(self, "optim")
        _positive("optim", lr=self.lr)
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        _non_negative("optim", eps=self.eps, weight_decay=self.weight_decay, warmup_steps=self.warmup_steps)
        if self.max_grad_norm is not None:
            _positive("optim", max_grad_norm=self.max_grad_norm)


LOSS_SCALE_KINDS = ("auto", "dynamic", "static", "none")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossScaleSection:
    """`auto`: dynamic scaling when the compute dtype is float16 or `model.emulate` has at most 5 exponent bits
    (e5m10, e5m2, e4m3: gradients underflow as in FP16), none otherwise (PyTorch GradScaler's defaults but growth
    every 400 steps, as in the reference runs)."""

    kind: str = "auto"
    init_scale: float = 2.0 ** 16
    period: int = 400
    factor: float = 2.0
    min_scale: float = 1.0
    max_scale: float = 2.0 ** 24

    def __post_init__(self):
        _check_fields(self, "loss_scale")
        if self.kind not in LOSS_SCALE_KINDS:
            raise ConfigError(f"loss_scale.kind={self.kind!r}; valid: {', '.join(LOSS_SCALE_KINDS)}")
        _positive("loss_scale", init_scale=self.init_scale, period=self.period, min_scale=self.min_scale,
                  max_scale=self.max_scale)
        for name in ("init_scale", "min_scale", "max_scale", "factor"):
            if getattr(self, name) > _FLOAT32_MAX:  # the loss scale state is float32
                raise ConfigError(f"loss_scale.{name}={getattr(self, name)} overflows float32 (max "
                                  f"{_FLOAT32_MAX:.4g})")
        if self.period > _INT32_MAX:
            raise ConfigError(f"loss_scale.period={self.period} overflows int32 (max {_INT32_MAX})")
        if self.kind in ("auto", "dynamic"):  # auto is dynamic for float16 compute
            if not self.factor > 1:
                raise ConfigError(f"loss_scale.factor must be > 1 for a dynamic loss scale (loss_scale.kind="
                                  f"{self.kind}), got {self.factor}")
            if not self.min_scale <= self.init_scale <= self.max_scale:
                raise ConfigError(f"loss_scale: need min_scale <= init_scale <= max_scale for a dynamic loss scale "
                                  f"(loss_scale.kind={self.kind}), got loss_scale.min_scale={self.min_scale}, "
                                  f"loss_scale.init_scale={self.init_scale}, loss_scale.max_scale={self.max_scale}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection:
    iterations: int = 50
    prompts_per_iteration: int = 64
    samples_per_prompt: int = 8
    minibatches_per_iteration: int = 4  # optimizer steps per iteration
    microbatches: int = 1  # gradient accumulation inside each optimizer step
    normalize_advantage_std: bool = False
    score_memory_gib: float = 2.0  # activation budget of one batch of the trainer's scorer (`scoring.score_rows`)

    def __post_init__(self):
        _check_fields(self, "train")
        _positive("train", iterations=self.iterations, prompts_per_iteration=self.prompts_per_iteration,
                  samples_per_prompt=self.samples_per_prompt,
                  minibatches_per_iteration=self.minibatches_per_iteration, microbatches=self.microbatches,
                  score_memory_gib=self.score_memory_gib)
        rows = self.prompts_per_iteration * self.samples_per_prompt
        if rows % self.minibatches_per_iteration:
            raise ConfigError(f"train: prompts_per_iteration x samples_per_prompt = {rows} rows do not split into "
                              f"minibatches_per_iteration={self.minibatches_per_iteration}")
        if (rows // self.minibatches_per_iteration) % self.microbatches:
            raise ConfigError(f"train: a mini-batch of {rows // self.minibatches_per_iteration} rows does not "
                              f"split into microbatches={self.microbatches}")


EXPORT_DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    every: int = 10  # iterations between checkpoints (and at the end)
    keep: int = 3
    export_hf: bool = True  # write a Hugging Face directory at the end
    export_dtype: str = "float32"

    def __post_init__(self):
        _check_fields(self, "checkpoint")
        _positive("checkpoint", every=self.every, keep=self.keep)
        if self.export_dtype not in EXPORT_DTYPES:
            raise ConfigError(f"checkpoint.export_dtype={self.export_dtype!r}; valid: {', '.join(EXPORT_DTYPES)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogSection:
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        _check_fields(self, "log")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSection:
    """The device mesh the trainer shards over (`jaxrl_fp16.sharding`): data x fsdp x tensor devices, all of
    them (over all processes) together. One size may be -1: the rest of the devices (default: all on data)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        _check_fields(self, "mesh")
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            if size < 1 and size != -1:
                raise ConfigError(f"mesh.{name}={size}: a mesh size is an integer >= 1, or -1 for the rest")
        rest = [f"mesh.{name}" for name, size in sizes.items() if size == -1]
        if len(rest) > 1:
            raise ConfigError(f"{' and '.join(rest)} are both -1; at most one mesh size may be the rest")

    def shape(self, num_devices: int) -> dict[str, int]:
        """The axis sizes for `num_devices` devices; a ConfigError names the keys when they do not fit."""
        from jaxrl_fp16.sharding import resolve_mesh_shape

        try:
            return resolve_mesh_shape(num_devices, self.data, self.fsdp, self.tensor)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedSection:
    """Several processes (hosts) in one run: JAX's distributed runtime, started before any JAX computation.
    Unset keys come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, else from JAX's cluster
    detection (SLURM, Open MPI, Kubernetes, Cloud TPU)."""

    enabled: bool = False
    coordinator_address: Optional[str] = None  # "host:port" of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None

    def __post_init__(self):
        _check_fields(self, "distributed")
        given = [k for k in ("coordinator_address", "num_processes", "process_id") if getattr(self, k) is not None]
        if given and not self.enabled:
            raise ConfigError(f"distributed.{given[0]} is set but distributed.enabled=false; set "
                              f"distributed.enabled=true to start several processes")
        if self.num_processes is not None and self.num_processes < 1:
            raise ConfigError(f"distributed.num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and (self.process_id < 0 or (
                self.num_processes is not None and self.process_id >= self.num_processes)):
            raise ConfigError(f"distributed.process_id={self.process_id} must be in [0, num_processes="
                              f"{self.num_processes})")
        address = self.coordinator_address
        if address is not None and not address.rpartition(":")[2].isdigit():
            raise ConfigError(f"distributed.coordinator_address={address!r} must be host:port")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DebugSection:
    inject_overflow_steps: list[int] = dataclasses.field(default_factory=list)  # optimizer steps made non-finite
    # GPU run-to-run determinism: XLA's --xla_gpu_deterministic_ops=true and vLLM's VLLM_BATCH_INVARIANT=1
    # (jaxrl_fp16._xla_flags.enable_deterministic; set before JAX starts). Slower; nothing changes on a CPU.
    deterministic: bool = False

    def __post_init__(self):
        _check_fields(self, "debug")
        if any(step < 0 for step in self.inject_overflow_steps):
            raise ConfigError(f"debug.inject_overflow_steps are optimizer steps (>= 0), got "
                              f"{list(self.inject_overflow_steps)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOSection:
    """Offline preference optimisation (`jaxrl-fp16 dpo`) on pairs made from the task's problems (the correct
    answer against a near miss); the frozen reference is the base model. `precision`, `optim`, `loss_scale` and
    `checkpoint` (its `every` counts optimizer steps) are shared with RL training."""

    loss_type: str = "sigmoid"  # sigmoid (DPO, cDPO with label_smoothing) or ipo
    beta: float = 0.1
    label_smoothing: float = 0.0
    num_pairs: int = 2048  # training pairs; the data cycles through per-epoch permutations
    eval_pairs: int = 256  # held-out pairs (prompts never trained on)
    steps: int = 200  # optimizer steps
    batch_size: int = 32  # pairs per optimizer step
    microbatches: int = 1  # gradient accumulation inside each step
    eval_every: int = 20  # steps between held-out evaluations (also at the start and the end)
    seed: int = 0  # pair generation and data order

    def __post_init__(self):
        _check_fields(self, "dpo")
        _positive("dpo", num_pairs=self.num_pairs, eval_pairs=self.eval_pairs, steps=self.steps,
                  batch_size=self.batch_size, microbatches=self.microbatches, eval_every=self.eval_every)
        if self.batch_size % self.microbatches:
            raise ConfigError(f"dpo.batch_size={self.batch_size} does not split into "
                              f"dpo.microbatches={self.microbatches}")
        try:
            self.loss_config()
        except ValueError as e:
            raise ConfigError(f"dpo.{e}") from None

    def loss_config(self):
        """The `DPOLossConfig` of this section."""
        from jaxrl_fp16.rl.dpo import DPOLossConfig

        return DPOLossConfig(loss_type=self.loss_type, beta=self.beta, label_smoothing=self.label_smoothing)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRASection:
    """Low-rank adapters (`jaxrl_fp16.lora`): only the adapters train (FP32 masters), the base stays frozen in the
    compute dtype; targets are Hugging Face module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    down_proj). The run config's `lora: null` (the default) trains every parameter."""

    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self):
        _check_fields(self, "lora")
        self.spec()  # validates rank, alpha and the target names

    def spec(self):
        """The `lora.LoRASpec` of this section."""
        from jaxrl_fp16.lora import LoRASpec

        return LoRASpec(rank=self.rank, alpha=self.alpha, targets=tuple(self.targets))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    precision: str = "fp16-mixed"
    seed: int = 0
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    task: TaskSection = dataclasses.field(default_factory=TaskSection)
    perfectible: PerfectibleSection = dataclasses.field(default_factory=PerfectibleSection)
    sampler: SamplerSection = dataclasses.field(default_factory=SamplerSection)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    critic: CriticConfig = dataclasses.field(default_factory=CriticConfig)  # PPO's value model and GAE
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    loss_scale: LossScaleSection = dataclasses.field(default_factory=LossScaleSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)
    debug: DebugSection = dataclasses.field(default_factory=DebugSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)
    dpo: DPOSection = dataclasses.field(default_factory=DPOSection)
    lora: Optional[LoRASection] = None  # adapters only; null: full fine-tuning

    def __post_init__(self):
        from jaxrl_fp16.precision import as_dtype

        _check_fields(self, "")
        _check_fields(self.loss, "loss")  # sections defined with their algorithms check their own ranges
        _check_fields(self.critic, "critic")
        _check_policy("precision", self.precision)
        if self.critic.enabled and self.loss.algorithm == "gspo":
            raise ConfigError("critic.enabled=true gives per-token advantages, but loss.algorithm=gspo takes one "
                              "per sequence; use a token-level loss (grpo is PPO-clip)")
        if self.train.samples_per_prompt < 2 and not self.critic.enabled:
            raise ConfigError(f"train.samples_per_prompt={self.train.samples_per_prompt}: the group advantages "
                              f"(a reward minus its prompt's mean) need >= 2 samples per prompt, else every "
                              f"advantage is 0 and nothing trains; raise it, or use PPO's GAE (critic.enabled=true)")
        s = self.sampler
        compute = self.policy.compute_dtype
        if s.dtype is not None and as_dtype(s.dtype) != compute and not s.allow_dtype_mismatch:
            raise ConfigError(f"sampler.dtype={s.dtype} differs from the compute dtype of precision={self.precision} "
                              f"({np.dtype(compute).name}): the rollout policy would not be the training policy; "
                              f"set sampler.allow_dtype_mismatch=true to study the mismatch")
        if self.model.emulate is not None and np.dtype(compute) != np.float32:
            raise ConfigError(f"model.emulate={self.model.emulate} needs a float32 compute dtype (the emulated format "
                              f"is carried in FP32), but precision={self.precision} computes in "
                              f"{np.dtype(compute).name}; set precision=fp32")
        if self.model.emulate is not None and s.name not in ("jax",):
            raise ConfigError(f"model.emulate={self.model.emulate}: only the JAX sampler (sampler.name=jax) can "
                              f"run an emulated format; sampler.name={s.name} computes in real dtypes")
        context = self.model.tiny.max_position_embeddings
        if self.model.path is None and s.max_new_tokens >= context:
            raise ConfigError(f"sampler.max_new_tokens={s.max_new_tokens} leaves no room for a prompt in the tiny "
                              f"model's context (model.tiny.max_position_embeddings={context})")

    @property
    def policy(self):
        return get_policy(self.precision)


def _check_policy(key: str, value: str) -> None:
    try:
        get_policy(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def _schema():
    schema = OmegaConf.structured(RunConfig)
    OmegaConf.set_readonly(schema, False)
    return schema


def _section_keys(schema, dotted: str) -> list[str]:
    node = schema
    for part in [p for p in dotted.split(".") if p]:
        if part not in node:
            return sorted(str(k) for k in node.keys())
        child = node[part]
        if child is None and dataclasses.is_dataclass(node._get_node(part)._metadata.ref_type):
            # An optional section left null (e.g. `lora`): its keys are its dataclass's fields.
            child = OmegaConf.structured(node._get_node(part)._metadata.ref_type)
        node = child
    return sorted(str(k) for k in node.keys()) if OmegaConf.is_dict(node) else []


def _schema_type(dotted: str) -> Any:
    """The annotated type of a dotted `RunConfig` key (None where it is no dataclass field, e.g. a task option)."""
    tp: Any = RunConfig
    for part in dotted.split("[")[0].split("."):
        tp = _unwrap_optional(tp)[0]
        if not dataclasses.is_dataclass(tp):
            return None
        tp = _field_types(tp).get(part)
    return tp


def _bad_value(key: str, message: str) -> ConfigError:
    tp = _schema_type(key)
    expected = f" (expected {_describe(tp)})" if tp is not None else ""
    return ConfigError(f"bad value for config key {key!r}: {message}{expected}")


def _first_line(e: BaseException) -> str:
    return str(getattr(e, "msg", None) or e).strip().splitlines()[0]


def _resolver_names(text: str) -> list[str]:
    """The resolvers a string value calls (['oc.env'] for '${oc.env:HOME}'); [] for plain `${key}` references."""
    from omegaconf import grammar_parser
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

    names = []

    def walk(node):
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            names.append(node.resolverName().getText())
        for child in getattr(node, "children", None) or ():
            walk(child)

    walk(grammar_parser.parse(text))
    return names


def _refuse_resolvers(value: Any, key: str = "") -> None:
    """Refuses resolver interpolations anywhere in an unresolved config container, naming the key."""
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_resolvers(v, _join(key, str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_resolvers(v, f"{key}[{i}]")
    elif isinstance(value, str) and "${" in value:
        try:
            names = _resolver_names(value)
        except GrammarParseError as e:
            raise ConfigError(f"{key}={value!r} is not a valid interpolation: {_first_line(e)}") from None
        if names:
            raise ConfigError(f"{key}={value!r} calls the resolver {names[0]!r}: resolvers (${{oc.env:...}}, "
                              f"${{name:...}}) are refused, since the resolved config is written to the run folder; "
                              f"write the value, or reference another key as ${{section.key}}")


def _load_yaml_layers(path: str | os.PathLike, seen: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """(path, config) of the YAML file and, first, of the files it names in its top-level `base:` key (relative
    to it)."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"config files include each other: {' -> '.join(seen + (path,))}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        layer = OmegaConf.load(path)  # a safe YAML loader: python tags (!!python/...) are refused
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_first_line(e)}") from None
    if not OmegaConf.is_dict(layer):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    base = layer.pop("base", None)
    bases = [] if base is None else [base] if isinstance(base, str) else list(base)
    layers = []
    for b in bases:
        layers += _load_yaml_layers(os.path.join(os.path.dirname(path), b), seen + (path,))
    return layers + [(path, layer)]


def _parse_overrides(overrides: Sequence[str]):
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r} is not a valid YAML value: {_first_line(e)}") from None
    return OmegaConf.from_dotlist(list(overrides))


def _merge_error(base, source: str, overrides: Sequence[str], e: OmegaConfBaseException) -> ConfigError:
    """A merge error that names no key: name the override at fault, or the file."""
    if source == "overrides":
        for item in overrides:
            try:
                OmegaConf.merge(base, OmegaConf.from_dotlist([item]))
            except OmegaConfBaseException as item_error:
                key = item.partition("=")[0]
                return _bad_value(key, f"override {item!r}: {_first_line(item_error)}")
    return ConfigError(f"bad config in {source}: {_first_line(e)}")


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads a YAML run config (or the defaults when `path` is None) and applies dotted `key=value` overrides.

    A config file may start from others: a top-level `base: other.yaml` (or a list) is merged first.
    """
    schema = _schema()
    try:
        layers = _load_yaml_layers(path) if path is not None else []
        layers.append(("overrides", _parse_overrides(overrides)))
        merged = schema
        for source, layer in layers:
            try:
                merged = OmegaConf.merge(merged, layer)
            except OmegaConfBaseException as e:
                if isinstance(e, ConfigKeyError) or getattr(e, "full_key", None):
                    raise
                raise _merge_error(merged, source, overrides, e) from None
        _refuse_resolvers(OmegaConf.to_container(merged, resolve=False))
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        parent = str(e.full_key or "").rpartition(".")[0]
        valid = _section_keys(schema, parent)
        raise ConfigError(f"unknown config key {e.full_key!r}; valid keys here: {', '.join(valid)}") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise (_bad_value(key, _first_line(e)) if key else ConfigError(f"bad config: {_first_line(e)}")) from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
