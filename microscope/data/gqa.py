"""GQA from its published files: balanced questions JSON, images folder, optional scene graphs.

    samples = gqa.load("testdev_balanced_questions.json", "images/",
                       scene_graphs="val_sceneGraphs.json", categories=["ChooseAttr"], n=500)

Category = structural type + semantic type, capitalised (``choose`` + ``attr`` → ``ChooseAttr``):
the six of Zhang et al. are :data:`CATEGORIES`. Constraint words are the question words GQA
annotates with object ids (``annotations.question``: word index or ``"i:j"`` range → object id);
with scene graphs the referred boxes are those objects' ``x, y, w, h``. Images are
``images/<imageId>.jpg``, read when a sample's ``image`` is first used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from microscope.data.shapes import Constraint
from microscope.data.vqa import DatasetError, VQASample, read_json, word_spans

CATEGORIES = ("ChooseAttr", "QueryAttr", "ChooseCat", "LogicalObj", "ChooseRel", "CompareAttr")


def category(q: dict) -> str:
    t = q.get("types") or {}
    return str(t.get("structural", "")).capitalize() + str(t.get("semantic", "")).capitalize()


def _constraints(question: str, ann: dict) -> tuple[tuple[Constraint, ...], list[str]]:
    spans = word_spans(question)
    cons, objs = [], []
    for key, obj in sorted(ann.items(), key=lambda kv: int(str(kv[0]).split(":")[0])):
        a, _, b = str(key).partition(":")
        i, j = int(a), int(b) if b else int(a) + 1
        if not 0 <= i < j <= len(spans):
            continue
        s, e = spans[i][0], spans[j - 1][1]
        cons.append(Constraint(question[s:e], s, e))
        objs.append(str(obj))
    return tuple(cons), objs


def load(questions: str | Path, images: str | Path, scene_graphs: str | Path | None = None,
         categories: Sequence[str] | None = CATEGORIES, n: int | None = None, seed: int = 0,
         image_ext: str = ".jpg") -> list[VQASample]:
    """GQA samples of ``categories`` (``None``: all), ``n`` of them drawn with ``seed`` (all if None)."""
    qs = read_json(Path(questions), "GQA questions")
    if not isinstance(qs, dict):
        raise DatasetError(f"GQA questions file {questions} must map question ids to questions, got "
                           f"{type(qs).__name__}")
    images = Path(images)
    if not images.is_dir():
        raise DatasetError(f"GQA images folder {images} does not exist")
    graphs = read_json(Path(scene_graphs), "GQA scene graphs") if scene_graphs is not None else None
    out = []
    for qid in sorted(qs):
        q = qs[qid]
        try:
            cat = category(q)
            if categories is not None and cat not in categories:
                continue
            text, answer, image_id = q["question"], q["answer"], q["imageId"]
        except (KeyError, TypeError) as e:
            raise DatasetError(f"GQA questions file {questions}: question {qid} lacks {e} (needs question, "
                               "answer, imageId, types)") from e
        cons, objs = _constraints(text, (q.get("annotations") or {}).get("question") or {})
        boxes, meta = [], {"image_id": image_id, "types": q.get("types", {})}
        if graphs is not None:
            g = graphs.get(image_id)
            if g is None:
                raise DatasetError(f"GQA scene graphs file {scene_graphs} has no image {image_id} (question {qid})")
            meta.update(width=g.get("width"), height=g.get("height"))
            for o in objs:
                ob = g.get("objects", {}).get(o)
                if ob is not None:
                    boxes.append((ob["x"], ob["y"], ob["x"] + ob["w"], ob["y"] + ob["h"]))
        out.append(VQASample(id=str(qid), image_path=images / f"{image_id}{image_ext}", question=text,
                             answer=str(answer), category=cat, constraints=cons, boxes=tuple(boxes), meta=meta))
    if categories is not None:
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown and not out:
            raise DatasetError(f"no GQA question has category {unknown}; GQA categories look like {list(CATEGORIES)}")
    if n is not None and n < len(out):
        pick = np.sort(np.random.default_rng(seed).choice(len(out), size=n, replace=False))
        out = [out[i] for i in pick]
    return out
