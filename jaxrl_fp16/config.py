"""The run config: typed, validated dataclasses composed from YAML with dotted `key=value` overrides.

One key, `precision` (a policy string such as `fp16-mixed`), sets the trainer's compute dtype and the sampler's.
Unknown keys, wrong types and bad values fail before any work, naming the key and the valid choices: every
section checks its own fields and `RunConfig` the rules across sections, so whatever the trainers later build
from the config (loss scale, optimizer, sampler, task) cannot fail on a config value.

Every float field holds a finite number: none takes inf to mean "no limit" (a disabled limit is null where the
key allows it, e.g. `optim.max_grad_norm`, `critic.value_clip`). Interpolations may reference other keys
(`${train.iterations}`), but resolvers (`${oc.env:VAR}`, any `${name:...}`) are refused: the resolved config is
written to the run folder, and a shared config must not copy the environment (secrets) there.

Each section is defined beside the code it configures and builds that code's object (`LossScaleSection.build` in
`loss_scale`, `OptimSection.build` in `optim`, `SamplerSection.engine_options` in `sampling.options`, ...); this
module composes them (`RunConfig`) and reads and writes YAML. `ConfigError` and the shared checks live in
`validation`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import numpy as np
import yaml
from omegaconf import OmegaConf, grammar_parser
from omegaconf.errors import ConfigKeyError, GrammarParseError, OmegaConfBaseException
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

from jaxrl_fp16.lora import LoRASection
from jaxrl_fp16.loss_scale import LossScaleSection
from jaxrl_fp16.models.config import Numerics
from jaxrl_fp16.optim import OptimSection
from jaxrl_fp16.precision import as_dtype, get_policy
from jaxrl_fp16.rl.dpo import DPOSection
from jaxrl_fp16.rl.losses import LossConfig
from jaxrl_fp16.rl.ppo import CriticConfig
from jaxrl_fp16.rl.prompts import PerfectibleSection
from jaxrl_fp16.rl.sft import ModelSection, SFTSection, TinyModelConfig
from jaxrl_fp16.rl.tasks import TaskSection
from jaxrl_fp16.sampling.options import SamplerSection
from jaxrl_fp16.topology import DistributedSection, MeshSection
from jaxrl_fp16.validation import (ConfigError, call_checked, check_fields, check_non_negative, check_positive,
                                   describe_type, field_types, join_key, unwrap_optional)

__all__ = ["RunConfig", "TinyModelConfig", "ModelSection", "TaskSection", "PerfectibleSection", "SamplerSection",
           "OptimSection", "LossScaleSection", "TrainSection", "SFTSection", "CheckpointSection", "LogSection",
           "DebugSection", "DPOSection", "LoRASection", "MeshSection", "DistributedSection",
           "load_config", "to_yaml", "ConfigError"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection:
    iterations: int = 50
    prompts_per_iteration: int = 64
    samples_per_prompt: int = 8
    minibatches_per_iteration: int = 4  # optimizer steps per iteration
    microbatches: int = 1  # gradient accumulation inside each optimizer step
    normalize_advantage_std: bool = False
    score_memory_gib: float = 2.0  # activation budget of one batch of the trainer's scorer (`scoring.score_rows`)
    # every eval_every iterations (0: never), `eval/accuracy`: the prompt set's accuracy at eval_samples_per_prompt
    eval_every: int = 0
    eval_samples_per_prompt: int = 4

    def __post_init__(self):
        check_fields(self, "train")
        check_positive("train", iterations=self.iterations, prompts_per_iteration=self.prompts_per_iteration,
                       samples_per_prompt=self.samples_per_prompt,
                       minibatches_per_iteration=self.minibatches_per_iteration, microbatches=self.microbatches,
                       score_memory_gib=self.score_memory_gib, eval_samples_per_prompt=self.eval_samples_per_prompt)
        check_non_negative("train", eval_every=self.eval_every)
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
        check_fields(self, "checkpoint")
        check_positive("checkpoint", every=self.every, keep=self.keep)
        if self.export_dtype not in EXPORT_DTYPES:
            raise ConfigError(f"checkpoint.export_dtype={self.export_dtype!r}; valid: {', '.join(EXPORT_DTYPES)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogSection:
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        check_fields(self, "log")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DebugSection:
    inject_overflow_steps: list[int] = dataclasses.field(default_factory=list)  # optimizer steps made non-finite
    # GPU run-to-run determinism: XLA's --xla_gpu_deterministic_ops=true and vLLM's VLLM_BATCH_INVARIANT=1
    # (jaxrl_fp16._xla_flags.enable_deterministic; set before JAX starts). Slower; nothing changes on a CPU.
    deterministic: bool = False

    def __post_init__(self):
        check_fields(self, "debug")
        if any(step < 0 for step in self.inject_overflow_steps):
            raise ConfigError(f"debug.inject_overflow_steps are optimizer steps (>= 0), got "
                              f"{list(self.inject_overflow_steps)}")


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
        check_fields(self, "")
        check_fields(self.loss, "loss")  # sections defined with their algorithms check their own ranges
        check_fields(self.critic, "critic")
        call_checked("precision", get_policy, self.precision)
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

    def resolved_loss_scale_kind(self) -> str:
        """`loss_scale.kind` with `auto` resolved for the compute dtype and the `model.emulate` format."""
        return self.loss_scale.resolved_kind(self.policy.compute_dtype, self.model.numerics().float_format)

    def build_loss_scale(self):
        """The run's initial loss scale (`LossScaleSection.build`): one construction for RL, DPO and the plan."""
        return self.loss_scale.build(self.policy.compute_dtype, self.model.numerics().float_format)

    def build_optimizer(self):
        """The run's optimizer (`OptimSection.build`; PPO: per-group clipping over policy and critic)."""
        return self.optim.build(self.critic)

    def sampler_numerics(self) -> Numerics:
        """The JAX sampler's `Numerics`: the model's, with `sampler.fp32_ops` also in FP32."""
        return Numerics.from_overrides([*self.model.fp32_ops, *self.sampler.fp32_ops], emulate=self.model.emulate)


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
        tp = unwrap_optional(tp)[0]
        if not dataclasses.is_dataclass(tp):
            return None
        tp = field_types(tp).get(part)
    return tp


def _bad_value(key: str, message: str) -> ConfigError:
    tp = _schema_type(key)
    expected = f" (expected {describe_type(tp)})" if tp is not None else ""
    return ConfigError(f"bad value for config key {key!r}: {message}{expected}")


def _first_line(e: BaseException) -> str:
    return str(getattr(e, "msg", None) or e).strip().splitlines()[0]


def _resolver_names(text: str) -> list[str]:
    """The resolvers a string value calls (['oc.env'] for '${oc.env:HOME}'); [] for plain `${key}` references."""
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
            _refuse_resolvers(v, join_key(key, str(k)))
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


def config_from_dict(d: dict[str, Any], source: str) -> RunConfig:
    """A `RunConfig` from plain nested dicts (`to_yaml`'s form, e.g. a checkpoint's meta); `source` names it in
    errors."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(_schema(), OmegaConf.create(d)))
    except Exception as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"the config stored in {source} does not load: {line}") from None


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
