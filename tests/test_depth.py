"""Depth reuse (microscope.depth): rows started at decoder layer l from the reference run's
recorded layer inputs give the whole forward's numbers, on every family, and the knockout sweep
really skips the layers below each window."""

from __future__ import annotations

import pytest
import torch

import microscope
from microscope import depth
from microscope import knockout as ko
from microscope.data import load_samples
from microscope.extract import capture
from microscope.prefix import causal_start, clean_cache, positions, prefix_of
from tests.tiny_models import MODELS

HANDLES = ["shapes", *MODELS]


def _clean(h, seed=3):
    s = load_samples("shapes", 1, seed, handle=h)[0]
    inputs = {k: v.to(h.device) for k, v in microscope.prepare_samples(h, [s]).inputs.items()}
    with torch.no_grad(), capture(h, [-1]) as acts:
        out = h.model(**inputs, use_cache=True, **clean_cache(h), logits_to_keep=1)
    return inputs, out, acts["resid.-1"]


def _layer_calls(h, fn):
    """``fn()`` and the (decoder layer, batch size) of every decoder-layer call it made, in order."""
    calls: list[tuple[int, int]] = []
    hooks = [lay.register_forward_pre_hook(lambda m, a, i=i: calls.append((i, a[0].shape[0])))
             for i, lay in enumerate(h.adapter.layers)]
    try:
        return fn(), calls
    finally:
        for hk in hooks:
            hk.remove()


def _bound(logits: torch.Tensor) -> float:
    """Float round-off allowance for the same logits summed in another order (another batch size,
    another number of query rows in each matrix product): 64 units of float32 rounding of the
    largest logit — far below any effect an analysis reports, far above what reordering gives."""
    return 64 * torch.finfo(torch.float32).eps * max(1.0, float(logits.abs().max()))


@pytest.mark.parametrize("name", HANDLES)
def test_starting_at_any_layer_gives_the_whole_forwards_logits(handles, name):
    """For a suffix starting at 0, in the middle and at the last position, and every start layer
    0..L: the rows' logits equal the whole prompt's forward (nothing is intervened on, so every
    start layer must give the same numbers)."""
    h = handles[name]
    inputs, out, emb = _clean(h)
    ref = out.logits[0, -1].float()
    T, L = emb.shape[1], h.adapter.n_layers
    keep = h.adapter.cross_attention_layers
    for first in sorted({0, T // 2, T - 1}):
        first = causal_start(h, inputs, first)
        prefix = prefix_of(out, first, keep=keep)
        if first > 0 and prefix is None:  # the model cannot take a cache (layer 0 kept whole)
            continue
        rec = depth.record(h, emb[:, first:], prefix, positions(h, inputs))
        for layer in [*rec.called, L]:
            with torch.no_grad():
                got = depth.run_from(h, rec, layer, [0, 0, 0]).float()
            assert got.shape == (3, ref.shape[-1])
            err = float((got - ref).abs().max())
            assert err <= _bound(ref), f"{name}: suffix from {first}, start layer {layer}: max |Δlogit| {err:.2e}"
        starts = [*rec.called, L]  # every row its own start: each joins the batch there
        with torch.no_grad():
            got = depth.run_from(h, rec, starts, [0] * len(starts)).float()
        err = float((got - ref).abs().max())
        assert err <= _bound(ref), f"{name}: suffix from {first}, rows joining at {starts}: max |Δlogit| {err:.2e}"


def test_starting_late_skips_an_intervention_below_it(shapes_handle):
    """A change to the recorded input of layer 2 shows in rows started at layers 0-2 and in none
    started at layer 3: the start layer decides which recorded inputs are read."""
    h = shapes_handle
    inputs, out, emb = _clean(h)
    rec = depth.record(h, emb, None, positions(h, inputs))
    with torch.no_grad():
        base = {layer: depth.run_from(h, rec, layer, [0]) for layer in (2, 3)}
        rec.hidden[2] = rec.hidden[2].clone()
        rec.hidden[2][:, -1] += 3.0
        changed = depth.run_from(h, rec, 2, [0])
        late = depth.run_from(h, rec, 3, [0])
    assert float((changed - base[2]).abs().max()) > 1e-2
    assert torch.equal(late, base[3])


def test_reference_rows_are_recorded_per_row(shapes_handle):
    """Recording R rows keeps each row's layer inputs; rows index them."""
    h = shapes_handle
    inputs, out, emb = _clean(h)
    rows = torch.cat([emb, emb + 0.5 * torch.randn_like(emb, generator=torch.Generator().manual_seed(0))])
    rec = depth.record(h, rows, None, positions(h, inputs))
    assert rec.hidden[0].shape[0] == 2 and rec.called == list(range(h.adapter.n_layers))
    with torch.no_grad():
        whole = h.model(inputs_embeds=rows, attention_mask=torch.ones(rows.shape[:2], dtype=torch.long),
                        logits_to_keep=1).logits[:, -1]
        got = depth.run_from(h, rec, 4, [1, 0, 1])
    assert float((got - whole[[1, 0, 1]]).abs().max()) <= _bound(whole)


def test_bad_start_layer_is_named(shapes_handle):
    h = shapes_handle
    inputs, out, emb = _clean(h)
    rec = depth.record(h, emb[:, -1:], prefix_of(out, emb.shape[1] - 1), positions(h, inputs))
    with pytest.raises(ValueError, match="layer must be in 0..6"):
        depth.run_from(h, rec, 7)
    with pytest.raises(ValueError, match="non-decreasing"):
        depth.run_from(h, rec, [3, 1], [0, 0])
    with pytest.raises(ValueError, match="3 start layers for 2 rows"):
        depth.run_from(h, rec, [1, 2, 3], [0, 0])


def test_the_sweep_computes_each_window_from_its_first_layer(shapes_handle):
    """Decoder-layer calls of a sweep: one whole forward and one recording forward per sample,
    then per chunk of rows only the layers from the chunk's first window start on — not L per row."""
    h = shapes_handle
    L = h.adapter.n_layers
    s = load_samples("shapes", 1, 3, handle=h)
    df, calls = _layer_calls(h, lambda: ko.sweep(h, s, edges=["image↛last"], window=3, batch_size=2,
                                                 only_correct=False, progress=False))
    assert len(df) == L
    starts = sorted(ko.window_layers(c, 3, L).start for c in range(L))
    # chunks of 2 rows in start order; a chunk's second row joins at its own window's first layer
    expected: list[tuple[int, int]] = []
    for a, b in zip(starts[0::2], starts[1::2]):
        expected += [(i, 1) for i in range(a, b)] + [(i, 2) for i in range(b, L)]
    assert calls[2 * L:] == expected  # after the whole forward and the recording (2 L calls of 1 row)
    assert sum(b for _, b in calls[2 * L:]) == sum(L - x for x in starts)  # each row: its layers from its start


def test_restorations_start_at_their_first_restored_layer(shapes_handle):
    """Decoder-layer calls of tr.restore: the recording of the corrupted rows (all layers for the N
    rows, then all layers for one row), then each chunk only from its first restored layer on; and
    the numbers equal the same restorations over the whole prompt (no prefix cache), one row at a time."""
    from microscope import tracing as tr

    h = shapes_handle
    L = h.adapter.n_layers
    s = load_samples("shapes", 1, 3, handle=h)[0]
    c = tr.corrupt(h, s, n_noise=3, seed=0)
    last = c.n_tokens - 1
    jobs = [("resid", [L - 1], [last]), ("mlp", [L - 2], [last]), ("resid", [-1], [last])]
    got, calls = _layer_calls(h, lambda: tr.restore(c, jobs, batch_size=3))
    # chunks of 3 rows (the 3 noise draws of one job), sorted by start: layer 0, L-2, L-1
    assert calls == [(i, 3) for i in range(L)] + [(i, 1) for i in range(L)] + \
        [(i, 3) for i in range(L)] + [(i, 3) for i in range(L - 2, L)] + [(L - 1, 3)]
    import dataclasses

    whole = tr.restore(dataclasses.replace(c, prefix=None, first=0), jobs, batch_size=1)
    assert got == pytest.approx(whole, rel=1e-5, abs=1e-7)
    # all 9 rows in one chunk: each job's rows join at its own first restored layer
    joined, calls = _layer_calls(h, lambda: tr.restore(c, jobs, batch_size=9))
    assert calls[2 * L:] == [(i, 3) for i in range(L - 2)] + [(L - 2, 6), (L - 1, 9)]
    assert joined == pytest.approx(whole, rel=1e-5, abs=1e-7)


def test_a_residual_restoration_starts_at_the_next_layer(shapes_handle):
    """The residual stream after layer l is layer l + 1's input: rows restoring it join at l + 1
    with the clean state written into that input, and give what whole-prompt forwards of the
    corrupted rows with layer l's output overwritten (a forward hook, not tr.restore) give."""
    from microscope import tracing as tr
    from microscope.prefix import next_token_probs

    h = shapes_handle
    L = h.adapter.n_layers
    # the first sample whose answer the corruption moves (10σ noise on the constraint)
    c = next(c for c in (tr.corrupt(h, s, n_noise=3, scale=10.0, seed=0)
                         for s in load_samples("shapes", 16, 3, handle=h)) if c.p_clean - c.p_corrupted > 0.2)
    last = c.n_tokens - 1
    pos = list(range(c.first, c.n_tokens))  # layer 0's whole output from the corruption on: the clean run again
    jobs = [("resid", [0], pos), ("resid", [L - 1], [last])]
    got, calls = _layer_calls(h, lambda: tr.restore(c, jobs, batch_size=3))
    # the recording (L calls of 3 rows, L of 1), then layers 1.. for layer 0's restoration; layer
    # L - 1 has no next layer: its rows run it, the state written at its output
    assert calls[2 * L:] == [(i, 3) for i in range(1, L)] + [(L - 1, 3)]

    def overwritten(layer: int, p) -> float:
        def hook(_m, _a, out):
            x = (out[0] if isinstance(out, tuple) else out).clone()
            x[:, p] = c.clean[f"resid.{layer}"][p]
            return (x, *out[1:]) if isinstance(out, tuple) else x

        hk = h.adapter.layers[layer].register_forward_hook(hook)
        try:
            with torch.no_grad():
                return float(next_token_probs(h, c.corrupted, None, c.position_ids)[:, c.answer_id].mean())
        finally:
            hk.remove()

    ref = [overwritten(0, pos), overwritten(L - 1, [last])]
    assert ref[0] == pytest.approx(c.p_clean, abs=1e-5) and c.p_clean - c.p_corrupted > 0.2  # the test can fail
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-7)


def test_sweep_rows_compute_only_the_positions_from_their_own_first_target(shapes_handle):
    """Rows of an edge into the last token compute one position; rows of an edge into the question
    compute the question on: one clean-layer recording per first target position."""
    h = shapes_handle
    s = load_samples("shapes", 1, 3, handle=h)
    batch = microscope.prepare_samples(h, s)
    T = batch.inputs["input_ids"].shape[1]
    _, tgt = ko.edge_masks(h, batch, "image↛question")
    q0 = int(tgt[0].nonzero().min())
    calls = []
    hooks = [lay.register_forward_pre_hook(lambda m, a: calls.append(tuple(a[0].shape[:2])))
             for lay in h.adapter.layers]
    try:
        ko.sweep(h, s, edges=["image↛last", "image↛question"], window=3, batch_size=4, only_correct=False,
                 progress=False)
    finally:
        for hk in hooks:
            hk.remove()
    rows = {length for b, length in calls if b > 1}
    assert rows == {1, T - q0}
    assert (1, 1) in calls and (1, T - q0) in calls  # one recording per suffix
