"""The Shapes world: procedurally generated visual questions with known ground truth.

Every sample is a small RGB image of 1–5 coloured shapes on a plain background and one
question in one of the six GQA categories, with a single-word answer and full ground truth:

- each object's shape, colour, size, pixel box and the image patches it covers on the
  model's ``patch_size`` grid (raster order, ``index = row * grid + col``, the order in which
  a ViT flattens its patch embeddings);
- which object(s) the question refers to;
- the constraint words (the words that pick out the referred object) and their character
  spans in the question;
- the category.

The image may be any size ``S``, also one that is not a multiple of the patch size ``p``: a ViT
embeds it with a ``p × p`` convolution of stride ``p`` and no padding, which gives
``g = floor(S / p)`` patches per side and never reads the last ``S - g·p`` rows and columns
(SigLIP at 384 px, 14 px patches: 27 × 27 patches over the first 378 px). The scene is laid out
in that seen ``g·p`` square (object sizes scale with it) and the unseen strip is background, so
every object is visible to the model and its patches are exactly those its pixels fall in.

``generate(n, seed)`` is deterministic and prefix-stable: sample ``i`` depends only on
``(seed, i)``, so ``generate(10, s)[:5] == generate(5, s)`` byte for byte. Within each
category answers are stratified: the k-th sample of a category takes the answer
``perm[k % m]`` of a seeded permutation of the category's m answers, so answers are uniform.

Example::

    >>> from microscope.data.shapes import generate
    >>> s = generate(1, seed=0)[0]
    >>> s.question, s.answer, s.category          # doctest: +SKIP
    ('What color is the circle?', 'red', 'QueryAttr')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CATEGORIES",
    "COLORS",
    "SHAPES",
    "SIZES",
    "BACKGROUND",
    "ANSWERS",
    "Constraint",
    "ShapeObject",
    "Sample",
    "generate",
    "ask",
    "reask",
    "conversation",
    "AUX_CATEGORIES",
    "blank_image",
    "vocabulary",
]

CATEGORIES: tuple[str, ...] = (
    "ChooseAttr",
    "QueryAttr",
    "ChooseCat",
    "LogicalObj",
    "ChooseRel",
    "CompareAttr",
)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 30),
    "purple": (145, 55, 200),
    "orange": (245, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: side of an object's bounding box in pixels, for an image of 96 px (scaled with image_size)
SIZES: dict[str, int] = {"small": 16, "large": 24}
BACKGROUND: tuple[int, int, int] = (245, 245, 245)
#: the possible answers of each category
ANSWERS: dict[str, tuple[str, ...]] = {
    "ChooseAttr": tuple(COLORS),
    "QueryAttr": tuple(COLORS),
    "ChooseCat": SHAPES,
    "LogicalObj": ("yes", "no"),
    "ChooseRel": ("left", "right"),
    "CompareAttr": ("yes", "no"),
}
#: the question templates, for documentation and for building a vocabulary
TEMPLATES: dict[str, str] = {
    "ChooseAttr": "Is the {shape} {color1} or {color2}?",
    "QueryAttr": "What color is the {shape}?",
    "ChooseCat": "Is the {color} object a {shape1} or a {shape2}?",
    "LogicalObj": "Is there a {shape1} or a {shape2}?",
    "ChooseRel": "Is the {shape1} {rel1} of or {rel2} of the {shape2}?",
    "CompareAttr": "Do the {shape1} and the {shape2} have the same color?",
}
#: training-only auxiliary question types (a curriculum for multi-turn training; never evaluated):
#: QueryPos retrieves one object's horizontal position, QueryCat retrieves by colour
AUX_CATEGORIES: tuple[str, ...] = ("QueryPos", "QueryCat")
AUX_ANSWERS: dict[str, tuple[str, ...]] = {"QueryPos": ("left", "right"), "QueryCat": SHAPES}
AUX_TEMPLATES: dict[str, str] = {
    "QueryPos": "Is the {shape} on the left or on the right?",
    "QueryCat": "What shape is the {color} object?",
}
_REFERENCE_SIZE = 96
_GAP = 2  # minimum pixels between two objects' boxes
_REL_MARGIN = 6  # minimum horizontal distance between centres for left/right questions
_MAX_TRIES = 2000
_MIN_VISIBLE = 48  # smallest seen square (px) the scenes are laid out in


@dataclass(frozen=True)
class Constraint:
    """A constraint word of the question and its character span ``question[start:end]``."""

    word: str
    start: int
    end: int


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene.

    ``box`` is ``(x0, y0, x1, y1)`` in pixels, end-exclusive. ``patches`` are the raster indices
    of the patches that contain at least one of the object's pixels, and ``patch_fraction[i]`` is
    the fraction of patch ``patches[i]``'s area the object covers.
    """

    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]
    patches: tuple[int, ...]
    patch_fraction: tuple[float, ...]
    #: scale of the scene: side of the seen square the objects are laid out in, over 96 px
    meta_scale: float = 1.0

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)


@dataclass
class Sample:
    """One visual question with its ground truth (see the module docstring)."""

    id: str
    image: Image.Image
    question: str
    answer: str
    category: str
    objects: tuple[ShapeObject, ...]
    referred: tuple[int, ...]
    constraints: tuple[Constraint, ...]
    options: tuple[str, ...] = ()
    image_size: int = _REFERENCE_SIZE
    patch_size: int = 16
    meta: dict = field(default_factory=dict)

    @property
    def grid(self) -> int:
        """Number of patches along one side of the image: ``floor(image_size / patch_size)``, as a
        stride-``patch_size`` convolution without padding gives."""
        return self.image_size // self.patch_size

    @property
    def visible_size(self) -> int:
        """Side of the square the patches cover, ``grid · patch_size`` px from the top-left corner;
        the rest of the image (``image_size - visible_size`` px) is background the model never
        sees. Equals ``image_size`` when it is a multiple of ``patch_size``."""
        return self.grid * self.patch_size

    def replacements(self, word: str) -> list[str]:
        """Other words of the same kind as ``word`` (colours for a colour, shapes for a shape,
        sizes for a size): the token-replacement corruption of causal tracing draws from these."""
        for kind in (COLORS, SHAPES, SIZES):
            if word in kind:
                return [w for w in kind if w != word]
        return []

    def referred_patches(self, min_coverage: float = 0.0) -> tuple[int, ...]:
        """Sorted union of the patches covered by the referred objects: every patch holding at
        least one of their pixels (``min_coverage = 0``), or those whose area they cover by at
        least the fraction ``min_coverage`` (see :meth:`patch_coverage`)."""
        if not 0.0 <= min_coverage <= 1.0:
            raise ValueError(f"min_coverage must be a fraction in [0, 1], got {min_coverage!r}")
        cov = self.patch_coverage()
        return tuple(int(j) for j in np.flatnonzero((cov > 0) & (cov >= min_coverage)))

    def patch_coverage(self, objects: Sequence[int] | None = None) -> np.ndarray:
        """Fraction of each patch's area covered by ``objects`` (indices into :attr:`objects`;
        default: the referred ones), as a float array of ``grid²`` values in raster order.

        ``coverage[j] = |pixels of the objects in patch j| / patch_size²``; objects never overlap,
        so the coverage of several is the sum of theirs (at most 1)."""
        cov = np.zeros(self.grid * self.grid)
        for i in (self.referred if objects is None else objects):
            o = self.objects[i]
            cov[list(o.patches)] += o.patch_fraction
        return cov

    def answer_for(self, objects: Sequence[ShapeObject] | None = None, keep: Sequence[int] | None = None
                   ) -> str | None:
        """The true answer of this sample's question about a changed scene: the objects ``keep``
        (default all) as given in ``objects`` (default :attr:`objects`). ``None`` when the
        question has no answer there: the object it names is missing or not unique, the answer is
        not among the options, or two objects it compares are closer horizontally than the
        generator's margin. ``answer_for() == answer`` on every generated sample."""
        objs = list(self.objects if objects is None else objects)
        objs = objs if keep is None else [objs[i] for i in keep]
        words = [c.word for c in self.constraints]

        def one(attr: str, value: str) -> ShapeObject | None:
            match = [o for o in objs if getattr(o, attr) == value]
            return match[0] if len(match) == 1 else None

        cat = self.category
        if cat == "LogicalObj":
            return "yes" if any(o.shape in words for o in objs) else "no"
        if cat in ("QueryAttr", "ChooseAttr", "ChooseCat"):
            o = one("color" if cat == "ChooseCat" else "shape", words[0])
            ans = None if o is None else (o.shape if cat == "ChooseCat" else o.color)
            return ans if ans is not None and (not self.options or ans in self.options) else None
        a, b = one("shape", words[0]), one("shape", words[1])
        if a is None or b is None:
            return None
        if cat == "CompareAttr":
            return "yes" if a.color == b.color else "no"
        dx = b.center[0] - a.center[0]
        return None if abs(dx) < _REL_MARGIN * _scale(objs) else ("left" if dx > 0 else "right")

    def object_mask(self, i: int) -> np.ndarray:
        """Boolean ``image_size × image_size`` mask of object ``i``'s pixels."""
        mask = np.zeros((self.image_size, self.image_size), dtype=bool)
        o = self.objects[i]
        mask[:self.visible_size, :self.visible_size] = _draw_mask(o.shape, o.box, self.visible_size)
        return mask

    def render(self, keep: Sequence[int] | None = None, objects: Sequence[ShapeObject] | None = None
               ) -> Image.Image:
        """The scene drawn again with only the objects ``keep`` (indices; default all), each as
        given in ``objects`` (default :attr:`objects`; pass edited copies, e.g.
        ``dataclasses.replace(o, color="red")``, for a counterfactual scene with the same boxes).
        ``render()`` gives :attr:`image` byte for byte; ``render(keep=[])`` the empty background."""
        objs = self.objects if objects is None else tuple(objects)
        if len(objs) != len(self.objects):
            raise ValueError(f"objects must give all {len(self.objects)} objects of the scene, got {len(objs)}")
        keep = range(len(objs)) if keep is None else keep
        img = np.empty((self.image_size, self.image_size, 3), dtype=np.uint8)
        img[:] = BACKGROUND
        seen = self.visible_size
        for i in keep:
            o = objs[i]
            img[:seen, :seen][_draw_mask(o.shape, o.box, seen)] = COLORS[o.color]
        return Image.fromarray(img, "RGB")


def vocabulary() -> list[str]:
    """Every word and punctuation token the Shapes world's questions and answers use."""
    words: set[str] = set()
    fill = {
        "shape": "",
        "shape1": "",
        "shape2": "",
        "color": "",
        "color1": "",
        "color2": "",
        "rel1": "",
        "rel2": "",
    }
    for t in list(TEMPLATES.values()) + list(AUX_TEMPLATES.values()):
        words.update(t.replace("?", " ?").format(**fill).split())
    words.update(COLORS)
    words.update(SHAPES)
    for answers in ANSWERS.values():
        words.update(answers)
    return sorted(words)


def blank_image(image_size: int = _REFERENCE_SIZE) -> Image.Image:
    """A plain background image of the Shapes world (no objects)."""
    return Image.new("RGB", (image_size, image_size), BACKGROUND)


def _check_args(n: int, seed: int, image_size: int, patch_size: int, max_objects: int,
                categories: Sequence[str]) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) \
            or image_size // patch_size * patch_size < _MIN_VISIBLE:
        raise ValueError(
            f"image_size must be an integer whose patch grid covers at least {_MIN_VISIBLE} px "
            f"(floor(image_size / patch_size) * patch_size >= {_MIN_VISIBLE}, the room the objects need), "
            f"got image_size={image_size!r} with patch_size={patch_size}: give a larger image_size"
        )
    if not isinstance(max_objects, (int, np.integer)) or not 2 <= max_objects <= 5:
        raise ValueError(f"max_objects must be an integer in [2, 5], got {max_objects!r}")
    if not categories:
        raise ValueError("categories must name at least one of " + ", ".join(CATEGORIES))
    bad = [c for c in categories if c not in CATEGORIES]
    if bad:
        raise ValueError(f"categories: unknown {bad}; choose from {list(CATEGORIES)}")


def generate(
    n: int,
    seed: int = 0,
    *,
    image_size: int = _REFERENCE_SIZE,
    patch_size: int = 16,
    max_objects: int = 5,
    categories: Sequence[str] = CATEGORIES,
    start: int = 0,
) -> list[Sample]:
    """Generate ``n`` samples of the Shapes world, deterministically from ``seed``.

    Parameters
    ----------
    n: number of samples.
    seed: non-negative integer; sample ``i`` depends only on ``(seed, i)``.
    image_size, patch_size: image side and the model's patch side, in pixels; the ground-truth
        patch indices are on the ``g = image_size // patch_size`` square grid. ``image_size`` need
        not be a multiple of ``patch_size``: the objects are then drawn inside the ``g·patch_size``
        px square the patches cover, and the remaining strip is background (see the module
        docstring).
    max_objects: largest number of objects in a scene (2–5); scenes have 1..max_objects
        objects, at least 2 where the category needs two referred objects.
    categories: question categories to draw from, cycled in the given order.
    start: index of the first sample (``generate(n, s, start=k)`` equals
        ``generate(k + n, s)[k:]``).
    """
    categories = tuple(categories)
    _check_args(n, seed, image_size, patch_size, max_objects, categories)
    perms = {
        c: np.random.default_rng([seed, 7_919, i]).permutation(len(ANSWERS[c]))
        for i, c in enumerate(CATEGORIES)
    }
    out = []
    for i in range(start, start + n):
        cat = categories[i % len(categories)]
        k = i // len(categories)
        answer = ANSWERS[cat][perms[cat][k % len(ANSWERS[cat])]]
        rng = np.random.default_rng([seed, i])
        out.append(_make_sample(f"shapes-{seed}-{i}", cat, answer, rng, image_size, patch_size,
                                max_objects))
    return out


# --------------------------------------------------------------------------- scene building

def _pick(rng: np.random.Generator, items: Sequence[str], exclude: Sequence[str] = ()) -> str:
    pool = [x for x in items if x not in exclude]
    return pool[int(rng.integers(len(pool)))]


def _place(rng: np.random.Generator, specs: list[dict], square: int,
           rel: tuple[int, int, str] | None = None) -> list[tuple[int, int, int, int]]:
    """Random non-overlapping boxes for ``specs`` inside the ``square`` px square from the
    top-left corner (the part of the image the patches cover; rejection sampling,
    all-or-nothing). Sizes and margins scale by ``square / 96``."""
    scale = square / _REFERENCE_SIZE
    for _ in range(_MAX_TRIES):
        boxes: list[tuple[int, int, int, int]] = []
        ok = True
        for sp in specs:
            side = int(round(SIZES[sp["size"]] * scale))
            placed = False
            for _ in range(50):
                x0 = int(rng.integers(0, square - side + 1))
                y0 = int(rng.integers(0, square - side + 1))
                b = (x0, y0, x0 + side, y0 + side)
                if all(b[0] >= o[2] + _GAP or o[0] >= b[2] + _GAP or b[1] >= o[3] + _GAP
                       or o[1] >= b[3] + _GAP for o in boxes):
                    boxes.append(b)
                    placed = True
                    break
            if not placed:
                ok = False
                break
        if ok and rel is not None:
            ia, ib, answer = rel
            ca = (boxes[ia][0] + boxes[ia][2]) / 2
            cb = (boxes[ib][0] + boxes[ib][2]) / 2
            want_left = answer == "left"
            ok = (cb - ca >= _REL_MARGIN * scale) if want_left else (ca - cb >= _REL_MARGIN * scale)
        if ok:
            return boxes
    raise RuntimeError("could not place the objects without overlap; use a larger image_size")


def _draw_mask(shape: str, box: tuple[int, int, int, int], image_size: int) -> np.ndarray:
    """Boolean pixel mask of one shape drawn in ``box``."""
    m = Image.new("L", (image_size, image_size), 0)
    d = ImageDraw.Draw(m)
    x0, y0, x1, y1 = box
    xe, ye = x1 - 1, y1 - 1
    if shape == "circle":
        d.ellipse([x0, y0, xe, ye], fill=255)
    elif shape == "square":
        d.rectangle([x0, y0, xe, ye], fill=255)
    elif shape == "triangle":
        d.polygon([((x0 + xe) / 2, y0), (xe, ye), (x0, ye)], fill=255)
    elif shape == "cross":
        w = (x1 - x0) // 3
        d.rectangle([x0 + w, y0, xe - w, ye], fill=255)
        d.rectangle([x0, y0 + w, xe, ye - w], fill=255)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(m) > 0


def _render(specs: list[dict], boxes: list, image_size: int, patch_size: int
            ) -> tuple[Image.Image, tuple[ShapeObject, ...]]:
    """The ``image_size`` px image with the objects drawn in ``boxes`` (all inside the seen
    ``g·patch_size`` square, ``g = image_size // patch_size``) and each object's patches:
    the cells of the ``g × g`` grid over that square that hold at least one of its pixels."""
    img = np.empty((image_size, image_size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    g = image_size // patch_size
    seen = g * patch_size
    objects = []
    for sp, b in zip(specs, boxes):
        if max(b) > seen:  # pragma: no cover - _place lays the scene out in the seen square
            raise RuntimeError(f"internal error: box {b} leaves the {seen} px square the patches cover")
        mask = _draw_mask(sp["shape"], b, seen)
        img[:seen, :seen][mask] = COLORS[sp["color"]]
        cover = mask.reshape(g, patch_size, g, patch_size).sum(axis=(1, 3)).reshape(-1)
        idx = np.flatnonzero(cover)
        x0, y0, x1, y1 = (int(v) for v in b)
        objects.append(ShapeObject(
            shape=sp["shape"], color=sp["color"], size=sp["size"], box=(x0, y0, x1, y1),
            patches=tuple(int(i) for i in idx),
            patch_fraction=tuple(float(cover[i]) / patch_size**2 for i in idx),
            meta_scale=seen / _REFERENCE_SIZE,
        ))
    return Image.fromarray(img, "RGB"), tuple(objects)


def _spans(question: str, words: Sequence[str]) -> tuple[Constraint, ...]:
    """Character spans of ``words`` in ``question``, each found after the previous one."""
    out, pos = [], 0
    for w in words:
        j = question.index(w, pos)
        out.append(Constraint(w, j, j + len(w)))
        pos = j + len(w)
    return tuple(out)


def _unique(objects: Sequence[ShapeObject], attr: str) -> list[int]:
    """Indices of objects whose ``attr`` value occurs once in the scene."""
    vals = [getattr(o, attr) for o in objects]
    return [i for i, v in enumerate(vals) if vals.count(v) == 1]


def _referent(objects: Sequence[ShapeObject], key: str, attr: str, value: str,
              rng: np.random.Generator) -> int | None:
    """A random object whose ``key`` (shape or colour) is unique in the scene and whose ``attr``
    equals ``value``, i.e. one that a question naming its ``key`` refers to unambiguously."""
    cand = [i for i in _unique(objects, key) if getattr(objects[i], attr) == value]
    return cand[int(rng.integers(len(cand)))] if cand else None


def ask(objects: Sequence[ShapeObject], category: str, answer: str, rng: np.random.Generator
        ) -> tuple[str, tuple[int, ...], tuple[str, ...], tuple[str, ...]] | None:
    """A question of ``category`` about a scene whose correct answer is ``answer``.

    Returns ``(question, referred, constraint_words, options)``, or ``None`` when the scene
    admits no such question (e.g. no object with a unique shape has colour ``answer``).
    Referred objects are always unambiguous: a shape word names an object only when that shape
    occurs once in the scene, a colour word only when that colour occurs once.
    """
    answers = {**ANSWERS, **AUX_ANSWERS}
    if category not in answers:
        raise ValueError(f"category: unknown {category!r}; choose from {list(CATEGORIES + AUX_CATEGORIES)}")
    if answer not in answers[category]:
        raise ValueError(f"answer {answer!r} is not an answer of {category}: {answers[category]}")
    present = {o.shape for o in objects}
    if category == "QueryPos":
        half = objects[0].meta_scale * _REFERENCE_SIZE / 2 if objects else 0
        margin = _REL_MARGIN * _scale(objects)
        cand = [i for i in _unique(objects, "shape")
                if (objects[i].center[0] <= half - margin) == (answer == "left")
                and abs(objects[i].center[0] - half) >= margin]
        if not cand:
            return None
        target = cand[int(rng.integers(len(cand)))]
        shape = objects[target].shape
        return f"Is the {shape} on the left or on the right?", (target,), (shape,), ("left", "right")
    if category == "QueryCat":
        t = _referent(objects, "color", "shape", answer, rng)
        if t is None:
            return None
        color = objects[t].color
        return f"What shape is the {color} object?", (t,), (color,), ()
    if category in ("QueryAttr", "ChooseAttr"):
        t = _referent(objects, "shape", "color", answer, rng)
        if t is None:
            return None
        shape = objects[t].shape
        if category == "QueryAttr":
            return f"What color is the {shape}?", (t,), (shape,), ()
        other = _pick(rng, list(COLORS), [answer])
        opts = (answer, other) if rng.random() < 0.5 else (other, answer)
        return f"Is the {shape} {opts[0]} or {opts[1]}?", (t,), (shape,), opts
    if category == "ChooseCat":
        t = _referent(objects, "color", "shape", answer, rng)
        if t is None:
            return None
        color = objects[t].color
        other = _pick(rng, SHAPES, [answer])
        opts = (answer, other) if rng.random() < 0.5 else (other, answer)
        return f"Is the {color} object a {opts[0]} or a {opts[1]}?", (t,), (color,), opts
    if category == "LogicalObj":
        pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b
                 and ((a in present or b in present) == (answer == "yes"))]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        referred = tuple(i for i, o in enumerate(objects) if o.shape in (a, b))
        return f"Is there a {a} or a {b}?", referred, (a, b), ("yes", "no")
    uniq = _unique(objects, "shape")
    index_pairs: list[tuple[int, int]] = []
    for i in uniq:
        for j in uniq:
            if i == j:
                continue
            if category == "ChooseRel":
                dx = objects[j].center[0] - objects[i].center[0]
                margin = _REL_MARGIN * _scale(objects)
                if (answer == "left" and dx >= margin) or (answer == "right" and -dx >= margin):
                    index_pairs.append((i, j))
            elif (objects[i].color == objects[j].color) == (answer == "yes"):
                index_pairs.append((i, j))
    if not index_pairs:
        return None
    i, j = index_pairs[int(rng.integers(len(index_pairs)))]
    a, b = objects[i].shape, objects[j].shape
    if category == "ChooseRel":
        opts = ("left", "right") if rng.random() < 0.5 else ("right", "left")
        return f"Is the {a} {opts[0]} of or {opts[1]} of the {b}?", (i, j), (a, b), opts
    return f"Do the {a} and the {b} have the same color?", (i, j), (a, b), ("yes", "no")


def reask(sample: Sample, category: str, seed: int = 0) -> Sample | None:
    """The same scene asked a ``category`` question (training-only auxiliary ones included) with
    the same answer, e.g. a ChooseCat sample's ``Is the red object a cross or a circle?`` as the
    QueryCat ``What shape is the red object?``: the same fact through another template. ``None``
    when the scene admits no such question (see :func:`ask`)."""
    got = ask(sample.objects, category, sample.answer, np.random.default_rng([seed, 104_723]))
    if got is None:
        return None
    question, referred, words, options = got
    return replace(sample, id=f"{sample.id}-{category}", question=question, category=category, referred=referred,
                   constraints=_spans(question, words), options=options)


def _scale(objects: Sequence[ShapeObject]) -> float:
    return 1.0 if not objects else objects[0].meta_scale


def _make_sample(sid: str, cat: str, answer: str, rng: np.random.Generator, image_size: int,
                 patch_size: int, max_objects: int) -> Sample:
    """Build a scene in which ``answer`` is possible for ``cat``, render it, then ask."""
    sizes = list(SIZES)
    colors = list(COLORS)
    n_min = 2 if cat in ("ChooseRel", "CompareAttr") else 1
    n_obj = int(rng.integers(n_min, max_objects + 1))
    specs: list[dict] = []
    rel = None

    def obj(shape: str, color: str) -> dict:
        return {"shape": shape, "color": color, "size": sizes[int(rng.integers(len(sizes)))]}

    if cat in ("QueryAttr", "ChooseAttr"):
        shape = _pick(rng, SHAPES)
        specs.append(obj(shape, answer))
        specs += [obj(_pick(rng, SHAPES, [shape]), _pick(rng, colors)) for _ in range(n_obj - 1)]
    elif cat == "ChooseCat":
        color = _pick(rng, colors)
        specs.append(obj(answer, color))
        specs += [obj(_pick(rng, SHAPES), _pick(rng, colors, [color])) for _ in range(n_obj - 1)]
    elif cat == "LogicalObj":
        # "no" needs two absent shapes: draw the scene from at most two shapes
        allowed = list(SHAPES) if answer == "yes" else \
            [SHAPES[i] for i in rng.permutation(len(SHAPES))[:2]]
        specs += [obj(_pick(rng, allowed), _pick(rng, colors)) for _ in range(n_obj)]
    else:  # ChooseRel, CompareAttr: two objects with unique shapes
        a, b = (SHAPES[i] for i in rng.permutation(len(SHAPES))[:2])
        ca = _pick(rng, colors)
        if cat == "CompareAttr":
            cb = ca if answer == "yes" else _pick(rng, colors, [ca])
        else:
            cb = _pick(rng, colors)
            rel = (0, 1, answer)
        specs += [obj(a, ca), obj(b, cb)]
        specs += [obj(_pick(rng, SHAPES, [a, b]), _pick(rng, colors)) for _ in range(n_obj - 2)]

    order = rng.permutation(len(specs))
    specs = [specs[i] for i in order]
    if rel is not None:
        inv = np.argsort(order)
        rel = (int(inv[0]), int(inv[1]), answer)
    visible = image_size // patch_size * patch_size  # the square the model's patches cover
    boxes = _place(rng, specs, visible, rel)
    image, objects = _render(specs, boxes, image_size, patch_size)
    asked = ask(objects, cat, answer, rng)
    if asked is None:  # pragma: no cover - the scene is built so that the answer is possible
        raise RuntimeError(f"internal error: no {cat} question with answer {answer} for {sid}")
    q, referred, cwords, options = asked
    return Sample(
        id=sid, image=image, question=q, answer=answer, category=cat, objects=objects,
        referred=referred, constraints=_spans(q, cwords), options=options,
        image_size=image_size, patch_size=patch_size,
    )


def conversation(sample: Sample, turns: int, rng: np.random.Generator, aux: bool = False
                 ) -> list[tuple[str, str, str]]:
    """``turns`` (question, answer, category) triples about ``sample``'s scene.

    The first is the sample's own question; the others are drawn from the other categories
    in random order, each with the first answer (in random order) the scene admits; a
    category with no possible question is skipped. ``aux=True`` also draws from the
    training-only :data:`AUX_CATEGORIES` and asks ChooseRel and CompareAttr first. Used for
    multi-turn visual instruction tuning, as in LLaVA's conversation data.
    """
    out = [(sample.question, sample.answer, sample.category)]
    cats = CATEGORIES + (AUX_CATEGORIES if aux else ())
    answers = {**ANSWERS, **AUX_ANSWERS}
    order = [cats[int(i)] for i in rng.permutation(len(cats))]
    if aux:  # training: the two-object relations, the hardest to learn, are asked first
        first = [c for c in ("ChooseRel", "CompareAttr") if c in order]
        order = first + [c for c in order if c not in first]
    for cat in order:
        if len(out) >= turns:
            break
        if cat == sample.category:
            continue
        for a in rng.permutation(len(answers[cat])):
            asked = ask(sample.objects, cat, answers[cat][int(a)], rng)
            if asked is not None:
                out.append((asked[0], answers[cat][int(a)], cat))
                break
    return out
