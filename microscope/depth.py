"""Depth reuse: start a batch of rows at decoder layer ``l`` instead of at the embeddings.

An intervention that first acts in decoder layer ``l`` (a knockout window starting at ``l``, a
restoration at layer ``l``) leaves the input of every layer up to ``l`` as it was in the run it
edits (the clean run for a knockout, the corrupted one for a restoration). Rows of an analysis
therefore need not compute layers ``0 … l − 1``: :func:`record` runs that reference forward once,
keeping what the model hands each decoder layer — the hidden states ``h_l`` entering it and its
keyword arguments (attention mask, rotary ``position_embeddings``, ``position_ids``, cross-attention
inputs: whatever this architecture passes) — and :func:`run_from` then calls layers ``l … L − 1``
directly on rows started from ``h_l``, and the model's own head (:meth:`Adapter.logits`: final
norm, unembedding, logit scale and soft cap)::

    rec = depth.record(handle, embeds, prefix, pos)          # one forward of the reference rows
    logits = depth.run_from(handle, rec, layer, rows)        # (R, V) next-token logits

Combined with the clean-prefix cache (:mod:`microscope.prefix`): ``embeds`` holds only the suffix
from the first position any row changes, and each row computes ``(L − l)`` layers of that suffix
instead of ``L`` layers of the whole prompt. The layers are called with the same inputs, masks and
cache contents as in a whole forward, so the numbers equal it up to float rounding (batch size
changes the order of some sums): bit for bit where the kernels do not depend on the batch size,
within float32 round-off otherwise (tested against whole forwards for every family in tests/).

The keyword arguments are recorded from one row and expanded over the rows of a run (:func:`_rows`):
every row of an analysis has the same positions, mask and cross-attention inputs (no padding). The
key/value cache is not recorded: each run gets a fresh cache of the prefix, which its rows share
(:func:`microscope.shared_prefix.rows_cache`: one copy of the prefix per layer, not one per row).
Forward hooks on the layers and their sub-modules fire as in a whole forward (the analyses'
restorations and captures use them); the attention functions registered by
:func:`microscope.knockout.knockout` apply as well.
"""

from __future__ import annotations

import bisect
import contextvars
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from microscope import shared_prefix
from microscope.prefix import next_token_probs


@dataclass
class Recording:
    """What one reference forward handed each decoder layer.

    ``hidden[l]``: ``(R, S, d)`` input of decoder layer ``l`` for the ``R`` reference rows over the
    ``S`` suffix positions (``hidden[L]``: the last layer's output); ``kwargs[l]``: the keyword
    arguments layer ``l`` was called with (from row 0, cache removed); ``called``: the layers the
    model called, in order (a model may skip some, e.g. Mllama's cross-attention layers without an
    image); ``prefix``: the clean cache of the positions before the suffix (or ``None``)."""

    hidden: dict[int, torch.Tensor]
    kwargs: dict[int, dict]
    called: list[int]
    prefix: list | None
    cache_name: str | None = None


def _is_cache(v) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(v, Cache)


def record(handle, embeds: torch.Tensor, prefix: list | None = None, pos=None) -> Recording:
    """Run the reference rows ``embeds`` ``(R, S, d)`` (decoder inputs of the suffix after
    ``prefix``, positions ``pos`` as :func:`microscope.prefix.positions` gives them) and keep each
    decoder layer's input and keyword arguments. Runs without gradients; a second, one-row forward
    records the keyword arguments when ``R > 1``."""
    layers = handle.adapter.layers
    hidden: dict[int, torch.Tensor] = {}
    kwargs: dict[int, dict] = {}
    called: list[int] = []
    state: dict = {"hidden": True, "kw": True, "cache": None}

    def pre(i: int):
        def hook(module, args, kw):
            if state["hidden"]:
                called.append(i)
                hidden[i] = (args[0] if args else kw["hidden_states"]).detach()
            if state["kw"]:
                kwargs[i] = {}
                for k, v in kw.items():
                    if k == "hidden_states":
                        continue
                    if _is_cache(v):
                        state["cache"] = k
                    else:
                        kwargs[i][k] = v
        return hook

    def post(module, args, kw, out):
        if state["hidden"]:
            hidden[len(layers)] = (out[0] if isinstance(out, tuple) else out).detach()

    hooks = [lay.register_forward_pre_hook(pre(i), with_kwargs=True) for i, lay in enumerate(layers)]
    hooks.append(layers[-1].register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            R = embeds.shape[0]
            state["kw"] = R == 1
            next_token_probs(handle, embeds, prefix, pos)
            if R > 1:  # keyword arguments from one row: they broadcast over any number of rows
                state["hidden"], state["kw"] = False, True
                next_token_probs(handle, embeds[:1], prefix, pos)
    finally:
        for hk in hooks:
            hk.remove()
    return Recording(hidden=hidden, kwargs=kwargs, called=called, prefix=prefix, cache_name=state["cache"])


def _rows(v, rows: int):
    """A recorded one-row keyword argument for ``rows`` rows: tensors of three or more dimensions
    whose first is 1 (masks ``(1, 1, S, K)``, rotary tables ``(1, S, d)``, cross-attention states
    ``(1, V, d)``) are expanded along it (a view; some layers reshape by the batch size, e.g.
    Mllama's cross-attention); others (position ids, M-RoPE's ``(3, 1, S, d)``) broadcast as they are."""
    if isinstance(v, torch.Tensor):
        return v.expand(rows, *v.shape[1:]) if v.ndim >= 3 and v.shape[0] == 1 and rows != 1 else v
    if isinstance(v, tuple):
        return tuple(_rows(x, rows) for x in v)
    if isinstance(v, list):
        return [_rows(x, rows) for x in v]
    return v


def run_from(handle, rec: Recording, layer: int | Sequence[int], rows: torch.Tensor | Sequence[int] | None = None,
             hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits ``(R, V)`` at the last position of rows started at decoder layer ``layer``.

    Row ``i`` starts from ``rec.hidden[layer][rows[i]]`` (``rows`` indexes the reference rows;
    ``None``: every reference row once), or from ``hidden`` ``(R, S, d)`` when given; then layers
    ``layer … L − 1`` that the reference forward called run on all rows with their recorded keyword
    arguments and a fresh cache of the prefix (:func:`microscope.shared_prefix.rows_cache`: one
    copy of the prefix shared by the rows where the attention allows it), and the model's head
    gives the logits. ``layer == L`` applies the head only.

    ``layer`` may give each row its own start layer (non-decreasing over the rows): row ``i`` then
    joins the batch at ``layer[i]`` — the first ``n_l`` rows (those with ``layer[i] <= l``) run
    layer ``l`` — so no row computes a layer below its own start. Interventions acting in layer
    ``l`` (knockout plans, restoration hooks) see a batch of those ``n_l`` rows: their rows are
    the first ``n_l`` of theirs (:func:`present`)."""
    a = handle.adapter
    L = a.n_layers
    starts = [int(layer)] if isinstance(layer, int) else [int(x) for x in layer]
    if not starts or any(not 0 <= x <= L for x in starts):
        raise ValueError(f"each start layer must be in 0..{L} (L = {L} decoder layers), got {layer}")
    if any(b < a_ for a_, b in zip(starts, starts[1:])):
        raise ValueError("per-row start layers must be non-decreasing (sort the rows by their first layer)")
    first = starts[0]
    if hidden is None:
        if first not in rec.hidden:
            raise ValueError(f"the recording has no input for layer {first}: the reference forward did not call it")
        idx = (torch.arange(rec.hidden[first].shape[0]) if rows is None
               else torch.as_tensor(rows, dtype=torch.long)).to(rec.hidden[first].device)
    elif len(starts) > 1:
        raise ValueError("per-row start layers need the recorded states (hidden=None)")
    if len(starts) == 1:  # one start for every row
        starts = starts * (int(hidden.shape[0]) if hidden is not None else len(idx))
    elif len(starts) != len(idx):
        raise ValueError(f"{len(starts)} start layers for {len(idx)} rows")
    R = len(starts)
    joined = bisect.bisect_right(starts, first)  # rows present from the first layer on
    h = hidden if hidden is not None else rec.hidden[first][idx[:joined]]
    counts = [bisect.bisect_right(starts, i) for i in range(L)]  # rows present in each layer
    token = _PRESENT.set(True)
    try:
        with shared_prefix.rows_cache(handle, rec.prefix, counts) as cache_value:
            for i in rec.called:
                if i < first:
                    continue
                if counts[i] > h.shape[0]:  # rows whose first layer is this one join, from the recorded input
                    h = torch.cat([h, rec.hidden[i][idx[h.shape[0]:counts[i]]]])
                kw = {k: _rows(v, h.shape[0]) for k, v in rec.kwargs[i].items()}
                if rec.cache_name is not None:
                    kw[rec.cache_name] = cache_value
                    if cache_value is None and "use_cache" in kw:
                        kw["use_cache"] = False
                out = a.layers[i](h, **kw)
                h = out[0] if isinstance(out, tuple) else out
            shared_prefix.check(cache_value)
    finally:
        _PRESENT.reset(token)
    if h.shape[0] < R:  # rows that start at the head
        h = torch.cat([h, rec.hidden[L][idx[h.shape[0]:]]])
    return a.logits(h[:, -1])


_PRESENT: contextvars.ContextVar[bool] = contextvars.ContextVar("microscope_depth_present", default=False)


def present() -> bool:
    """Whether the forward now running is a :func:`run_from` whose batch may hold only the first
    rows of an intervention's (rows joining at their own start layer)."""
    return _PRESENT.get()
