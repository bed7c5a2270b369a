"""Group-relative (GRPO) advantages, pure jax.numpy; `check_rewards` is the host-side guard jitted code cannot be.

Rows [g K, (g + 1) K) of the rewards are the K = group_size samples of prompt g:

    A_i = r_i - mean_{j in group(i)} r_j                                  normalize_std=False (the reference runs)
    A_i = (r_i - mean_{j in group(i)} r_j) / (std_{j in group(i)} r_j + eps)   normalize_std=True

The group std is the sample standard deviation (ddof = 1), as in the common GRPO implementations; a group of one
sample has advantage 0 either way. The advantages are float32 whatever the reward dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_rewards", "group_advantages"]


def check_rewards(rewards) -> np.ndarray:
    """Raises ValueError naming the rows of non-finite rewards (or a non-1-D shape); returns them as a host array."""
    rewards_N = np.asarray(rewards)
    if rewards_N.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {rewards_N.shape}")
    bad = np.flatnonzero(~np.isfinite(rewards_N))
    if bad.size:
        shown = ", ".join(f"row {i}: {rewards_N[i]}" for i in bad[:8])
        more = f" (and {bad.size - 8} more)" if bad.size > 8 else ""
        raise ValueError(f"{bad.size} non-finite reward(s): {shown}{more}")
    return rewards_N


def group_advantages(rewards_N: jax.Array, group_size: int, *, normalize_std: bool = False,
                     eps: float = 1e-6) -> jax.Array:
    """GRPO advantages: each reward minus its group's mean, optionally divided by the group std + eps.

    Args:
      rewards_N: [N] rewards; rows of one group are consecutive. Non-finite rewards propagate (call
        `check_rewards` on the host first).
      group_size: K, the samples per prompt; N must be a multiple of it.
      normalize_std: divide by the group's sample std (ddof = 1) plus `eps`.
      eps: added to the std before dividing.

    Returns:
      [N] float32 advantages.
    """
    shape = jnp.shape(rewards_N)
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if len(shape) != 1 or shape[0] % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a length divisible by group_size={group_size}, got shape {shape}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    rewards_GxK = jnp.asarray(rewards_N, jnp.float32).reshape(-1, group_size)
    centred_GxK = rewards_GxK - jnp.mean(rewards_GxK, axis=-1, keepdims=True)
    if normalize_std and group_size > 1:
        std_Gx1 = jnp.sqrt(jnp.sum(centred_GxK * centred_GxK, axis=-1, keepdims=True) / (group_size - 1))
        centred_GxK = centred_GxK / (std_Gx1 + eps)
    return centred_GxK.reshape(shape)
