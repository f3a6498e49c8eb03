"""The package layout stays true: every import points down the layers (or within a package), and no modules import
each other in a cycle. Lazy imports inside functions count too: they are arrows all the same."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The installed packages, lowest first. A module may import from its own package and from packages listed before
#: its own, never from one listed after it.
LAYERS = ["utils", "datasets", "layers", "backbones", "necks", "heads", "models", "evaluation", "tasks", "inference",
          "benchmarks", "hydra_plugins", "tools"]


def _modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported_names(name: str, path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` for each import of module ``name`` that reaches a project package: ``import a.b`` gives
    ``("a.b", None)``, ``from a import b`` gives ``("a", "b")``; relative imports made absolute."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            out += [(base, alias.name) for alias in node.names]
    return [(m, n) for m, n in out if m.split(".")[0] in LAYERS]


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module ``name`` imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    out = set()
    for module, item in _imported_names(name, path):
        target = f"{module}.{item}" if item and f"{module}.{item}" in modules else module
        while target and target not in modules:  # `import a.b.c` of a name inside a module: that module
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _rank(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_imports_point_down_the_layers():
    upward = sorted(f"{m} imports {t}" for m, targets in _graph().items() for t in targets if _rank(t) > _rank(m))
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other: {cycles}"


def test_every_project_import_resolves():
    """A lazy import inside a function fails only when it runs: each one must name a module that exists, and a name
    that module defines (or a submodule)."""
    import importlib

    modules = _modules()
    broken = []
    for name, path in modules.items():
        for module, item in _imported_names(name, path):
            if module not in modules:
                broken.append(f"{name}: no module {module}")
            elif (item and item != "*" and f"{module}.{item}" not in modules
                  and not hasattr(importlib.import_module(module), item)):
                broken.append(f"{name}: {module} has no {item}")
    assert not broken, "\n".join(broken)


def test_the_checks_see_the_project():
    graph = _graph()
    assert {"heads.postprocess", "layers.kernels.nms", "tasks.runner", "inference.predictor"} <= set(graph)
    assert "layers.kernels.dispatch" in graph["heads.postprocess"]  # relative and absolute imports both resolve
    assert "tasks.captured_step" in graph["tasks.captured_training"]


def test_no_module_holds_more_than_one_concept_by_size():
    """A file past 400 lines is holding two concepts: split it (the tests are exempt)."""
    long = sorted(f"{name} ({n} lines)" for name, path in _modules().items()
                  if (n := len(path.read_text().splitlines())) > 400)
    assert not long, f"modules over 400 lines: {long}"
