"""The package's import graph, read from the source with `ast`: no cycle among module-level imports, and the run
config (`config.py`, `validation.py` and every module that defines a config section) imports at module level only."""

from __future__ import annotations

import ast
from pathlib import Path

import jaxrl_fp16
from jaxrl_fp16 import config, validation

PACKAGE = "jaxrl_fp16"
ROOT = Path(jaxrl_fp16.__file__).resolve().parent


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (a package is its `__init__.py`)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module that importing `name` names (its longest prefix that is a module), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
                    modules: dict[str, Path]) -> list[str]:
    """The dotted names an import statement brings in (`from a import b` names `a.b` when that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        package = module if is_package else module.rpartition(".")[0]
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([node.module] if node.module else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def import_edges(module: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(module-level, function-level) package modules that `module` imports; a class body runs at import time,
    so its imports are module-level; an import inside a function (or a method) is function-level."""
    top: set[str] = set()
    inside: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for name in _imported_names(child, module, path.name == "__init__.py", modules):
                    target = _resolve(name, modules) if name.split(".")[0] == PACKAGE else None
                    if target is not None and target != module:
                        (inside if nested else top).add(target)
            visit(child, nested)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return top, inside


def import_graph(modules: dict[str, Path]) -> dict[str, tuple[set[str], set[str]]]:
    return {name: import_edges(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as [a, b, ..., a], or None when it has none (depth-first, white/grey/black)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def config_modules(graph_modules: dict[str, Path]) -> set[str]:
    """config, validation, and every module that defines a run-config section (a class named `*Section`)."""
    out = {f"{PACKAGE}.config", f"{PACKAGE}.validation"}
    for name, path in graph_modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        if any(isinstance(n, ast.ClassDef) and n.name.endswith("Section") for n in tree.body):
            out.add(name)
    return out


MODULES = module_files()
GRAPH = import_graph(MODULES)


def test_find_cycle_on_synthetic_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None  # a diamond: no cycle
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"w"}, "w": {"y"}}) == ["w", "y", "z", "w"]


def test_import_edges_tell_module_level_from_function_level(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    for rel in ("__init__.py", "a.py", "b.py", "c.py", "sub/__init__.py", "sub/d.py"):
        (pkg / rel).write_text("")
    (pkg / "a.py").write_text(
        f"import os\nfrom {PACKAGE} import b\nfrom .sub.d import thing\n"
        f"class K:\n    from {PACKAGE}.c import x\n"
        f"def f():\n    import {PACKAGE}.sub\n    def g():\n        from . import c\n")
    modules = module_files(pkg)
    top, inside = import_edges(f"{PACKAGE}.a", pkg / "a.py", modules)
    assert top == {f"{PACKAGE}.b", f"{PACKAGE}.sub.d", f"{PACKAGE}.c"}
    assert inside == {f"{PACKAGE}.sub", f"{PACKAGE}.c"}


def test_the_graph_covers_the_package():
    assert {f"{PACKAGE}.config", f"{PACKAGE}.rl.trainer", f"{PACKAGE}.sampling.options"} <= set(MODULES)
    assert f"{PACKAGE}.validation" in GRAPH[f"{PACKAGE}.config"][0]  # edges are found, not an empty graph


def test_no_cycle_among_module_level_imports():
    cycle = find_cycle({name: top for name, (top, _) in GRAPH.items()})
    assert cycle is None, f"module-level import cycle: {' -> '.join(cycle)}"


def test_config_modules_import_at_module_level_only():
    modules = config_modules(MODULES)
    expected = {"config", "validation", "loss_scale", "optim", "lora", "topology", "sampling.options", "rl.sft",
                "rl.tasks", "rl.prompts", "rl.dpo"}
    assert {f"{PACKAGE}.{m}" for m in expected} <= modules
    late = {name: sorted(GRAPH[name][1]) for name in sorted(modules) if GRAPH[name][1]}
    assert not late, f"function-level imports of package modules in config modules: {late}"


def test_the_training_core_imports_at_module_level_only():
    """The RL run's construction, loop and trained tree: no late import working around a cycle."""
    core = [f"{PACKAGE}.rl.{m}" for m in ("setup", "loop", "trainable", "trainer", "dpo_trainer")]
    late = {name: sorted(GRAPH[name][1]) for name in core if GRAPH[name][1]}
    assert not late, f"function-level imports of package modules: {late}"


def test_validation_is_a_leaf():
    top, inside = GRAPH[f"{PACKAGE}.validation"]
    assert not top and not inside, f"jaxrl_fp16.validation imports {sorted(top | inside)}"


def test_config_reexports_every_section():
    for name in config.__all__:
        assert getattr(config, name) is not None, name
    assert config.ConfigError is validation.ConfigError
    sections = [getattr(config, n) for n in config.__all__ if n.endswith("Section")]
    assert len(sections) == 15 and all(s.__module__.startswith(f"{PACKAGE}.") for s in sections)
