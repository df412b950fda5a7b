"""The sample type of real visual-question data sets, shared by every loader.

    s = VQASample(id="q1", image_path=Path("img.jpg"), question="Is the cup red?", answer="yes",
                  category="ChooseAttr", constraints=(Constraint("cup", 7, 10),))
    s.image                    # PIL image, loaded on first access (clear error if missing)
    s.referred_patches()       # patches under the referred boxes, once a patch grid is set

It has the fields the suite reads from a Shapes-world sample (``id``, ``image``, ``question``,
``answer``, ``category``, ``constraints``, ``referred_patches()``), so every analysis runs on
either. Boxes are ``(x0, y0, x1, y1)`` pixels of the original image; :func:`box_patches` maps them
onto a vision tower's patch grid for the CLIP-style preprocessing of LLaVA-1.5 (resize the
shortest edge, centre-crop a square), :func:`resized_box_patches` for a resize of the whole image
(the anyres base view, Qwen2-VL). Both take ``visible``, the fraction of each side of the
preprocessed ``S`` px square that the ``g = floor(S / p)`` patches cover (``g·p / S``: 378/384
for SigLIP-384/14); boxes in the remaining strip fall on no patch, since the tower never sees it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from microscope.data.shapes import Constraint
from microscope.errors import MicroscopeError


class DatasetError(MicroscopeError, ValueError):
    """A data-set file is missing or not in the expected layout (the message names it)."""


def read_json(path: Path, what: str):
    """JSON from ``path`` or a :class:`DatasetError` naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{what} file {path} is not valid JSON ({e})") from e


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the whitespace-separated words of ``text`` (GQA indexes words so),
    trailing punctuation excluded."""
    spans, i = [], 0
    for w in text.split(" "):
        if w:
            core = w.rstrip("?.,!;:")
            spans.append((i, i + max(1, len(core))))
        i += len(w) + 1
    return spans


def phrase_span(text: str, phrase: str) -> tuple[int, int] | None:
    """First case-insensitive occurrence of ``phrase`` in ``text`` as ``(start, end)``."""
    k = text.lower().find(phrase.lower().strip())
    return None if k < 0 or not phrase.strip() else (k, k + len(phrase.strip()))


def box_patches(box: Sequence[float], width: int, height: int, grid: int, visible: float = 1.0
                ) -> tuple[int, ...]:
    """Raster indices of the ``grid × grid`` patches a box overlaps after CLIP-style
    preprocessing: scale the shortest edge to the crop size, centre-crop a square.

    The crop is ``s = min(width, height)`` original pixels wide; the patches cover its first
    ``visible · s`` (``visible = grid · patch / crop_size``), so one cell is
    ``visible · s / grid`` original pixels and a box beyond the covered part overlaps no patch."""
    side = min(width, height)
    ox, oy = (width - side) / 2, (height - side) / 2
    x0, y0, x1, y1 = box
    cell = side * visible / grid
    c0, c1 = math.floor((x0 - ox) / cell), math.ceil((x1 - ox) / cell) - 1
    r0, r1 = math.floor((y0 - oy) / cell), math.ceil((y1 - oy) / cell) - 1
    c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, grid - 1), min(r1, grid - 1)
    return tuple(r * grid + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)) if c0 <= c1 and r0 <= r1 \
        else ()


def resized_box_patches(box: Sequence[float], width: int, height: int, rows: int, cols: int,
                        visible: float = 1.0) -> tuple[int, ...]:
    """Raster indices of the ``rows × cols`` cells a box overlaps when the whole image is resized
    onto that grid, without cropping (Qwen2-VL's dynamic resolution; the anyres base view).

    The cells cover the first ``visible`` of each resized side (``visible = grid · patch / S``
    for an ``S`` px view): a cell is ``visible · width / cols`` by ``visible · height / rows``
    original pixels, and a box beyond the covered part overlaps no cell."""
    x0, y0, x1, y1 = box
    cw, ch = width * visible / cols, height * visible / rows
    c0, c1 = max(math.floor(x0 / cw), 0), min(math.ceil(x1 / cw) - 1, cols - 1)
    r0, r1 = max(math.floor(y0 / ch), 0), min(math.ceil(y1 / ch) - 1, rows - 1)
    return tuple(r * cols + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1))


@dataclass
class VQASample:
    """One visual question from a data set on disk."""

    id: str
    image_path: Path
    question: str
    answer: str
    category: str
    constraints: tuple[Constraint, ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()   # the referred objects' boxes
    options: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)
    grid: int | tuple[int, int] | None = None  # patch grid for referred_patches: square side, or (rows, cols)
    visible: float = 1.0  # fraction of each preprocessed side the grid covers: grid · patch / image_size

    @property
    def image(self) -> Image.Image:
        """The RGB image, read from ``image_path``; :class:`DatasetError` if unreadable."""
        try:
            with Image.open(self.image_path) as im:
                return im.convert("RGB")
        except FileNotFoundError as e:
            raise DatasetError(f"sample {self.id}: image file {self.image_path} does not exist") from e
        except OSError as e:
            raise DatasetError(f"sample {self.id}: image file {self.image_path} is not a readable image ({e})") \
                from e

    def referred_patches(self) -> tuple[int, ...]:
        """Sorted patches under the referred boxes on the grid set with :meth:`with_grid`
        (empty without boxes or grid)."""
        if not self.boxes or self.grid is None:
            return ()
        w, h = self.size()
        out: set[int] = set()
        for b in self.boxes:
            out.update(box_patches(b, w, h, self.grid, self.visible) if isinstance(self.grid, int)
                       else resized_box_patches(b, w, h, *self.grid, visible=self.visible))
        return tuple(sorted(out))

    def size(self) -> tuple[int, int]:
        """``(width, height)`` from the data set's metadata, else from the image file's header."""
        w, h = self.meta.get("width"), self.meta.get("height")
        if w and h:
            return int(w), int(h)
        with Image.open(self.image_path) as im:
            return im.size


def with_grid(samples: Sequence[VQASample], handle) -> list[VQASample]:
    """Set every sample's patch grid to the model's: the vision tower's square
    ``image_size // patch_size`` grid (an int: CLIP's resize-and-centre-crop; a ``(side, side)``
    pair for the anyres base view, which resizes the whole image to a square without cropping),
    or for a dynamic-resolution tower the ``(rows, cols)`` token grid its processor gives this
    sample's image size; ``None`` (no referred patches) for a model with neither. A fixed tower's
    grid covers ``visible = grid · patch_size / image_size`` of each side (SigLIP-384/14:
    378/384), set on the samples too; a dynamic one's covers the whole resized image."""
    from microscope.model import ANYRES, image_geometry, patch_grid, token_grid

    grid = patch_grid(handle.model)
    visible = 1.0
    if grid is not None:
        side, patch = image_geometry(handle.model)
        visible = grid * patch / side
    if grid is not None and getattr(handle.model.config, "model_type", "") in ANYRES:
        grid = (grid, grid)
    by_size: dict[tuple[int, int], tuple[int, int] | None] = {}
    for s in samples:
        if grid is None and s.boxes:
            size = s.size()
            if size not in by_size:
                by_size[size] = token_grid(handle, *size)
            s.grid = by_size[size]
        else:
            s.grid = grid
        s.visible = visible
    return list(samples)
