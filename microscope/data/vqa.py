"""The sample type of real visual-question data sets, shared by every loader.

    s = VQASample(id="q1", image_path=Path("img.jpg"), question="Is the cup red?", answer="yes",
                  category="ChooseAttr", constraints=(Constraint("cup", 7, 10),))
    s.image                    # PIL image, loaded on first access (clear error if missing)
    s.referred_patches()       # patches under the referred boxes, once a patch grid is set

It has the fields the suite reads from a Shapes-world sample (``id``, ``image``, ``question``,
``answer``, ``category``, ``constraints``, ``referred_patches()``), so every analysis runs on
either. ``answer`` is ``None`` for data without a gold answer (VQA-Constraints): every analysis
then measures the model's own greedy answer (:mod:`microscope.answers`). Boxes are
``(x0, y0, x1, y1)`` pixels of the original image; :func:`microscope.grid.box_patches` maps them
onto a vision tower's patch grid for the CLIP-style preprocessing of LLaVA-1.5 (resize the
shortest edge, centre-crop a square), :func:`~microscope.grid.resized_box_patches` for a resize of the whole image
(the anyres base view, Qwen2-VL). Both take ``visible``, the fraction of each side of the
preprocessed ``S`` px square that the ``g = floor(S / p)`` patches cover (``g·p / S``: 378/384
for SigLIP-384/14); boxes in the remaining strip fall on no patch, since the tower never sees it.

Loaders return :class:`Samples`, a list that also says which rows it skipped and why
(``samples.skipped``) and which it kept only in part (``samples.notes``): one bad row never
aborts a whole file. :func:`locate` finds a constraint phrase in its question by a stated rule.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from microscope.data.shapes import Constraint
from microscope.errors import MicroscopeError
from microscope.grid import box_patches, resized_box_patches


class DatasetError(MicroscopeError, ValueError):
    """A data-set file is missing or not in the expected layout (the message names it)."""


class DatasetWarning(UserWarning):
    """Rows of a data-set file were skipped or kept only in part (the message counts them)."""


#: extensions tried, in order, for an image path that names no existing file
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class Samples(list):
    """A loader's samples, plus the rows it left out and the rows it kept only in part.

    ``skipped``: one dict per row left out, ``{"source", "row", "reason"}``; ``notes``: one per
    sample kept with a limitation, ``{"source", "row", "id", "note"}`` (e.g. no scene graph, so no
    boxes; a constraint found by its head noun). :meth:`report` gives both as one tidy table.
    """

    def __init__(self, items=(), skipped: Sequence[dict] = (), notes: Sequence[dict] = ()):
        super().__init__(items)
        self.skipped: list[dict] = list(skipped)
        self.notes: list[dict] = list(notes)

    def report(self) -> pd.DataFrame:
        """Skipped and partly kept rows: ``source, row, id, action, reason``."""
        rows = [{"source": d["source"], "row": d["row"], "id": None, "action": "skipped", "reason": d["reason"]}
                for d in self.skipped]
        rows += [{"source": d["source"], "row": d["row"], "id": d["id"], "action": "kept", "reason": d["note"]}
                 for d in self.notes]
        return pd.DataFrame(rows, columns=["source", "row", "id", "action", "reason"])

    def summary(self) -> str:
        """One line per distinct reason with its count ('' when nothing was skipped or noted)."""
        out = [f"skipped {n} row(s): {r}" for r, n in Counter(d["reason"] for d in self.skipped).items()]
        out += [f"kept {n} sample(s) {r}" for r, n in Counter(d["note"] for d in self.notes).items()]
        return "\n".join(out)

    def warn(self, what: str, total: int) -> None:
        """A :class:`DatasetWarning` counting skipped rows out of ``total`` (nothing if none)."""
        if self.skipped:
            reasons = Counter(_reason_kind(d["reason"]) for d in self.skipped)
            warnings.warn(f"{what}: skipped {len(self.skipped)} of {total} rows ("
                          + "; ".join(f"{n} {r}" for r, n in reasons.items())
                          + "); samples.skipped lists each row and reason", DatasetWarning, stacklevel=3)


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0]


def draw(items: list, n: int | None, seed: int) -> list:
    """``n`` of ``items`` drawn without replacement with ``seed``, in their original order (all if
    ``n`` is None or not smaller)."""
    import numpy as np

    if n is None or n >= len(items):
        return items
    pick = np.sort(np.random.default_rng(seed).choice(len(items), size=n, replace=False))
    return [items[i] for i in pick]


def resolve_image(path: Path) -> Path:
    """``path`` if it is a file, else the first of ``path`` + each of :data:`IMAGE_EXTS` that is
    (published VQA-Constraints paths like ``./A photo of Ron Fricke`` carry no extension; the
    whole name is kept, so ``Audible.com`` becomes ``Audible.com.jpg``), else ``path`` itself."""
    path = Path(path)
    if path.is_file():
        return path
    for ext in IMAGE_EXTS:
        cand = path.with_name(path.name + ext)
        if cand.is_file():
            return cand
    return path


def read_json(path: Path, what: str):
    """JSON from ``path`` or a :class:`DatasetError` naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{what} file {path} is not valid JSON ({e})") from e


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the whitespace-separated words of ``text`` (GQA indexes words so),
    trailing punctuation excluded."""
    spans, i = [], 0
    for w in text.split(" "):
        if w:
            core = w.rstrip("?.,!;:")
            spans.append((i, i + max(1, len(core))))
        i += len(w) + 1
    return spans


_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)*")
#: words that are never a head noun: determiners, demonstratives, pronouns
FUNCTION_WORDS = frozenset("""a an the this that these those here there it its they them their his her him he she
one ones some any my your our which what who""".split())
#: words that end a noun phrase's head (prepositions, copulas, participles seen in the published files)
PHRASE_BREAKS = frozenset("""of in on at like with for from to by about near under over behind above below into
is are was were be being been shown pictured""".split())


def _stem(word: str) -> str:
    """Lower case, possessive and plural endings removed: ``Trees`` → ``tree``, ``bus's`` → ``bus``,
    ``berries`` → ``berry``, ``boxes`` → ``box``."""
    w = word.lower().replace("’", "'")
    w = w[:-2] if w.endswith("'s") else w.rstrip("'")
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("es") and w[-3] in "sxz" or w.endswith(("ches", "shes")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def head_noun(phrase: str) -> str | None:
    """The phrase's head noun: its last word before the first preposition or verb
    (:data:`PHRASE_BREAKS`) that is not a determiner or pronoun (:data:`FUNCTION_WORDS`);
    ``None`` when there is none (``"this"``, ``"these"``, ``"here"``)."""
    words = [m.group() for m in _WORD.finditer(phrase)]
    for i, w in enumerate(words):
        if i and w.lower() in PHRASE_BREAKS:
            words = words[:i]
            break
    content = [w for w in words if w.lower() not in FUNCTION_WORDS]
    return content[-1] if content else None


def locate(question: str, phrase: str) -> tuple[tuple[int, int] | None, str]:
    """Where ``phrase`` (a constraint entity) sits in ``question``, and the rule that found it.

    Rules, in order: ``verbatim`` (case-insensitive, as whole words: ``hat`` is not found inside
    ``What``); ``inflection`` (the phrase's words,
    compared by :func:`_stem`: case, plural and possessive endings ignored, as consecutive words of
    the question: ``refrigerator`` finds ``refrigerators``); ``head noun`` (the phrase's
    :func:`head_noun` alone, by the same comparison: ``this plant`` finds ``plant`` in "Name the
    type of plant this is?"). Returns ``(None, reason)`` when no rule applies.
    """
    phrase = phrase.strip()
    if not phrase:
        return None, "empty constraint"
    m = re.search(r"(?<![A-Za-z0-9])" + re.escape(phrase) + r"(?![A-Za-z0-9])", question, re.IGNORECASE)
    if m is not None:
        return (m.start(), m.end()), "verbatim"
    qw = [(m.start(), m.end(), _stem(m.group())) for m in _WORD.finditer(question)]
    pw = [_stem(m.group()) for m in _WORD.finditer(phrase)]
    if pw:
        for i in range(len(qw) - len(pw) + 1):
            if [w for _, _, w in qw[i:i + len(pw)]] == pw:
                return (qw[i][0], qw[i + len(pw) - 1][1]), "inflection"
    head = head_noun(phrase)
    if head is None:
        return None, f"constraint {phrase!r} is not in the question and has no content word to look for"
    for a, b, w in qw:
        if w == _stem(head):
            return (a, b), "head noun"
    return None, f"constraint {phrase!r} is not in the question, nor is its head noun {head!r}"


@dataclass
class VQASample:
    """One visual question from a data set on disk."""

    id: str
    image_path: Path
    question: str
    answer: str | None  # None: no gold answer; analyses use the model's own greedy answer
    category: str
    constraints: tuple[Constraint, ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()   # the referred objects' boxes
    options: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)
    grid: int | tuple[int, int] | None = None  # patch grid for referred_patches: square side, or (rows, cols)
    visible: float = 1.0  # fraction of each preprocessed side the grid covers: grid · patch / image_size

    @property
    def image(self) -> Image.Image:
        """The RGB image, read from ``image_path``; :class:`DatasetError` if unreadable."""
        try:
            with Image.open(self.image_path) as im:
                return im.convert("RGB")
        except FileNotFoundError as e:
            tried = "" if self.image_path.suffix.lower() in IMAGE_EXTS else \
                f" (nor with {', '.join(IMAGE_EXTS)} appended)"
            raise DatasetError(f"sample {self.id}: image file {self.image_path} does not exist{tried}; check the "
                               "images folder given to the loader") from e
        except OSError as e:
            raise DatasetError(f"sample {self.id}: image file {self.image_path} is not a readable image ({e})") \
                from e

    def referred_patches(self) -> tuple[int, ...]:
        """Sorted patches under the referred boxes on the grid set with :func:`microscope.grid.with_grid`
        (empty without boxes or grid)."""
        if not self.boxes or self.grid is None:
            return ()
        w, h = self.size()
        out: set[int] = set()
        for b in self.boxes:
            out.update(box_patches(b, w, h, self.grid, self.visible) if isinstance(self.grid, int)
                       else resized_box_patches(b, w, h, *self.grid, visible=self.visible))
        return tuple(sorted(out))

    def size(self) -> tuple[int, int]:
        """``(width, height)`` from the data set's metadata, else from the image file's header."""
        w, h = self.meta.get("width"), self.meta.get("height")
        if w and h:
            return int(w), int(h)
        with Image.open(self.image_path) as im:
            return im.size


