"""VQA-Constraints (Basu et al. 2024) from its CSV files: question, constraint entity, image path.

    samples = vqa_constraints.load(["movies.csv", "known.csv"], images="images/", n=300)

Each CSV has a header with (case-insensitive) ``question``, ``constraint`` (or ``entity`` /
``constraint_entity``), ``image`` (or ``image_path``) and ``answer`` columns; ``category`` is
taken from a ``category`` column or else the file name. The constraint's character span is its
first case-insensitive occurrence in the question; image paths are relative to ``images`` (default:
the CSV's folder) unless absolute.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from microscope.data.shapes import Constraint
from microscope.data.vqa import DatasetError, VQASample, phrase_span

COLUMNS = {"question": ("question",), "constraint": ("constraint", "entity", "constraint_entity"),
           "image": ("image", "image_path", "img_path"), "answer": ("answer", "label")}


def _column(header: list[str], key: str, path: Path) -> str:
    low = {h.strip().lower(): h for h in header}
    for name in COLUMNS[key]:
        if name in low:
            return low[name]
    raise DatasetError(f"VQA-Constraints file {path} has no {key} column (accepted names: {list(COLUMNS[key])}; "
                       f"found {header})")


def load(csvs: str | Path | Sequence[str | Path], images: str | Path | None = None, n: int | None = None,
         seed: int = 0) -> list[VQASample]:
    """Samples from one or more VQA-Constraints CSV files, ``n`` drawn with ``seed`` (all if None)."""
    paths = [Path(csvs)] if isinstance(csvs, (str, Path)) else [Path(p) for p in csvs]
    out = []
    for path in paths:
        if not path.is_file():
            raise DatasetError(f"VQA-Constraints file {path} does not exist")
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            cq, cc, ci, ca = (_column(header, k, path) for k in ("question", "constraint", "image", "answer"))
            ccat = next((h for h in header if h.strip().lower() == "category"), None)
            root = Path(images) if images is not None else path.parent
            for k, row in enumerate(reader):
                q, ent = (row.get(cq) or "").strip(), (row.get(cc) or "").strip()
                span = phrase_span(q, ent)
                if not q or span is None:
                    raise DatasetError(f"VQA-Constraints file {path}, row {k + 2}: constraint {ent!r} does not occur "
                                       f"in question {q!r}")
                img = Path((row.get(ci) or "").strip())
                out.append(VQASample(
                    id=f"{path.stem}-{k}", image_path=img if img.is_absolute() else root / img, question=q,
                    answer=(row.get(ca) or "").strip(), category=(row.get(ccat) or "").strip() if ccat else path.stem,
                    constraints=(Constraint(q[span[0]:span[1]], *span),), meta={"file": str(path), "row": k + 2}))
    if n is not None and n < len(out):
        pick = np.sort(np.random.default_rng(seed).choice(len(out), size=n, replace=False))
        out = [out[i] for i in pick]
    return out
