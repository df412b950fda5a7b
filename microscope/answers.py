"""Answer tokens: which vocabulary id a single-word answer starts with, and its variants.

    ids = answer_ids(handle.processor, ["red", "yes"])      # first token of each answer
    cap = variant_id(handle.processor, "red", "capitalised")  # "Red", or None if not a token

    tid, source = answer_target(handle.processor, sample.answer, logits)  # gold, or the model's own answer

Every effect the suite measures (knockout change, indirect effect, logit-lens probability) is
about ``p(answer's first token)`` at the last prompt position, so they all share these ids.

The id is the one the model would *generate* there: the answer is tokenised in context, after
the chat template's generation prompt, and with the separator the template puts between that
prompt and the assistant's text. The same word has several ids in most vocabularies — Llama's
SentencePiece writes ``▁red`` after ``ASSISTANT:`` (the template adds a space), Qwen2's
byte-level BPE writes ``red`` after ``<|im_start|>assistant\\n`` and Llama 3 writes ``Ġred`` after
Idefics3's ``Assistant:`` — and only the in-context one is the model's answer. The separator
comes from rendering the template with an assistant turn holding the answer; a template that
cannot render one (or a bare tokenizer) gets a space after a prompt that does not end in
whitespace, none otherwise.

A sample without a gold answer (``answer=None``, e.g. VQA-Constraints) is measured on the model's
own greedy answer instead: :func:`answer_target` returns the arg-max of its clean logits and the source
``"model"``, which every analysis records in its ``answer_source`` column (and the token it measured).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence

from microscope.roles import build_prompt, lays_out_prompt, user_turn

VARIANTS = ("lower", "capitalised")


#: generation contexts already rendered, per processor (its chat template does not change)
_CONTEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def generation_context(processor) -> tuple[str, str]:
    """``(prompt, separator)``: the chat template's generation prompt for a one-image question
    and the text its assistant turn puts between that prompt and the answer (``""`` for a bare
    tokenizer, which has no template). Rendered once per processor."""
    tok = getattr(processor, "tokenizer", None)
    if tok is None or not callable(getattr(processor, "apply_chat_template", None)):
        return "", ""
    try:
        return _CONTEXTS[processor]
    except (KeyError, TypeError):  # TypeError: a processor that cannot be weakly referenced
        pass
    ctx = _render_context(processor)
    with contextlib.suppress(TypeError):
        _CONTEXTS[processor] = ctx
    return ctx


def _render_context(processor, answer: str = "yes") -> tuple[str, str]:
    q = "?"
    prompt = build_prompt(processor, q)
    if lays_out_prompt(processor):  # PaliGemma: the answer follows the text its processor lays out (… "\n")
        from PIL import Image

        _, laid, *_ = processor.prepare_inputs_layout(images=[Image.new("RGB", (2, 2))], text=[prompt])
        return laid[0], ""
    try:
        full = processor.apply_chat_template(
            [*user_turn(q), {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            add_generation_prompt=False)
    except Exception:  # a template that renders one user turn only (e.g. microscope.fusion's)
        full = None
    if isinstance(full, str) and full.startswith(prompt) and answer in full[len(prompt):]:
        rest = full[len(prompt):]
        return prompt, rest[:rest.index(answer)]
    return prompt, "" if not prompt or prompt[-1].isspace() else " "


def _first_id(tok, text: str, context: tuple[str, str] = ("", "")) -> int | None:
    """Id of the first token of ``text`` written after ``context`` (prompt, separator): the first
    token of ``prompt + separator + text`` that ends after the prompt."""
    prompt, sep = context
    if not prompt:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        first = int(ids[0]) if ids else None
    else:
        enc = tok(prompt + sep + text, add_special_tokens=False, return_offsets_mapping=True)
        after = [i for i, (_a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if b > len(prompt)]
        first = int(after[0]) if after else None
    unk = getattr(tok, "unk_token_id", None)
    return None if first is None or (unk is not None and first == unk) else first


def answer_ids(processor, answers: Sequence[str]) -> list[int]:
    """First token id of each answer in the form the model generates after its chat template
    (see the module doc; a bare tokenizer: the answer tokenised alone, no BOS).

    Raises ``ValueError`` naming an answer the vocabulary cannot spell (empty or unknown token).
    """
    tok = getattr(processor, "tokenizer", processor)
    ctx = generation_context(processor)
    out = []
    for a in answers:
        i = _first_id(tok, a, ctx)
        if i is None:
            raise ValueError(f"answer {a!r} has no token in this model's vocabulary (it tokenises to "
                             "nothing or to the unknown token); pick answers the model can produce")
        out.append(i)
    return out


def variant_id(processor, answer: str, variant: str) -> int | None:
    """First token id of ``answer`` written as ``variant`` (``lower`` / ``capitalised``), in the
    form the model generates after its chat template (as :func:`answer_ids`).

    ``None`` when the variant is not in the vocabulary or starts with the same token as the
    lower-case form (nothing separate to measure).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants are {list(VARIANTS)}")
    tok = getattr(processor, "tokenizer", processor)
    ctx = generation_context(processor)
    low = _first_id(tok, answer.lower(), ctx)
    if variant == "lower":
        return low
    cap = _first_id(tok, answer[:1].upper() + answer[1:].lower(), ctx)
    return None if cap is None or cap == low else cap


GOLD, MODEL = "gold", "model"


class NoTarget(ValueError):
    """A sample's gold answer has no first token in the model's vocabulary (nothing to measure)."""


def gold_id(processor, answer: str | None) -> int | None:
    """First token id of a gold ``answer`` in generation context (as :func:`answer_ids`); ``None``
    when there is no gold answer (``answer=None``).

    Raises :class:`NoTarget` naming an answer the vocabulary cannot spell.
    """
    if answer is None:
        return None
    i = _first_id(getattr(processor, "tokenizer", processor), answer, generation_context(processor))
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
