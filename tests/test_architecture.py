"""The layout's rules, checked on the source (no imports run): what is shared is public,
imports flow one way, and no function grows past a screen and a half."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "caft_tl"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module in the package (a package is its __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _private_imports(paths: list[Path]) -> list[str]:
    """``from X import _name`` where X is another module (``_io``-style private *modules*
    with public names are fine: the name is what must be public)."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{_shown(path)}: {node.module}.{alias.name}")
    return found


def _imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules ``path`` imports anywhere (function-level imports included),
    packages' ``__init__`` re-exports left out (they are the public front, not a dependency)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name in modules and modules[name].name != "__init__.py":
                targets.add(name)
                break
    return targets


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (depth-first search), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_private_names_imported_across_modules():
    paths = list(PACKAGE.rglob("*.py")) + list((ROOT / "analyses").rglob("*.py"))
    assert _private_imports(paths) == []


def test_private_import_scan_finds_one(tmp_path):
    # The scan itself must be able to fail.
    probe = tmp_path / "probe.py"
    probe.write_text("from caft_tl.train import _epoch_order, finetune\n")
    assert _private_imports([probe]) == [f"{probe}: caft_tl.train._epoch_order"]


def test_no_import_cycles():
    modules = _modules()
    graph = {
        name: _imported_modules(path, modules) - {name}
        for name, path in modules.items()
        if path.name != "__init__.py"
    }
    assert _cycle(graph) is None


def test_cycle_search_finds_a_loop():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_longer_than_a_screen_and_a_half():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert long == []


def test_config_dataclasses_document_every_field():
    import dataclasses
    import inspect
    import re

    from caft_tl.demo import DemoConfig
    from caft_tl.directions.crosscoder import CrosscoderConfig
    from caft_tl.directions.sae import SAEConfig
    from caft_tl.evals.sampling import SamplingConfig
    from caft_tl.lora import LoraConfig
    from caft_tl.train import TrainConfig

    undocumented = {}
    for cls in (TrainConfig, DemoConfig, LoraConfig, SamplingConfig, CrosscoderConfig, SAEConfig):
        doc = inspect.getdoc(cls) or ""
        # "name:" or "a, name, b:" at the start of an Args line, or ``name`` in the prose.
        listed = {
            name.strip()
            for line in re.findall(r"^\s*([\w, ]+):", doc, flags=re.M)
            for name in line.split(",")
        }
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in listed and f"``{f.name}``" not in doc
        ]
        if missing:
            undocumented[cls.__name__] = missing
    assert undocumented == {}
