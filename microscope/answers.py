"""Answer tokens: which vocabulary id a single-word answer starts with, and its variants.

    ids = answer_ids(handle.processor, ["red", "yes"])      # first token of each answer
    cap = variant_id(handle.processor, "red", "capitalised")  # "Red", or None if not a token

    tid, source = answer_target(handle.processor, sample.answer, logits)  # gold, or the model's own answer

Every effect the suite measures (knockout change, indirect effect, logit-lens probability) is
about ``p(answer's first token)`` at the last prompt position, so they all share these ids. A
sample without a gold answer (``answer=None``, e.g. VQA-Constraints) is measured on the model's
own greedy answer instead: :func:`answer_target` returns the arg-max of its clean logits and the source
``"model"``, which every analysis records in its ``answer_source`` column (and the token it measured).
"""

from __future__ import annotations

from collections.abc import Sequence

VARIANTS = ("lower", "capitalised")


def _first_id(tok, text: str) -> int | None:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    unk = getattr(tok, "unk_token_id", None)
    return None if unk is not None and ids[0] == unk else int(ids[0])


def answer_ids(processor, answers: Sequence[str]) -> list[int]:
    """First token id of each answer as the tokenizer writes it (no BOS).

    Raises ``ValueError`` naming an answer the vocabulary cannot spell (empty or unknown token).
    """
    tok = getattr(processor, "tokenizer", processor)
    out = []
    for a in answers:
        i = _first_id(tok, a)
        if i is None:
            raise ValueError(f"answer {a!r} has no token in this model's vocabulary (it tokenises to "
                             "nothing or to the unknown token); pick answers the model can produce")
        out.append(i)
    return out


def variant_id(processor, answer: str, variant: str) -> int | None:
    """First token id of ``answer`` written as ``variant`` (``lower`` / ``capitalised``).

    ``None`` when the variant is not in the vocabulary or starts with the same token as the
    lower-case form (nothing separate to measure).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants are {list(VARIANTS)}")
    tok = getattr(processor, "tokenizer", processor)
    low = _first_id(tok, answer.lower())
    if variant == "lower":
        return low
    cap = _first_id(tok, answer[:1].upper() + answer[1:].lower())
    return None if cap is None or cap == low else cap


GOLD, MODEL = "gold", "model"


class NoTarget(ValueError):
    """A sample's gold answer has no first token in the model's vocabulary (nothing to measure)."""


def gold_id(processor, answer: str | None) -> int | None:
    """First token id of a gold ``answer``; ``None`` when there is no gold answer (``answer=None``).

    Raises :class:`NoTarget` naming an answer the vocabulary cannot spell.
    """
    if answer is None:
        return None
    i = _first_id(getattr(processor, "tokenizer", processor), answer)
    if i is None:
        raise NoTarget(f"answer {answer!r} has no token in this model's vocabulary (it tokenises to nothing or to "
                       "the unknown token)")
    return i


def answer_target(processor, answer: str | None, logits) -> tuple[int, str]:
    """The token an analysis measures for one sample, and where it comes from: the gold answer's
    first token (``"gold"``), or with ``answer=None`` the model's own greedy answer, the arg-max of
    the clean next-token ``logits`` at the last prompt position (``"model"``), as the published
    VQA-Constraints tracing does. :class:`NoTarget` for a gold answer the vocabulary cannot spell.
    """
    g = gold_id(processor, answer)
    return (int(logits.argmax()), MODEL) if g is None else (g, GOLD)


def only_correct_note(n_model: int) -> str:
    """The warning that ``only_correct`` does not apply to samples without a gold answer."""
    return (f"only_correct=True has no meaning for the {n_model} sample(s) without a gold answer (answer=None): each "
            "is measured on the model's own greedy answer, which is correct by construction, so all are kept")
