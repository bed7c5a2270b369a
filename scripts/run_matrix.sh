#!/usr/bin/env bash
# The algorithm matrix at tiny scale, each algorithm in FP16 and BF16 (CPU; a few minutes per arm).
#   scripts/run_matrix.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
for config in configs/matrix/tiny_*.yaml; do
  scripts/run_arms.sh "$config" "$@"
done
