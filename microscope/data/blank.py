"""The empty counterpart of a sample: its image with nothing in it.

Used as the "nothing here" reference by the blank-image corruption (:mod:`microscope.tracing`),
the objectness baseline and integrated gradients' baseline (:mod:`microscope.attribution`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image


def blank_like(sample):
    """``sample`` with its objects removed: the Shapes world's empty scene, or for other samples a
    plain image of the image's median colour (what "nothing here" looks like to the tower)."""
    if hasattr(sample, "render") and getattr(sample, "objects", None) is not None:
        img = sample.render(keep=[])
    else:
        arr = np.asarray(sample.image.convert("RGB"))
        img = Image.new("RGB", sample.image.size, tuple(int(v) for v in np.median(arr.reshape(-1, 3), axis=0)))
    if "image" in {f.name for f in dataclasses.fields(sample)}:
        return dataclasses.replace(sample, image=img)
    return _WithImage(sample, img)  # a sample that reads its image from disk (VQASample)


class _WithImage:
    """A sample proxy whose ``image`` is replaced (for samples that read the image from disk)."""

    def __init__(self, sample, image):
        self._s, self.image = sample, image

    def __getattr__(self, name):
        return getattr(self._s, name)
