"""The package's layering, read from the source: every ``kineflow`` import points downward.

Layers, lowest first (docs/design.md and the README's Layout section)::

    0  io, config, folders           foundations
    1  flow, data, tokenizers        the maths, the data, the image and text tokenizers
    2  models, inputs                networks; sequence layouts and preprocessing
    3  interop                       foreign checkpoint formats (Janus, diffusers, Gemma, MAR)
    4  pipelines                     sampling, kineflow.load and the pipeline registry
    5  train, eval                   trainers; benchmarks and scorers
    6  apps                          demo, showcase, the reproduction
    7  cli                           the ``kineflow`` command

A module may import from its own layer or any layer below, never from above; imports inside
functions count too (a lazy import is still a dependency). Module-level cycles are refused as
well, lazy ones included.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kineflow"

LAYERS = {
    "io": 0, "config": 0, "folders": 0,
    "flow": 1, "data": 1, "tokenizers": 1,
    "models": 2, "inputs": 2,
    "interop": 3,
    "pipelines": 4,
    "train": 5, "eval": 5,
    "apps": 6,
    "cli": 7,
}  # fmt: skip
#: The package root only re-exports ``kineflow.load`` lazily; ``python -m kineflow`` is the CLI.
FACADES = {"kineflow", "kineflow.__main__"}


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The kineflow modules ``path`` imports, at any depth of the file, except imports for
    type checkers only (``if TYPE_CHECKING:``), which never run."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from kineflow.x import y` depends on kineflow.x.y when y is a module.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                     else node.module for a in node.names]  # fmt: skip
        else:
            continue
        out |= {n for n in names if n.split(".")[0] == "kineflow"}
    return out


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = _modules(package)
    return {m: {i for i in _imports(p, modules) if i != m} for m, p in modules.items()}


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in _modules() if m not in FACADES and _layer(m) is None)
    assert not unplaced, f"modules outside every layer (add them to LAYERS): {unplaced}"


def _upward(graph: dict[str, set[str]]) -> list[str]:
    upward = []
    for module, imported in graph.items():
        if module in FACADES:
            continue
        for target in imported:
            lo, hi = _layer(module), _layer(target)
            if hi is not None and hi > lo:
                upward.append(f"{module} (layer {lo}) imports {target} (layer {hi})")
    return sorted(upward)


def test_imports_point_downward() -> None:
    upward = _upward(_graph())
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    # Tarjan's strongly connected components; any component of 2+ modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_over_500_lines() -> None:
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"modules over 500 lines: {long}"


def test_the_checks_catch_a_planted_upward_import_and_cycle(tmp_path, monkeypatch) -> None:
    """The checker itself: an upward import and a lazy cycle planted in a copy are found."""
    copy = tmp_path / "kineflow"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "flow" / "planted.py").write_text("from kineflow.cli import main\n")
    (copy / "cycle_a.py").write_text("import kineflow.cycle_b\n")
    (copy / "cycle_b.py").write_text("def f():\n    from kineflow import cycle_a\n")
    (copy / "flow" / "hints.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kineflow.cli import main\n"
    )
    monkeypatch.setitem(LAYERS, "cycle_a", 0)
    monkeypatch.setitem(LAYERS, "cycle_b", 0)
    graph = _graph(copy)
    assert "kineflow.flow.planted (layer 1) imports kineflow.cli (layer 7)" in _upward(graph)
    assert ["kineflow.cycle_a", "kineflow.cycle_b"] in _cycles(graph)
    assert not graph["kineflow.flow.hints"]  # type-checking imports never run
