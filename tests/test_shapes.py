"""The Shapes world generator: determinism, scene rules, ground truth, balance, bad input."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from microscope.data import shapes
from microscope.data.shapes import ANSWERS, CATEGORIES, COLORS, generate


@pytest.fixture(scope="module")
def samples():
    return generate(1200, seed=3)


def _solve(s: shapes.Sample) -> str:
    """Answer a sample from its ground truth, independently of how the generator built it."""
    objs = s.objects
    words = [c.word for c in s.constraints]
    by_shape = [o for o in objs if o.shape == words[0]]
    if s.category in ("QueryAttr", "ChooseAttr"):
        assert len(by_shape) == 1, "the referred shape must be unique"
        return by_shape[0].color
    if s.category == "ChooseCat":
        match = [o for o in objs if o.color == words[0]]
        assert len(match) == 1, "the referred colour must be unique"
        return match[0].shape
    if s.category == "LogicalObj":
        return "yes" if any(o.shape in words for o in objs) else "no"
    a = [o for o in objs if o.shape == words[0]]
    b = [o for o in objs if o.shape == words[1]]
    assert len(a) == 1 and len(b) == 1
    if s.category == "ChooseRel":
        return "left" if a[0].center[0] < b[0].center[0] else "right"
    return "yes" if a[0].color == b[0].color else "no"


def test_same_seed_same_bytes_and_prefix_stable():
    a, b = generate(24, seed=11), generate(24, seed=11)
    for x, y in zip(a, b):
        assert x.image.tobytes() == y.image.tobytes()
        assert (x.question, x.answer, x.objects, x.constraints) == (y.question, y.answer, y.objects,
                                                                    y.constraints)
    head = generate(10, seed=11)
    assert [s.image.tobytes() for s in head] == [s.image.tobytes() for s in a[:10]]
    tail = generate(5, seed=11, start=19)
    assert [s.question for s in tail] == [s.question for s in a[19:]]
    other = generate(24, seed=12)
    assert sum(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, other)) == 0


def test_scene_rules(samples):
    n_obj = collections.Counter(len(s.objects) for s in samples)
    assert set(n_obj) == {1, 2, 3, 4, 5}
    used = {(o.color, o.shape, o.size) for s in samples for o in s.objects}
    assert len({u[0] for u in used}) >= 6 and len({u[1] for u in used}) >= 4
    assert len({u[2] for u in used}) >= 2
    aligned = 0
    for s in samples:
        boxes = [o.box for o in s.objects]
        for i, a in enumerate(boxes):
            assert 0 <= a[0] < a[2] <= s.image_size and 0 <= a[1] < a[3] <= s.image_size
            aligned += a[0] % s.patch_size == 0 and a[1] % s.patch_size == 0
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], "overlap"
    n_boxes = sum(len(s.objects) for s in samples)
    # positions are continuous, not snapped to the grid: ~1/256 of boxes align by chance
    assert aligned < 0.02 * n_boxes


def test_ground_truth_matches_pixels(samples):
    """Each object's colour fills its box's pixels, and its patches are where those pixels are."""
    for s in samples[:200]:
        img = np.asarray(s.image)
        g = s.grid
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            crop = img[y0:y1, x0:x1]
            mask = np.all(crop == COLORS[o.color], axis=-1)
            assert mask.mean() > 0.3, (s.id, o)
            full = np.zeros(img.shape[:2], bool)
            full[y0:y1, x0:x1] = mask
            cover = full.reshape(g, s.patch_size, g, s.patch_size).sum(axis=(1, 3)).reshape(-1)
            assert tuple(np.flatnonzero(cover)) == o.patches
            assert np.allclose(o.patch_fraction, cover[list(o.patches)] / s.patch_size ** 2)
        bg = np.ones(img.shape[:2], bool)
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            bg[y0:y1, x0:x1] = False
        assert np.all(img[bg] == shapes.BACKGROUND)


def test_answers_questions_and_constraints(samples):
    for s in samples:
        assert s.answer == _solve(s), (s.id, s.question)
        assert s.answer in ANSWERS[s.category]
        assert " " not in s.answer
        for c in s.constraints:
            assert s.question[c.start:c.end] == c.word
        if s.options:
            assert s.answer in s.options
        if s.category == "LogicalObj":
            words = {c.word for c in s.constraints}
            assert s.referred == tuple(i for i, o in enumerate(s.objects) if o.shape in words)
        else:
            words = [c.word for c in s.constraints]
            attr = "color" if s.category == "ChooseCat" else "shape"
            assert [getattr(s.objects[i], attr) for i in s.referred] == words
        assert set(s.referred_patches()) == {p for i in s.referred for p in s.objects[i].patches}
    templates = {
        "ChooseAttr": "Is the ", "QueryAttr": "What color is the ", "ChooseCat": "Is the ",
        "LogicalObj": "Is there a ", "ChooseRel": "Is the ", "CompareAttr": "Do the ",
    }
    for s in samples:
        assert s.question.startswith(templates[s.category]) and s.question.endswith("?")


def test_answers_balanced_within_category(samples):
    for cat in CATEGORIES:
        answers = [s.answer for s in samples if s.category == cat]
        counts = collections.Counter(answers)
        assert set(counts) == set(ANSWERS[cat])
        uniform = 1 / len(ANSWERS[cat])
        assert max(counts.values()) / len(answers) <= uniform + 0.10, (cat, counts)


def test_patch_grid_follows_patch_size():
    s = generate(6, seed=0, image_size=112, patch_size=14)
    assert all(s_.grid == 8 and s_.image.size == (112, 112) for s_ in s)
    assert max(p for x in s for o in x.objects for p in o.patches) < 64


def test_conversation_turns_are_correct():
    rng = np.random.default_rng(0)
    for s in generate(60, seed=5):
        turns = shapes.conversation(s, 6, rng)
        assert turns[0] == (s.question, s.answer, s.category)
        assert len({t[2] for t in turns}) == len(turns)
        for q, a, cat in turns[1:]:
            probe = shapes.Sample(id="t", image=s.image, question=q, answer=a, category=cat,
                                  objects=s.objects, referred=(), constraints=shapes._spans(
                                      q, [w for w in q.rstrip("?").split()
                                          if w in shapes.SHAPES or (cat == "ChooseCat" and w in COLORS
                                                                    and q.index(w) < q.index("object"))]))
            assert _solve(probe) == a, (q, a)


@pytest.mark.parametrize("kwargs, name", [
    ({"n": -1}, "n"), ({"n": 2.5}, "n"), ({"seed": -3}, "seed"), ({"image_size": 40}, "image_size"),
    ({"image_size": 62, "patch_size": 32}, "image_size"), ({"image_size": 13, "patch_size": 14}, "image_size"),
    ({"image_size": True}, "image_size"), ({"patch_size": 0}, "patch_size"),
    ({"max_objects": 6}, "max_objects"), ({"max_objects": 1}, "max_objects"),
    ({"categories": ["Counting"]}, "categories"), ({"categories": []}, "categories"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    args = {"n": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=name):
        generate(args.pop("n"), **args)


def test_ask_rejects_bad_category_and_answer():
    s = generate(1, seed=0)[0]
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="category"):
        shapes.ask(s.objects, "Counting", "yes", rng)
    with pytest.raises(ValueError, match="answer"):
        shapes.ask(s.objects, "QueryAttr", "yes", rng)


def test_training_only_aux_questions_are_correct_and_never_in_generate():
    rng = np.random.default_rng(1)
    seen = collections.Counter()
    for s in generate(300, seed=8):
        assert s.category in CATEGORIES
        turns = shapes.conversation(s, 8, rng, aux=True)
        for q, a, cat in turns[1:]:
            seen[cat] += 1
            if cat == "QueryPos":
                obj = [o for o in s.objects if o.shape == q.split()[2]]
                assert len(obj) == 1 and (obj[0].center[0] < s.image_size / 2) == (a == "left")
                assert abs(obj[0].center[0] - s.image_size / 2) >= 6
            elif cat == "QueryCat":
                obj = [o for o in s.objects if o.color == q.split()[4]]
                assert len(obj) == 1 and obj[0].shape == a
        assert all(t[2] in CATEGORIES for t in shapes.conversation(s, 8, rng))  # aux off by default
    assert seen["QueryPos"] > 50 and seen["QueryCat"] > 50
    vocab = shapes.vocabulary()
    assert {"on", "shape"} <= set(vocab)
