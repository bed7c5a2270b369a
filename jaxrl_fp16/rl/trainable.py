"""The tree an RL run trains, in its four variants, and the loss the update step differentiates.

    variant      trained tree                                  policy params (sampled, scored, exported)
    full         the policy's params                           the tree
    PPO          {"policy": params, "critic": critic}          tree["policy"]
    LoRA         the adapters (base frozen, compute dtype)     base + adapters merged
    LoRA + PPO   {"policy": adapters, "critic": critic}        base + tree["policy"] merged

`Trainable` is the one place that knows the variants: the trainer, `export_checkpoint` and the memory plan ask it
for the initial tree, the policy's weights, the exported policy and the step's loss (`rl_loss` wrapped for LoRA);
`make_rl_step` is the update step the trainer runs and the plan compiles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax

from jaxrl_fp16 import multiprocess
from jaxrl_fp16.config import RunConfig
from jaxrl_fp16.lora import LoRA
from jaxrl_fp16.models.config import ModelConfig
from jaxrl_fp16.models.decoder import CausalLM, token_logprobs
from jaxrl_fp16.rl import ppo
from jaxrl_fp16.rl.losses import LossInputs, compute_loss
from jaxrl_fp16.step import make_train_step

__all__ = ["Trainable", "make_rl_step", "rl_loss"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Trainable:
    """What a run trains: the policy in full or as LoRA adapters (`lora`), with PPO's critic beside it (`critic`).

    Args:
      critic: PPO: the tree is {"policy": ..., "critic": ...}.
      lora: the run's adapters (None: full fine-tuning); its `part` is "policy" exactly when `critic` is set.
    """

    critic: bool = False
    lora: LoRA | None = None

    def __post_init__(self):
        if self.lora is not None and self.lora.part != ("policy" if self.critic else None):
            raise ValueError(f"LoRA part {self.lora.part!r} does not match critic={self.critic} (the adapters sit "
                             f"under 'policy' exactly when PPO's critic trains beside them)")

    @classmethod
    def for_run(cls, run: RunConfig, cfg: ModelConfig, base_params: Any) -> "Trainable":
        """The variant of `run` (`critic.enabled`, `lora`); LoRA keeps `base_params` as its frozen base."""
        return cls(critic=run.critic.enabled, lora=LoRA.for_run(run, cfg, base_params))

    @property
    def frozen(self) -> Any:
        """LoRA's frozen base in the compute dtype, the step's `frozen` argument (None without LoRA)."""
        return None if self.lora is None else self.lora.frozen

    def init(self, params: Any) -> Any:
        """The tree the step trains at step 0, from the base model's `params`."""
        tree = ppo.init_params(params) if self.critic else params
        return tree if self.lora is None else self.lora.trainable(tree)

    def policy_params(self, tree: Any) -> Any:
        """The policy's part of a (trained or compute-dtype) tree: its params, or with LoRA its adapters."""
        return ppo.policy_params(tree) if self.critic else tree

    def critic_params(self, tree: Any) -> Any:
        """The critic's part of a tree (None without PPO)."""
        return tree["critic"] if self.critic else None

    def policy_weights(self, tree: Any) -> Any:
        """The policy's FP32 weights as the sampler and the scorer take them (LoRA: base and adapters merged)."""
        params = self.policy_params(tree)
        return params if self.lora is None else self.lora.policy_params(params)

    def exported(self, tree: Any, base: Any = None) -> Any:
        """The policy's FP32 weights for export, on the host; LoRA: the FP32 adapters merged into the FP32 `base`.
        Several processes: gathered by all (collectives), one tensor at a time."""
        params = self.policy_params(tree)
        if self.lora is not None and base is None:
            raise ValueError("a LoRA export needs the FP32 base params to merge the adapters into (base=None)")
        return multiprocess.host_tree(params if self.lora is None else self.lora.export_params(params, base))

    def step_loss(self, loss_fn: Callable[[Any, Any], Any]) -> Callable[..., Any]:
        """`loss_fn(compute_tree, batch)` on the full tree -> the loss `make_train_step` differentiates (LoRA:
        `loss(adapters_tree, batch, frozen)` with the merged policy in the adapters' place)."""
        return loss_fn if self.lora is None else self.lora.wrap_loss(loss_fn)


def rl_loss(trainable: Trainable, run: RunConfig, model: CausalLM, compute_params: Any,
            batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The RL loss of a mini-batch on the full tree in the compute dtype: the policy loss (`run.loss`) on the
    policy's token log-probs, plus PPO's value loss on the critic (`run.critic`)."""
    logp = token_logprobs(model, trainable.policy_params(compute_params), batch["tokens"], batch["attention_mask"],
                          temperature=run.sampler.temperature)
    adv = batch["advantages"]  # [B] (group advantages) or [B, T] (PPO's GAE)
    inputs = LossInputs(logp_BxT=logp, old_logp_BxT=batch["old_logp"], sampler_logp_BxT=batch["sampler_logp"],
                        mask_BxT=batch["response_mask"],
                        **({"advantages_BxT": adv} if adv.ndim == 2 else {"advantages_B": adv}))
    loss, diag = compute_loss(run.loss, inputs)
    if trainable.critic:
        value_term, value_diag = ppo.value_loss_term(model, trainable.critic_params(compute_params), batch,
                                                     run.critic, run.loss.aggregation, run.loss.max_response_len)
        loss, diag = loss + value_term, {**diag, **value_diag}
    return loss, diag


def make_rl_step(trainable: Trainable, run: RunConfig, model: CausalLM, optimizer: Any, *, state_sharding: Any,
                 batch_sharding: Any) -> Callable[..., Any]:
    """The run's jitted update step over `rl_loss` (`step.make_train_step`, the state donated); PPO clips each
    group's gradient in its optimizer, so the step's own clipping is off."""
    return make_train_step(trainable.step_loss(functools.partial(rl_loss, trainable, run, model)), optimizer,
                           run.policy, max_grad_norm=None if run.critic.enabled else run.optim.max_grad_norm,
                           num_microbatches=run.train.microbatches, donate=True, state_sharding=state_sharding,
                           batch_sharding=batch_sharding)
