"""The bundled models' command line (``python -m microscope.zoo``) as the tests call it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from microscope.data import shapes

ROOT = Path(__file__).resolve().parents[1]


def run_zoo(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m microscope.zoo ARGS`` offline, from the repository root."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "microscope.zoo", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def evaluation_report(model: str) -> dict:
    """The accuracy report of ``model`` on 2000 fresh samples from a seed never used in training,
    through the CLI (what the model card states)."""
    out = run_zoo("evaluate", model, "--n", "2000", "--seed", "7")
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["n"] == 2000 and set(r["per_category"]) == set(shapes.CATEGORIES)
    return r
