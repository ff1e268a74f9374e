"""The import graph of deformable_detr/, benchmarks/ and experiments/ (read statically, lazy imports included) has
no cycle and only goes down the layers of ARCHITECTURE.md."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("deformable_detr", "benchmarks", "experiments")
NATIVE = {"deformable_detr._C"}  # the compiled extension: a leaf
# ARCHITECTURE.md's one-way order: a module imports only from its own layer or a lower one; layers of equal rank
# do not import each other.
RANK = {
    "deformable_detr._extension": 0,
    "deformable_detr.ops": 1,
    "deformable_detr.modules": 2,
    "deformable_detr.data": 2,
    "deformable_detr": 3,  # the public API (__init__)
    "deformable_detr.integrations": 3,
    "deformable_detr.models": 3,
    "deformable_detr.engine": 4,
    "deformable_detr.cli": 5,
    "deformable_detr.__main__": 6,
    "benchmarks": 7,
    "experiments": 8,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: {project modules it imports}}``; ``from pkg import name`` counts as importing ``pkg.name`` when
    that is a module, else ``pkg``."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}

    def resolve(name: str) -> str | None:
        if name in NATIVE:
            return None
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(resolve(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(None if full in NATIVE else resolve(full) if full in files else resolve(base))
        graph[module] = deps - {None, module}
    return graph


def _layer(module: str) -> str:
    while module not in RANK:
        module = module.rpartition(".")[0]
    return module


def test_no_import_cycle():
    graph = import_graph()
    assert "experiments.trees.convergence" in graph and "benchmarks.report" in graph  # the walk found the tree
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
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
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_go_down_the_layers():
    wrong = []
    for module, deps in import_graph().items():
        here = _layer(module)
        for dep in deps:
            there = _layer(dep)
            if there != here and RANK[there] >= RANK[here]:
                wrong.append(f"{module} -> {dep} ({here} rank {RANK[here]}, {there} rank {RANK[there]})")
    assert not wrong, "imports against ARCHITECTURE.md's order:\n" + "\n".join(sorted(wrong))


def test_support_imports_no_test_module():
    """tests/support is the helpers' package: a helper never imports a test module (a test module's imports and
    module-level code would then run wherever the helper is used, and the dependency would point the wrong way)."""
    wrong = []
    for path in sorted((REPO / "tests" / "support").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [alias.name for alias in node.names if not node.module]
            else:
                continue
            wrong += [f"{path.name}: {name}" for name in names if any(p.startswith("test_") for p in name.split("."))]
    assert not wrong, "tests/support imports test modules:\n" + "\n".join(wrong)
