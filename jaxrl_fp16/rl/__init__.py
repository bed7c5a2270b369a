"""RL pieces: group and GAE advantages, the policy-gradient losses of the algorithms compared, PPO's critic."""

from jaxrl_fp16.rl.advantages import check_rewards, gae_advantages, group_advantages
from jaxrl_fp16.rl.losses import AGGREGATIONS, DIAG_NAMES, LOSSES, LossConfig, LossInputs, compute_loss
from jaxrl_fp16.rl.ppo import CriticConfig

__all__ = ["AGGREGATIONS", "CriticConfig", "DIAG_NAMES", "LOSSES", "LossConfig", "LossInputs", "check_rewards",
           "compute_loss", "gae_advantages", "group_advantages"]
