from __future__ import annotations

import pytest

import microscope
from tests.tiny_models import build_idefics3, build_llava15, build_llava_next


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"llava15": build_llava15(root / "llava15"), "llava_next": build_llava_next(root / "llava_next"),
            "idefics3": build_idefics3(root / "idefics3")}


@pytest.fixture(scope="session")
def shapes_handle():
    return microscope.load("shapes-llava")


@pytest.fixture(scope="session")
def handles(tiny_dirs, shapes_handle):
    return {"shapes": shapes_handle, **{k: microscope.load(str(v)) for k, v in tiny_dirs.items()}}
