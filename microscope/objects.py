"""Object-level causal tests: which objects of a scene does the answer depend on?

    df = object_tests(handle, samples)           # per sample × object × space × test: effect, referred
    acc = object_accuracy(df)                    # per space × test × category: accuracy vs chance

Every test changes one object (or a set of objects) of a Shapes-world scene, runs the model, and
measures how far the answer moved from the clean run by the change of the answer's **log-odds**,
``d(P, Q) = |lo(P) − lo(Q)|`` with ``lo(P) = log P(a) − log Σ_{v≠a} P(v)`` (:func:`distance`).
Unlike a difference of probabilities or the total variation ``½ Σ_v |P(v) − Q(v)|`` (also
available), it does not saturate where the model is sure: 0.999 → 0.99 is 2.3 in log-odds and
0.009 in TV, so moving a referred object that cannot flip the answer still shows. The change
is made in one of two **spaces**:

- ``pixels``: the scene is drawn again with the change (:meth:`~microscope.data.shapes.Sample.render`);
  the whole model, vision tower included, runs on the new image.
- ``embeddings``: the decoder input of the clean prompt, with the image tokens of the patches
  whose pixels the change touches replaced by the tower's tokens for the changed image (an
  interchange intervention on the decoder's input: the decoder sees the change only there).

**Tests** (``test`` column; ``K`` a set of objects kept, ``P_K`` the distribution with only the
objects in ``K`` drawn, ``N`` all objects, ``P_N`` the clean one):

- ``occlude`` (necessity): ``d(P_N, P_{N∖i})``, object ``i`` painted out.
- ``restore`` (sufficiency): ``d(P_N, P_∅) − d(P_N, P_{i})``, how much of the distance to the
  clean answer keeping only object ``i`` recovers.
- ``occlude`` and ``restore`` are the last and first terms of the **Shapley value** of the game
  ``v(K) = −d(P_N, P_K)`` over every set of objects:
  ``φ_i = Σ_{K ⊆ N∖i} |K|!(n−|K|−1)!/n! · (v(K ∪ i) − v(K))``, which sums to ``d(P_N, P_∅)``
  (efficiency) and splits the credit between objects that can stand in for each other.
- ``variable``: an intervention on the **variable the question's answer is a function of**
  (:data:`ANSWER_VARIABLE`): the object's colour (QueryAttr, ChooseAttr, CompareAttr), its shape
  (ChooseCat), its horizontal position (ChooseRel) — effect = mean ``d(P_N, P_edit)`` over every
  other value (5 colours, 3 shapes, up to ``n_positions`` free places across the image) — or its presence
  (LogicalObj: "is there a circle or a square?" is a function of which shapes are present, and
  any one match suffices, so the test is the Shapley value above, over all ``2^n`` sets of
  objects, which credits each of two redundant matches where ``occlude`` credits neither).

Why the ``variable`` test: removing the object a question presupposes ("the red object") makes the
question unanswerable, and a model answering an unanswerable two-way question picks an option
that matches the clean answer about half the time — so ``occlude``/``restore`` cannot separate
the referred object from a look-alike, nor a two-object question's referents from distractors.
Changing the referred object's colour keeps the question answerable and changes its answer.

**Accuracy** (:func:`object_accuracy`): a sample is right when every referred object's effect
exceeds every other object's by more than :data:`TIE` (closer effects are ties, counted wrong).
Samples need a referred object and another object to rank (the only ones the test can fail).
Chance: ``1 / C(n, r)`` for ``n`` objects, ``r`` referred (a random order ranks the referred set
first). The ground truth also says which interventions change the question's *true* answer
(:meth:`~microscope.data.shapes.Sample.answer_for`): a sample is **testable** when every referred
object has such an intervention — a ChooseRel referent with the other one at the image's edge
cannot be moved across it, so no change of that object alone can show the answer depends on it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from microscope.answers import answer_ids
from microscope.crossattn import has_cross_attention, no_patch_tokens
from microscope.grid import image_patch_positions
from microscope.prefix import causal_start, clean_cache, next_token_probs, prefix_of
from microscope.prefix import positions as prompt_positions
from microscope.progress import tqdm
from microscope.roles import prepare_samples

#: the scene variable each category's answer is a function of
ANSWER_VARIABLE = {"QueryAttr": "color", "ChooseAttr": "color", "CompareAttr": "color", "ChooseCat": "shape",
                   "ChooseRel": "position", "LogicalObj": "presence"}
SPACES = ("pixels", "embeddings")
TESTS = ("occlude", "restore", "variable")
_GAP = 2  # px between boxes, as the Shapes world places them
COLUMNS = ["model", "sample_id", "category", "n_objects", "n_referred", "object", "referred", "space", "test",
           "effect", "n_variants", "n_changing", "testable", "p_clean", "correct"]
#: effects closer than this (in log-odds or TV) are ties: a ranking decided by float noise is no ranking
TIE = 1e-3


class _Stop(Exception):
    """Raised by a pre-hook on the first decoder layer once the decoder input is recorded."""


def decoder_inputs(handle, samples: Sequence, batch_size: int = 64) -> list[torch.Tensor]:
    """Each sample's decoder input (token embeddings with the image features merged in), (T, d)
    per sample, without running the decoder: the forward stops at the first decoder layer."""
    a = handle.adapter
    out: list[torch.Tensor] = []
    for i in range(0, len(samples), batch_size):
        batch = prepare_samples(handle, samples[i:i + batch_size])
        seen: dict = {}

        def pre(_m, args, kwargs, seen=seen):
            seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()
            raise _Stop

        hook = a.layers[0].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            with torch.no_grad():
                handle.model(**{k: v.to(handle.device) for k, v in batch.inputs.items()}, use_cache=False)
        except _Stop:
            pass
        finally:
            hook.remove()
        out += list(seen["x"])
    return out


def probs(handle, samples: Sequence, batch_size: int = 64) -> torch.Tensor:
    """Next-token distribution at the last prompt position, (n, vocab), one row per sample."""
    out = []
    for i in range(0, len(samples), batch_size):
        batch = prepare_samples(handle, samples[i:i + batch_size])
        with torch.no_grad():
            lg = handle.model(**{k: v.to(handle.device) for k, v in batch.inputs.items()}, use_cache=False,
                              logits_to_keep=1).logits[:, -1].float()
        out.append(lg.softmax(-1).cpu())
    return torch.cat(out)


def _embed_probs(handle, embeds: torch.Tensor, prefix, pos_ids, batch_size: int = 64) -> torch.Tensor:
    """Next-token distributions of decoder inputs ``embeds`` (R, T, d) sharing a clean prefix cache
    of their first ``length(prefix)`` positions (the rows hold only the suffix)."""
    with torch.no_grad():
        return torch.cat([next_token_probs(handle, embeds[i:i + batch_size], prefix, pos_ids).cpu()
                          for i in range(0, len(embeds), batch_size)])


def total_variation(p: torch.Tensor | np.ndarray, q: torch.Tensor | np.ndarray) -> np.ndarray:
    """``TV(p, q) = ½ Σ_v |p(v) − q(v)|`` over the last axis."""
    return 0.5 * np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum(-1)


def answer_log_odds(p: torch.Tensor | np.ndarray, answer: int) -> np.ndarray:
    """``lo(P) = log P(a) − log Σ_{v≠a} P(v)`` over the last axis (summing the other tokens, not
    ``1 − P(a)``, keeps it exact where ``P(a)`` rounds to 1)."""
    q = np.asarray(p, dtype=np.float64)
    other = np.delete(q, answer, axis=-1).sum(-1)
    return np.log(np.clip(q[..., answer], 1e-300, None)) - np.log(np.clip(other, 1e-300, None))


def distance(p_clean, p, answer: int, measure: str = "logodds") -> np.ndarray:
    """How far each distribution in ``p`` moved from ``p_clean``: ``|lo(P_clean) − lo(P)|`` (the
    answer's log-odds, ``measure="logodds"``) or ``TV(P_clean, P)`` (``"tv"``)."""
    if measure == "logodds":
        return np.abs(answer_log_odds(p_clean, answer) - answer_log_odds(p, answer))
    if measure == "tv":
        return total_variation(p_clean, p)
    raise ValueError(f"unknown measure {measure!r}; measures are 'logodds' and 'tv'")


def shapley_values(value: dict[frozenset, float], n: int) -> np.ndarray:
    """Exact Shapley values of the game ``value`` (every subset of ``range(n)`` → a number):
    ``φ_i = Σ_{K ⊆ N∖i} |K|!(n−|K|−1)!/n! · (v(K ∪ i) − v(K))``; they sum to ``v(N) − v(∅)``."""
    phi = np.zeros(n)
    for K, vk in value.items():
        w = math.factorial(len(K)) * math.factorial(n - len(K) - 1) / math.factorial(n) if len(K) < n else 0.0
        for i in range(n):
            if i not in K:
                phi[i] += w * (value[K | {i}] - vk)
    return phi


@dataclasses.dataclass(frozen=True)
class Variant:
    """One changed scene: the objects drawn (``keep``) as given in ``objects``; ``target`` is the
    object changed (``None`` for a set of objects, e.g. a coalition of the presence game)."""

    test: str
    target: int | None
    keep: tuple[int, ...]
    objects: tuple
    label: str = ""


def _free(box, others, seen) -> bool:
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 > seen or y1 > seen:
        return False
    return all(x0 >= o[2] + _GAP or o[0] >= x1 + _GAP or y0 >= o[3] + _GAP or o[1] >= y1 + _GAP for o in others)


def _moves(box, others, seen: int, n_positions: int, steps: int = 9) -> list[tuple[int, int, int, int]]:
    """Up to ``n_positions`` new places for ``box``, at distinct horizontal positions spread over
    the seen square: on a ``steps × steps`` lattice of positions, those at least half the box's
    width away horizontally that overlap no other box (gap included), the one nearest the
    original row kept per column, then ``n_positions`` columns evenly picked."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cols = []
    for x in sorted({int(round(v)) for v in np.linspace(0, seen - w, steps)}):
        if abs(x - x0) * 2 < w:
            continue
        free = [(abs(y - y0), (x, y, x + w, y + h)) for y in {int(round(v)) for v in np.linspace(0, seen - h, steps)}
                if _free((x, y, x + w, y + h), others, seen)]
        if free:
            cols.append(min(free)[1])
    if len(cols) <= n_positions:
        return cols
    return [cols[int(round(k))] for k in np.linspace(0, len(cols) - 1, n_positions)]


def variants(sample, variable: str, n_positions: int = 6) -> list[Variant]:
    """The ``variable`` interventions on every object of ``sample``: every other colour, every
    other shape, or up to ``n_positions`` new places at distinct horizontal positions spread over
    the seen square, overlapping no other object (:func:`_moves`). ``presence``: every subset of
    objects kept."""
    from microscope.data import shapes

    objs, n, everyone = tuple(sample.objects), len(sample.objects), tuple(range(len(sample.objects)))
    out: list[Variant] = []
    if variable == "presence":
        for r in range(n + 1):
            for K in itertools.combinations(range(n), r):
                out.append(Variant("presence", None, K, objs, "keep " + ",".join(map(str, K))))
        return out
    for i, o in enumerate(objs):
        if variable == "color":
            values = [c for c in shapes.COLORS if c != o.color]
            edits = [dataclasses.replace(o, color=c) for c in values]
        elif variable == "shape":
            values = [s for s in shapes.SHAPES if s != o.shape]
            edits = [dataclasses.replace(o, shape=s) for s in values]
        elif variable == "position":
            edits, values = [], []
            for box in _moves(o.box, [p.box for j, p in enumerate(objs) if j != i], sample.visible_size,
                              n_positions):
                edits.append(dataclasses.replace(o, box=box))
                values.append(f"x={box[0]}, y={box[1]}")
        else:
            raise ValueError(f"unknown variable {variable!r}; variables are color, shape, position, presence")
        for e, v in zip(edits, values):
            out.append(Variant(variable, i, everyone, objs[:i] + (e,) + objs[i + 1:], f"{i}: {v}"))
    return out


def _changed_patches(a: np.ndarray, b: np.ndarray, grid: int, patch: int) -> np.ndarray:
    """Raster indices of the ``grid × grid`` patches where images ``a`` and ``b`` differ."""
    seen = grid * patch
    d = (a[:seen, :seen] != b[:seen, :seen]).any(-1)
    return np.flatnonzero(d.reshape(grid, patch, grid, patch).any(axis=(1, 3)).reshape(-1))


def scene_distributions(handle, sample, scenes: Sequence[Variant], space: str, batch_size: int = 64
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P_clean, P)``: the clean next-token distribution and one per changed scene, in ``space``
    (``pixels``: the model on the redrawn image; ``embeddings``: the clean decoder input with the
    image tokens of the changed patches taken from the redrawn image's decoder input)."""
    if space not in SPACES:
        raise ValueError(f"unknown space {space!r}; spaces are {list(SPACES)}")
    images = [sample.render(v.keep, v.objects) for v in scenes]
    copies = [dataclasses.replace(sample, image=im) for im in images]
    if space == "pixels":
        p = probs(handle, [sample, *copies], batch_size)
        return p[0], p[1:]
    batch = prepare_samples(handle, [sample])
    inputs = {k: v.to(handle.device) for k, v in batch.inputs.items()}
    pos = image_patch_positions(handle, batch, 0, sample.grid)
    first = causal_start(handle, inputs, int(pos.min()))  # the image block's start where it is bidirectional
    with torch.no_grad():
        out = handle.model(**inputs, use_cache=True, **clean_cache(handle), logits_to_keep=1)
    p_clean = out.logits[0, -1].float().softmax(-1).cpu()
    prefix = prefix_of(out, first, keep=handle.adapter.cross_attention_layers)
    pos_ids = prompt_positions(handle, inputs)
    clean = decoder_inputs(handle, [sample])[0]
    base = np.asarray(sample.image)
    rows = []
    for im, e in zip(images, decoder_inputs(handle, copies, batch_size)):
        x = clean.clone()
        idx = pos[torch.as_tensor(_changed_patches(base, np.asarray(im), sample.grid, sample.patch_size),
                                  dtype=torch.long)]
        x[idx] = e[idx]
        rows.append(x[first:] if prefix else x)
    p = _embed_probs(handle, torch.stack(rows), prefix, pos_ids, batch_size) if rows else torch.zeros(0, len(p_clean))
    return p_clean, p


def object_tests(handle, samples: Sequence, spaces: Sequence[str] = SPACES, n_positions: int = 6,
                 measure: str = "logodds", only_correct: bool = True, batch_size: int = 64,
                 progress: bool = True) -> pd.DataFrame:
    """Every test of the module doc on every object of every sample with objects (Shapes world)
    that has a referred object and another one to rank it against (the others are skipped).

    One row per sample × space × test × object: ``model, sample_id, category, n_objects,
    n_referred, object, referred, space, test, effect, n_variants, n_changing, testable, p_clean,
    correct``, with effects in ``measure`` (:func:`distance`). Samples the model answers wrongly
    are left out when ``only_correct``."""
    if "embeddings" in spaces and has_cross_attention(handle):
        raise no_patch_tokens(handle, "object tests in the 'embeddings' space (pass spaces=['pixels']: the scene "
                                      "redrawn works on every model)")
    rows = []
    for s in tqdm(samples, desc="object tests", disable=not progress, mininterval=5):
        if not getattr(s, "objects", None) or not hasattr(s, "render"):
            raise ValueError(f"sample {getattr(s, 'id', s)!r} has no objects to test (object tests need "
                             "Shapes-world samples)")
        gold = answer_ids(handle.processor, [s.answer])[0]
        n, ref = len(s.objects), set(s.referred)
        if not rankable(s):  # nothing to rank: no referred object, or no other one
            continue
        variable = ANSWER_VARIABLE.get(s.category)
        for space in spaces:
            if variable == "presence":  # every subset of objects: the Shapley value needs them all
                game = variants(s, "presence")
                edits: list[Variant] = []
            else:  # the presence tests need only the empty scene, each object alone and each left out
                everyone = tuple(range(n))
                game = [Variant("presence", None, K, tuple(s.objects)) for K in
                        [(), everyone, *[(i,) for i in range(n)], *[everyone[:i] + everyone[i + 1:] for i in range(n)]]]
                edits = variants(s, variable, n_positions) if variable is not None else []
            p_clean, p = scene_distributions(handle, s, game + edits, space, batch_size)
            correct = int(p_clean.argmax()) == gold
            if only_correct and not correct:
                break
            tv = distance(p_clean, p, gold, measure)
            v = {frozenset(g.keep): -float(d) for g, d in zip(game, tv[:len(game)])}
            N, empty = frozenset(range(n)), frozenset[int]()
            effects = {
                "occlude": [-v[N - {i}] for i in range(n)],
                "restore": [v[frozenset([i])] - v[empty] for i in range(n)],
            }
            counts = {"occlude": [1] * n, "restore": [2] * n}
            # variants changing the true answer: only for "variable"
            changing: dict[str, list[int | None]] = {t: [None] * n for t in effects}
            testable: dict[str, bool | None] = {t: None for t in effects}
            if variable == "presence":
                effects["variable"], counts["variable"] = list(shapley_values(v, n)), [len(game)] * n
                flips = [_changes(s, g) for g in game]
                changing["variable"] = [sum(f for g, f in zip(game, flips) if i in g.keep) for i in range(n)]
                testable["variable"] = any(flips)
            elif variable is not None:
                ev = tv[len(game):]
                tg = np.array([e.target for e in edits])
                effects["variable"] = [float(ev[tg == i].mean()) if (tg == i).any() else float("nan")
                                       for i in range(n)]
                counts["variable"] = [int((tg == i).sum()) for i in range(n)]
                changes = np.array([_changes(s, e) for e in edits], dtype=bool)
                n_changing = [int(changes[tg == i].sum()) for i in range(n)]
                changing["variable"] = list(n_changing)
                testable["variable"] = all(n_changing[i] > 0 for i in ref)
            for test, eff in effects.items():
                for i in range(n):
                    rows.append({"model": handle.name, "sample_id": s.id, "category": s.category, "n_objects": n,
                                 "n_referred": len(ref), "object": i, "referred": i in ref, "space": space,
                                 "test": test, "effect": float(eff[i]), "n_variants": counts[test][i],
                                 "n_changing": changing[test][i], "testable": testable[test],
                                 "p_clean": float(p_clean[gold]), "correct": correct})
    return pd.DataFrame(rows, columns=COLUMNS)


def _changes(sample, v: Variant) -> bool:
    """Whether the changed scene ``v`` has a true answer, and another one than the sample's."""
    a = sample.answer_for(v.objects, v.keep)
    return a is not None and a != sample.answer


def rankable(sample) -> bool:
    """Whether ``sample`` has objects, at least one of them referred and at least one not: the
    samples on which an object ranking can be right or wrong."""
    objs = getattr(sample, "objects", None)
    if not objs:
        return False
    return 0 < len(set(sample.referred)) < len(objs)


def ranks_referred_first(effect: Sequence[float], referred: Sequence[bool], tie: float = TIE) -> bool:
    """True when every referred object's effect exceeds every other object's by more than ``tie``
    (closer effects are a tie, and a tie is not a ranking)."""
    e, r = np.asarray(effect, dtype=float), np.asarray(referred, dtype=bool)
    if not r.any() or r.all():
        raise ValueError("ranking needs at least one referred and one other object")
    if np.isnan(e[r]).any():
        return False
    return bool(np.nanmin(e[r]) > np.nanmax(e[~r], initial=-np.inf) + tie)


def object_accuracy(df: pd.DataFrame, by: Sequence[str] = ("space", "test", "category"), tie: float = TIE
                    ) -> pd.DataFrame:
    """Per group of ``by``: the share of samples whose referred objects all rank above every
    other object (:func:`ranks_referred_first`), its chance level (mean ``1 / C(n, r)``) and the
    number of samples; and the same over the **testable** samples only, where every referred
    object has an intervention (of the ``variable`` test) that changes the question's true answer
    (:meth:`~microscope.data.shapes.Sample.answer_for`) — e.g. a ChooseRel referent that can be
    moved across the other; elsewhere no test on that object alone can show the answer depends
    on it. Samples without a referred object or without another object are left out. Columns:
    ``*by, accuracy, chance, n_samples, accuracy_testable, n_testable``."""
    keys = list(by)
    inner = [c for c in keys if c != "category"]
    per = []
    for k, g in df.groupby([*inner, "sample_id"], sort=False):
        r = g.referred.to_numpy()
        if not r.any() or r.all():
            continue
        n, m = len(r), int(r.sum())
        t = g.testable.iloc[0] if "testable" in g else None
        per.append({**dict(zip(inner, k[:-1])), "category": g.category.iloc[0],
                    "ok": ranks_referred_first(g.effect, r, tie), "chance": 1 / math.comb(n, m),
                    "testable": bool(t) if t is not None and not pd.isna(t) else np.nan})
    per = pd.DataFrame(per, columns=[*inner, "category", "ok", "chance", "testable"])
    per["ok_testable"] = per.ok.where(per.testable == True)  # noqa: E712 (NaN: not assessed)
    out = per.groupby(keys, sort=False).agg(accuracy=("ok", "mean"), chance=("chance", "mean"),
                                            n_samples=("ok", "size"), accuracy_testable=("ok_testable", "mean"),
                                            n_testable=("ok_testable", "count")).reset_index()
    return out
