"""RL pieces: group advantages and the policy-gradient losses of the algorithms compared."""

from jaxrl_fp16.rl.advantages import check_rewards, group_advantages
from jaxrl_fp16.rl.losses import AGGREGATIONS, DIAG_NAMES, LOSSES, LossConfig, LossInputs, compute_loss

__all__ = ["AGGREGATIONS", "DIAG_NAMES", "LOSSES", "LossConfig", "LossInputs", "check_rewards", "compute_loss",
           "group_advantages"]
