"""The public API is explicit: each public module's `__all__` is exactly its list in docs/api.md, every name in it
exists, and every other module of the package says in its docstring that it is internal."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
API = ROOT / "docs" / "api.md"
SECTION = "## The public API"
MODULE = re.compile(r"^### `(mlx_gemma3[\w.]*)`$")
NAME = re.compile(r"^\| `(\w+)` \|")


def documented() -> dict[str, list[str]]:
    """docs/api.md's public API section: each `### `module`` heading and the names in its table."""
    text = API.read_text(encoding="utf-8")
    assert SECTION in text, f"docs/api.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    listed, module = {}, None
    for line in section.splitlines():
        if heading := MODULE.match(line):
            module = heading.group(1)
            assert module not in listed, f"docs/api.md lists {module} twice"
            listed[module] = []
        elif (name := NAME.match(line)) and module is not None:
            listed[module].append(name.group(1))
    return listed


def module_files() -> dict[str, Path]:
    """Every module of the installed package by its import name (convert/ installs as mlx_gemma3.convert)."""
    files = {}
    for top, prefix in ((ROOT / "mlx_gemma3", "mlx_gemma3"), (ROOT / "convert", "mlx_gemma3.convert")):
        for path in top.rglob("*.py"):
            parts = path.relative_to(top).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            files[".".join((prefix, *parts))] = path
    return files


def declared_all(path: Path) -> list[str] | None:
    """The module's `__all__` as written (a list of strings), or None when it has none."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return [ast.literal_eval(item) for item in node.value.elts]
    return None


def test_the_public_modules_are_the_documented_ones():
    public = {name for name, path in module_files().items() if declared_all(path) is not None}
    assert public == set(documented())


def test_each_all_is_exactly_its_documented_list():
    files = module_files()
    for module, names in documented().items():
        assert len(names) == len(set(names)), f"docs/api.md lists a name twice under {module}"
        assert sorted(declared_all(files[module]) or []) == sorted(names), module


def test_every_public_name_exists():
    for module, names in documented().items():
        loaded = importlib.import_module(module)
        missing = [name for name in names if not hasattr(loaded, name)]
        assert not missing, f"{module} has no {missing}"


def test_every_other_module_says_it_is_internal():
    silent = []
    for name, path in module_files().items():
        if declared_all(path) is not None:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if not any(line.startswith("Internal") for line in doc.splitlines()):
            silent.append(name)
    assert not silent, f"modules with neither __all__ nor 'Internal: ...' in their docstring: {silent}"
