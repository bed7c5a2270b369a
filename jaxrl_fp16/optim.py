"""The run config's `optim` section and the optax optimizer it builds (RL and DPO training)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import optax

from jaxrl_fp16.rl import ppo
from jaxrl_fp16.validation import ConfigError, check_fields, check_non_negative, check_positive

__all__ = ["OptimSection"]


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
        check_fields(self, "optim")
        check_positive("optim", lr=self.lr)
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        check_non_negative("optim", eps=self.eps, weight_decay=self.weight_decay, warmup_steps=self.warmup_steps)
        if self.max_grad_norm is not None:
            check_positive("optim", max_grad_norm=self.max_grad_norm)

    def build(self, critic: ppo.CriticConfig | None = None) -> optax.GradientTransformation:
        """AdamW with a linear warmup of `warmup_steps`; with an enabled `critic` (PPO), one transformation over
        {"policy", "critic"} that clips each group's gradients on its own (`ppo.make_optimizer`)."""
        lr = self.lr if self.warmup_steps == 0 else optax.linear_schedule(0.0, self.lr, self.warmup_steps)
        optimizer = optax.adamw(lr, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay)
        if critic is not None and critic.enabled:
            return ppo.make_optimizer(optimizer, critic, self.max_grad_norm)
        return optimizer
