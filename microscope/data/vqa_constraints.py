"""VQA-Constraints (Basu et al., NeurIPS 2024) from its published CSV files.

    samples = vqa_constraints.load(["multimodal_movies.csv", "multimodal_known.csv", "okvqa.csv"],
                                   images="images/", n=300)

The published files (``data_constraints/`` of microsoft/MLLMInterpret) are read as they are:

- ``multimodal_movies.csv``: ``,question,director,main_entity,image_url``
- ``multimodal_known.csv``: ``,question,subject,main_entity,image_url``
- ``okvqa.csv``: ``,question,main_entity,image_url``

The first, unnamed column is the row index (the sample id is ``<file stem>-<index>``). Column
names are matched case-insensitively, with the documented alternatives kept (:data:`COLUMNS`):
constraint ``main_entity`` / ``constraint`` / ``entity`` / ``constraint_entity``; image
``image_url`` / ``image`` / ``image_path`` / ``img_path``. Other columns (``director``,
``subject``: who or what the photo shows) go to ``meta``.

**There is no answer column** in the published files: the published analysis traces the model's
own answer, so ``answer`` is ``None`` and every analysis uses the model's greedy first token
(:mod:`microscope.answers`). An ``answer`` (or ``label``) column, if a file has one, is read.

Image paths are relative to ``images`` (default: the CSV's folder) unless absolute; Known and
Movies paths have no extension (``./A photo of Ron Fricke``), so the path as written is tried
first, then with ``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ``.bmp``, ``.gif`` appended
(:func:`~microscope.data.vqa.resolve_image`).

The constraint's character span is found by :func:`~microscope.data.vqa.locate`: verbatim (whole
words, any case), else its words with case and plural/possessive endings ignored, else its head
noun alone ("this plant" in "Name the type of plant this is?" is ``plant``); the rule is
``meta["constraint_rule"]``, the published entity ``meta["entity"]``. A row whose constraint
cannot be located, or that lacks a question or an image path, is skipped with its reason
(``samples.skipped``, and a warning with the count); it never aborts the file.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from microscope.data.shapes import Constraint
from microscope.data.vqa import DatasetError, Samples, VQASample, draw, locate, resolve_image

COLUMNS = {"question": ("question",),
           "constraint": ("main_entity", "constraint", "entity", "constraint_entity"),
           "image": ("image_url", "image", "image_path", "img_path"),
           "answer": ("answer", "label")}
REQUIRED = ("question", "constraint", "image")


def _column(header: list[str], key: str, path: Path) -> str | None:
    low = {h.strip().lower(): h for h in header}
    for name in COLUMNS[key]:
        if name in low:
            return low[name]
    if key in REQUIRED:
        raise DatasetError(f"VQA-Constraints file {path} has no {key} column (accepted names: {list(COLUMNS[key])}; "
                           f"found {header}); the published files have question, main_entity and image_url")
    return None


def load(csvs: str | Path | Sequence[str | Path], images: str | Path | None = None, n: int | None = None,
         seed: int = 0) -> Samples:
    """Samples from one or more VQA-Constraints CSV files, ``n`` drawn with ``seed`` (all if None).

    ``answer`` is ``None`` unless the file has an answer column (the published ones do not).
    Rows that cannot be used are listed in ``.skipped`` of the result (see the module doc).
    """
    paths = [Path(csvs)] if isinstance(csvs, (str, Path)) else [Path(p) for p in csvs]
    out: list[VQASample] = []
    skipped: list[dict] = []
    notes: list[dict] = []
    total = 0
    for path in paths:
        if not path.is_file():
            raise DatasetError(f"VQA-Constraints file {path} does not exist")
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            cq, cc, ci = (_column(header, k, path) for k in REQUIRED)
            ca = _column(header, "answer", path)
            ccat = next((h for h in header if h.strip().lower() == "category"), None)
            cidx = header[0] if header and header[0].strip() == "" else None  # pandas' unnamed index column
            extra = [h for h in header if h not in (cq, cc, ci, ca, ccat, cidx)]
            root = Path(images) if images is not None else path.parent
            for k, row in enumerate(reader):
                total += 1
                line = k + 2  # 1-based line of the row, after the header
                q, ent = (row.get(cq) or "").strip(), (row.get(cc) or "").strip()
                img = (row.get(ci) or "").strip()
                if not q or not img:
                    skipped.append({"source": str(path), "row": line,
                                    "reason": f"no {'question' if not q else 'image path'} in the row"})
                    continue
                span, rule = locate(q, ent)
                if span is None:
                    skipped.append({"source": str(path), "row": line, "reason": f"constraint not located: {rule}"})
                    continue
                index = (row.get(cidx) or "").strip() if cidx is not None else ""
                sid = f"{path.stem}-{index or k}"
                if rule != "verbatim":
                    notes.append({"source": str(path), "row": line, "id": sid,
                                  "note": f"with the constraint located by its {rule} rule"})
                p = Path(img)
                answer = (row.get(ca) or "").strip() if ca else ""
                out.append(VQASample(
                    id=sid, image_path=p if p.is_absolute() else resolve_image(root / p), question=q,
                    answer=answer or None, category=(row.get(ccat) or "").strip() if ccat else path.stem,
                    constraints=(Constraint(q[span[0]:span[1]], *span),),
                    meta={"file": str(path), "row": line, "entity": ent, "constraint_rule": rule,
                          **{h.strip(): row.get(h) for h in extra}}))
    kept = draw(out, n, seed)
    ids = {s.id for s in kept}
    result = Samples(kept, skipped, [d for d in notes if d["id"] in ids])
    result.warn(f"VQA-Constraints {', '.join(p.name for p in paths)}", total)
    return result
