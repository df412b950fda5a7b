"""No warning the user did not cause: the analyses call transformers only in ways it does not
warn about (deprecated keywords and output fields). Warnings become errors here, and
transformers' logged notices are collected."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import pytest

import microscope
from microscope import attribution as at
from microscope import knockout as ko
from microscope import objects as ob
from microscope import tracing as tr
from microscope.data import load_samples
from tests.tiny_models import BUILDERS

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
        trace = tr.trace(h, s[1], kinds=["mlp"], corrupted=c)
        ig = at.integrated_gradients(h, s[:1], n_steps=4, only_correct=False, progress=False)
        same = [ob.Variant("presence", None, tuple(range(len(s[0].objects))), tuple(s[0].objects))]
        p0, p = ob.scene_distributions(h, s[0], same, "embeddings")
    assert not [r.getMessage() for r in logged]
    # the calls ran through (nothing was skipped that could have warned)
    assert len(df) == 2 * h.adapter.n_layers and c.prefix is not None and trace.effect.notna().all()
    assert len(ig) > 0 and ob.total_variation(p0, p[0]) < 1e-5

