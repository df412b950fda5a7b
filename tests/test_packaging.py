"""The repository's set-up files agree with each other and with the README."""

from __future__ import annotations

import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_declares_the_same_packages_as_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = py["dependencies"] + py["optional-dependencies"]["dev"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pip = [p for p in pip if not p.startswith("-e")]
    assert sorted(p.replace(" ", "") for p in pip) == sorted(p.replace(" ", "") for p in declared)
    needed = {"torch", "transformers", "numpy", "scipy", "pandas", "pyarrow", "matplotlib", "seaborn",
              "safetensors", "tqdm", "papermill", "ipywidgets", "jupyterlab", "ipykernel",
              "scikit-dimension"}
    assert needed <= {_name(p) for p in py["dependencies"]}
    assert {"pytest", "ruff", "mypy"} <= {_name(p) for p in py["optional-dependencies"]["dev"]}
    assert "torch==2.13.0" in py["dependencies"]
    assert py["name"] == "mllm-microscope" and py["requires-python"] == ">=3.10"


def test_readme_first_screen_has_the_two_commands_and_ci_runs_the_test_one():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    assert "make figures" in first_screen and "make test" in first_screen
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert "torch==2.13.0" in makefile and "venv" in makefile


def test_make_test_lints_and_type_checks_before_any_test():
    """CI runs ``make test``: its recipe runs ruff and mypy (on the package pyproject.toml
    configures) before the first pytest, so a lint or type error fails CI."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M).group(1).splitlines()
    first_pytest = next(i for i, line in enumerate(recipe) if "pytest" in line)
    commands = [line.strip() for line in recipe[:first_pytest]]
    assert "$(BIN)/ruff check microscope tests benchmarks" in commands
    assert "$(BIN)/python -m mypy" in commands
    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert mypy["files"] == ["microscope"] and mypy["python_version"] == "3.10"


def _import_graph() -> dict[str, set[str]]:
    """``module -> package modules it imports``, at any depth of its code (function-level imports
    included), read from the source with ``ast``; a package is its ``__init__``."""
    import ast

    pkg = ROOT / "microscope"
    mods = {}
    for p in pkg.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {}
    for name, p in mods.items():
        out = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in mods:
                out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                        for a in node.names}
        graph[name] = out - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(u):
        state[u] = 1
        path.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return path[path.index(v):] + [v]
            if v not in state and (c := visit(v)):
                return c
        state[u] = 2
        path.pop()
        return None

    return next((c for u in sorted(graph) if u not in state and (c := visit(u))), None)


def test_the_package_import_graph_has_no_cycle():
    graph = _import_graph()
    assert {"microscope.model", "microscope.zoo", "microscope.tracing", "microscope.attribution"} <= set(graph)
    assert "microscope.zoo" in graph["microscope.model"]  # the bundled models' directory lookup
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({**graph, "microscope.zoo": graph["microscope.zoo"] | {"microscope.model"}})  # a cycle is found
