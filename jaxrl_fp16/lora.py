"""Low-rank adapters (LoRA) on chosen projections, trained through the one mixed-precision step.

    trainable  adapters {A [L, in, r], B [L, r, out]} per target, FP32 masters (TrainState, checkpoints)
    frozen     the base model in the compute dtype, passed to the step as an argument (never differentiated)
    W_merged = W + (alpha / rank) * B @ A          (HF layout; Flax kernel: W + A @ (scale * B)), in FP32

Targets are named as Hugging Face modules (`q_proj`, `v_proj`, `gate_proj`, ...); the valid names come from
the HF name table, so they cannot drift from the model. Layers are stacked under `nn.scan`, and so are the
adapters: a leading layer axis on A and B, one adapter per layer. A is random (seeded, PEFT's default
kaiming-uniform bound 1/sqrt(in)), B is zero, so a fresh adapter leaves the model unchanged.

The trainer's forward uses the merged weight, not the unmerged sum x W + s x A B: it merges the frozen base and
the adapters (both as the step hands them over, in the compute dtype) in FP32 and rounds the result once to the
compute dtype. The sampler receives the same FP32 merge and rounds it the same way, so the rollout policy and
the training policy run on bit-identical weights, as in full fine-tuning. The cost is one transient merged
copy of each targeted kernel (and its gradient) per step. A consequence: an update smaller than half a unit in
the last place of the compute dtype does not change the merged weight (gradients still reach the adapters
through the cast), so in BF16 the policy moves in coarser steps than its FP32 adapters. Export merges the FP32
masters into the FP32 base checkpoint (not its compute-dtype copy).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.models.hf_table import HF_TABLE, expected_params_shapes
from jaxrl_fp16.precision import Policy
from jaxrl_fp16.validation import ConfigError, check_fields

__all__ = ["LORA_TARGETS", "LoRASection", "LoRASpec", "LoRA", "target_paths", "init_adapters", "merge_params",
           "export_params", "adapter_count"]

_A, _B = "lora_a", "lora_b"


def _linear_targets() -> dict[str, tuple[str, ...]]:
    """HF module name -> path of its kernel in the Flax tree, for every per-layer linear projection."""
    out = {}
    for row in HF_TABLE:
        if row.per_layer and row.transpose and row.hf.endswith(".weight"):
            out[row.hf.split(".")[-2]] = row.path
    return out


_TARGET_PATHS = _linear_targets()
LORA_TARGETS: tuple[str, ...] = tuple(_TARGET_PATHS)


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Rank, alpha and target modules; `scale` = alpha / rank."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha!r}")
        target_paths(self.targets)  # validates the names

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRASection:
    """Low-rank adapters (`jaxrl_fp16.lora`): only the adapters train (FP32 masters), the base stays frozen in the
    compute dtype; targets are Hugging Face module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    down_proj). The run config's `lora: null` (the default) trains every parameter."""

    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self):
        check_fields(self, "lora")
        self.spec()  # validates rank, alpha and the target names

    def spec(self) -> LoRASpec:
        """The `LoRASpec` of this section."""
        return LoRASpec(rank=self.rank, alpha=self.alpha, targets=tuple(self.targets))


def target_paths(targets: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Kernel paths (layers stacked) of the targeted HF modules; unknown or repeated names raise ConfigError."""
    if len(targets) == 0:
        raise ConfigError(f"lora.targets is empty; valid: {', '.join(LORA_TARGETS)}")
    unknown = [t for t in targets if t not in _TARGET_PATHS]
    if unknown:
        raise ConfigError(f"lora.targets: unknown module(s) {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(LORA_TARGETS)}")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"lora.targets names a module twice: {list(targets)}")
    return {t: _TARGET_PATHS[t] for t in targets}


def _module(tree: Mapping, kernel_path: tuple[str, ...]) -> Any:
    for key in kernel_path[:-1]:
        tree = tree[key]
    return tree


def _with_leaf(tree: Mapping, path: tuple[str, ...], value: Any) -> dict:
    """A copy of `tree` with the leaf at `path` set (copies only the dicts along the path, creating missing ones)."""
    out = dict(tree)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = _with_leaf(tree.get(path[0], {}), path[1:], value)
    return out


def init_adapters(cfg: ModelConfig, spec: LoRASpec, seed: int) -> dict:
    """FP32 adapters for `cfg`: per target {lora_a [L, in, r] ~ U(+-1/sqrt(in)), lora_b [L, r, out] = 0}.

    A target's A depends only on (seed, target name), not on which other modules are targeted.
    """
    shapes = expected_params_shapes(cfg)
    tree: dict = {}
    for name, path in target_paths(spec.targets).items():
        L, fan_in, fan_out = _module(shapes, path)[path[-1]]
        key = jax.random.fold_in(jax.random.PRNGKey(seed), LORA_TARGETS.index(name))
        bound = 1.0 / np.sqrt(fan_in)
        a = jax.random.uniform(key, (L, fan_in, spec.rank), jnp.float32, -bound, bound)
        b = jnp.zeros((L, spec.rank, fan_out), jnp.float32)
        tree = _with_leaf(tree, path[:-1], {_A: a, _B: b})
    return tree


def adapter_count(adapters: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(adapters)))


def merge_params(base: Mapping, adapters: Mapping, spec: LoRASpec) -> dict:
    """`base` with every targeted kernel replaced by W + A @ (scale * B), computed in FP32 (HIGHEST precision).

    Other leaves are returned as they are (their own dtype). In HF layout the merged weight is
    W + scale * B @ A, the product formed with B already scaled (a product scaled afterwards would be contracted
    into an FMA). Reproducible to the bit for the same compiled code on the same CPU; against another library's
    matmul (numpy's) it agrees within FP32 rounding, as the kernels' summation order depends on the instruction
    set.
    """
    out = dict(base)
    scale = jnp.float32(spec.scale)
    for path in target_paths(spec.targets).values():
        module = _module(adapters, path)
        a, b = jnp.asarray(module[_A], jnp.float32), jnp.asarray(module[_B], jnp.float32)
        kernel = jnp.asarray(_module(base, path)[path[-1]], jnp.float32)
        merged = kernel + jnp.matmul(a, scale * b, precision=jax.lax.Precision.HIGHEST)
        out = _with_leaf(out, path, merged)
    return out


@functools.partial(jax.jit, static_argnames=("spec",))
def _merged_f32(base: Any, adapters: Any, spec: LoRASpec) -> Any:
    merged = merge_params(base, adapters, spec)
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), merged)


class LoRA:
    """What a LoRA run changes in the trainer: what is trained, what is frozen, what the sampler gets.

    Args:
      spec: rank, alpha, targets.
      cfg: the model config.
      base_params: the base model's FP32 parameters; kept only as the frozen compute-dtype copy.
      policy: the run's precision policy.
      seed: seeds A.
    """

    def __init__(self, spec: LoRASpec, cfg: ModelConfig, base_params: Any, policy: Policy, seed: int,
                 part: str | None = None):
        self.spec = spec
        self.cfg = cfg
        self.policy = policy
        self.seed = seed
        self.part = part
        self.frozen = jax.tree_util.tree_map(lambda x: jnp.asarray(x, policy.compute_dtype), base_params)

    @classmethod
    def for_run(cls, run: Any, cfg: ModelConfig, base_params: Any) -> "LoRA | None":
        """The LoRA of a `RunConfig` (None without a `lora` section). With PPO's critic the trainable tree is
        {"policy": adapters, "critic": ...}: the adapters sit under "policy", the critic trains in full."""
        if run.lora is None:
            return None
        return cls(run.lora.spec(), cfg, base_params, run.policy, run.seed,
                   part="policy" if run.critic.enabled else None)

    def init_adapters(self) -> dict:
        """The adapters at step 0 (FP32)."""
        return init_adapters(self.cfg, self.spec, self.seed)

    def trainable(self, full: Any) -> Any:
        """The tree the step trains, from the one full fine-tuning would train: the policy's params (under
        `part`, if set) replaced by fresh adapters."""
        return self.init_adapters() if self.part is None else {**full, self.part: self.init_adapters()}

    def wrap_loss(self, loss_fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any, Any], Any]:
        """`loss_fn(params, batch)` on full params -> `loss(trainable, batch, frozen)` for the train step.

        The step hands over the adapters in the compute dtype; the merged weights are formed in FP32 and cast
        once to the compute dtype (the rounding the sampler applies to `policy_params`), and take the adapters'
        place (the whole tree, or `part`) in the tree `loss_fn` gets.
        """
        spec, policy, part = self.spec, self.policy, self.part

        def loss(compute_trainable, batch, frozen):
            adapters = compute_trainable if part is None else compute_trainable[part]
            merged = policy.cast_to_compute(merge_params(frozen, adapters, spec))
            return loss_fn(merged if part is None else {**compute_trainable, part: merged}, batch)

        return loss

    def policy_params(self, adapters: Any) -> Any:
        """FP32 merged weights for the sampler and the scorer: equal, once cast to the compute dtype, to the
        weights the train step's forward uses."""
        return _merged_f32(self.frozen, self.policy.cast_to_compute(adapters), self.spec)

    def export_params(self, adapters: Any, base_f32: Any) -> Any:
        """FP32 merged weights of the FP32 masters into the FP32 base checkpoint, as numpy (for export)."""
        return export_params(adapters, base_f32, self.spec)


def export_params(adapters: Any, base_f32: Any, spec: LoRASpec) -> Any:
    """FP32 merge of FP32 adapters into an FP32 base, as numpy arrays."""
    return jax.device_get(_merged_f32(base_f32, adapters, spec))
