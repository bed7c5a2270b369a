"""jaxrl_fp16: RL fine-tuning of LLMs in JAX that defeats the training-inference mismatch with FP16."""

from jaxrl_fp16 import _xla_flags  # noqa: F401  (must run before JAX starts its backends)
from jaxrl_fp16.loss_scale import DynamicLossScale, NoOpLossScale, StaticLossScale, all_finite, select_tree
from jaxrl_fp16.mismatch import METRIC_NAMES, mismatch_metrics
from jaxrl_fp16.models.config import ModelConfig, Numerics
from jaxrl_fp16.models.decoder import CausalLM, token_logprobs
from jaxrl_fp16.models.hf import load_hf_params, save_hf_params
from jaxrl_fp16.precision import Policy, get_policy
from jaxrl_fp16.sampling import JaxSampler, Rollout, Sampler, SamplingSettings, create_sampler
from jaxrl_fp16.scoring import Scorer
from jaxrl_fp16.step import TrainState, make_train_step

__version__ = "0.1.0"

__all__ = [
    "CausalLM", "DynamicLossScale", "JaxSampler", "METRIC_NAMES", "ModelConfig", "NoOpLossScale", "Numerics",
    "Policy", "Rollout", "Sampler", "SamplingSettings", "Scorer", "StaticLossScale", "TrainState", "all_finite",
    "create_sampler", "get_policy", "load_hf_params", "make_train_step", "mismatch_metrics", "save_hf_params",
    "select_tree", "token_logprobs",
]
