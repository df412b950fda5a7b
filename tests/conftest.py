from __future__ import annotations

import warnings

import pytest

import microscope
from tests.tiny_models import BUILDERS, FUSION


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def shapes_handle():
    return microscope.load("shapes-llava")


@pytest.fixture(scope="session")
def handles(tiny_dirs, shapes_handle):
    with warnings.catch_warnings():  # processors loaded without their video part (no torchvision here)
        warnings.filterwarnings("ignore", "torchvision is not installed")
        return {"shapes": shapes_handle, **{k: microscope.load(str(v)) for k, v in tiny_dirs.items()},
                **{k: microscope.load(f"tests.fusion_example:{k}", allow_factory=True) for k in FUSION}}
