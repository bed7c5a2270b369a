"""jaxrl_fp16: RL fine-tuning of LLMs in JAX that defeats the training-inference mismatch with FP16."""

from jaxrl_fp16 import _xla_flags  # noqa: F401  (must run before JAX starts its backends)
