#!/usr/bin/env bash
# Runs the FP16 and the BF16 arm of one experiment, one after the other, into runs/<name>-fp16 and -bf16.
#   scripts/run_arms.sh configs/gpu/r1_distill_qwen_1p5b_math_fp16.yaml [key=value ...]
# The config's precision is overridden per arm; everything else (model, prompts, seed) is shared.
# Add --resume to continue both arms from their last checkpoints.
set -euo pipefail
config=${1:?usage: scripts/run_arms.sh CONFIG [key=value ...] [--resume]}
shift
name=$(basename "${config%.yaml}")
name=${name%_fp16}
name=${name%_bf16}
JAXRL=${JAXRL:-jaxrl-fp16}
for arm in fp16 bf16; do
  if [ "$arm" = fp16 ]; then precision=fp16-mixed; scale=dynamic; else precision=bf16-mixed; scale=none; fi
  "$JAXRL" train "$config" --run-dir "runs/${name}-${arm}" "precision=${precision}" "loss_scale.kind=${scale}" "$@"
done
