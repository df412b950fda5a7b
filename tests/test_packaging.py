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
    assert {"pytest", "ruff"} <= {_name(p) for p in py["optional-dependencies"]["dev"]}
    assert "torch==2.13.0" in py["dependencies"]
    assert py["name"] == "mllm-microscope" and py["requires-python"] == ">=3.10"


def test_readme_first_screen_has_the_two_commands_and_ci_runs_the_test_one():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    assert "make figures" in first_screen and "make test" in first_screen
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert "torch==2.13.0" in makefile and "venv" in makefile
