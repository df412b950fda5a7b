"""Answer tokens: which vocabulary id a single-word answer starts with, and its variants.

    ids = answer_ids(handle.processor, ["red", "yes"])      # first token of each answer
    cap = variant_id(handle.processor, "red", "capitalised")  # "Red", or None if not a token

Every effect the suite measures (knockout change, indirect effect, logit-lens probability) is
about ``p(answer's first token)`` at the last prompt position, so they all share these ids.
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
