"""Session-wide test fixtures, shared by the pytest-xdist workers and by the CLI processes tests start.

- One JAX persistent compilation cache for the session (`JAX_COMPILATION_CACHE_DIR`; `make test` sets it to a
  folder kept across runs, `.cache/jax-tests`, else one under the session's shared temporary folder): a program
  compiled once, by a worker, a `jaxrl-fp16` subprocess or an earlier run, is loaded instead of compiled again.
  The key covers the program, the JAX and XLA versions, the devices and XLA_FLAGS, so `make test-isa` and the
  8-device subprocess get their own entries, and a changed program is a new entry.
- `base_models`: each warm-started tiny base model is built once per session, in a shared folder, under a file
  lock (the first worker that needs it builds it, the others wait and reuse it). A test module asks for its own
  cache folder with the base model of its run config linked in, and passes it as `model.cache_dir`:

      @pytest.fixture(scope="module")
      def cache_dir(base_models, tmp_path_factory):
          run = load_config(CONFIG, ["model.warm_start.steps=300", ...])  # the keys that pick the base model
          return base_models.cache_dir(run, tmp_path_factory.mktemp("cache"))

      ... load_config(CONFIG, [f"model.cache_dir={cache_dir}", ...]) or `jaxrl-fp16 ... model.cache_dir=...`

  The base model is keyed as `jaxrl_fp16.rl.sft.ensure_base_model` keys it (`base_model_key`: `model.tiny`,
  `model.warm_start`, `task.name`, `task.options`, the forward's options), so modules whose configs agree on
  those keys share one build: test_trainer, test_lora and test_ppo (configs/tiny_fp16.yaml with a 300-step warm
  start) do. A CLI test (test_sanity's `jaxrl-fp16 sanity`) uses it the same way: load the run config the command builds
  (`load_config(jaxrl_fp16.tools.sanity.preset_path(), overrides)`), and give the command
  `model.cache_dir=<the folder returned>`; it shares the others' build when its warm start and task keys equal
  theirs. Each module gets its own folder (linking the shared build) because the prompt-set cache that runs
  write next to the base model is not safe for two processes writing the same file at once.
- `--compile-times=PATH`: each test's XLA compile seconds and wall seconds, written to PATH and summed by file
  (tests/compile_times.py).
- Collection order: the longest files first (`LONG_FILES`), so that `make test`'s two workers finish together.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import filelock  # installed with transformers (huggingface_hub) and torch
import pytest

from compile_times import (pytest_addoption, pytest_configure, pytest_runtest_protocol,  # noqa: F401 (hooks)
                           pytest_sessionfinish, pytest_terminal_summary, pytest_testnodedown)


# Programs that compile faster than this are not written to the cache (JAX's default is 1 s).
MIN_COMPILE_SECONDS = 0.0


def _shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's temporary folder every xdist worker sees (a worker's own base temp is below it)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return root / "shared"


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """The session's persistent compilation cache (in this process and in the subprocesses tests start): the
    folder in JAX_COMPILATION_CACHE_DIR when set (`make test` keeps one across runs), else one under the session's
    shared temporary folder. Every compiled program is written (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, unless
    set)."""
    import jax

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(_shared_root(tmp_path_factory) / "jax-cache")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    min_seconds = float(os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(MIN_COMPILE_SECONDS)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


@dataclasses.dataclass(frozen=True, kw_only=True)
class SharedBaseModels:
    """Base models built once per test session in `root` and linked into each caller's cache folder."""

    root: Path

    def build(self, run) -> str:
        """The shared directory of `run`'s base model, built on first use (one builder at a time per model)."""
        from jaxrl_fp16.rl.sft import base_model_key, ensure_base_model

        self.root.mkdir(parents=True, exist_ok=True)
        shared = dataclasses.replace(run, model=dataclasses.replace(run.model, path=None, cache_dir=str(self.root)))
        with filelock.FileLock(str(self.root / f"build-{base_model_key(run)}.lock")):
            return ensure_base_model(shared, progress=False)

    def cache_dir(self, run, cache_dir: str | os.PathLike) -> str:
        """`cache_dir` (created) holding `run`'s base model, a link to the shared build; `run`'s own
        `model.cache_dir` and `model.path` are ignored."""
        built = self.build(run)
        os.makedirs(cache_dir, exist_ok=True)
        link = os.path.join(cache_dir, os.path.basename(built))
        if not os.path.lexists(link):
            os.symlink(built, link, target_is_directory=True)
        return str(cache_dir)


@pytest.fixture(scope="session")
def base_models(tmp_path_factory) -> SharedBaseModels:
    """The session's shared base models (see the module docstring)."""
    return SharedBaseModels(root=_shared_root(tmp_path_factory) / "base-models")


# The test files that take longest, about longest first (each file alone on 2 busy cores, 2026-11-30: from 12 down
# to 1.5 minutes). `make test` gives each worker whole files (--dist loadfile) in collection order
# (--no-loadscope-reorder; xdist's own order, by number of tests, leaves files of few long tests such as
# test_trainer.py and test_multiprocess.py for the end): long files first, the short ones fill in at the end, so
# the two workers finish together. The second file builds no base model (its worker would wait for the first
# file's build).
LONG_FILES = ("test_trainer.py", "test_transformers_sampler.py", "test_multiprocess.py", "test_sweep.py",
              "test_ppo.py", "test_lora.py", "test_dpo.py", "test_sanity.py", "test_cli.py", "test_gpu_smoke.py",
              "test_emulation.py", "test_vllm_sampler.py", "test_jax_sampler.py")


def pytest_collection_modifyitems(config, items):
    """Collects the LONG_FILES first, in that order; every file keeps its own order of tests."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
