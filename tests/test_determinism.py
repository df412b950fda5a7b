"""Same inputs and seed, same numbers, bit for bit: every analysis the notebooks run, twice in one
process. Seeded analyses are also run with another seed, which must change their numbers (so the
comparison is shown able to fail). Kill-and-resume identity of a store is in test_extract."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import pytest
import torch

from microscope import attribution as at
from microscope import geometry as G
from microscope import knockout as ko
from microscope import objects as ob
from microscope import tracing as tr
from microscope.data import shapes
from microscope.extract import extract
from microscope.lens import logit_lens
from microscope.store import ActivationStore

SIGMA = 0.05


def _samples():
    return shapes.generate(3, seed=11)


def _profile(h, seed, tmp):
    path = tmp / f"store-{seed}-{len(list(tmp.iterdir()))}"
    extract(h, shapes.generate(8, seed=5), path, layers=[-1, 2, 5], batch_size=4, progress=False)
    return G.profile(ActivationStore(path), metrics=["id_twonn", "anisotropy_pc1", "linearity"], n=60,
                     n_splits=3, seed=seed, progress=False)


def _objects(h, seed, tmp):
    picked = [s for s in shapes.generate(24, seed=6) if ob.rankable(s)][:2]
    return ob.object_tests(h, picked, spaces=["embeddings"], n_positions=2, only_correct=False, progress=False)


#: name: (call(handle, seed, tmp_path) -> DataFrame, whether the seed matters)
ANALYSES: dict[str, tuple[Callable, bool]] = {
    "geometry.profile": (_profile, True),
    "knockout.sweep": (lambda h, seed, t: ko.sweep(h, _samples(), edges=["image↛last", "question↛last"],
                                                   only_correct=False, progress=False), False),
    "knockout.predict": (lambda h, seed, t: ko.predict(h, _samples(), "image↛question", progress=False), False),
    "lens.logit_lens": (lambda h, seed, t: logit_lens(h, _samples(), progress=False), False),
    "tracing.corruption_effects": (
        lambda h, seed, t: tr.corruption_effects(h, _samples()[:2], n_noise=2, sigma_text=SIGMA, sigma_image=SIGMA,
                                                 seed=seed, progress=False), True),
    "tracing.trace_dataset": (
        lambda h, seed, t: tr.trace_dataset(h, _samples()[:1], sites=["resid", "mlp"], n_noise=2, sigma=SIGMA,
                                            seed=seed, only_correct=False, progress=False), True),
    "attribution.attention_contributions": (
        lambda h, seed, t: at.attention_contributions(h, _samples(), layers=[0, 3], progress=False), False),
    "attribution.restoration_scores": (
        lambda h, seed, t: at.restoration_scores(h, _samples()[:1], n_noise=2, sigma=SIGMA, seed=seed,
                                                 only_correct=False, progress=False), True),
    "attribution.group_restoration_scores": (
        lambda h, seed, t: at.group_restoration_scores(h, _samples()[:1], n_noise=2, sigma=SIGMA, seed=seed,
                                                       only_correct=False, progress=False), True),
    "attribution.integrated_gradients": (
        lambda h, seed, t: at.integrated_gradients(h, _samples()[:1], n_steps=4, only_correct=False,
                                                   progress=False), False),
    "attribution.objectness_scores": (lambda h, seed, t: at.objectness_scores(h, _samples(), progress=False), False),
    "objects.object_tests": (_objects, False),
}


@pytest.mark.parametrize("name", list(ANALYSES))
def test_same_seed_same_numbers(shapes_handle, name, tmp_path):
    call, seeded = ANALYSES[name]
    torch.manual_seed(123)  # the global generator must not matter: disturb it between the runs
    a = call(shapes_handle, 0, tmp_path)
    torch.rand(7)
    b = call(shapes_handle, 0, tmp_path)
    assert isinstance(a, pd.DataFrame) and len(a) > 0
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    if seeded:
        c = call(shapes_handle, 1, tmp_path)
        with pytest.raises(AssertionError):
            pd.testing.assert_frame_equal(a, c, check_exact=True)


def test_extraction_twice_gives_identical_tensors(shapes_handle, tmp_path):
    samples = shapes.generate(5, seed=8)
    stores = [extract(shapes_handle, samples, tmp_path / f"s{i}", layers=[-1, 1, 4], sites=["resid", "mlp", "attn"],
                      batch_size=2, progress=False) for i in range(2)]
    for layer in (-1, 1, 4):
        for site in ("resid",) if layer == -1 else ("resid", "mlp", "attn"):
            (x, tx), (y, ty) = (s.load(layer, site=site) for s in stores)
            assert torch.equal(x, y) and tx.equals(ty)
    pd.testing.assert_frame_equal(stores[0].tokens(), stores[1].tokens(), check_exact=True)
