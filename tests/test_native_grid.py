"""Samples at a model's native resolution when it is not a multiple of the patch size.

SigLIP-384/14 (LLaVA-OneVision) embeds a 384 px image with a stride-14 convolution: a 27 × 27 patch
grid over the first 378 px; the last 6 px rows and columns are never seen. Shapes samples are
drawn at 384 px with their objects inside the seen 378 px, and real images' boxes are mapped
onto the part of the resized image the grid covers. Checked against the tiny models' own
processor and embeddings (tests/tiny_models.py build_llava_onevision), cell by cell.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import microscope
from microscope import grid
from microscope import knockout as ko
from microscope.data import load_samples, shapes
from microscope.data.vqa import VQASample
from microscope.extract import capture
from microscope.grid import box_patches, patch_grid, resized_box_patches, with_grid
from tests.test_shapes import _solve
from tests.tiny_models import build_llava_onevision


def _load(path) -> microscope.model.Handle:
    with warnings.catch_warnings():  # processor loaded without its video part (no torchvision here)
        warnings.filterwarnings("ignore", "torchvision is not installed")
        return microscope.load(str(path))


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    """Tiny OneVision models at 62 px and 384 px (patch 14) whose image tokens are the tower's
    patch embeddings (no attention between patches before the decoder)."""
    root = tmp_path_factory.mktemp("native")
    return {size: _load(build_llava_onevision(root / f"ov{size}", size=size, tower_layers=1, feature_layer=-2,
                                                    square_pin=True))
            for size in (62, 384)}


@pytest.mark.parametrize("size, patch, grid", [(384, 14, 27), (62, 14, 4), (100, 16, 6), (336, 14, 24)])
def test_shapes_at_a_size_that_is_not_a_multiple_of_the_patch(size, patch, grid):
    """The image is ``size`` px; the objects lie in the first ``grid · patch`` px (the part a
    stride-``patch`` convolution sees), the rest is background, and each object's patches are
    where its pixels are on the ``grid × grid`` grid over that part."""
    samples = shapes.generate(30, seed=4, image_size=size, patch_size=patch)
    seen = grid * patch
    for s in samples:
        assert s.image.size == (size, size) and s.grid == grid and s.visible_size == seen
        img = np.asarray(s.image)
        assert np.all(img[seen:] == shapes.BACKGROUND) and np.all(img[:, seen:] == shapes.BACKGROUND)
        assert s.answer == _solve(s), (s.id, s.question)
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= seen and 0 <= y0 < y1 <= seen
            full = np.zeros((seen, seen), bool)
            full[y0:y1, x0:x1] = np.all(img[y0:y1, x0:x1] == shapes.COLORS[o.color], axis=-1)
            cover = full.reshape(grid, patch, grid, patch).sum(axis=(1, 3)).reshape(-1)
            assert tuple(np.flatnonzero(cover)) == o.patches and max(o.patches) < grid * grid
            assert np.allclose(o.patch_fraction, cover[list(o.patches)] / patch ** 2)
    # objects are drawn to the scale of the seen square, so they keep filling it
    assert max(o.box[2] for s in samples for o in s.objects) > seen - 4


def test_sizes_that_are_multiples_of_the_patch_draw_the_same_bytes_as_before():
    """Multiples (every model so far, and the embedded model's training data) are unchanged:
    digests recorded on the code before native sizes were supported."""
    want = {(96, 16): "cc18005f77cfb13c", (336, 14): "2ad63c0c81a661c5", (112, 14): "3ba9830069dd68f3"}
    for (size, patch), digest in want.items():
        h = hashlib.sha256()
        for s in shapes.generate(12, seed=11, image_size=size, patch_size=patch):
            h.update(s.image.tobytes())
            h.update(repr((s.question, s.answer, s.objects, s.referred, s.constraints)).encode())
        assert h.hexdigest()[:16] == digest, (size, patch)


@pytest.mark.parametrize("config, want", [
    (transformers.LlavaConfig(), (336, 14, 24)),             # LLaVA-1.5: CLIP ViT-L/14 at 336 px
    (transformers.LlavaNextConfig(), (336, 14, 24)),         # LLaVA-NeXT's base view
    (transformers.LlavaOnevisionConfig(), (384, 14, 27)),    # OneVision: SigLIP so400m/14 at 384 px
], ids=["llava-1.5", "llava-next", "onevision"])
def test_real_model_geometries_get_samples(config, want):
    """The real checkpoints' vision geometries (the config classes' defaults) all get samples at
    their native size, on the grid their towers embed: ``floor(image_size / patch_size)``."""
    h = SimpleNamespace(model=SimpleNamespace(config=config), processor=None, name=type(config).__name__)
    s = load_samples("shapes", n=6, seed=2, handle=h)
    assert {(x.image_size, x.patch_size, x.grid) for x in s} == {want}
    assert patch_grid(h.model) == want[2] and all(x.image.size == (want[0], want[0]) for x in s)
    # a custom-fusion model with the same tower (Bunny: SigLIP 384/14) gets the same
    fusion = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(), image_size=want[0], patch_size=14))
    assert load_samples("shapes", n=1, handle=fusion)[0].grid == want[2]


def _base_embeddings(h, images: list[Image.Image], question: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Input embeddings of the base view's image tokens, one row per image: ``(N, grid², d)``,
    and every token's input embeddings ``(N, T, d)``."""
    probe = [shapes.Sample(id=f"p{i}", image=im, question=question, answer="red", category="QueryAttr",
                           objects=(), referred=(), constraints=()) for i, im in enumerate(images)]
    b = microscope.prepare_samples(h, probe)
    with torch.no_grad(), capture(h, [-1]) as acts:
        h.model(**b.inputs)
    emb = acts["resid.-1"]
    pos = [grid.image_patch_positions(h, b, i, patch_grid(h.model)) for i in range(len(images))]
    return torch.stack([emb[i, p] for i, p in enumerate(pos)]), emb


@pytest.mark.parametrize("size", [62, 384])
def test_cells_reach_exactly_their_image_tokens(onevision, size):
    """Blacking out pixel cell (r, c) of the seen square changes exactly base-view image token
    r·g + c; blacking out the unseen strip changes no token at all; erasing a sample's object
    changes exactly the tokens of its ground-truth patches."""
    h = onevision[size]
    g = size // 14
    t0 = time.perf_counter()
    s = load_samples("shapes", n=3, seed=1, handle=h)
    assert (s[0].image_size, s[0].grid, patch_grid(h.model)) == (size, g, g)
    plain = np.full((size, size, 3), 200, np.uint8)
    cells = [(0, 0), (1, 2), (g - 1, 0), (g - 1, g - 1)]
    images = [plain]
    for r, c in cells:
        img = plain.copy()
        img[14 * r:14 * r + 14, 14 * c:14 * c + 14] = 0
        images.append(img)
    strip = plain.copy()
    strip[14 * g:] = 0
    strip[:, 14 * g:] = 0
    images.append(strip)
    base, emb = _base_embeddings(h, [Image.fromarray(x) for x in images], "What color is the circle?")
    for k, (r, c) in enumerate(cells, start=1):
        changed = ((base[k] - base[0]).abs().amax(-1) > 0).nonzero().flatten().tolist()
        assert changed == [r * g + c], (r, c, changed)
    assert torch.equal(emb[-1], emb[0]), "a pixel the tower never sees changed an embedding"
    for x in s:
        img = np.asarray(x.image)
        erased = []
        for o in x.objects:
            e = img.copy()
            x0, y0, x1, y1 = o.box
            e[y0:y1, x0:x1] = shapes.BACKGROUND
            erased.append(Image.fromarray(e))
        base, _ = _base_embeddings(h, [x.image, *erased], x.question)
        for k, o in enumerate(x.objects, start=1):
            changed = ((base[k] - base[0]).abs().amax(-1) > 0).nonzero().flatten().tolist()
            assert tuple(changed) == o.patches, (x.id, o)
    print(f"\n{size} px / 14 px: {g}x{g} grid, {emb.shape[1]} tokens per prompt, "
          f"{time.perf_counter() - t0:.2f} s")


def test_related_image_edges_and_sweep_on_a_native_grid(onevision):
    """The knockout's related/other-image edges run on samples drawn at 62 px (4 × 4 over 56 px)
    and at 384 px (27 × 27 over 378 px)."""
    for size, g in ((62, 4), (384, 27)):
        h = onevision[size]
        s = load_samples("shapes", n=2, seed=5, handle=h)
        b = microscope.prepare_samples(h, s)
        related = [x.referred_patches() for x in s]
        src, _ = ko.edge_masks(h, b, "related-image↛question", related)
        other, _ = ko.edge_masks(h, b, "other-image↛question", related)
        for i, x in enumerate(s):
            assert src[i].sum().item() == len(x.referred_patches())
            assert src[i].sum().item() + other[i].sum().item() == g * g
    h = onevision[62]
    s = load_samples("shapes", n=2, seed=5, handle=h)
    df = ko.sweep(h, s, edges=["related-image↛question", "other-image↛question"], only_correct=False,
                  progress=False)
    assert len(df) == 2 * 2 * h.adapter.n_layers and df.p_blocked.notna().all()


def test_real_boxes_skip_the_strip_the_tower_never_sees(onevision):
    """A 120 × 80 image is resized to 62 × 62 for the base view; the grid covers its first 56 px,
    i.e. x < 120 · 56/62 ≈ 108.4 of the original. A GQA-style box's referred patches are the
    cells the processor's own pixels put a dark box in; one right of 108.4 px is in none (it is
    in the unseen strip)."""
    h = onevision[62]
    ip = h.processor.image_processor
    visible = 56 / 62
    for box, want in (((84, 0, 90, 12), (3,)), ((112, 30, 120, 50), ()), ((0, 60, 10, 80), (12,))):
        img = np.full((80, 120, 3), 255, np.uint8)
        x0, y0, x1, y1 = box
        img[y0:y1, x0:x1] = 0
        px = ip(images=[Image.fromarray(img)], return_tensors="pt")["pixel_values"][0, 0].mean(0)  # base view
        assert (px < 0).any(), "the box is in the processed image"
        dark = (px[:56, :56].reshape(4, 14, 4, 14).amin(dim=(1, 3)).flatten() < 0).nonzero().flatten()
        assert tuple(dark.tolist()) == want, box
        sample = VQASample(id="q", image_path=None, question="Is the cup red?", answer="yes",
                           category="ChooseAttr", boxes=(box,), meta={"width": 120, "height": 80})
        (sample,) = with_grid([sample], h)
        assert sample.grid == (4, 4) and sample.referred_patches() == want, box
        assert resized_box_patches(box, 120, 80, 4, 4, visible=visible) == want
    assert sample.visible == pytest.approx(visible)
    # the centre-crop rule, on a crop of 80 px whose grid covers 56/62 of it
    assert box_patches((20, 0, 35, 10), 120, 80, 4, visible=visible) == (0,)
    assert box_patches((95, 0, 100, 10), 120, 80, 4, visible=visible) == ()
