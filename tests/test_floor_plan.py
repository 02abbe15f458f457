"""The package's floor plan: imports run down only (command lines → serve/train/distributed → generation →
processing → model → errors), and no two modules import each other, directly or around a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import mlx_gemma3

PACKAGE = Path(mlx_gemma3.__file__).parent
FLOORS = {"errors": 0, "model": 1, "processing": 2, "generation": 3, "serve": 4, "train": 4, "distributed": 4}
TOP = 5  # the command lines, the loader and the public face


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every mlx_gemma3 module `path` imports, at the top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def floor(name: str) -> int:
    parts = name.split(".")
    return FLOORS.get(parts[1], TOP) if len(parts) > 1 else TOP


def package_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 else name


def test_imports_run_down_only():
    upward = [
        f"{a} → {b}"
        for a, targets in import_graph().items()
        for b in targets
        if floor(b) > floor(a) or (floor(b) == floor(a) and package_of(b) != package_of(a) and floor(a) != TOP)
    ]
    assert upward == []


def test_model_and_processing_import_no_feature():
    features = ("generation", "serve", "train", "distributed")
    bad = [
        f"{a} → {b}"
        for a, targets in import_graph().items()
        if a.split(".")[1:2] in (["model"], ["processing"])
        for b in targets
        if b.split(".")[1:2] and b.split(".")[1] in features or floor(b) == TOP
    ]
    assert bad == []


def test_no_import_circles():
    graph = import_graph()
    circles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" → ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert circles == []


def test_each_file_name_once():
    names = [p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    assert sorted({n for n in names if names.count(n) > 1}) == []
