"""ScienceQA from its published files: ``problems.json`` and ``images/<split>/<pid>/image.png``.

    samples = scienceqa.load("problems.json", "images/", splits=["test"], n=500)

Only questions with an image are kept. The question the model sees is the LLaVA ScienceQA
format: optional ``Context: <hint>``, the question, the choices as ``A. ...``, and "Answer with
the option's letter from the given choices directly."; the answer is the letter. The category is
ScienceQA's ``category`` field (subject and topic are in ``meta``); there are no constraint
annotations.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from microscope.data.vqa import DatasetError, VQASample, read_json

LETTERS = "ABCDEFGHIJ"
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def load(problems: str | Path, images: str | Path, splits: Sequence[str] | None = None, n: int | None = None,
         seed: int = 0) -> list[VQASample]:
    """Image-bearing ScienceQA questions of ``splits`` (``None``: all), ``n`` drawn with ``seed``."""
    ps = read_json(Path(problems), "ScienceQA problems")
    if not isinstance(ps, dict):
        raise DatasetError(f"ScienceQA problems file {problems} must map problem ids to problems")
    images = Path(images)
    if not images.is_dir():
        raise DatasetError(f"ScienceQA images folder {images} does not exist")
    out = []
    for pid in sorted(ps):
        p = ps[pid]
        try:
            if not p.get("image"):
                continue
            if splits is not None and p.get("split") not in splits:
                continue
            choices, ans = list(p["choices"]), int(p["answer"])
            question = p["question"]
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"ScienceQA problems file {problems}: problem {pid} lacks or garbles {e} "
                               "(needs question, choices, answer, image, split)") from e
        if not 0 <= ans < len(choices) <= len(LETTERS):
            raise DatasetError(f"ScienceQA problems file {problems}: problem {pid} answer {ans} is not one of its "
                               f"{len(choices)} choices")
        parts = [f"Context: {p['hint']}"] if p.get("hint") else []
        parts += [question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)] + [INSTRUCTION]
        out.append(VQASample(
            id=str(pid), image_path=images / str(p.get("split", "")) / str(pid) / p["image"], question="\n".join(parts),
            answer=LETTERS[ans], category=str(p.get("category") or p.get("subject") or "ScienceQA"),
            options=tuple(LETTERS[:len(choices)]),
            meta={k: p.get(k) for k in ("subject", "topic", "grade", "split", "task")}))
    if n is not None and n < len(out):
        pick = np.sort(np.random.default_rng(seed).choice(len(out), size=n, replace=False))
        out = [out[i] for i in pick]
    return out
