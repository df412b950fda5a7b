"""The package's import graph has no cycle, counting every import statement — module level,
inside functions, and under ``TYPE_CHECKING`` — between ``microscope`` modules: a lazy import
that closes a cycle still ties two modules together."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "microscope"


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*.py"):
        name = ".".join(p.relative_to(root.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """``module -> modules it imports`` (a ``from a.b import c`` names ``a.b.c`` when that is a
    module, else ``a.b``)."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                         for a in node.names]
            for n in names:
                r = resolve(n) if n.startswith("microscope") else None
                if r and r != m:
                    graph[m].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (networkx, which torch installs)."""
    import networkx as nx

    g = nx.DiGraph([(a, b) for a, bs in graph.items() for b in bs])
    g.add_nodes_from(graph)
    return sorted(sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1)


def test_the_cycle_finder_finds_a_lazy_cycle():
    g = {"microscope.model": {"microscope.zoo"}, "microscope.zoo": {"microscope.model"}, "microscope.roles": set()}
    assert cycles(g) == [["microscope.model", "microscope.zoo"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph(modules())
    assert "microscope.grid" in graph["microscope.knockout"]  # the graph sees real imports
    assert "microscope.zoo" in graph["microscope.model"]      # ... function-level ones too
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
