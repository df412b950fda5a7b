"""ScienceQA from its published files: ``problems.json`` (optionally ``pid_splits.json``) and
``images/<split>/<pid>/image.png``.

    samples = scienceqa.load("problems.json", "images/", splits=["test"], n=500)
    samples = scienceqa.load("problems.json", "images/", splits=["minitest"], pid_splits="pid_splits.json")

Only questions with an image are kept. The question the model sees is the LLaVA ScienceQA
format: optional ``Context: <hint>``, the question, the choices as ``A. ...``, and "Answer with
the option's letter from the given choices directly."; the answer is the letter. The category is
ScienceQA's ``category`` field (subject and topic are in ``meta``); there are no constraint
annotations. A problem's split is its ``split`` field; with ``pid_splits`` (ScienceQA's
``pid_splits.json``) ``splits`` may also name that file's other lists (``trainval``,
``minitrain``, ``minival``, ``minitest``). A problem that cannot be used (no choices, an answer
index outside them) is skipped with its reason in ``samples.skipped``; it never aborts the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from microscope.data.vqa import DatasetError, Samples, VQASample, draw, read_json

LETTERS = "ABCDEFGHIJ"
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def _split_lists(pid_splits: str | Path | None, splits: Sequence[str] | None) -> dict[str, set[str]] | None:
    if pid_splits is None:
        return None
    d = read_json(Path(pid_splits), "ScienceQA pid_splits")
    if not isinstance(d, dict) or not all(isinstance(v, list) for v in d.values()):
        raise DatasetError(f"ScienceQA pid_splits file {pid_splits} must map split names to lists of problem ids")
    bad = [s for s in (splits or []) if s not in d]
    if bad:
        raise DatasetError(f"ScienceQA pid_splits file {pid_splits} has no split {bad}; it has {list(d)}")
    return {k: {str(x) for x in v} for k, v in d.items()}


def load(problems: str | Path, images: str | Path, splits: Sequence[str] | None = None, n: int | None = None,
         seed: int = 0, pid_splits: str | Path | None = None) -> Samples:
    """Image-bearing ScienceQA questions of ``splits`` (``None``: all), ``n`` drawn with ``seed``."""
    ps = read_json(Path(problems), "ScienceQA problems")
    if not isinstance(ps, dict):
        raise DatasetError(f"ScienceQA problems file {problems} must map problem ids to problems")
    images = Path(images)
    if not images.is_dir():
        raise DatasetError(f"ScienceQA images folder {images} does not exist")
    lists = _split_lists(pid_splits, splits)
    out, skipped = [], []
    for pid in sorted(ps):
        p = ps[pid]
        if not isinstance(p, dict) or not p.get("image"):
            continue
        split = p.get("split")
        if splits is not None:
            if lists is not None:
                if not any(str(pid) in lists[s] for s in splits):
                    continue
            elif split not in splits:
                continue
        if split is None and lists is not None:
            split = next((s for s in ("train", "val", "test") if str(pid) in lists.get(s, ())), None)
        try:
            choices, ans = list(p["choices"]), int(p["answer"])
            question = str(p["question"])
        except (KeyError, TypeError, ValueError) as e:
            skipped.append({"source": str(problems), "row": str(pid),
                            "reason": f"lacks or garbles {e} (needs question, choices, answer)"})
            continue
        if not 0 <= ans < len(choices) <= len(LETTERS):
            skipped.append({"source": str(problems), "row": str(pid),
                            "reason": f"answer {ans} is not one of its {len(choices)} choices"})
            continue
        parts = [f"Context: {p['hint']}"] if p.get("hint") else []
        parts += [question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)] + [INSTRUCTION]
        out.append(VQASample(
            id=str(pid), image_path=images / str(split or "") / str(pid) / p["image"], question="\n".join(parts),
            answer=LETTERS[ans], category=str(p.get("category") or p.get("subject") or "ScienceQA"),
            options=tuple(LETTERS[:len(choices)]),
            meta={**{k: p.get(k) for k in ("subject", "topic", "grade", "task")}, "split": split}))
    result = Samples(draw(out, n, seed), skipped)
    result.warn(f"ScienceQA {Path(problems).name}", len(ps))
    return result
