"""The published-layout references the speed benchmarks time ours against and check it with.

- :func:`knockout_reference`: Zhang et al.'s layout — one full forward of the model (vision tower
  included) per (sample, edge, window centre), with that window's plan;
- :func:`tracing_reference`: ROME's layout — one forward of the whole prompt per (sample, layer,
  token), the ``N`` corrupted rows of the sample with that single residual state restored.

Used by ``knockout_sweep.py``, ``tracing_map.py`` and ``real_shapes.py`` (run as scripts, this
directory is on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

import microscope
from microscope import knockout as ko
from microscope import tracing as tr
from microscope.answers import answer_ids
from microscope.model import Handle
from microscope.prefix import next_token_probs

#: knockout result key: (sample id, edge, window centre)
KnockoutKey = tuple[str, str, int]
#: tracing result key: (index of the sample, layer (-1: the decoder input), position)
TracingKey = tuple[int, int, int]


def knockout_reference(h: Handle, samples: Sequence, edges: Sequence[str], window: int
                       ) -> dict[KnockoutKey, float]:
    """p(answer) with the edge blocked in the window: one full forward per (sample, edge, window centre)."""
    L = h.adapter.n_layers
    out = {}
    for s in samples:
        batch = microscope.prepare_samples(h, [s])
        gold = answer_ids(h.processor, [s.answer])[0]
        for e in edges:
            src, tgt = ko.edge_masks(h, batch, e, [s.referred_patches()])
            if not src.any():
                continue
            for c in range(L):
                plan = [ko.Block(src, tgt, list(ko.window_layers(c, window, L)))]
                with torch.no_grad(), ko.knockout(h, plan):
                    logits = h.model(**batch.inputs, use_cache=False).logits[0, -1]
                out[(s.id, e, c)] = float(logits.float().softmax(-1)[gold])
    return out


def first_corrupted(c: tr.Corrupted) -> int:
    """The first corrupted position: the cells of the map start there (before it the effect is 0)."""
    return int(c.positions.nonzero().min())


def tracing_reference(cs: Sequence[tr.Corrupted]) -> dict[TracingKey, float]:
    """p_restored of every residual-stream cell (layer -1..L-1 × each token from the first
    corrupted one) of each corrupted sample: one whole-prompt forward of its ``N`` rows per cell,
    the clean state written at the cell by a hook — no key/value cache, no depth reuse (not
    ``tr.restore``, which records the corrupted run and starts its rows at their layer)."""
    out = {}
    for k, c in enumerate(cs):
        h, N, first = c.handle, c.n_noise, first_corrupted(c)
        rows = torch.arange(N)
        for layer in range(-1, h.adapter.n_layers):
            for pos in range(first, c.n_tokens):
                spec = {("resid", layer): (rows, torch.full((N,), pos))}
                with torch.no_grad(), tr._restoring(h, c.clean, spec):
                    p = next_token_probs(h, c.corrupted, None, c.position_ids)[:, c.answer_id]
                out[(k, layer, pos)] = float(p.mean())
    return out


def tracing_cells(cs: Sequence[tr.Corrupted], maps: Sequence[pd.DataFrame]) -> dict[TracingKey, float]:
    """The cells of :func:`tracing_reference` read from ``microscope.tracing.trace`` maps (one per sample)."""
    out = {}
    for k, (c, m) in enumerate(zip(cs, maps)):
        m = m[m.position >= first_corrupted(c)]
        out.update({(k, int(r.layer), int(r.position)): float(r.p_restored) for r in m.itertuples()})
    return out
