"""The package map of docs/architecture.md holds: imports only go up the layers, and never in a circle.

Each module may import from its own layer or a layer listed before it. This is what lets a reader
follow ``rmtprune.compress(model)`` or ``rmtprune analyze FILE`` top to bottom without jumping back
into a module already passed. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "rmtprune"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

#: The layers of docs/architecture.md, first to last (top-level module or package names).
LAYERS: list[tuple[str, list[str]]] = [
    (
        "foundation",
        ["errors", "_validate", "_format", "_progress", "_atomic", "_tensor_source", "_hf_guard"],
    ),
    ("experiment kit", ["zoo"]),
    ("engine", ["spectral"]),
    ("configuration and modules", ["config", "lowrank", "layers", "masks"]),
    ("analyze", ["_spectrum", "analysis", "calibration", "sequential", "finetune"]),
    ("decide and cut", ["plan_record", "allocation", "surgery", "sparsity", "plotting", "_analyze_plots"]),
    (
        "persist",
        [
            "_safetensors_reader",
            "_torch_reader",
            "weights_file",
            "weights_analysis",
            "manifest",
            "sparse_format",
            "_outputs",
            "io",
            "hf",
        ],
    ),
    ("train", ["training"]),
    ("integrations", ["integrations"]),
    ("interface", ["commands", "cli"]),
]
#: Deprecated module paths kept for one release: thin aliases, not part of the map.
ALIASES = {"checkpoint", "data", "models", "sparsify"}
ROOT = {"__init__", "__main__"}


def _top(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    """Top-level rmtprune modules that ``path`` imports (relative or absolute, anywhere in the file)."""
    rel = path.relative_to(SRC)
    pkg = list(rel.parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                parts = base + (node.module.split(".") if node.module else [])
                names = parts[:1] if parts else [a.name for a in node.names]
            elif node.module and node.module.split(".")[0] == "rmtprune":
                rest = node.module.split(".")[1:]
                names = rest[:1] if rest else [a.name for a in node.names]
            else:
                continue
            out.update(names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "rmtprune" and len(parts) > 1:
                    out.add(parts[1])
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        top = _top(path)
        graph.setdefault(top, set()).update(m for m in _imports(path) if m != top)
    return graph


def _layer_of() -> dict[str, int]:
    return {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}


def test_every_module_is_on_the_map() -> None:
    layer = _layer_of()
    missing = sorted(set(_graph()) - set(layer) - ALIASES - ROOT)
    assert not missing, f"modules missing from LAYERS and docs/architecture.md: {missing}"
    doc = DOC.read_text(encoding="utf-8")
    for _, mods in LAYERS:
        for m in mods:
            assert f"`{m}" in doc, f"docs/architecture.md does not mention {m}"


def test_imports_only_go_up_the_layers() -> None:
    layer = _layer_of()
    bad = []
    for mod, deps in sorted(_graph().items()):
        if mod not in layer:
            continue
        for dep in sorted(deps):
            if dep in ALIASES:
                bad.append(f"{mod} imports the deprecated alias {dep}")
            elif dep in layer and layer[dep] > layer[mod]:
                bad.append(f"{mod} ({LAYERS[layer[mod]][0]}) imports {dep} ({LAYERS[layer[dep]][0]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle() -> None:
    graph = _graph()

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if b in graph and a in reach(b) and a < b)
    assert not cycles, cycles


@pytest.mark.parametrize("package", ["spectral"])
def test_spectral_is_numpy_only(package: str) -> None:
    for path in (SRC / package).rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("torch", "rmtprune") for n in names), f"{path}: {names}"
