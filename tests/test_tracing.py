"""Causal tracing: invariants, determinism, groups, errors; visual-token attribution."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import microscope
from microscope import attribution as at
from microscope import tracing as tr
from microscope.data import load_samples
from microscope.extract import capture
from tests.tiny_models import MODELS


def _samples(handle, n=6, seed=2):
    return load_samples("shapes", n, seed, handle=handle)  # on the model's patch grid where it has one


@pytest.fixture(scope="module")
def corrupted(shapes_handle):
    """The first QueryAttr sample (one constraint word) whose answer the noise really moves."""
    for s in _samples(shapes_handle, n=60, seed=2):
        if s.category == "QueryAttr":
            c = tr.corrupt(shapes_handle, s, n_noise=4, seed=3)
            if c.correct and c.p_corrupted < c.p_clean - 0.2:
                return c
    raise AssertionError("no QueryAttr sample in 60 is moved by 3-sigma noise")


def test_restoring_the_whole_residual_stream_of_a_layer_gives_back_the_clean_probability(shapes_handle, corrupted):
    c = corrupted
    assert c.p_corrupted < c.p_clean - 0.05  # the corruption does something
    T, L = c.n_tokens, shapes_handle.adapter.n_layers
    jobs = [("resid", [layer], list(range(T))) for layer in range(-1, L)]
    jobs.append(("resid", list(range(-1, L)), list(range(T))))  # every layer at every token
    jobs.append(("resid", [L - 1], [T - 1]))  # the last position's final state is all the logits read
    p = tr.restore(c, jobs, batch_size=5)
    assert p == pytest.approx([c.p_clean] * len(jobs), abs=1e-5)
    # a Restore is the same restoration as its tuple, and reads as one (up to float32 round-off: in
    # the first call a row shares a chunk with a job restoring layer 0, so it is computed from layer 0
    # rather than from the recorded input of layer 1 — the same sums in another order)
    r = tr.Restore("resid", [1], [T - 1])
    assert tr.restore(c, [r, ("resid", [1], [T - 1]), tr.Restore("mlp", [0, 1], [T - 2])], batch_size=5)[0] == \
        pytest.approx(tr.restore(c, [("resid", [1], [T - 1])], batch_size=5)[0], rel=0, abs=64 * 2.0 ** -23)
    assert repr(r) == f"Restore(site='resid', layers=[1], positions=[{T - 1}])"


def test_zero_noise_gives_zero_effect_and_the_same_seed_the_same_numbers(shapes_handle):
    h = shapes_handle
    s = _samples(h)[0]
    zero = tr.trace(h, s, sites=["resid", "mlp"], n_noise=2, scale=0.0, sigma=0.05)
    assert (zero.p_corrupted == zero.p_clean).all()
    assert zero.effect.abs().max() < 1e-6
    a = tr.trace(h, s, sites=["attn"], n_noise=3, sigma=0.05, seed=1)
    b = tr.trace(h, s, sites=["attn"], n_noise=3, sigma=0.05, seed=1)
    pd.testing.assert_frame_equal(a, b)
    c = tr.trace(h, s, sites=["attn"], n_noise=3, sigma=0.05, seed=2)
    assert not a.effect.equals(c.effect)


def test_the_map_covers_every_layer_and_token_and_skips_only_what_causality_fixes(shapes_handle, corrupted):
    h, c = shapes_handle, corrupted
    df = tr.trace(h, c.sample, corrupted=c, batch_size=64)
    T, L = c.n_tokens, h.adapter.n_layers
    assert len(df) == (3 * L + 1) * T
    assert set(df.site) == {"resid", "mlp", "attn"} and set(df.layer) == set(range(-1, L))
    assert set(df[df.site == "mlp"].layer) == set(range(L))
    first = int(c.positions.nonzero().min())
    before = df[df.position < first]
    assert (before.effect == 0).all() and (before.role == "image").sum() == (3 * L + 1) * 36
    # why they are skipped, from plain forwards (no restoration code): before the first corrupted token
    # every corrupted run's residual states equal the clean run's (causal attention), from it on they differ
    with torch.no_grad():
        mask = torch.ones(c.corrupted.shape[:2], dtype=torch.long)
        hs = h.model(inputs_embeds=c.corrupted, attention_mask=mask, output_hidden_states=True).hidden_states
    for lay in (0, 2, L - 2):  # (the model's last hidden state is after its final norm)
        clean = c.clean[f"resid.{lay}"]
        assert torch.allclose(hs[lay + 1][:, :first], clean[:first].expand(c.n_noise, -1, -1), atol=1e-4)
        assert (hs[lay + 1][:, first] - clean[first]).abs().max() > 1e-2
    # running skipped positions for real, without the clean-prefix shortcut, gives the same zero effect,
    # while the same call restoring the corrupted token's input brings the clean answer back
    import dataclasses

    whole = dataclasses.replace(c, prefix=None)
    p = tr.restore(whole, [("resid", [2], [first - 1]), ("mlp", [1, 2, 3], [5]), ("resid", [-1], [first])])
    assert p[:2] == pytest.approx([c.p_corrupted] * 2, abs=1e-5)
    assert p[2] == pytest.approx(c.p_clean, abs=1e-5) and c.p_clean - c.p_corrupted > 0.2
    # batch size does not change the numbers
    small = tr.trace(h, c.sample, sites=["mlp"], corrupted=c, batch_size=7)
    big = df[df.site == "mlp"].reset_index(drop=True)
    assert (small.p_restored - big.p_restored).abs().max() < 1e-5
    # restoring the (only) corrupted token's input undoes the corruption
    cons = df[(df.site == "resid") & (df.layer == -1) & (df.role == "constraint")]
    assert cons.p_restored.iloc[0] == pytest.approx(c.p_clean, abs=1e-5)
    # the embedded model reads the constraint into the last position in its first layers: restoring the
    # last position's state after layer 0 brings the answer back, restoring the constraint's does not
    res = df[df.site == "resid"].set_index(["layer", "role"]).effect
    assert res[(0, "last")] > 0.9 * (c.p_clean - c.p_corrupted)
    assert abs(res[(0, "constraint")]) < 0.05 * (c.p_clean - c.p_corrupted)


def test_groups_and_aggregation(shapes_handle):
    h = shapes_handle
    s = [x for x in _samples(h, n=12, seed=5) if x.category in ("CompareAttr", "QueryAttr")][:3]
    df = tr.trace_dataset(h, s, sites=["resid"], n_noise=2, only_correct=False, progress=False)
    assert set(df.sample_id) == {x.id for x in s}
    g = set(df.group)
    assert {"last constraint", "other question", "related image", "other image", "template", "last"} <= g
    cmp_ = df[(df.category == "CompareAttr") & (df.role == "constraint")]
    assert set(cmp_.group) == {"first constraint", "last constraint"}  # "the triangle and the square"
    agg = tr.aggregate(df)
    one = agg[(agg.site == "resid") & (agg.layer == 0) & (agg.group == "last")]
    manual = df[(df.layer == 0) & (df.group == "last")].groupby("sample_id").effect.mean().mean()
    assert one.effect.iloc[0] == pytest.approx(manual)
    assert (agg.ci_low <= agg.effect).all() and (agg.effect <= agg.ci_high).all()
    # the 95 % normal CI over samples: effect ± 1.96 · sd / √n of the per-sample means
    per = df[(df.layer == 0) & (df.group == "last")].groupby("sample_id").effect.mean()
    half = 1.96 * per.std(ddof=1) / len(per) ** 0.5
    assert one.ci_high.iloc[0] - one.effect.iloc[0] == pytest.approx(half, rel=1e-9, abs=1e-12)
    assert one.effect.iloc[0] - one.ci_low.iloc[0] == pytest.approx(half, rel=1e-9, abs=1e-12)
    peaks = tr.peak_layers(agg)
    assert set(peaks) == {"resid"} and 0 <= peaks["resid"]["layer"] < 6


def test_token_replacement_writes_other_words_of_the_same_kind(shapes_handle):
    h = shapes_handle
    s = _samples(h)[1]  # "What color is the cross?"
    c = tr.corrupt(h, s, "replace", n_noise=6, seed=0)
    t = int(c.positions.nonzero()[0])
    emb = h.adapter.embed.weight
    shape_ids = microscope.answers.answer_ids(h.processor, ["circle", "square", "triangle"])
    for n in range(6):
        d = (emb[shape_ids] - c.corrupted[n, t]).abs().sum(-1)
        assert d.min() < 1e-6  # exactly one of the other shapes' embeddings
    assert c.p_corrupted < c.p_clean


def test_image_targets_corrupt_only_their_patches(shapes_handle):
    h = shapes_handle
    s = _samples(h)[1]
    rel = tr.corrupt(h, s, target="related-image", n_noise=2, sigma=0.5)
    oth = tr.corrupt(h, s, target="other-image", n_noise=2, sigma=0.5)
    img = tr.corrupt(h, s, target="image", n_noise=2, sigma=0.5)
    assert torch.equal(rel.positions | oth.positions, img.positions) and not (rel.positions & oth.positions).any()
    assert int(rel.positions.sum()) == len(s.referred_patches())
    changed = (rel.corrupted[0] != rel.clean["resid.-1"]).any(-1)
    assert torch.equal(changed, rel.positions)


@pytest.mark.parametrize("name", MODELS)
def test_tracing_runs_on_other_layouts(handles, name):
    h = handles[name]
    s = _samples(h, n=2)[1]
    c = tr.corrupt(h, s, n_noise=2, sigma=0.1)
    L, T = h.adapter.n_layers, c.n_tokens
    p = tr.restore(c, [("resid", [1], list(range(T)))])
    assert p[0] == pytest.approx(c.p_clean, abs=1e-5)
    df = tr.trace(h, s, sites=["mlp"], corrupted=c)
    assert len(df) == L * T and df.effect.notna().all()


def test_nested_interventions_are_refused(shapes_handle):
    from microscope import knockout as ko

    h = shapes_handle
    with ko.knockout(h, []), pytest.raises(RuntimeError, match="do not nest"), at.record_attention(h, [0]):
        pass
    assert not microscope.attention.active()


def test_bad_tracing_input_gets_clear_errors(shapes_handle, corrupted):
    h = shapes_handle
    s = _samples(h)[0]
    with pytest.raises(ValueError, match="unknown corruption"):
        tr.corrupt(h, s, "blur")
    with pytest.raises(ValueError, match="unknown target"):
        tr.corrupt(h, s, target="pixels")
    with pytest.raises(ValueError, match="constraint words"):
        tr.corrupt(h, s, "replace", target="image")
    with pytest.raises(ValueError, match="n_noise"):
        tr.corrupt(h, s, n_noise=0)
    with pytest.raises(ValueError, match="unknown site"):
        tr.restore(corrupted, [("mlp_out", [0], [1])])
    with pytest.raises(ValueError, match=r"Restore\(site, layers, positions\)"):
        tr.restore(corrupted, [("resid", [0])])
    with pytest.raises(ValueError, match="out of range"):
        tr.restore(corrupted, [("mlp", [6], [1])])
    with pytest.raises(ValueError, match="out of range"):
        tr.restore(corrupted, [("attn", [-1], [1])])
    with pytest.raises(ValueError, match="positions"):
        tr.restore(corrupted, [("resid", [0], [999])])
    with pytest.raises(tr.NothingToCorrupt):
        blank = microscope.data.shapes.generate(1, 0)[0]
        blank.constraints = ()
        tr.corrupt(h, blank)


@pytest.mark.parametrize("name", ["shapes", "qwen2_vl", "llava_onevision"])
def test_attention_contributions_decompose_the_attention_output_exactly(handles, name):
    h = handles[name]
    batch = microscope.prepare_samples(h, _samples(h, n=3))
    for layer in (0, 3):
        alpha, outs = at.head_contributions(h, batch, layer)
        with torch.no_grad(), capture(h, [layer], ["attn"]) as acts:
            h.model(**batch.inputs)
        rec = torch.einsum("bhqk,bkhd->bqd", alpha, outs)
        bias = at.output_projection(h.adapter.layers[layer].self_attn).bias
        rec = rec + (0 if bias is None else bias)
        real = batch.roles != 0
        assert (rec - acts[f"attn.{layer}"])[real].abs().max() < 1e-4
    assert not microscope.attention.active()
    assert h.adapter.layers[0].self_attn.config._attn_implementation == "sdpa"


def test_precision_at_k_known_answers():
    rows = []
    for sid, good in (("a", True), ("b", False)):
        for p in range(10):
            rel = p in (2, 3)
            score = (1.0 if rel else 0.0) if good else (1.0 if p in (7, 8) else 0.0)
            rows.append({"sample_id": sid, "category": "X", "patch": p, "score": score, "related": rel})
    prec = at.precision_at_k(pd.DataFrame(rows))
    assert prec.set_index("sample_id").precision.to_dict() == {"a": 1.0, "b": 0.0}
    assert (prec.chance == 0.2).all() and (prec.k == 2).all()
    assert at.summary(prec) == {"precision": 0.5, "chance": 0.2, "n_samples": 2}


def test_restoring_single_image_tokens_finds_the_referred_object(shapes_handle):
    h = shapes_handle
    s = [x for x in _samples(h, n=24, seed=7) if x.category in ("QueryAttr", "ChooseAttr")][:6]
    rs = at.restoration_scores(h, s, n_noise=4, progress=False)
    summ = at.summary(at.precision_at_k(rs))
    assert summ["n_samples"] >= 4
    assert summ["precision"] > summ["chance"] + 0.3


def test_the_clean_prefix_cache_changes_no_number(shapes_handle, corrupted):
    import dataclasses

    c = corrupted
    assert c.prefix is not None and c.first > 36  # the question comes after the image
    whole = dataclasses.replace(c, prefix=None)
    jobs = [(k, [lay], [t]) for k in ("resid", "mlp", "attn") for lay in (0, 3) for t in range(c.first, c.n_tokens)]
    a = tr.restore(c, jobs)
    b = tr.restore(whole, jobs)
    assert abs(a - b).max() < 1e-5
    # p_corrupted (computed from the prefix) equals whole-prompt forwards of the corrupted inputs
    with torch.no_grad():
        p = tr._forward_p(shapes_handle, c.corrupted, c.answer_id).mean().item()
    assert c.p_corrupted == pytest.approx(p, abs=1e-6)
    # the default sigma is the sample's own text-embedding std, as noise_sigma measures it
    d = tr.corrupt(shapes_handle, c.sample, n_noise=2, seed=3)
    ref = tr.corrupt(shapes_handle, c.sample, n_noise=2, seed=3, sigma=tr.noise_sigma(shapes_handle, [c.sample]))
    assert torch.allclose(d.corrupted, ref.corrupted, atol=1e-6)


@pytest.mark.parametrize("name", ["gemma3", "paligemma"])
def test_the_prefix_shortcut_on_bidirectional_families_equals_plain_forwards(handles, name):
    """Where image tokens read later image tokens (Gemma 3) or the whole prompt is one
    bidirectional prefix (PaliGemma), a corruption that starts inside the block changes earlier
    positions: the shortcut starts at the block's start (PaliGemma: 0, no prefix), and every number
    equals whole-prompt forwards of the corrupted inputs. After the block (Gemma 3's constraint
    words) the shortcut is used, with the prompt's token_type_ids, and changes no number either."""
    import dataclasses

    from microscope.prefix import next_token_probs, positions

    h = handles[name]
    s = next(x for x in _samples(h, n=40) if x.referred_patches() and min(x.referred_patches()) > 0)
    image = None
    for target in ("related-image", "constraint"):
        c = tr.corrupt(h, s, target=target, n_noise=3, scale=3.0, sigma=1.0, seed=1)
        image = c.batch.role_mask("image")[0].nonzero().flatten()
        touched = int(c.positions.nonzero().min())
        if name == "paligemma":
            assert c.first == 0 and c.prefix is None  # the whole prompt is bidirectional
        elif target == "related-image":
            assert touched > int(image.min()) and c.first == int(image.min())  # back to the image block's start
        else:
            assert c.first == touched > int(image.max()) and c.prefix is not None  # causal after the block
        pos = positions(h, {k: v for k, v in c.batch.inputs.items()})
        assert "token_type_ids" in pos
        # the clean decoder input run from inputs_embeds (from the cached prefix where there is one) is
        # the model's own forward: the block's token_type_ids reach it (without them the mask is causal)
        clean = c.clean["resid.-1"][None]
        with torch.no_grad():
            ref = h.model(**c.batch.inputs, logits_to_keep=1).logits[:, -1].float().log_softmax(-1)
            got = next_token_probs(h, clean[:, c.first:] if c.prefix else clean, c.prefix, pos).log()
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
        with torch.no_grad():  # p_corrupted: whole-prompt forwards, no cache
            whole = next_token_probs(h, c.corrupted, None, pos)[:, c.answer_id].mean().item()
        assert c.p_corrupted == pytest.approx(whole, abs=1e-6)
        T = c.n_tokens
        jobs = [(k, [lay], [t]) for k in ("resid", "attn") for lay in (0, 2) for t in range(c.first, T)]
        a = tr.restore(c, jobs)
        b = tr.restore(dataclasses.replace(c, prefix=None), jobs)
        assert abs(a - b).max() < 1e-5
    # an image token before the first corrupted one is changed by the corruption (it reads later image
    # tokens): what the shortcut would have taken from the clean cache is not clean
    if name == "gemma3":
        c = tr.corrupt(h, s, target="related-image", n_noise=3, sigma=1.0, seed=1)
        early = int(image.min())
        assert not c.positions[early]
        with torch.no_grad(), capture(h, [0]) as acts:
            next_token_probs(h, c.corrupted, None, positions(h, dict(c.batch.inputs)))
        assert (acts["resid.0"][:, early] - c.clean["resid.0"][early]).abs().max() > 1e-3


def test_attention_contributions_known_answer_per_image_token(shapes_handle):
    """score(j) = mean over the target tokens c of sum_h alpha[h, c, j] · ||W_O^h W_V^h x_j||, recomputed
    here by plain loops from head_contributions; one row per sample × layer × patch; the default layers
    are the first quarter of the decoder, at least two; ``related`` marks the referred patches."""
    h = shapes_handle
    samples = _samples(h, n=3, seed=5)
    df = at.attention_contributions(h, samples, batch_size=2, progress=False)
    L = h.adapter.n_layers
    assert sorted(df.layer.unique()) == list(range(max(2, L // 4)))
    n_patches = len(microscope.grid.image_patch_positions(h, microscope.prepare_samples(h, samples[:1]), 0))
    assert len(df) == len(samples) * max(2, L // 4) * n_patches
    one = at.attention_contributions(h, samples, layers=[3], target="question", batch_size=1, progress=False)
    assert set(one.layer) == {3} and len(one) == len(samples) * n_patches
    for s in samples:  # one at a time: the positions of an unpadded batch of one
        batch = microscope.prepare_samples(h, [s])
        alpha, outs = at.head_contributions(h, batch, 3)
        pos = microscope.grid.image_patch_positions(h, batch, 0, s.grid)
        targets = batch.role_mask("question")[0].nonzero().flatten().tolist()
        want = [sum(float(alpha[0, hd, c, j]) * float(outs[0, j, hd].norm()) for c in targets
                    for hd in range(alpha.shape[1])) / len(targets) for j in pos.tolist()]
        got = one[one.sample_id == s.id].sort_values("patch")
        assert got.position.tolist() == pos.tolist()
        assert got.score.to_numpy() == pytest.approx(want, rel=1e-4, abs=1e-7)
        assert set(got.patch[got.related]) == set(s.referred_patches()) and got.related.any()
        assert (got.category == s.category).all() and (got.model == h.name).all()


def test_restore_window_is_the_smallest_odd_width_of_ten_layers_in_forty_eight():
    assert [tr.restore_window(n) for n in (1, 6, 24, 32, 48, 80)] == [1, 3, 5, 7, 11, 17]


def test_one_noise_sample_and_one_row_per_forward_give_the_same_numbers(shapes_handle, corrupted):
    """batch_size=1 (a forward per (job, noise) row) equals one batch; n_noise=1 is a valid corruption whose
    p_corrupted is that one copy's probability and whose restorations are p_clean when everything is restored."""
    c = corrupted
    T, L = c.n_tokens, shapes_handle.adapter.n_layers
    jobs = [("mlp", [1, 2], [T - 2, T - 1]), ("attn", [3], list(range(c.first, T))), ("resid", [0], [])]
    assert tr.restore(c, jobs, batch_size=1) == pytest.approx(tr.restore(c, jobs, batch_size=256), abs=1e-6)
    assert tr.restore(c, jobs, batch_size=256)[2] == c.p_corrupted  # restoring nothing: the corrupted run
    one = tr.corrupt(shapes_handle, c.sample, n_noise=1, seed=3)
    assert one.n_noise == 1 and one.corrupted.shape == (1, T, c.corrupted.shape[-1])
    assert torch.equal(one.corrupted[0], c.corrupted[0])  # the same seed draws the same first copy
    p1 = tr.restore(one, [("resid", [L - 1], [T - 1])], batch_size=1)
    assert p1[0] == pytest.approx(one.p_clean, abs=1e-5)
    with torch.no_grad():  # the one copy's probability, by a plain forward of its embeddings
        alone = float(tr._forward_p(shapes_handle, one.corrupted, one.answer_id)[0])
    assert one.p_corrupted == pytest.approx(alone, abs=1e-5)


def test_dataset_functions_pass_sigma_and_a_seed_per_sample(shapes_handle):
    """trace_dataset traces sample k as trace(..., sigma, seed=seed + k); corruption_effects corrupts sample i
    with seed + i; its blank-image row of a sample without a gold answer is measured on the model's own
    clean top token."""
    import dataclasses

    h = shapes_handle
    s = [x for x in _samples(h, n=8, seed=4) if x.category == "QueryAttr"][:2]
    df = tr.trace_dataset(h, s, sites=["resid"], n_noise=2, sigma=0.07, seed=5, only_correct=False,
                          progress=False)
    for k, x in enumerate(s):
        one = tr.trace(h, x, sites=["resid"], n_noise=2, sigma=0.07, seed=5 + k)
        got = df[df.sample_id == x.id].reset_index(drop=True)
        assert got.p_restored.to_numpy() == pytest.approx(one.p_restored.to_numpy(), abs=1e-6)
    noise = [("noise", "noise", "constraint", 3.0)]
    eff = tr.corruption_effects(h, s, noise, n_noise=2, sigma_text=0.07, seed=9, progress=False)
    for i, x in enumerate(s):
        c = tr.corrupt(h, x, n_noise=2, scale=3.0, sigma=0.07, seed=9 + i)
        assert eff.p_corrupted[i] == pytest.approx(c.p_corrupted, abs=1e-6)
    free = dataclasses.replace(s[0], answer=None)
    blank = tr.corruption_effects(h, [free], [("blank image", "blank", "image", 0.0)], progress=False)
    from microscope.objects import probs

    p = probs(h, [free])[0]
    assert blank.p_clean[0] == pytest.approx(float(p.max()), abs=1e-6) and bool(blank.correct[0])
