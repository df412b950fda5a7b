"""Inputs with per-token roles, derived from the processor's own ids and character offsets.

    batch = prepare(handle, images, questions, constraints=[[(7, 13)], ...])
    handle.model(**batch.inputs)
    batch.roles          # (B, T) int codes into ROLES
    batch.role_mask("image")

Roles: ``image`` where ``input_ids == image_token_id`` (LLaVA-NeXT's image-newline
tokens included: its processor gives them the image token id too); ``question`` for tokens whose
characters lie in the question; ``constraint`` for question tokens overlapping a constraint span;
``template`` for everything else the chat template adds (BOS, ``USER:``, ``ASSISTANT:``);
``last`` for the final prompt position; ``pad`` for padding; ``image_boundary`` for the
begin/end-of-image marker tokens a processor declares in ``image_boundary_tokens``
(OmniFusion's ``<SOI>``/``<EOI>``, whose input vectors are learned with the image side and read
the image before the text does; see :func:`microscope.fusion.fuse`) — other families' markers
stay ``template``. Nothing counts tokens: the
processor's ids are aligned with an offset-mapped tokenisation of the same prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

ROLES: tuple[str, ...] = ("pad", "template", "image", "question", "constraint", "last", "image_boundary")
ROLE_CODE: dict[str, int] = {r: i for i, r in enumerate(ROLES)}
MAX_IMAGE_SIDE = 8192


def role_codes(roles: str | Sequence[str]) -> list[int]:
    """Codes of role names; ``ValueError`` naming an unknown role and listing the known ones."""
    if isinstance(roles, str):
        roles = [roles]
    bad = [r for r in roles if r not in ROLE_CODE]
    if bad:
        raise ValueError(f"unknown role(s) {bad}; roles are {list(ROLES)}")
    return [ROLE_CODE[r] for r in roles]


@dataclass
class Batch:
    """Processor outputs plus per-token roles for a batch of (image, question) pairs."""

    inputs: dict
    roles: torch.Tensor
    prompts: list[str]
    sample_ids: list[str] = field(default_factory=list)

    def role_mask(self, roles: str | Sequence[str]) -> torch.Tensor:
        """Boolean (B, T) mask of the positions whose role is in ``roles``."""
        return torch.isin(self.roles, torch.tensor(role_codes(roles)))

    def role_names(self, row: int) -> list[str]:
        return [ROLES[int(c)] for c in self.roles[row]]

    @property
    def last_index(self) -> torch.Tensor:
        """Index of the last prompt position of every row."""
        return (self.roles == ROLE_CODE["last"]).int().argmax(-1)


def check_image(img, index: int = 0) -> Image.Image:
    """An RGB PIL image from a PIL image or an H×W(×C) uint8 array, or a clear error.

    Grayscale, palette and RGBA images are converted to RGB (alpha composited on white).
    """
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim not in (2, 3):
            raise TypeError(f"image {index}: arrays must be uint8 H×W or H×W×C, got {img.dtype} "
                            f"with shape {img.shape}")
        img = Image.fromarray(img)
    if not isinstance(img, Image.Image):
        raise TypeError(f"image {index}: expected a PIL.Image or a uint8 array, got {type(img).__name__}")
    w, h = img.size
    if min(w, h) < 2 or max(w, h) > MAX_IMAGE_SIDE:
        raise ValueError(f"image {index}: size {w}×{h} is outside 2..{MAX_IMAGE_SIDE} px; resize it "
                         "before passing it in")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def user_turn(question: str) -> list[dict]:
    """The chat messages of one user turn: one image, then ``question``."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def lays_out_prompt(processor) -> bool:
    """Whether ``processor`` has no chat template because it lays the prompt out itself
    (PaliGemma: image tokens, ``<bos>``, the text, ``\n``): its own layout step
    (``prepare_inputs_layout``) rewrites a text holding only its image placeholder and a word."""
    token, layout = getattr(processor, "image_token", None), getattr(processor, "prepare_inputs_layout", None)
    if getattr(processor, "chat_template", None) or not isinstance(token, str) or not callable(layout):
        return False
    probe = token + "x"
    try:
        _, text, *_ = layout(images=[Image.new("RGB", (2, 2))], text=[probe])
    except Exception:  # a layout step that needs more than a placeholder and text: not this kind
        return False
    return isinstance(text, list) and len(text) == 1 and text[0] != probe


def build_prompt(processor, question: str) -> str:
    """The model's chat-template prompt for one image and ``question``; for a processor that lays
    out its prompt itself (:func:`lays_out_prompt`), its image placeholder followed by the question
    (the processor adds the rest, and :func:`prepare` marks what it adds as template)."""
    if lays_out_prompt(processor):
        return processor.image_token + question
    return processor.apply_chat_template(user_turn(question), add_generation_prompt=True)


def adds_special_tokens(processor, prompt: str) -> bool:
    """Whether tokenising ``prompt`` should add the tokenizer's special tokens: not when the prompt
    already starts with its BOS token (a chat template that writes ``{{ bos_token }}``, as Gemma 3's
    and Llama 3's do), or the ids would start with two. This is transformers' own rule for a
    processor's ``apply_chat_template(tokenize=True)``; prompts without it (LLaVA's ``USER: …``,
    a processor that lays out the prompt itself) get the tokenizer's BOS as usual."""
    bos = getattr(getattr(processor, "tokenizer", processor), "bos_token", None)
    return not (bos and prompt.startswith(bos))


def reserved_strings(processor) -> list[str]:
    """The strings a processor or its tokenizer gives a meaning of their own: the image/video
    placeholders (``processor.image_token`` …), the tokenizer's special tokens and its added tokens
    marked special (Qwen's ``<|vision_start|>``). Inside a
    question they would become image slots or control tokens instead of text."""
    found = {v for k, v in vars(processor).items() if k.endswith("_token") and isinstance(v, str)}
    tok = getattr(processor, "tokenizer", processor)
    found.update(getattr(tok, "all_special_tokens", []) or [])
    found.update(t.content for t in (getattr(tok, "added_tokens_decoder", None) or {}).values() if t.special)
    return sorted(s for s in found if s and s.strip())


def check_question(question, index: int, reserved: Sequence[str]) -> str:
    """``question`` if it is a non-empty string free of reserved strings, else a ``ValueError``."""
    if not isinstance(question, str):
        raise TypeError(f"question {index}: expected a string, got {type(question).__name__}")
    if not question.strip():
        raise ValueError(f"question {index} is empty")
    hits = [r for r in reserved if r in question]
    if hits:
        raise ValueError(f"question {index} contains {hits}, which this model's processor reserves for "
                         f"images or control tokens ({question!r}); remove or reword it — the image is "
                         "passed separately and placed by the chat template")
    return question


def _placeholder_ids(processor) -> set[int]:
    """The id of the placeholder the chat template writes for an image (``processor.image_token``)
    when it is one token: the processor replaces it, so it is not among the processor's ids. It is
    the image-token id itself for most families; Aya Vision writes ``<image>`` and fills
    ``<|IMG_PATCH|>`` tokens."""
    token, tok = getattr(processor, "image_token", None), processor.tokenizer
    if not isinstance(token, str):
        return set()
    ids = tok(token, add_special_tokens=False)["input_ids"]
    return set(ids) if len(ids) == 1 else set()


def boundary_ids(processor) -> set[int]:
    """Ids of the begin/end-of-image marker tokens ``processor.image_boundary_tokens`` declares
    (each must be one token), empty when it declares none."""
    names = getattr(processor, "image_boundary_tokens", None) or ()
    tok = processor.tokenizer
    out = set()
    for name in names:
        ids = tok(name, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"image boundary token {name!r} is {len(ids)} tokens for this tokenizer; it must be one")
        out.add(int(ids[0]))
    return out


def _per_prompt(processor, images: list) -> list:
    """Images as a transformers processor reads one image per prompt, ``[[im0], [im1], …]``: every
    processor splits a flat list by the prompts' image tokens except SmolVLM's, which takes a flat
    list as all images of one prompt (a custom-fusion processor takes the flat list)."""
    from transformers import ProcessorMixin

    return [[im] for im in images] if isinstance(processor, ProcessorMixin) else images


def _spans_in_prompt(processor, image, prompt: str, row: torch.Tensor, att: torch.Tensor, img_id: int
                     ) -> dict[int, tuple[int, int]]:
    """``position -> (start, end)`` in ``prompt`` of each of ``row``'s tokens that comes from the
    prompt's own text, read off the processor's own tokenisation of the text it writes.

    For processors that write text around the image placeholder that tokenises together with the
    prompt's (Gemma 3: ``<start_of_image>`` becomes ``\n\n<start_of_image>`` + image tokens +
    ``<end_of_image>\n\n``, and ``\n\n`` + the question's first word is not the prompt's
    ``<start_of_image>`` + that word). The processor is run once more on this one prompt with
    ``return_offsets_mapping`` and ``return_text_replacement_offsets``: a token's characters in the
    expanded text map back to the prompt by undoing the length change of every replacement before
    it; tokens inside a replacement (what the processor wrote) are left out."""
    enc = processor(images=_per_prompt(processor, [image]), text=[prompt], return_offsets_mapping=True,
                    return_text_replacement_offsets=True, add_special_tokens=adds_special_tokens(processor, prompt))
    ids, offsets = enc["input_ids"][0], enc["offset_mapping"][0]
    repl = enc.get("text_replacement_offsets")
    real = [j for j in range(len(row)) if att[j]]
    if repl is None or len(real) != len(ids) or any(int(row[j]) != int(t) for j, t in zip(real, ids)):
        raise RuntimeError("internal: the processor's ids do not contain the tokenised prompt, and its own "
                           "offsets of the text it writes are not available to align them")
    moves = sorted((r["new_span"], (r["span"][1] - r["span"][0]) - (r["new_span"][1] - r["new_span"][0]))
                   for r in repl[0])
    out: dict[int, tuple[int, int]] = {}
    for j, t, (a, b) in zip(real, ids, offsets):
        if int(t) == img_id or b <= a or any(ns[0] <= a and b <= ns[1] for ns, _ in moves):
            continue
        shift = sum(d for ns, d in moves if ns[1] <= a)
        out[j] = (a + shift, b + shift)
    return out


def prepare(handle, images: Sequence, questions: Sequence[str],
            constraints: Sequence[Sequence[tuple[int, int]]] | None = None,
            sample_ids: Sequence[str] | None = None) -> Batch:
    """Processor inputs for ``(image, question)`` pairs, left-padded, with roles.

    ``constraints[i]`` lists character spans ``(start, end)`` in ``questions[i]``.
    """
    processor = handle.processor
    n = len(questions)
    if images is None or len(images) != n:
        raise ValueError(f"{handle.name} needs one image per question: got "
                         f"{0 if images is None else len(images)} images for {n} questions")
    imgs = []
    for i, im in enumerate(images):
        if im is None:
            raise ValueError(f"question {i} has no image; {handle.name} needs one image per question")
        imgs.append(check_image(im, i))
    reserved = reserved_strings(processor)
    for i, q in enumerate(questions):
        check_question(q, i, reserved)
    prompts = [build_prompt(processor, q) for q in questions]
    specials = {adds_special_tokens(processor, p) for p in prompts}
    if len(specials) != 1:
        raise RuntimeError("internal: some of this model's prompts start with its BOS token and some do not")
    special = specials.pop()
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        inputs = processor(images=_per_prompt(processor, imgs), text=prompts, return_tensors="pt", padding=True,
                           add_special_tokens=special)
    finally:
        tok.padding_side = old_side
    inputs.pop("labels", None)  # PaliGemma's training targets (all -100 without a suffix): not a model input here
    ids = inputs["input_ids"]
    att = inputs["attention_mask"]
    img_id = handle.adapter.image_token_id
    skip = {img_id, *_placeholder_ids(processor)}
    boundary = torch.tensor(sorted(boundary_ids(processor)), dtype=torch.long)
    roles = torch.full(ids.shape, ROLE_CODE["pad"], dtype=torch.long)
    for i, (p, q) in enumerate(zip(prompts, questions)):
        q0 = p.find(q)
        if q0 < 0:
            raise ValueError(f"question {i} does not appear verbatim in its prompt {p!r}")
        spans = [(q0 + a, q0 + b) for a, b in (constraints[i] if constraints else [])]
        for a, b in spans:
            if not q0 <= a < b <= q0 + len(q):
                raise ValueError(f"constraint span {(a - q0, b - q0)} is outside question {i} ({len(q)} chars)")
        plain = tok(p, return_offsets_mapping=True, add_special_tokens=special)
        p_ids = [t for t in plain["input_ids"]]
        offs = [o for t, o in zip(p_ids, plain["offset_mapping"]) if t not in skip]
        p_text = [t for t in p_ids if t not in skip]
        row = ids[i]
        pos = [j for j in range(len(row)) if att[i, j] and row[j] != img_id]
        # the prompt's own tokens appear in order among the processor's non-image ids; ids the
        # processor adds around images (Idefics3's <fake_token_around_image>, <global-img>) do not
        matched: dict[int, int] = {}
        k = 0
        for j in pos:
            if k < len(p_text) and int(row[j]) == p_text[k]:
                matched[j] = k
                k += 1
        span_of = {j: offs[m] for j, m in matched.items()}
        if k != len(p_text):  # the text the processor writes around an image merges with the prompt's
            span_of = _spans_in_prompt(processor, imgs[i], p, row, att[i], img_id)
        for j in pos:
            if j not in span_of:
                roles[i, j] = ROLE_CODE["template"]
                continue
            a, b = span_of[j]
            if a >= q0 and b <= q0 + len(q) and b > a:
                code = ROLE_CODE["question"]
                if any(a < e and b > s for s, e in spans):
                    code = ROLE_CODE["constraint"]
            else:
                code = ROLE_CODE["template"]
            roles[i, j] = code
        roles[i][(row == img_id) & att[i].bool()] = ROLE_CODE["image"]
        roles[i][torch.isin(row, boundary) & att[i].bool()] = ROLE_CODE["image_boundary"]
        last = int(att[i].nonzero().max())
        roles[i, last] = ROLE_CODE["last"]
    return Batch(inputs=inputs, roles=roles, prompts=prompts,
                 sample_ids=list(sample_ids) if sample_ids is not None else [str(i) for i in range(n)])


def prepare_samples(handle, samples: Sequence) -> Batch:
    """:func:`prepare` for Shapes-world (or any same-shaped) samples, with their constraint spans."""
    return prepare(handle, [s.image for s in samples], [s.question for s in samples],
                   [[(c.start, c.end) for c in s.constraints] for s in samples],
                   [s.id for s in samples])
