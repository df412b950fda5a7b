"""Attention knockout: stop chosen query positions from reading chosen key positions.

    plan = [Block(source=batch.role_mask("image"), target=batch.role_mask("last"), layers=[2, 3])]
    with knockout(handle, plan):          # nothing is patched outside the block
        logits = handle.model(**batch.inputs).logits

    df = sweep(handle, samples)           # % change of p(answer) per edge × window centre
    acc = predict(handle, samples, "image↛text")   # accuracy with image blocked in all layers

How: the decoder's attention is routed, for the duration of the ``with`` block, through an
attention function registered with transformers' ``AttentionInterface`` (and its mask
function with ``AttentionMaskInterface``). It wraps the model's own ``sdpa`` or ``eager``
function and, in the planned decoder layers only, removes the blocked (query, key) pairs from
the attention mask before calling it: a boolean mask gets ``False``, an additive mask gets the
dtype's minimum. No module's ``forward`` is replaced, the vision tower's attention (which reads
the vision config) is untouched, and an empty plan calls the original function with the
original mask, so it reproduces the unpatched logits exactly. The mask edited is the model's own:
where image tokens attend to each other bidirectionally (Gemma 3, PaliGemma), an ``image↛image``
edge removes both directions inside the image block.

Edges are written ``source↛target`` (``->`` works too): ``source`` positions are
the keys whose information is blocked, ``target`` the queries that can no longer attend to
them. Sides are role names (:data:`~microscope.roles.ROLES`), ``question`` (question incl.
constraint tokens), ``text`` (every non-image prompt position), ``related-image`` (image tokens
of the patches covering the referred object(s)) and ``other-image`` (the remaining image tokens).

**Cross-attention models (Mllama).** Their text reads the image in cross-attention decoder
layers (:mod:`microscope.crossattn`), whose keys are the vision states, not positions of the
sequence. There a block with ``vision=True`` removes every (target query, vision key) pair: a query
with no key left contributes nothing — its cross-attention output is 0, as for a row Meta's
reference implementation masks out — while its MLP term is unchanged. In self-attention layers a
block acts on positions as for every model, the image's position being its ``<|image|>`` token. An
edge from ``image`` (:func:`edge_block`) does both, so ``image↛text`` in every layer keeps the
image from every text position: through the vision states, and through the ``<|image|>``
position that read them. Other sources (``question↛last``) have ``vision=False``: nothing to
block in a cross-attention layer. Related/other-image sources are refused (no patch positions).

Knockout effect: ``(p_blocked − p_base) / p_base × 100`` for the first token of the
correct answer at the last position, with attention blocked in a window of ``k`` consecutive
layers centred at ``l`` (clipped at the ends), on samples the model answers correctly. A sample
without a gold answer (``answer=None``) is measured on the model's own greedy answer
(:func:`microscope.answers.answer_target`); ``only_correct`` does not apply to it. Samples left out are
counted per reason in ``df.attrs["skipped"]``, and an empty table says why in
``df.attrs["why_empty"]`` (:mod:`microscope.results`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from microscope import attention, batching, depth, shared_prefix, validate
from microscope.answers import MODEL, NoTarget, answer_target, gold_id, only_correct_note
from microscope.crossattn import has_cross_attention, no_patch_tokens
from microscope.errors import MicroscopeError
from microscope.extract import capture
from microscope.grid import image_patch_positions, related_patches
from microscope.prefix import causal_start, clean_cache, positions, prefix_of
from microscope.progress import tqdm
from microscope.results import UNSPELLABLE, WRONG, explain
from microscope.roles import Batch, prepare_samples, role_codes

QUESTION = ("question", "constraint")
#: every position that is neither image nor padding: as a knockout target, ``image↛text`` also keeps
#: the image from OmniFusion's begin/end-of-image markers, which the text would otherwise read it through
TEXT = ("template", "image_boundary", "question", "constraint", "last")
#: the edges of Zhang et al. (CVPR 2025) swept by default, plus image↛text (image blocked from
#: every text position: what remains is the question-only prediction)
EDGES: dict[str, tuple[str, str]] = {
    "image↛question": ("image", "question"),
    "image↛last": ("image", "last"),
    "question↛last": ("question", "last"),
    "last↛last": ("last", "last"),
    "related-image↛question": ("related-image", "question"),
    "other-image↛question": ("other-image", "question"),
    "image↛text": ("image", "text"),
}
SWEEP_EDGES = tuple(e for e in EDGES if e != "image↛text")
#: names an edge side may use for a set of roles (besides a single role name)
ROLE_GROUPS = {"question": QUESTION, "text": TEXT}
_PATCH_GROUPS = ("related-image", "other-image")
_BASES = ("sdpa", "eager")
_NAME = "microscope_knockout_{}"
shared_prefix.AWARE.update(_NAME.format(b) for b in _BASES)  # their functions call shared_prefix.attend


@dataclass
class Block:
    """Block attention from ``source`` keys to ``target`` queries in ``layers``.

    ``source``/``target``: boolean ``(B, T)`` masks (or ``(T,)``, shared by every row).
    ``layers``: decoder layer indices applied to every row, or a boolean ``(B, n_layers)``
    tensor giving each row its own layers (one forward can then hold a whole window sweep).
    ``vision`` (cross-attention models only; a bool, or ``(B,)`` booleans per row): whether the
    block also removes the vision states from ``target`` in the cross-attention layers among
    ``layers`` (see the module doc); a block reaching a cross-attention layer must say so, and
    :func:`edge_block` says it for an edge (``True`` for sources ``image``).
    """

    source: torch.Tensor
    target: torch.Tensor
    layers: Sequence[int] | torch.Tensor
    vision: bool | torch.Tensor | None = None


class _Plan:
    """A list of blocks compiled to per-layer (rows, source, target) entries."""

    def __init__(self, blocks: Sequence[Block], n_layers: int, check_layers, cross_layers: Sequence[int] = ()):
        self.by_layer: dict[int, list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]] = {}
        self.cross_layers = frozenset(cross_layers)
        #: cross-attention layer -> [(rows, target, vision)]: target queries lose every vision key
        self.cross: dict[int, list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]] = {}
        for j, b in enumerate(blocks):
            src, tgt = torch.as_tensor(b.source, dtype=torch.bool), torch.as_tensor(b.target, dtype=torch.bool)
            if src.shape != tgt.shape or src.ndim not in (1, 2):
                raise ValueError(f"block {j}: source {tuple(src.shape)} and target {tuple(tgt.shape)} must "
                                 "be boolean masks of the same shape, (T,) or (B, T)")
            entries: list[tuple[int, torch.Tensor | None]]
            if isinstance(b.layers, torch.Tensor) and b.layers.dtype == torch.bool:
                lay = b.layers
                if lay.ndim != 2 or lay.shape[1] != n_layers or (src.ndim == 2 and lay.shape[0] != src.shape[0]):
                    raise ValueError(f"block {j}: per-row layers must be a (B, {n_layers}) boolean tensor, got "
                                     f"{tuple(lay.shape)}")
                entries = [(layer, lay[:, layer]) for layer in lay.any(0).nonzero().flatten().tolist()]
            else:
                entries = [(layer, None) for layer in check_layers(list(b.layers), allow_embedding=False)]
            vision = self._vision(j, b, [layer for layer, _ in entries])
            for layer, rows in entries:
                if layer in self.cross_layers:
                    if vision is not None:
                        self.cross.setdefault(layer, []).append((rows, tgt, vision))
                else:
                    self.by_layer.setdefault(layer, []).append((rows, src, tgt))

    def _vision(self, j: int, b: Block, layers: list[int]) -> torch.Tensor | None:
        """Block ``j``'s ``vision`` as a boolean tensor (``None``: it blocks nothing in cross-attention
        layers), or a :class:`MicroscopeError` for a block that reaches a cross-attention layer
        without saying whether it blocks the vision states, or says so on a model without them."""
        crossed = sorted(set(layers) & self.cross_layers)
        if b.vision is None:
            if crossed:
                raise MicroscopeError(
                    f"knockout block {j} reaches cross-attention layer(s) {crossed}, whose keys are the image's "
                    "vision states, not positions: say whether it removes them from its target queries there — "
                    "Block(..., vision=True) (an edge from the image) or vision=False; "
                    "microscope.knockout.edge_block(handle, batch, edge, layers) builds the block of an edge")
            return None
        v = torch.as_tensor(b.vision, dtype=torch.bool)
        if bool(v.any()) and not self.cross_layers:
            raise MicroscopeError(f"knockout block {j} has vision=True, but this model has no cross-attention "
                                  "layers: its image is in the sequence, blocked through source positions")
        return v if crossed else None

    def blocked_queries(self, layer: int, batch: int, q_len: int, device) -> torch.Tensor | None:
        """``(B, Q)`` boolean: True where query q reads no vision state in cross-attention ``layer``
        (queries are the last ``q_len`` positions of the blocks' ``T``)."""
        entries = self.cross.get(layer)
        if not entries:
            return None
        out = torch.zeros(batch, q_len, dtype=torch.bool, device=device)
        for rows, tgt, vision in entries:
            rows, tgt, vision = _present(rows, batch, 1), _present(tgt, batch, 2), _present(vision, batch, 1)
            if tgt.ndim == 2 and tgt.shape[0] != batch:
                raise ValueError(f"knockout plan was built for inputs of shape {tuple(tgt.shape)} but the forward "
                                 f"has batch {batch}; build the plan from the same batch you run")
            m = tgt.to(device)[..., tgt.shape[-1] - q_len:]
            m = m & (vision.to(device)[:, None] if vision.ndim else vision.to(device))
            if rows is not None:
                m = m & rows.to(device)[:, None]
            out |= m
        return out

    def blocked(self, layer: int, batch: int, q_len: int, k_len: int, device) -> torch.Tensor | None:
        """``(B, Q, K)`` boolean: True where query q may not read key k in ``layer``."""
        entries = self.by_layer.get(layer)
        if not entries:
            return None
        out = torch.zeros(batch, q_len, k_len, dtype=torch.bool, device=device)
        for rows, src, tgt in entries:
            rows, src, tgt = _present(rows, batch, 1), _present(src, batch, 2), _present(tgt, batch, 2)
            if src.shape[-1] != k_len or (src.ndim == 2 and src.shape[0] != batch):
                raise ValueError(f"knockout plan was built for inputs of shape {tuple(src.shape)} but the "
                                 f"forward has batch {batch} × {k_len} tokens; build the plan from the "
                                 "same batch you run (with a KV cache: masks over cache + new tokens)")
            # queries are the last q_len positions (all of them without a cache)
            m = tgt.to(device)[..., k_len - q_len:, None] & src.to(device)[..., None, :]
            if rows is not None:
                m = m & rows.to(device)[:, None, None]
            out |= m
        return out


def _present(t, batch: int, ndim: int):
    """A plan's per-row tensor (``ndim`` dimensions, rows first; other shapes are shared by every
    row) for a forward holding its first ``batch`` rows: inside :func:`microscope.depth.run_from`
    rows join at their own first layer, so a layer's batch is the first rows of the plan's;
    elsewhere a plan must match the batch (checked by the caller)."""
    if t is None or t.ndim != ndim or t.shape[0] <= batch or not depth.present():
        return t
    return t[:batch]


def _apply(mask: torch.Tensor | None, blocked: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    if mask is None:  # sdpa skipped the causal mask: materialise it before editing
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=blocked.device).tril(k_len - q_len)[None, None]
    if mask.dtype == torch.bool:
        return mask & ~blocked[:, None]
    return mask.masked_fill(blocked[:, None], torch.finfo(mask.dtype).min)


def _wrapped(base: str):
    def knockout_attention(module, query, key, value, attention_mask, **kwargs):
        fn = attention.base_function(module, base)
        entry = attention.state(module)
        if isinstance(entry, tuple):  # (plan, layer) inside a knockout block, None outside
            plan, layer = entry
            if layer in plan.cross_layers:
                return _cross(fn, entry, module, query, key, value, attention_mask, **kwargs)
            # keys over the whole prompt: a shared-prefix layer's suffix keys follow its prefix
            k_len = shared_prefix.key_length(key)
            blocked = plan.blocked(layer, query.shape[0], query.shape[-2], k_len, query.device)
            if blocked is not None:
                attention_mask = _apply(attention_mask, blocked, query.shape[-2], k_len)
        return shared_prefix.attend(fn, module, query, key, value, attention_mask, **kwargs)

    knockout_attention.__name__ = _NAME.format(base)
    return knockout_attention


def _cross(fn, entry, module, query, key, value, attention_mask, **kwargs):
    """A cross-attention layer's attention with the blocked queries' output set to 0: softmax over
    an empty set of keys contributes nothing (``o_proj`` has no bias, so the layer adds 0 there)."""
    plan, layer = entry
    rows = plan.blocked_queries(layer, query.shape[0], query.shape[-2], query.device)
    out, weights = fn(module, query, key, value, attention_mask, **kwargs)
    if rows is None:
        return out, weights
    out = out.masked_fill(rows[:, :, None, None], 0.0)  # (B, Q, H, D)
    if weights is not None:
        weights = weights.masked_fill(rows[:, None, :, None], 0.0)  # (B, H, Q, K)
    return out, weights


@contextlib.contextmanager
def knockout(handle, plan: Sequence[Block], implementation: str | None = None) -> Iterator[None]:
    """Run forwards of ``handle.model`` inside the block with ``plan``'s attention edges removed.

    ``implementation``: ``"sdpa"`` or ``"eager"`` (default: the one the model was loaded with).
    Everything is restored on exit, even on error; contexts do not nest (:mod:`microscope.attention`).
    """
    base = implementation or handle.adapter.attention(0).config._attn_implementation
    if base not in _BASES:
        raise ValueError(f"knockout needs the 'sdpa' or 'eager' attention implementation, got {base!r}: "
                         "load the model with microscope.load(..., attn_implementation='sdpa')")
    compiled = _Plan(plan, handle.adapter.n_layers, handle.adapter.check_layers, handle.adapter.cross_attention_layers)
    with attention.routed(handle, _NAME.format(base), _wrapped(base), base,
                          {i: (compiled, i) for i in range(handle.adapter.n_layers)}):
        yield


# ---------------------------------------------------------------------------------------- edges

def parse_edge(edge: str) -> tuple[str, str]:
    """``"image↛last"`` / ``"image->last"`` / a name in :data:`EDGES` → ``(source, target)``."""
    if edge in EDGES:
        return EDGES[edge]
    for sep in ("↛", "->"):
        if sep in edge:
            src, tgt = (s.strip() for s in edge.split(sep, 1))
            for side in (src, tgt):
                if side not in ROLE_GROUPS and side not in _PATCH_GROUPS:
                    role_codes(side)
            if tgt in _PATCH_GROUPS:
                raise ValueError(f"edge {edge!r}: related/other image patches can only be a source")
            return src, tgt
    raise ValueError(f"edge {edge!r} is not 'source↛target' (or 'source->target'); named edges are "
                     f"{list(EDGES)}")


def edge_block(handle, batch: Batch, edge: str, layers: Sequence[int] | torch.Tensor,
               related: Sequence[Sequence[int]] | None = None) -> Block:
    """The :class:`Block` of ``edge`` on ``batch`` in ``layers``: :func:`edge_masks`, and on a
    cross-attention model ``vision`` = whether the edge's source is ``image`` (its vision states are
    then removed from the targets in the cross-attention layers among ``layers``)."""
    src, tgt = edge_masks(handle, batch, edge, related)
    return Block(src, tgt, layers, vision=edge_vision(handle, edge))


def edge_vision(handle, edge: str) -> bool | None:
    """``vision`` of ``edge``'s block: ``None`` on a model without cross-attention layers, else
    whether its source is the image."""
    return parse_edge(edge)[0] == "image" if has_cross_attention(handle) else None


def edge_masks(handle, batch: Batch, edge: str, related: Sequence[Sequence[int]] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(B, T)`` (source, target) masks of ``edge`` on ``batch``.

    ``related[i]``: patch indices (raster order on the vision tower's grid) covering the object(s)
    row ``i``'s question refers to; needed for ``related-image``/``other-image`` sources.
    """
    src, tgt = parse_edge(edge)
    if src in _PATCH_GROUPS and has_cross_attention(handle):
        raise no_patch_tokens(handle, f"the edge {edge!r}")

    def side(name: str) -> torch.Tensor:
        if name in _PATCH_GROUPS:
            if related is None or len(related) != batch.roles.shape[0]:
                raise ValueError(f"edge {edge!r} needs related patches, one list per row "
                                 f"(got {None if related is None else len(related)})")
            m = torch.zeros_like(batch.roles, dtype=torch.bool)
            for i, patches in enumerate(related):
                pos = image_patch_positions(handle, batch, i)
                sel = torch.zeros(len(pos), dtype=torch.bool)
                idx = torch.as_tensor(list(patches), dtype=torch.long)
                if len(idx) and (idx.min() < 0 or idx.max() >= len(pos)):
                    raise ValueError(f"row {i}: related patch indices must lie in 0..{len(pos) - 1}")
                sel[idx] = True
                m[i, pos[sel if name == "related-image" else ~sel]] = True  # both within the patch grid
            return m
        return batch.role_mask(ROLE_GROUPS.get(name, name))

    return side(src), side(tgt)


# ---------------------------------------------------------------------------------------- sweep

def knockout_window(n_layers: int) -> int:
    """Window size scaled to depth: the smallest odd ``k >= 9 · n_layers / 32`` (Zhang et al. use
    k = 9 on 32 layers; 13 for 40 layers, 3 for the embedded model's 6)."""
    return max(1, 2 * math.ceil((9 * n_layers / 32 - 1) / 2) + 1)


def window_layers(center: int, window: int, n_layers: int) -> range:
    """The ``window`` layers centred at ``center``, clipped to ``0..n_layers-1``."""
    lo = max(0, center - (window - 1) // 2)
    hi = min(n_layers, center + window // 2 + 1)
    return range(lo, hi)


def sweep(handle, samples: Sequence, edges: Sequence[str] = SWEEP_EDGES, window: int | None = None,
          batch_size: int | None = None, only_correct: bool = True, progress: bool = True) -> pd.DataFrame:
    """Knockout effect for every sample × edge × window centre, batched.

    Per sample: one ordinary forward (base probability, and the decoder's input embeddings with
    the image features merged in), then every (edge, centre) pair as one row of a batch of
    ``inputs_embeds`` forwards with per-row layer masks — ``ceil(E·L / batch_size)`` forwards
    (``batch_size=None``: as many rows as memory holds, :mod:`microscope.batching`)
    instead of ``E·L``. Related/other-image edges are skipped (with a warning) on models whose
    image tokens have no patch grid. Positions before the first target query cannot change (causal
    attention; where a bidirectional block holds that query — Gemma 3's image, PaliGemma's prompt —
    before the block's start, :func:`microscope.prefix.causal_start`), so those forwards start after
    them from the clean key/value cache
    (:mod:`microscope.prefix`); and the layers below a window's first layer see the clean run, so
    each row joins its chunk's batch at its own window's first layer, from the clean run's recorded
    layer inputs (:mod:`microscope.depth`): a row of window ``[lo, hi]`` computes ``L − lo`` layers of the
    suffix instead of ``L`` layers of the prompt. Samples answered wrongly are skipped when ``only_correct``; edges on
    related/other image patches are skipped for samples whose question refers to no patch (or has
    no boxes, e.g. a GQA question without a scene graph), and samples whose gold answer the
    vocabulary cannot spell are skipped: each count is in ``df.attrs["skipped"]``. A sample with
    ``answer=None`` is measured on the model's own greedy answer (``only_correct`` has no meaning
    for it: it is kept, with a warning).

    Returns one row per (sample, edge, centre): ``model, sample_id, category, edge, layer``
    (window centre), ``layer_lo, layer_hi, window, answer_token, answer_source, p_base, p_blocked,
    change`` (%); ``answer_token`` is the measured token, ``answer_source`` ``"gold"`` or ``"model"``.
    """
    a = handle.adapter
    L = a.n_layers
    window = knockout_window(L) if window is None else validate.window(window)
    batch_size = None if batch_size is None else validate.positive_int(batch_size, "batch_size")
    edges = validate.strings(edges, "edges")  # one edge given as a string is a list of one
    for e in edges:
        parse_edge(e)
    wins = [window_layers(c, window, L) for c in range(L)]
    layer_rows = torch.zeros(L, L, dtype=torch.bool)
    for c, w in enumerate(wins):
        layer_rows[c, w.start:w.stop] = True
    records = []
    device = handle.device
    patch_edges_ok: bool | None = None
    skipped: Counter = Counter()
    n_model = 0
    tok = handle.processor.tokenizer
    for s in tqdm(samples, desc="knockout sweep", disable=not progress, mininterval=5):
        try:
            gold_id(handle.processor, s.answer)
        except NoTarget:
            skipped[UNSPELLABLE] += 1
            continue
        batch = prepare_samples(handle, [s])
        if patch_edges_ok is None:
            try:
                image_patch_positions(handle, batch, 0)
                patch_edges_ok = True
            except ValueError as err:
                patch_edges_ok = False
                if any(parse_edge(e)[0] in _PATCH_GROUPS for e in edges):
                    warnings.warn(f"related/other-image edges skipped: {err}", stacklevel=2)
        inputs = {k: v.to(device) for k, v in batch.inputs.items()}
        with torch.no_grad(), capture(handle, [-1]) as acts:
            out = handle.model(**inputs, use_cache=True, **clean_cache(handle), logits_to_keep=1)
        logits = out.logits[0, -1].float()
        gold, source = answer_target(handle.processor, s.answer, logits)
        n_model += source == MODEL
        if only_correct and int(logits.argmax()) != gold:
            skipped[WRONG] += 1
            continue
        p_base = float(logits.softmax(-1)[gold])
        emb = acts["resid.-1"]
        rel = related_patches(handle, batch, 0, s) if patch_edges_ok else None
        todo = []
        for e in edges:
            src_name, _ = parse_edge(e)
            patches = None
            if src_name in _PATCH_GROUPS:
                if not rel or not patch_edges_ok:
                    if patch_edges_ok:
                        skipped[f"have no referred patches for {e}"] += 1
                    continue
                patches = [rel]
            src, tgt = edge_masks(handle, batch, e, patches)
            if tgt[0].any():
                todo += [(e, c, src[0], tgt[0]) for c in range(L)]
        if not todo:
            skipped["have no target position for any edge"] += 1
            continue
        target_tok = tok.convert_ids_to_tokens(gold)
        # positions before a row's first target query are untouched by its plan (causal attention;
        # before a bidirectional block that holds a target query, causal_start): they come from the
        # clean run's key/value cache and only the rest is computed — rows grouped by that position
        # (an edge into the last token computes one position, one into the question the question on);
        # the layers below a window's first one see the clean run too: the clean layer inputs are
        # recorded once per group and each row joins its chunk at its window's first layer
        # (microscope.depth)
        pos = positions(handle, inputs)
        firsts = [causal_start(handle, inputs, int(t[3].nonzero().min())) for t in todo]
        recs, rows = {}, {}
        for f in sorted(set(firsts)):
            pre = prefix_of(out, f, keep=handle.adapter.cross_attention_layers)
            recs[f] = depth.record(handle, emb[:, f:], pre, pos)
            rows[f] = batch_size or batching.rows_per_batch(handle, pre, emb.shape[1] - f)
        order = sorted(range(len(todo)), key=lambda j: (firsts[j], wins[todo[j][1]].start))  # stable
        p_blocked = [0.0] * len(todo)
        i = 0
        while i < len(order):
            f = firsts[order[i]]
            idx = [j for j in order[i:i + rows[f]] if firsts[j] == f]  # one suffix per chunk
            i += len(idx)
            chunk = [todo[j] for j in idx]
            r = len(chunk)
            block = Block(source=torch.stack([t[2] for t in chunk]), target=torch.stack([t[3] for t in chunk]),
                          layers=layer_rows[[t[1] for t in chunk]],
                          vision=None if not has_cross_attention(handle) else
                          torch.tensor([bool(edge_vision(handle, t[0])) for t in chunk]))
            with torch.no_grad(), knockout(handle, [block]):  # rows sorted by first layer: each joins at its own
                starts = [wins[t[1]].start for t in chunk]
                logits = depth.run_from(handle, recs[firsts[idx[0]]], starts, [0] * r).float()
            for j, pb in zip(idx, logits.softmax(-1)[:, gold].cpu().tolist()):
                p_blocked[j] = pb
        for (e, c, _, _), pb in zip(todo, p_blocked):
            records.append({
                "model": handle.name, "sample_id": s.id, "category": getattr(s, "category", ""),
                "edge": e, "layer": c, "layer_lo": wins[c].start, "layer_hi": wins[c].stop - 1,
                "window": window, "answer_token": target_tok, "answer_source": source, "p_base": p_base,
                "p_blocked": pb, "change": (pb - p_base) / p_base * 100.0,
            })
    if only_correct and n_model:
        warnings.warn(only_correct_note(n_model), stacklevel=2)
    cols = ["model", "sample_id", "category", "edge", "layer", "layer_lo", "layer_hi", "window", "answer_token",
            "answer_source", "p_base", "p_blocked", "change"]
    return explain(pd.DataFrame.from_records(records, columns=cols), skipped, len(samples), "knockout rows")


def predict(handle, samples: Sequence, edge: str | None = None, layers: Sequence[int] | None = None,
            batch_size: int = 32, progress: bool = True) -> pd.DataFrame:
    """Greedy first-token answers with ``edge`` knocked out in ``layers`` (default: all layers).

    ``edge=None`` predicts without intervention. One row per sample: ``model, sample_id,
    category, answer, answer_token, answer_source, prediction, correct, matches_answer, p_answer``.
    ``answer_token`` is the gold answer's first token, or for ``answer=None`` the model's own
    greedy answer without intervention (``answer_source`` ``"model"``); ``p_answer`` its
    probability here. ``correct`` (nullable boolean) compares the prediction with the gold answer
    and is missing without one (and for a gold answer the vocabulary cannot spell);
    ``matches_answer`` compares it with ``answer_token``: for samples without gold, whether the
    knockout leaves the model's own answer in place.
    """
    layers = list(range(handle.adapter.n_layers)) if layers is None else handle.adapter.check_layers(
        layers, allow_embedding=False)
    batch_size = validate.positive_int(batch_size, "batch_size")
    if edge is not None:
        parse_edge(edge)
    tok = handle.processor.tokenizer
    rows = []
    for i in tqdm(range(0, len(samples), batch_size), desc="predict", disable=not progress, mininterval=5):
        chunk = samples[i:i + batch_size]
        batch = prepare_samples(handle, chunk)
        inputs = {k: v.to(handle.device) for k, v in batch.inputs.items()}
        gold = []
        for s in chunk:
            try:
                gold.append(gold_id(handle.processor, s.answer))
            except NoTarget:
                gold.append(-1)  # a gold answer with no token: nothing to compare with
        own = None
        if edge is not None and any(g is None for g in gold):  # the model's own answers, without knockout
            with torch.no_grad():
                own = handle.model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float().argmax(-1)
        plan = []
        if edge is not None:
            src, tgt = edge_masks(handle, batch, edge,
                                  [related_patches(handle, batch, i, s) or () for i, s in enumerate(chunk)])
            plan = [Block(src, tgt, layers, vision=edge_vision(handle, edge))]
        with torch.no_grad(), knockout(handle, plan):
            logits = handle.model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        probs = logits.softmax(-1).cpu()
        pred = probs.argmax(-1).tolist()
        own = pred if own is None else own.cpu().tolist()
        names = tok.convert_ids_to_tokens(pred)
        for j, (s, g) in enumerate(zip(chunk, gold)):
            t, source = (own[j], MODEL) if g is None else (g, "gold")
            rows.append({"model": handle.name, "sample_id": s.id, "category": getattr(s, "category", ""),
                         "answer": s.answer, "answer_token": tok.convert_ids_to_tokens(t) if t >= 0 else None,
                         "answer_source": source, "prediction": names[j],
                         "correct": None if g is None or g < 0 else pred[j] == g,
                         "matches_answer": pred[j] == t,
                         "p_answer": float(probs[j, t]) if t >= 0 else float("nan")})
    df = pd.DataFrame(rows, columns=["model", "sample_id", "category", "answer", "answer_token", "answer_source",
                                     "prediction", "correct", "matches_answer", "p_answer"])
    df["correct"] = df["correct"].astype("boolean")
    df["matches_answer"] = df["matches_answer"].astype(bool)
    return df


def largest_drops(df: pd.DataFrame) -> dict[str, dict]:
    """Per edge, the window centre with the most negative mean change and that mean (%); ``{}``
    for a table without rows (see ``df.attrs["why_empty"]``)."""
    out: dict[str, dict] = {}
    for e, g in df.groupby("edge", sort=False):
        m = g.groupby("layer")["change"].mean()
        out[e] = {"layer": int(m.idxmin()), "change": float(m.min()), "n_samples": int(g.sample_id.nunique())}
    return out
