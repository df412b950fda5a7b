"""Accuracy of a LLaVA on Shapes-world samples, through the processor and ``model(**inputs)``.

The prediction is the arg-max of the next-token logits at the last prompt position (greedy
first answer token); it is correct when it equals the answer's first token id.

``question_only_prior`` is the accuracy of the best predictor that sees the question text and
nothing else: for every question string, the most frequent answer in a separate reference
draw of the generator (falling back to the category's most frequent answer for unseen
strings). A model that uses the image must beat it; with blank images it must fall back to it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import pandas as pd
import torch

from microscope.answers import answer_ids
from microscope.data import shapes
from microscope.errors import MicroscopeError
from microscope.progress import tqdm
from microscope.roles import build_prompt


def predict(model, processor, images: Sequence, questions: Sequence[str], batch: int = 64,
            progress: bool = True) -> tuple[list[int], torch.Tensor]:
    """Greedy first answer token ids and the last-position probabilities, per question."""
    ids, probs = [], []
    device = next(model.parameters()).device
    it = range(0, len(questions), batch)
    for i in tqdm(it, desc="evaluate", disable=not progress, mininterval=5):
        enc = processor(images=list(images[i:i + batch]),
                        text=[build_prompt(processor, q) for q in questions[i:i + batch]],
                        return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            logits = model(**enc).logits[:, -1].float()
        p = logits.softmax(-1)
        probs.append(p.cpu())
        ids += p.argmax(-1).tolist()
    return ids, torch.cat(probs) if probs else torch.empty(0)


def evaluate_samples(model, processor, samples: Sequence[shapes.Sample], blank: bool = False,
                     batch: int = 64, progress: bool = True) -> pd.DataFrame:
    """One row per sample: id, category, answer, prediction, correct, p_answer.

    ``blank=True`` replaces every image by a plain background image of the same size.
    """
    images = [shapes.blank_image(s.image_size) if blank else s.image for s in samples]
    pred, probs = predict(model, processor, images, [s.question for s in samples], batch, progress)
    gold = answer_ids(processor, [s.answer for s in samples])
    tok = processor.tokenizer
    return pd.DataFrame({
        "id": [s.id for s in samples],
        "category": [s.category for s in samples],
        "answer": [s.answer for s in samples],
        "prediction": tok.convert_ids_to_tokens(pred),
        "correct": [p == g for p, g in zip(pred, gold)],
        "p_answer": [float(probs[i, g]) for i, g in enumerate(gold)],
    })


def _answer_counts(samples: Sequence) -> tuple[dict[str, Counter], dict[str, Counter]]:
    """Answer counts per question string and per category."""
    by_q: dict[str, Counter] = defaultdict(Counter)
    by_cat: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        if s.answer is None:  # no gold answer: nothing to count
            continue
        by_q[s.question][s.answer] += 1
        by_cat[s.category][s.answer] += 1
    return by_q, by_cat


def question_only_prior(samples: Sequence[shapes.Sample], reference: Sequence[shapes.Sample]
                        ) -> pd.Series:
    """Per-sample correctness of the best question-only predictor fitted on ``reference``."""
    by_q, by_cat = _answer_counts(reference)
    out = []
    for s in samples:
        c = by_q.get(s.question) or by_cat[s.category]
        out.append(c.most_common(1)[0][0] == s.answer)
    return pd.Series(out, index=[s.id for s in samples], name="prior_correct")


#: the accuracy bar of a bundled model, against which every training seed of the fusion comparison is
#: also measured (its verdicts over all seeds and over the seeds that meet the bar stand side by side):
#: overall accuracy, every category's accuracy, and how far blank-image accuracy may sit above the
#: question-only prior (a model that uses the image falls back to the prior without it)
BAR = {"overall": 0.95, "category": 0.90, "blank_above_prior": 0.10}


def bar_failures(report: dict, bar: dict = BAR) -> list[str]:
    """What an :func:`evaluate` report misses of ``bar`` — empty when the model meets it:
    ``overall >= bar["overall"]``, ``min_c acc_c >= bar["category"]`` and
    ``blank_overall <= question_only_prior + bar["blank_above_prior"]``."""
    out = []
    if report["overall"] < bar["overall"]:
        out.append(f"overall {report['overall']:.3f} < {bar['overall']}")
    for c, v in report["per_category"].items():
        if v < bar["category"]:
            out.append(f"{c} {v:.3f} < {bar['category']}")
    if report["blank_overall"] > report["question_only_prior"] + bar["blank_above_prior"]:
        out.append(f"blank image {report['blank_overall']:.3f} > question-only prior "
                   f"{report['question_only_prior']:.3f} + {bar['blank_above_prior']}")
    return out


def evaluate(model, processor, n: int = 2000, seed: int = 7, batch: int = 64,
             reference_n: int = 20_000, progress: bool = True) -> dict:
    """The accuracy report of ``python -m microscope.zoo evaluate`` as a dict.

    Keys: ``n``, ``seed``, ``overall``, ``per_category``, ``blank_overall``,
    ``blank_per_category``, ``question_only_prior``, ``question_only_prior_per_category``.
    """
    if n < 6:
        raise ValueError(f"n must be at least 6 (one sample per category), got {n}")
    from microscope.grid import image_geometry

    geometry = image_geometry(model)
    if geometry is None:
        raise MicroscopeError(f"{type(model).__name__} has a dynamic-resolution vision tower: the Shapes world is "
                              "drawn on a fixed image_size / patch_size grid; evaluate a model with a fixed one")
    size, patch = geometry
    samples = shapes.generate(n, seed, image_size=size, patch_size=patch)
    ref = shapes.generate(reference_n, seed + 104_729, image_size=size, patch_size=patch)
    real = evaluate_samples(model, processor, samples, batch=batch, progress=progress)
    blank = evaluate_samples(model, processor, samples, blank=True, batch=batch, progress=progress)
    real["prior_correct"] = question_only_prior(samples, ref).values
    real["blank_correct"] = blank["correct"].values
    cats = [c for c in shapes.CATEGORIES if c in set(real["category"])]
    g = real.groupby("category")
    return {
        "n": n,
        "seed": seed,
        "overall": float(real["correct"].mean()),
        "per_category": {c: float(g["correct"].mean()[c]) for c in cats},
        "blank_overall": float(real["blank_correct"].mean()),
        "blank_per_category": {c: float(g["blank_correct"].mean()[c]) for c in cats},
        "question_only_prior": float(real["prior_correct"].mean()),
        "question_only_prior_per_category": {c: float(g["prior_correct"].mean()[c]) for c in cats},
    }


def leave_one_out_prior(samples: Sequence) -> pd.Series:
    """Per-sample correctness of the question-only predictor fitted on the *other* samples: the
    most frequent answer to the same question string, else in the same category (for data sets
    that cannot be re-drawn like the Shapes world). Ties go to the alphabetically first answer.
    Nullable boolean: missing for samples without a gold answer (``answer=None``)."""
    by_q, by_cat = _answer_counts(samples)
    out: list[bool | None] = []
    for s in samples:
        if s.answer is None:
            out.append(None)
            continue
        for table, key in ((by_q, s.question), (by_cat, s.category)):
            c = table[key].copy()
            c[s.answer] -= 1
            c = +c
            if c:
                top = max(c.values())
                out.append(min(a for a, v in c.items() if v == top) == s.answer)
                break
        else:
            out.append(False)
    return pd.Series(out, index=[s.id for s in samples], name="prior_correct", dtype="boolean")
