"""Advantages, pure jax.numpy: group-relative (GRPO) and per-token GAE (PPO); `check_rewards` is the host-side
guard jitted code cannot be.

Rows [g K, (g + 1) K) of the rewards are the K = group_size samples of prompt g:

    A_i = r_i - mean_{j in group(i)} r_j                                  normalize_std=False (the reference runs)
    A_i = (r_i - mean_{j in group(i)} r_j) / (std_{j in group(i)} r_j + eps)   normalize_std=True

The group std is the sample standard deviation (ddof = 1), as in the common GRPO implementations; a group of one
sample has advantage 0 either way. The advantages are float32 whatever the reward dtype.

PPO's per-token advantages (`gae_advantages`, generalized advantage estimation) run backwards over the response
tokens of each row, with V = 0 after the last one (the episode ends with the response):

    delta_t = r_t + gamma V_{t'} - V_t          t' = the next response token of the row
    A_t     = delta_t + gamma lam A_{t'}        returns R_t = A_t + V_t
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_rewards", "gae_advantages", "group_advantages", "masked_whiten"]


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


def gae_advantages(rewards: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array, *, gamma: float = 1.0,
                   lam: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Per-token GAE advantages and returns (see the module docstring), one `lax.scan` backwards over time.

    The time axis of a row is its response tokens (where `mask_BxT` is set) in order; positions off the mask
    are skipped (the recursion passes over them), so the right-padded response layout of `sampling.base` and a
    left-padded prompt both work. Entries off the mask may hold anything (NaN, inf): they are replaced before
    any arithmetic.

    Args:
      rewards: [B] terminal rewards, credited to each row's last response token, or [B, T] per-token rewards.
      values_BxT: [B, T] the critic's V_t of the state before response token t (the same position convention
        as the log-probs).
      mask_BxT: [B, T] nonzero on response tokens.
      gamma: discount factor in [0, 1].
      lam: GAE's lambda in [0, 1] (1: Monte-Carlo returns minus V; 0: one-step TD errors).

    Returns:
      `(advantages_BxT, returns_BxT)`, float32, 0 off the mask.
    """
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    mask_BxT = jnp.asarray(mask_BxT).astype(bool)
    if mask_BxT.ndim != 2 or jnp.shape(values_BxT) != mask_BxT.shape:
        raise ValueError(f"values_BxT and mask_BxT must share one [B, T] shape, got {jnp.shape(values_BxT)} "
                         f"and {mask_BxT.shape}")
    values_BxT = jnp.where(mask_BxT, jnp.asarray(values_BxT, jnp.float32), 0.0)
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.shape == mask_BxT.shape[:1]:
        T = mask_BxT.shape[1]
        last_B = T - 1 - jnp.argmax(mask_BxT[:, ::-1], axis=-1)  # the last response token of each row
        is_last_BxT = (jnp.arange(T)[None, :] == last_B[:, None]) & mask_BxT
        rewards_BxT = jnp.where(is_last_BxT, rewards[:, None], 0.0)
    elif rewards.shape == mask_BxT.shape:
        rewards_BxT = jnp.where(mask_BxT, rewards, 0.0)
    else:
        raise ValueError(f"rewards must be [B] (terminal) or [B, T] (per token) with [B, T] = {mask_BxT.shape}, "
                         f"got shape {rewards.shape}")

    def step(carry, xs):
        next_value_B, next_adv_B = carry
        reward_B, value_B, valid_B = xs
        delta_B = reward_B + gamma * next_value_B - value_B
        adv_B = delta_B + (gamma * lam) * next_adv_B
        carry = (jnp.where(valid_B, value_B, next_value_B), jnp.where(valid_B, adv_B, next_adv_B))
        return carry, jnp.where(valid_B, adv_B, 0.0)

    zeros_B = jnp.zeros(mask_BxT.shape[:1], jnp.float32)
    _, adv_TxB = jax.lax.scan(step, (zeros_B, zeros_B), (rewards_BxT.T, values_BxT.T, mask_BxT.T), reverse=True)
    advantages_BxT = adv_TxB.T
    return advantages_BxT, jnp.where(mask_BxT, advantages_BxT + values_BxT, 0.0)


def masked_whiten(x_BxT: jax.Array, mask_BxT: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / (std + eps) over the entries where `mask_BxT` is set (population std); 0 elsewhere."""
    mask_BxT = jnp.asarray(mask_BxT).astype(bool)
    x_BxT = jnp.where(mask_BxT, jnp.asarray(x_BxT, jnp.float32), 0.0)
    count = jnp.maximum(jnp.sum(mask_BxT).astype(jnp.float32), 1.0)
    mean = jnp.sum(x_BxT) / count
    centred_BxT = jnp.where(mask_BxT, x_BxT - mean, 0.0)
    std = jnp.sqrt(jnp.sum(centred_BxT * centred_BxT) / count)
    return centred_BxT / (std + eps)
