"""Which image token covers which patch of which image view — one place for the image-token grid.

A fixed-resolution vision tower of input side ``S`` px and patch ``p`` px (after any ``k × k``
pooling of its patches into tokens, Gemma 3's ``mm_tokens_per_image``) sees a ``g × g`` grid,
``g = floor(S / p)``, in raster order: token ``i`` covers row ``i // g``, column ``i % g``
(:func:`image_geometry`, :func:`patch_grid`). A dynamic-resolution tower (Qwen2-VL) merges
``m × m`` patches into one token over the ``(h / m) × (w / m)`` grid its processor gives each
image (:func:`token_grid`). Anyres models (LLaVA-NeXT, LLaVA-OneVision) put the base view's grid
first, then the high-resolution crops (:func:`patch_layout` returns the base grid).

On the data side, a box ``(x0, y0, x1, y1)`` in original pixels maps onto those cells through the
model's preprocessing: CLIP-style shortest-edge resize and centre crop (:func:`box_patches`) or a
whole-image resize (:func:`resized_box_patches`); :func:`with_grid` sets every sample's grid to the
model's, and :func:`sample_geometry` chooses the size synthetic scenes are drawn at so that their
objects fall on whole cells. Knockout's related/other-image edges, tracing's object tokens,
patch attribution and the object tests all read the grid from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from microscope.crossattn import has_cross_attention, no_patch_tokens
from microscope.roles import ROLE_CODE, Batch

__all__ = ["is_anyres", "image_geometry", "patch_grid", "token_grid", "sample_geometry", "image_patch_positions",
           "patch_layout", "check_grid", "related_patches", "box_patches", "resized_box_patches", "with_grid"]


# ------------------------------------------------------------------------------ the model's grid

def is_anyres(config) -> bool:
    """Whether a model's image tokens start with the base view — the whole image resized to a
    square, not cropped — followed by high-resolution crops (LLaVA-NeXT's "anyres" tiling, which
    LLaVA-NeXT-Video and LLaVA-OneVision share): its config lists ``image_grid_pinpoints``."""
    return bool(getattr(config, "image_grid_pinpoints", None))


def image_geometry(model) -> tuple[int, int] | None:
    """``(image_size, patch_size)`` of a vision tower with a fixed input resolution (from the
    vision config, or from a :class:`~microscope.fusion.FusionModel` that was given them);
    ``None`` for dynamic-resolution towers (Qwen2-VL), whose grid depends on each image."""
    vc = getattr(model.config, "vision_config", None)
    if getattr(vc, "spatial_merge_size", None) and getattr(vc, "temporal_patch_size", None):
        return None  # Qwen2-VL-style dynamic resolution (GLM-4.1V's image_size is only its position table's)
    for src in (vc, model):
        size, patch = getattr(src, "image_size", None), getattr(src, "patch_size", None)
        if isinstance(size, int) and isinstance(patch, int):
            return size, patch * _pooling(model.config, size // patch)
    return None


def _pooling(config, grid: int) -> int:
    """``k`` when the model average-pools its tower's ``grid × grid`` patches in ``k × k`` blocks
    into ``mm_tokens_per_image = (grid / k)²`` image tokens in raster order (Gemma 3: 64 × 64
    patches → 16 × 16 tokens); 1 otherwise. One image token then covers ``k · patch`` px."""
    n = getattr(config, "mm_tokens_per_image", None)
    side = int(round(n ** 0.5)) if isinstance(n, int) and n > 0 else 0
    return grid // side if side and side * side == n and grid % side == 0 else 1


def patch_grid(model) -> int | None:
    """Side of the vision tower's square patch grid, ``floor(image_size / patch_size)`` (what a
    stride-``patch_size`` convolution without padding gives: 27 for SigLIP at 384/14), or ``None``."""
    g = image_geometry(model)
    return g[0] // g[1] if g else None


def token_grid(handle, width: int, height: int) -> tuple[int, int] | None:
    """``(rows, cols)`` of image tokens a dynamic-resolution model (Qwen2-VL) gives a
    ``width × height`` image — what its own image processor resizes it to, divided by
    ``patch · merge`` — or ``None`` for other models. Tokens run in raster order over it."""
    vc = getattr(handle.model.config, "vision_config", None)
    merge = getattr(vc, "spatial_merge_size", None)
    ip = getattr(handle.processor, "image_processor", None)
    if not isinstance(merge, int) or ip is None:
        return None
    from PIL import Image

    thw = ip(images=[Image.new("RGB", (int(width), int(height)))], return_tensors="pt").get("image_grid_thw")
    if thw is None or int(thw[0][0]) != 1:
        return None
    return int(thw[0][1]) // merge, int(thw[0][2]) // merge


def sample_geometry(handle, target: int = 224) -> tuple[int, int] | None:
    """``(image_size, patch_size)`` to draw synthetic samples on, so that their patch grid is the
    model's image-token grid.

    Fixed-resolution towers: :func:`image_geometry`, the tower's own size even when it is not a
    multiple of the patch (SigLIP: 384 px, 14 px patches → 27 × 27 patches over the first 378 px;
    :mod:`microscope.data.shapes` lays the scene out in that seen square). Dynamic-resolution towers that merge m × m
    patches into one token (Qwen2-VL: 14 px patches, m = 2): one token covers ``patch · m`` px, and
    the side is the multiple of it nearest ``target`` that the model's own image processor keeps
    unresized (checked by running it). ``None`` when there is no such grid.
    """
    fixed = image_geometry(handle.model)
    if fixed is not None:
        return fixed
    vc = getattr(handle.model.config, "vision_config", None)
    merge, patch = getattr(vc, "spatial_merge_size", None), getattr(vc, "patch_size", None)
    if not (isinstance(merge, int) and isinstance(patch, int)):
        return None
    unit = patch * merge
    for side in sorted(range(2 * unit, 4 * target + 1, unit), key=lambda x: (abs(x - target), x)):
        if token_grid(handle, side, side) == (side // unit, side // unit):
            return side, unit
    return None


# ------------------------------------------------------- image tokens in a prompt

def image_patch_positions(handle, batch: Batch, row: int, grid: int | tuple[int, int] | None = None
                          ) -> torch.Tensor:
    """Sequence positions of row ``row``'s image tokens that form the vision tower's patch grid,
    in patch (raster) order.

    LLaVA-1.5 style: every image token, one per patch. LLaVA-NeXT and LLaVA-OneVision (anyres): the image tokens
    start with the base (whole-image) view's grid, followed by the high-resolution crops and
    newline tokens; the base grid is returned, so related/other-image edges compare patches
    *of the base view* and leave the crop tokens out of both. Qwen2-VL (dynamic resolution): the
    row's image is ``image_grid_thw = (1, h, w)`` patches merged m × m into tokens in raster order
    over ``(h/m) × (w/m)``. ``grid``: the grid the caller's patch indices assume (a sample's
    ``grid``: a square side or ``(rows, cols)``), checked against the model's. ``ValueError`` for
    other layouts (give image positions directly as a :class:`Block`).
    """
    pos, shape = patch_layout(handle, batch, row)
    check_grid(handle, shape, grid)
    return pos


def patch_layout(handle, batch: Batch, row: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Row ``row``'s patch-grid positions and the grid's ``(rows, cols)``; ``ValueError`` when its
    image tokens form no patch grid."""
    if has_cross_attention(handle):
        raise no_patch_tokens(handle, "an image patch grid (related/other-image edges, patch attribution, object "
                                      "tests)")
    pos = (batch.roles[row] == ROLE_CODE["image"]).nonzero().flatten()
    side = patch_grid(handle.model)
    if side is not None:
        if is_anyres(handle.model.config) and len(pos) > side * side:
            return pos[:side * side], (side, side)
        if len(pos) != side * side:
            raise ValueError(f"{handle.name} has {len(pos)} image tokens for a {side}×{side} patch grid; related/"
                             "other-image edges need the patch grid's tokens — pass image positions in a Block "
                             "instead")
        return pos, (side, side)
    thw = batch.inputs.get("image_grid_thw")
    merge = getattr(getattr(handle.model.config, "vision_config", None), "spatial_merge_size", None)
    if thw is None or not merge:
        raise ValueError(f"{handle.name}'s image tokens form no patch grid (pixel-shuffled or dynamic "
                         "resolution); related/other-image edges need one — pass image positions in a Block instead")
    t, h, w = (int(v) for v in thw[row])
    shape = (h // merge, w // merge)
    if t != 1 or len(pos) != shape[0] * shape[1]:
        raise ValueError(f"{handle.name}: row {row}'s image is a {t}×{h}×{w} patch grid for {len(pos)} image "
                         "tokens, not one image; related/other-image edges need one image per row")
    return pos, shape


def check_grid(handle, shape: tuple[int, int], grid: int | tuple[int, int] | None) -> None:
    want = (grid, grid) if isinstance(grid, int) else tuple(grid) if grid is not None else shape
    if want != shape:
        raise ValueError(f"the sample's patch indices are on a {want[0]}×{want[1]} grid but {handle.name}'s image "
                         f"tokens form a {shape[0]}×{shape[1]} grid: load samples with load_samples(..., handle=h)")


def related_patches(handle, batch: Batch, row: int, sample) -> tuple[int, ...] | None:
    """``sample.referred_patches()``, checked to lie on the model's patch grid (``None`` when the
    sample has none or the model has no patch grid)."""
    f = getattr(sample, "referred_patches", None)
    if not callable(f):
        return None
    try:
        _, shape = patch_layout(handle, batch, row)
    except ValueError:
        return None
    check_grid(handle, shape, getattr(sample, "grid", None))  # a mismatch is the caller's error
    return tuple(f())


# ------------------------------------------------------------ boxes on the grid

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


def with_grid(samples: Sequence[Any], handle) -> list[Any]:
    """Set every sample's patch grid to the model's and return the samples. Samples are data-set
    samples (:class:`microscope.data.vqa.VQASample`: ``grid``, ``visible``, ``boxes``, ``size()``).

    The grid is the vision tower's square ``image_size // patch_size`` grid (an int: CLIP's
    resize-and-centre-crop; a ``(side, side)`` pair for the anyres base view, which resizes the
    whole image to a square without cropping), or for a dynamic-resolution tower the
    ``(rows, cols)`` token grid its processor gives this sample's image size; ``None`` (no
    referred patches) for a model with neither. A fixed tower's grid covers
    ``visible = grid · patch_size / image_size`` of each side (SigLIP-384/14: 378/384), set on the
    samples too; a dynamic one's covers the whole resized image."""
    side_patches = patch_grid(handle.model)
    geometry = image_geometry(handle.model)
    visible = 1.0
    if side_patches is not None and geometry is not None:  # patch_grid is None exactly when geometry is
        side, patch = geometry
        visible = side_patches * patch / side
    grid: int | tuple[int, int] | None = side_patches
    if side_patches is not None and is_anyres(handle.model.config):
        grid = (side_patches, side_patches)
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
    return samples if isinstance(samples, list) else list(samples)
