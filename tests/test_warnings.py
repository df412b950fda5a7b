"""No warning the user did not cause: the analyses call transformers, numpy and torch only in
ways they do not warn about (deprecated keywords and output fields, read-only arrays wrapped as
tensors). Warnings become errors here, and transformers' logged notices are collected."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import microscope
from microscope import attribution as at
from microscope import knockout as ko
from microscope import objects as ob
from microscope import tracing as tr
from microscope.data import load_samples
from tests.tiny_models import BUILDERS

ROOT = Path(__file__).resolve().parents[1]
#: the embedded model, two tiny families of different layouts (fixed grid with any-resolution crops;
#: native grid with M-RoPE) and a custom fusion whose forward takes ``**kwargs`` (the cache keyword
#: is then the installed transformers' own)
HANDLES = ["shapes", "llava_next", "qwen2_vl", "bunny"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def strict() -> Iterator[list[logging.LogRecord]]:
    """FutureWarning and DeprecationWarning raise; the yielded list collects what transformers
    logs at WARNING or above (its notice on reading ``output.past_key_values`` goes through its
    logger, once per process: that memo is cleared first)."""
    handler = _Records()
    log = logging.getLogger("transformers")
    logging.Logger.warning_once.cache_clear()  # transformers' once-per-process memo of logged warnings
    log.addHandler(handler)
    try:
        with warnings.catch_warnings():
            # from any module: transformers' own warnings are attributed to its callers' frames
            # (torch's Module.__call__ when a custom fusion's forward calls its decoder)
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("error", category=category)
            yield handler.records
    finally:
        log.removeHandler(handler)


@pytest.fixture(scope="module")
def strict_handles(tmp_path_factory, shapes_handle):
    root = tmp_path_factory.mktemp("warn")
    with warnings.catch_warnings():  # processors loaded without their video part (no torchvision here)
        warnings.filterwarnings("ignore", "torchvision is not installed")
        return {"shapes": shapes_handle,
                **{k: microscope.load(str(BUILDERS[k](root / k))) for k in ("llava_next", "qwen2_vl")},
                "bunny": microscope.load("tests.fusion_example:bunny", allow_factory=True)}


@pytest.mark.parametrize("name", HANDLES)
def test_knockout_tracing_and_attribution_warn_about_nothing(strict_handles, name):
    h = strict_handles[name]
    s = load_samples("shapes", 2, 8, handle=h)
    with strict() as logged:
        df = ko.sweep(h, s, edges=["image↛question"], window=1, only_correct=False, progress=False)
        c = tr.corrupt(h, s[1], n_noise=2, sigma=0.1)  # the clean prefix cache: read and handed back
        trace = tr.trace(h, s[1], sites=["mlp"], corrupted=c)
        ig = at.integrated_gradients(h, s[:1], n_steps=4, only_correct=False, progress=False)
        same = [ob.Variant("presence", None, tuple(range(len(s[0].objects))), tuple(s[0].objects))]
        p0, p = ob.scene_distributions(h, s[0], same, "embeddings")
    assert not [r.getMessage() for r in logged]
    # the calls ran through (nothing was skipped that could have warned)
    assert len(df) == 2 * h.adapter.n_layers and c.prefix is not None and trace.effect.notna().all()
    assert len(ig) > 0 and ob.total_variation(p0, p[0]) < 1e-5


def test_read_only_arrays_reach_torch_without_a_warning():
    """Torch warns once per process about a read-only numpy array it wraps, so this runs in a fresh
    interpreter: a read-only array (pandas' ``to_numpy()`` under copy-on-write) given to the geometry
    functions, and notebook 02's PCA of a random subset of a store's tokens."""
    script = """
import warnings
warnings.filterwarnings("error", message=".*not writable")
import numpy as np, pandas as pd, torch
from microscope import geometry as G
x = np.random.default_rng(0).normal(size=(200, 6))
ro = pd.DataFrame(x).to_numpy()
ro.flags.writeable = False  # whatever pandas' copy-on-write gives: read-only for sure
G.pca_2d(ro); G.anisotropy(ro); G.intrinsic_dimension(ro); G.linearity(ro, ro)
tokens = pd.DataFrame({"role": ["image", "text"] * 100, "row": np.arange(200)})
pca = G.pca_points(torch.as_tensor(x), tokens, n=50, seed=1)
assert list(pca.columns) == ["role", "row", "pc1", "pc2"] and len(pca) == 50 and pca.row.is_unique
assert np.allclose(pca[["pc1", "pc2"]].to_numpy(), G.pca_2d(x[pca.row.to_numpy()]))  # each point beside its token
full = G.pca_points(x, tokens, n=None)
assert full.row.tolist() == list(range(200)) and np.allclose(full[["pc1", "pc2"]].to_numpy(), G.pca_2d(x))
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
