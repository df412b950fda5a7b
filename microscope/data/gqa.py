"""GQA from its published files, or from the knockout paper's per-category CSVs.

    samples = gqa.load("val_balanced_questions.json", "images/", scene_graphs="val_sceneGraphs.json",
                       categories=["ChooseAttr"], n=500)
    samples = gqa.load(["GQA_val_correct_question_with_choose_ChooseAttr.csv", ...], "images/")

**Categories** follow Zhang et al. (CVPR 2025), who define each of their six by GQA's *detailed*
question types (:data:`DETAILED`, ``grouping="detailed"``, the default):

=============  =====================================================================
category       GQA detailed types
=============  =====================================================================
ChooseAttr     chooseAttr, materialChoose, activityChoose, typeChoose
QueryAttr      positionQuery
LogicalObj     existThatOr, existThatOrC
CompareAttr    twoCommon
ChooseRel      relChooser
ChooseCat      categoryThatChoose, categoryThisChoose, objThisChoose
=============  =====================================================================

A question of another detailed type gets that type as its category (kept only when
``categories=None``). ``grouping="broad"`` instead names the category by structural + semantic
type, capitalised (``choose`` + ``attr`` → ``ChooseAttr``): wider, e.g. "Do you see either a white
refrigerator or dishwasher there?" (``existAttrOrC``) is then LogicalObj.

**JSON questions** (``*_balanced_questions.json``): constraint words are the question words GQA
annotates with object ids (``annotations.question``: word index or ``"i:j"`` range → object id);
with scene graphs (one file or several, e.g. train and val) the referred boxes are those objects'
``x, y, w, h``. GQA publishes scene graphs for train and val only: a question whose image has no
scene graph (every testdev question) is *kept* without boxes, for every edge and analysis that
does not need them, and noted in ``samples.notes`` with a count in a warning; related/other-image
edges and attribution then skip it. The knockout paper used val questions. A question with no
answer (GQA's test questions) has ``answer=None``: analyses use the model's own answer.

**Knockout-paper CSVs** (``datasets/GQA_val_correct_question_with_*.csv`` of
FightingFighting/cross-modal-information-flow-in-MLLM: val questions the paper's models answered
correctly) are read as they are: ``question_id, img_id, question, answer, type_detailed, ...,
image_w, image_h`` and either a ``central object`` or ``object1``/``object2`` with ``name, id, x,
y, w, h`` (``-`` where absent). Each object's box is a referred box and its name, located in the
question by :func:`~microscope.data.vqa.locate`, a constraint.

Images are ``images/<imageId>.jpg``, read when a sample's ``image`` is first used. A question
that cannot be used (no question text or image id, an unknown type under ``grouping="detailed"``)
is skipped with its reason in ``samples.skipped``; it never aborts the file.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from pathlib import Path

from microscope.data.shapes import Constraint
from microscope.data.vqa import DatasetError, DatasetWarning, Samples, VQASample, draw, locate, read_json, word_spans

CATEGORIES = ("ChooseAttr", "QueryAttr", "ChooseCat", "LogicalObj", "ChooseRel", "CompareAttr")
#: the knockout paper's categories by GQA detailed type (Zhang et al., CVPR 2025)
DETAILED: dict[str, str] = {
    "chooseAttr": "ChooseAttr", "materialChoose": "ChooseAttr", "activityChoose": "ChooseAttr",
    "typeChoose": "ChooseAttr",
    "positionQuery": "QueryAttr",
    "existThatOr": "LogicalObj", "existThatOrC": "LogicalObj",
    "twoCommon": "CompareAttr",
    "relChooser": "ChooseRel",
    "categoryThatChoose": "ChooseCat", "categoryThisChoose": "ChooseCat", "objThisChoose": "ChooseCat",
}
GROUPINGS = ("detailed", "broad")


def category(types: dict, grouping: str = "detailed") -> str:
    """A question's category from its ``types`` (``structural``, ``semantic``, ``detailed``):
    the knockout paper's by detailed type (:data:`DETAILED`; other detailed types are their own
    category), or with ``grouping="broad"`` structural + semantic capitalised. ``""`` when the
    needed type is missing."""
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; choose one of {list(GROUPINGS)}")
    t = types or {}
    if grouping == "detailed":
        d = str(t.get("detailed") or "")
        return DETAILED.get(d, d)
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


def _read_graphs(scene_graphs) -> dict | None:
    if scene_graphs is None:
        return None
    paths = [scene_graphs] if isinstance(scene_graphs, (str, Path)) else list(scene_graphs)
    graphs: dict = {}
    for p in paths:
        g = read_json(Path(p), "GQA scene graphs")
        if not isinstance(g, dict):
            raise DatasetError(f"GQA scene graphs file {p} must map image ids to scene graphs, got {type(g).__name__}")
        graphs.update(g)
    return graphs


def _from_json(path: Path, images: Path, graphs: dict | None, grouping: str, image_ext: str,
               skipped: list, notes: list, wanted: set[str] | None = None) -> tuple[list[VQASample], int]:
    qs = read_json(path, "GQA questions")
    if not isinstance(qs, dict):
        raise DatasetError(f"GQA questions file {path} must map question ids to questions, got {type(qs).__name__}")
    if grouping == "detailed" and qs and not any("detailed" in ((q or {}).get("types") or {})
                                                  for q in qs.values() if isinstance(q, dict)):
        raise DatasetError(f"GQA questions file {path} has no detailed question types (types.detailed), which the "
                           "knockout paper's categories need; pass grouping='broad' to group by structural + "
                           "semantic type")
    out = []
    for qid in sorted(qs):
        q = qs[qid]
        if not isinstance(q, dict) or not q.get("question") or not q.get("imageId"):
            skipped.append({"source": str(path), "row": str(qid),
                            "reason": "no question text or imageId (a GQA question needs both)"})
            continue
        types = q.get("types") or {}
        cat = category(types, grouping)
        if not cat:
            skipped.append({"source": str(path), "row": str(qid), "reason": f"no {grouping} question type"})
            continue
        if wanted is not None and cat not in wanted:  # filtered before any parsing or scene-graph lookup
            continue
        text, image_id = str(q["question"]), str(q["imageId"])
        answer = q.get("answer")
        cons, objs = _constraints(text, (q.get("annotations") or {}).get("question") or {})
        boxes, meta = [], {"image_id": image_id, "types": types, "source": str(path)}
        if graphs is not None:
            g = graphs.get(image_id)
            if g is None:
                meta["scene_graph"] = False
                notes.append({"source": str(path), "row": str(qid), "id": str(qid),
                              "note": "without boxes: no scene graph for its image (GQA publishes train and val "
                                      "scene graphs only)"})
            else:
                meta.update(width=g.get("width"), height=g.get("height"), scene_graph=True)
                for o in objs:
                    ob = (g.get("objects") or {}).get(o)
                    if ob is not None:
                        boxes.append((ob["x"], ob["y"], ob["x"] + ob["w"], ob["y"] + ob["h"]))
        out.append(VQASample(id=str(qid), image_path=images / f"{image_id}{image_ext}", question=text,
                             answer=None if answer is None else str(answer), category=cat, constraints=cons,
                             boxes=tuple(boxes), meta=meta))
    return out, len(qs)


def _objects(row: dict, header: Sequence[str]) -> list[dict]:
    """The objects of a knockout-paper CSV row: ``central object`` or ``object1``, ``object2``."""
    out = []
    for prefix in ("central object", "object1", "object2"):
        if f"{prefix} name" not in header:
            continue
        name = (row.get(f"{prefix} name") or "").strip()
        vals = [(row.get(f"{prefix} {k}") or "").strip() for k in ("x", "y", "w", "h")]
        box = None
        if all(v not in ("", "-") for v in vals):
            try:
                x, y, w, h = (float(v) for v in vals)
                box = (x, y, x + w, y + h)
            except ValueError:
                box = None
        out.append({"name": name, "id": (row.get(f"{prefix} id") or "").strip(), "box": box})
    return out


CSV_REQUIRED = ("question_id", "img_id", "question", "answer", "type_detailed", "type_structural", "type_semantic")


def _from_csv(path: Path, images: Path, grouping: str, image_ext: str, skipped: list, notes: list,
              wanted: set[str] | None = None) -> tuple[list[VQASample], int]:
    if not path.is_file():
        raise DatasetError(f"GQA knockout-paper CSV {path} does not exist")
    out, total = [], 0
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        missing = [c for c in CSV_REQUIRED if c not in header]
        if missing:
            raise DatasetError(f"GQA knockout-paper CSV {path} lacks columns {missing} (found {header}); it should be "
                               "one of the datasets/GQA_val_correct_question_with_*.csv files as published")
        if not any(f"{p} name" in header for p in ("central object", "object1")):
            raise DatasetError(f"GQA knockout-paper CSV {path} has neither 'central object name' nor 'object1 name' "
                               "columns, so no object the question refers to")
        for k, row in enumerate(reader):
            total += 1
            line = k + 2
            qid, image_id, text = (row.get(c, "").strip() for c in ("question_id", "img_id", "question"))
            if not qid or not image_id or not text:
                skipped.append({"source": str(path), "row": line, "reason": "no question_id, img_id or question"})
                continue
            types = {"detailed": row["type_detailed"].strip(), "structural": row["type_structural"].strip(),
                     "semantic": row["type_semantic"].strip()}
            cat = category(types, grouping)
            if not cat:
                skipped.append({"source": str(path), "row": line, "reason": f"no {grouping} question type"})
                continue
            if wanted is not None and cat not in wanted:
                continue
            cons: list[Constraint] = []
            boxes, names = [], []
            for o in _objects(row, header):
                if o["box"] is not None:
                    boxes.append(o["box"])
                if not o["name"]:
                    continue
                names.append(o["name"])
                span, rule = locate(text, o["name"])
                if span is None:
                    notes.append({"source": str(path), "row": line, "id": qid,
                                  "note": f"without a constraint for an object: {rule}"})
                elif all(c.start != span[0] for c in cons):
                    cons.append(Constraint(text[span[0]:span[1]], *span))
            meta = {"image_id": image_id, "types": types, "source": str(path), "objects": names,
                    "full_answer": row.get("full answer"), "has_boxes": bool(boxes)}
            for key, col in (("width", "image_w"), ("height", "image_h")):
                try:
                    meta[key] = int(float(row.get(col) or ""))
                except ValueError:
                    pass
            answer = (row.get("answer") or "").strip()
            out.append(VQASample(id=qid, image_path=images / f"{image_id}{image_ext}", question=text,
                                 answer=answer or None, category=cat,
                                 constraints=tuple(sorted(cons, key=lambda c: c.start)), boxes=tuple(boxes),
                                 options=(), meta=meta))
    return out, total


def load(questions: str | Path | Sequence[str | Path], images: str | Path,
         scene_graphs: str | Path | Sequence[str | Path] | None = None,
         categories: Sequence[str] | None = CATEGORIES, n: int | None = None, seed: int = 0,
         image_ext: str = ".jpg", grouping: str = "detailed") -> Samples:
    """GQA samples of ``categories`` (``None``: all), ``n`` of them drawn with ``seed`` (all if None).

    ``questions``: a GQA questions JSON or a knockout-paper CSV, or a list of them (mixed is fine).
    ``scene_graphs``: one or more GQA scene-graph JSON files, for the JSON questions' boxes.
    ``grouping``: ``"detailed"`` (the knockout paper's categories) or ``"broad"``.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; choose one of {list(GROUPINGS)}")
    paths = [Path(questions)] if isinstance(questions, (str, Path)) else [Path(p) for p in questions]
    images = Path(images)
    if not images.is_dir():
        raise DatasetError(f"GQA images folder {images} does not exist")
    graphs = _read_graphs(scene_graphs)
    out: list[VQASample] = []
    skipped: list[dict] = []
    notes: list[dict] = []
    total = 0
    wanted = None if categories is None else set(categories)
    for path in paths:
        if path.suffix.lower() == ".csv":
            got, t = _from_csv(path, images, grouping, image_ext, skipped, notes, wanted)
        else:
            got, t = _from_json(path, images, graphs, grouping, image_ext, skipped, notes, wanted)
        out += got
        total += t
    unknown = [c for c in categories or () if c not in CATEGORIES]
    if unknown and not out:
        raise DatasetError(f"no GQA question has category {unknown}; the knockout paper's categories are "
                           f"{list(CATEGORIES)}")
    out = draw(out, n, seed)
    ids = {s.id for s in out}
    result = Samples(out, skipped, [d for d in notes if d["id"] in ids])
    result.warn(f"GQA {', '.join(p.name for p in paths)}", total)
    no_graph = sum(s.meta.get("scene_graph") is False for s in result)
    if no_graph:
        warnings.warn(f"GQA: {no_graph} of {len(result)} questions have no scene graph for their image (kept without "
                      "boxes; related/other-image edges and attribution skip them); scene graphs exist for train and "
                      "val images only", DatasetWarning, stacklevel=2)
    return result
