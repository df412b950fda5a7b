from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest

import microscope
from tests.tiny_models import BUILDERS, FUSION

# Under mutation testing (mutmut sets MUTANT_UNDER_TEST) pytest runs hundreds of times in forks of one
# process; the checkpoints and handles are built once there (80 s) and every fork reuses them. The models
# do not depend on any mutated function; a normal run builds them per session as before.
_ONCE: dict = {}


def _once(key: str, make):
    if not os.environ.get("MUTANT_UNDER_TEST"):
        return make()
    if key not in _ONCE:
        _ONCE[key] = make()
    return _ONCE[key]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    def make():
        root = (Path(tempfile.mkdtemp(prefix="microscope-tiny-")) if os.environ.get("MUTANT_UNDER_TEST")
                else tmp_path_factory.mktemp("tiny"))  # a fork's basetemp is cleaned by later forks
        return {name: build(root / name) for name, build in BUILDERS.items()}
    return _once("tiny_dirs", make)


@pytest.fixture(scope="session")
def shapes_handle():
    return _once("shapes_handle", lambda: microscope.load("shapes-llava"))


@pytest.fixture(scope="session")
def handles(tiny_dirs, shapes_handle):
    return _once("handles", lambda: _handles(tiny_dirs, shapes_handle))


def _handles(tiny_dirs, shapes_handle):
    with warnings.catch_warnings():  # processors loaded without their video part (no torchvision here)
        warnings.filterwarnings("ignore", "torchvision is not installed")
        return {"shapes": shapes_handle, **{k: microscope.load(str(v)) for k, v in tiny_dirs.items()},
                **{k: microscope.load(f"tests.fusion_example:{k}", allow_factory=True) for k in FUSION}}
