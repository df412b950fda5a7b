"""Batches sized by memory (microscope.batching): the per-row cost counts the prefix once per row
only where the rows do not share it, the row count follows the budget, and the analyses run their
rows in batches of that size with the same numbers."""

from __future__ import annotations

import pytest
import torch

import microscope
from microscope import batching, shared_prefix
from microscope import knockout as ko
from microscope.data import load_samples
from microscope.prefix import clean_cache, prefix_of


def _prefix(h, back: int):
    """The clean cache of every position but the last ``back`` of one sample's prompt."""
    s = load_samples("shapes", 1, 3, handle=h)[0]
    inputs = {k: v.to(h.device) for k, v in microscope.prepare_samples(h, [s]).inputs.items()}
    with torch.no_grad():
        out = h.model(**inputs, use_cache=True, **clean_cache(h), logits_to_keep=1)
    return prefix_of(out, int(inputs["input_ids"].shape[1]) - back)


@pytest.fixture(scope="module")
def prefix(shapes_handle):
    return _prefix(shapes_handle, 5)


def test_a_row_pays_for_the_prefix_only_where_rows_do_not_share_it(shapes_handle, prefix):
    h = shapes_handle
    prefix_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in prefix)
    own = batching.row_bytes(h, prefix, 5, shared=False)
    one = batching.row_bytes(h, prefix, 5, shared=True)
    assert own - one == prefix_bytes
    assert batching.row_bytes(h, prefix, 10, shared=True) > one  # grows with the suffix
    with shared_prefix.disabled():
        assert not shared_prefix.shares(h, prefix)
    assert shared_prefix.shares(h, prefix) and not shared_prefix.shares(h, None)


def test_rows_per_batch_follows_the_budget(shapes_handle, prefix):
    h = shapes_handle
    per_row = batching.row_bytes(h, prefix, 5, shared=True)
    assert batching.rows_per_batch(h, prefix, 5, cap=10_000, memory=7 * per_row) == 7
    assert batching.rows_per_batch(h, prefix, 5, cap=10_000, memory=7 * per_row - 1) == 6
    assert batching.rows_per_batch(h, prefix, 5, memory=0) == 1  # at least one row
    assert batching.rows_per_batch(h, prefix, 5, cap=4, memory=7 * per_row) == 4
    model = sum(t.numel() * t.element_size() for t in (*h.model.parameters(), *h.model.buffers()))
    assert batching.budget(h) == max(64 << 20, int(0.5 * batching.total_memory("cpu")) - model)
    assert batching.total_memory("cpu") > 1 << 30


def test_the_sweep_runs_batches_of_the_memory_sized_row_count(shapes_handle, monkeypatch):
    h = shapes_handle
    s = load_samples("shapes", 1, 3, handle=h)
    fixed = ko.sweep(h, s, edges=["image↛last"], window=3, batch_size=64, only_correct=False, progress=False)
    monkeypatch.setattr(batching, "budget", lambda handle: 3 * _row(handle))
    calls = []
    hooks = [lay.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0])) for lay in h.adapter.layers]
    try:
        sized = ko.sweep(h, s, edges=["image↛last"], window=3, only_correct=False, progress=False)
    finally:
        for hk in hooks:
            hk.remove()
    assert max(calls) == 3  # batches of the 3 rows the budget holds (the rows join at their own layers)
    assert sized["p_blocked"].to_numpy() == pytest.approx(fixed["p_blocked"].to_numpy(), rel=1e-5, abs=1e-7)


def _row(h) -> int:
    """The per-row bytes of the sweep's image↛last rows: one position after the clean prefix."""
    return batching.row_bytes(h, _prefix(h, 1), 1, shared=True)
