"""Attribution against ground truth that can fail it: patch truth by coverage, scores with their
chance levels and objectness baselines, object-level causal tests, group restoration, integrated
gradients, and how much each corruption corrupts. Every score is shown to fail a wrong attribution."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from microscope import attribution as at
from microscope import grid
from microscope import groundtruth as gt
from microscope import objects as ob
from microscope import tracing as tr
from microscope.data import load_samples, shapes
from microscope.data.blank import blank_like
from microscope.prefix import next_token_probs


@pytest.fixture(scope="module")
def scenes():
    return shapes.generate(240, seed=4)


@pytest.fixture(scope="module")
def truth(scenes):
    return gt.patch_truth(scenes)


# --------------------------------------------------------------------------- ground truth

def test_coverage_is_measured_on_the_pixels_and_leaves_the_images_unchanged(scenes):
    for s in scenes[:120]:
        assert s.render().tobytes() == s.image.tobytes()  # the same drawing, byte for byte
        g, p = s.grid, s.patch_size
        for i in range(len(s.objects)):
            m = s.object_mask(i)
            img = np.asarray(s.image)[m]
            assert (img == shapes.COLORS[s.objects[i].color]).all()
            cells = m[:g * p, :g * p].reshape(g, p, g, p).sum(axis=(1, 3)).reshape(-1) / p**2
            assert np.allclose(cells, s.patch_coverage([i]))
        cov = s.patch_coverage()
        assert s.referred_patches() == tuple(np.flatnonzero(cov > 0))  # any pixel: the old definition
        assert s.referred_patches(0.15) == tuple(np.flatnonzero(cov >= 0.15))
        assert set(s.referred_patches(0.15)) <= set(s.referred_patches())
    assert (np.asarray(scenes[0].render(keep=[])) == shapes.BACKGROUND).all()
    with pytest.raises(ValueError, match="min_coverage"):
        scenes[0].referred_patches(1.5)


def test_patch_truth_thresholds_owners_and_slivers(scenes, truth):
    assert len(truth) == 36 * len(scenes)
    t = truth.set_index(["sample_id", "patch"])
    for s in scenes[:60]:
        cov = s.patch_coverage()
        tt = t.loc[s.id]
        assert np.allclose(tt.coverage, cov) and (tt.truth == (cov >= 0.15)).all()
        for j in range(36):
            own = int(tt.owner.iloc[j])
            covs = [s.patch_coverage([i])[j] for i in range(len(s.objects))]
            assert own == (int(np.argmax(covs)) if max(covs) >= 0.15 else -1)
    slivers = truth[(truth.coverage > 0) & (truth.coverage < 0.15)]
    assert 0.3 < len(slivers) / (truth.coverage > 0).sum() < 0.5  # about 40% of touched patches are slivers
    loose = gt.patch_truth(scenes[:10], min_coverage=0.0)
    assert (loose.truth == (loose.coverage > 0)).all()


# --------------------------------------------------------------------------- scores and their failures

def _with(table, name, values):
    out = table.copy()
    out[name] = values
    return out


def test_scores_known_answers_and_ties():
    s = np.array([5.0, 4, 3, 2, 1, 0])
    w = np.array([1.0, 1, 0, 0, 0, 0])
    assert gt.precision_at_k(s, w, 2) == 1.0 and gt.precision_at_k(-s, w, 2) == 0.0
    assert gt.auc(s, w) == 1.0 and gt.auc(-s, w) == 0.0
    flat = np.zeros(6)
    assert gt.precision_at_k(flat, w, 2) == pytest.approx(2 / 6)  # ties share the places: chance
    assert gt.auc(flat, w) == 0.5
    assert gt.precision_at_k(np.array([1.0, 0, 0, 0, 0, 1]), w, 1) == pytest.approx(0.5)
    cw = np.array([0.9, 0.2, 0.5, 0, 0, 0])  # coverage weights: normalised by the best top-k
    assert gt.precision_at_k(cw, cw, 2) == 1.0
    assert gt.precision_at_k(np.array([0, 1.0, 0.5, 0, 0, 0]), cw, 2) == pytest.approx(0.7 / 1.4)


def test_every_score_fails_wrong_attributions_and_objectness_cannot_pass_referred_vs_distractor(truth):
    """Oracle attribution: perfect. Shuffled scores: chance on every score. The distractors'
    patches: referred-vs-distractor 0. Question-blind objectness: referred-vs-distractor ½."""
    t = truth.copy()
    covs = {}
    for s in shapes.generate(240, seed=4):
        per = np.stack([s.patch_coverage([i]) for i in range(len(s.objects))])
        other = [i for i in range(len(s.objects)) if i not in s.referred]
        covs[s.id] = per[other].sum(0) if other else np.zeros(36)
    t["oracle"] = t.coverage + t.owner_referred  # truth first; a patch two objects share goes to its owner
    t["distractors"] = np.concatenate([covs[sid] for sid in dict.fromkeys(t.sample_id)])
    t = gt.shuffled(t, "oracle", seed=1)
    per = gt.score_samples(t, ["oracle", "oracle (shuffled)", "distractors", "objectness (oracle)"])
    summ = gt.summarize(per).set_index(["method", "metric"])
    for metric in gt.METRICS:
        assert summ.loc[("oracle", metric), "value"] == pytest.approx(1.0)
        sh = summ.loc[("oracle (shuffled)", metric)]
        assert abs(sh.value - sh.chance) < 2.5 * (sh.ci_high - sh.value) / 1.96 + 0.02, metric
    assert summ.loc[("distractors", "referred_vs_distractor"), "value"] == 0.0
    rvd = summ.loc[("objectness (oracle)", "referred_vs_distractor")]
    assert abs(rvd.value - 0.5) < 0.08
    assert summ.loc[("oracle", "referred_vs_distractor"), "over_objectness"] > 0.4
    # the old yardstick (any pixel of the object) cannot give a perfect attribution full marks
    loose = gt.patch_truth(shapes.generate(240, seed=4), min_coverage=0.0)
    loose["exact15"] = np.where(loose.coverage >= 0.15, 1.0, 0.0) + 1e-3 * np.random.default_rng(0).random(len(loose))
    old = gt.summarize(gt.score_samples(loose, ["exact15"])).set_index("metric")
    assert 0.5 < old.loc["precision@k", "value"] < 0.8


def test_coverage_weighted_truth_and_bad_input(truth):
    t = _with(truth, "cov", truth.coverage)
    per = gt.score_samples(t, ["cov"], truth="coverage")
    assert (per.value[per.metric.isin(["precision@k", "top-1", "roc_auc"])] > 0.999).all()
    with pytest.raises(ValueError, match="truth"):
        gt.score_samples(t, ["cov"], truth="soft")
    with pytest.raises(ValueError, match="no score column"):
        gt.score_samples(t, ["nope"])
    with pytest.raises(ValueError, match="k must"):
        gt.precision_at_k(np.zeros(3), np.ones(3), 0)


# --------------------------------------------------------------------------- object-level tests

def test_shapley_values_are_exact():
    # v(K) = 1 if K holds object 0 and 1 (a conjunction, like "are the two the same colour?"); 2 is idle
    v = {frozenset(K): float({0, 1} <= set(K)) for r in range(4) for K in itertools.combinations(range(3), r)}
    assert ob.shapley_values(v, 3) == pytest.approx([0.5, 0.5, 0.0])
    # a disjunction ("is there a circle or a square?" with two circles): both credited, not neither
    v = {frozenset(K): float(bool({0, 1} & set(K))) for r in range(4) for K in itertools.combinations(range(3), r)}
    assert ob.shapley_values(v, 3) == pytest.approx([0.5, 0.5, 0.0])
    rng = np.random.default_rng(0)
    v = {frozenset(K): float(rng.random()) for r in range(6) for K in itertools.combinations(range(5), r)}
    assert ob.shapley_values(v, 5).sum() == pytest.approx(v[frozenset(range(5))] - v[frozenset()])


def test_object_accuracy_fails_wrong_rankings():
    rows = []
    rng = np.random.default_rng(0)
    for k in range(600):
        n = int(rng.integers(2, 6))
        ref = set(rng.choice(n, size=int(rng.integers(1, n)), replace=False).tolist())
        for i in range(n):
            for test, eff in (("right", float(i in ref) + 0.01 * rng.random()), ("random", rng.random()),
                              ("inverted", float(i not in ref)), ("flat", 0.0)):
                rows.append({"sample_id": f"s{k}", "category": "X", "space": "pixels", "test": test,
                             "object": i, "referred": i in ref, "effect": eff})
    acc = ob.object_accuracy(pd.DataFrame(rows)).set_index("test")
    assert acc.loc["right", "accuracy"] == 1.0
    assert acc.loc["inverted", "accuracy"] == 0.0 and acc.loc["flat", "accuracy"] == 0.0  # ties are wrong
    r = acc.loc["random"]
    assert abs(r.accuracy - r.chance) < 0.06 and r.chance < 0.5
    with pytest.raises(ValueError, match="at least one referred"):
        ob.ranks_referred_first([1.0, 2.0], [True, True])


def test_variants_change_one_object_and_never_overlap(scenes):
    for s in [x for x in scenes if len(x.objects) >= 3][:20]:
        for var in ("color", "shape", "position"):
            vs = ob.variants(s, var)
            assert vs and all(v.target is not None for v in vs)
            for v in vs:
                diff = [i for i, (a, b) in enumerate(zip(s.objects, v.objects)) if a != b]
                assert diff == [v.target]
                boxes = [o.box for o in v.objects]
                for a, b in itertools.combinations(boxes, 2):
                    assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        assert len(ob.variants(s, "color")) == 5 * len(s.objects)
        assert len(ob.variants(s, "presence")) == 2 ** len(s.objects)
    with pytest.raises(ValueError, match="unknown variable"):
        ob.variants(scenes[0], "size")


@pytest.fixture(scope="module")
def rankable(shapes_handle):
    pool = [s for s in load_samples("shapes", 60, 5, handle=shapes_handle) if ob.rankable(s)]
    return {c: [s for s in pool if s.category == c][:2] for c in shapes.CATEGORIES}


def test_object_tests_find_the_referred_objects_in_both_spaces(shapes_handle, rankable):
    h = shapes_handle
    picked = rankable["QueryAttr"][:1] + rankable["CompareAttr"][:1] + rankable["LogicalObj"][:1]
    df = ob.object_tests(h, picked, progress=False)
    assert set(df.space) == {"pixels", "embeddings"} and set(df.test) == set(ob.TESTS)
    acc = ob.object_accuracy(df, by=("space", "test"))
    var = acc[acc.test == "variable"]
    assert (var.accuracy == 1.0).all() and (var.n_samples == 3).all()
    # not by a hair: in every sample the referred objects' log-odds change beats the others' by > 0.3
    v = df[df.test == "variable"]
    for _, g in v.groupby(["space", "sample_id"]):
        assert g[g.referred].effect.min() > g[~g.referred].effect.max() + 0.3
    # an unchanged scene moves nothing in either space
    s = picked[0]
    same = [ob.Variant("presence", None, tuple(range(len(s.objects))), tuple(s.objects))]
    for space in ob.SPACES:
        p0, p = ob.scene_distributions(h, s, same, space)
        assert ob.total_variation(p0, p[0]) < 1e-5
    # the embedding space changes only the edited object's patches: an edit of a far object's colour
    # does not reach the decoder input of another object's patches
    clean = ob.decoder_inputs(h, [s])[0]
    pos = grid.image_patch_positions(h, at.prepare_samples(h, [s]), 0, s.grid)
    e = ob.variants(s, "color")[0]
    edited = ob.decoder_inputs(h, [dataclasses.replace(s, image=s.render(e.keep, e.objects))])[0]
    changed = ob._changed_patches(np.asarray(s.image), np.asarray(s.render(e.keep, e.objects)), s.grid, s.patch_size)
    assert set(changed) == set(s.objects[e.target].patches)
    assert (edited[pos[changed]] - clean[pos[changed]]).abs().max() > 1e-3


def test_presence_tests_cannot_separate_look_alikes_but_the_variable_test_can(shapes_handle):
    """'Is the red object a square or a circle?' with three circles: removing any one leaves a circle, so
    p(answer) barely moves whichever is painted out; recolouring or reshaping the red one changes the answer."""
    h = shapes_handle
    base = shapes.generate(1, seed=9, start=74)[0]
    assert base.question == "Is the red object a square or a circle?" and base.referred == (2,)
    tv = ob.object_tests(h, [base], spaces=["pixels"], measure="tv", progress=False)
    assert tv[tv.test == "occlude"].effect.abs().max() < 0.02  # every circle can stand in for the red one
    var = tv[tv.test == "variable"].set_index("object").effect
    assert var[2] > 0.25 and var.drop(2).max() < 0.05  # one reshape of the red circle (to a square) flips it
    lo = ob.object_tests(h, [base], spaces=["pixels"], progress=False)  # log-odds: the same verdict, unsaturated
    var = lo[lo.test == "variable"].set_index("object").effect
    assert var[2] > var.drop(2).max() + 1.0
    assert not (tv.testable == False).any()  # noqa: E712 (the red circle's reshape to a square changes the truth)
    with pytest.raises(ValueError, match="unknown measure"):
        ob.distance(np.ones(3) / 3, np.ones((1, 3)) / 3, 0, "kl")


# --------------------------------------------------------------------------- attribution methods

def test_objectness_is_question_blind_and_finds_objects(shapes_handle):
    h = shapes_handle
    s = [x for x in load_samples("shapes", 12, 3, handle=h) if len(x.objects) >= 2][:3]
    a = at.objectness_scores(h, s, progress=False)
    other_q = [dataclasses.replace(x, question="What color is the cross?", constraints=()) for x in s]
    b = at.objectness_scores(h, other_q, progress=False)
    assert np.allclose(a.score, b.score, atol=1e-5)  # the question cannot reach the image tokens
    t = at.attribution_table(gt.patch_truth(s), {"objectness": a})
    # it finds every object (patches any object covers >= 15%), not the referred one
    found = [gt.auc(g.objectness, g["objectness (oracle)"] >= 0.15) for _, g in t.groupby("sample_id")]
    assert np.mean(found) > 0.95


def test_integrated_gradients_are_complete_and_group_restoration_efficient(shapes_handle):
    h = shapes_handle
    s = [x for x in load_samples("shapes", 18, 7, handle=h) if x.category == "QueryAttr" and len(x.objects) >= 2][:2]
    ig = at.integrated_gradients(h, s, n_steps=48, progress=False)
    for sid, g in ig.groupby("sample_id"):
        x = next(v for v in s if v.id == sid)
        assert (g.category == "QueryAttr").all() and (g.model == h.name).all()
        gold = at.answer_ids(h.processor, [x.answer])[0]
        probs = ob.probs(h, [x, blank_like(x)])  # plain forwards on the real and the blank image
        diff = float(probs[0, gold] - probs[1, gold])
        assert g.score.sum() == pytest.approx(diff, abs=0.02)  # completeness
    sigma = tr.noise_sigma(h, s, "image")
    gr = at.group_restoration_scores(h, s, n_noise=4, sigma=sigma, progress=False)
    for sid, g in gr.groupby("sample_id"):
        x = next(v for v in s if v.id == sid)
        c = tr.corrupt(h, x, "noise", "image", n_noise=4, sigma=sigma, seed=[v.id for v in s].index(sid))
        owned = g[g.owner >= 0]
        phi = owned.groupby("owner").score.first()
        emb = c.corrupted.clone()  # every owned patch clean, written directly (no restoring hooks)
        emb[:, owned.position.tolist()] = c.clean["resid.-1"][owned.position.tolist()]
        with torch.no_grad():
            p_all = float(next_token_probs(h, emb, None, c.position_ids)[:, c.answer_id].mean())
        assert phi.sum() == pytest.approx(p_all - c.p_corrupted, abs=1e-5)  # efficiency
    t = at.attribution_table(gt.patch_truth(s), {"integrated gradients": ig, "group restoration": gr})
    t = gt.shuffled(t, "integrated gradients", seed=3)
    summ = gt.summarize(gt.score_samples(t, ["integrated gradients", "group restoration",
                                             "integrated gradients (shuffled)"])).set_index(["method", "metric"])
    for m in ("integrated gradients", "group restoration"):
        assert summ.loc[(m, "precision@k"), "value"] > 0.7
    assert summ.loc[("integrated gradients (shuffled)", "precision@k"), "value"] < 0.5


# --------------------------------------------------------------------------- corruption, honestly

def test_corruption_effects_and_selection(shapes_handle):
    h = shapes_handle
    s = load_samples("shapes", 6, 2, handle=h)
    eff = tr.corruption_effects(h, s, corruptions=[("zero", "noise", "constraint", 0.0),
                                                   ("noise 3σ (constraint)", "noise", "constraint", 3.0),
                                                   ("blank image", "blank", "image", 0.0)],
                                n_noise=4, progress=False)
    zero = eff[eff.corruption == "zero"]
    assert (zero["drop"].abs() < 1e-6).all() and (zero.flipped == ~zero.correct).all()
    blank = eff[eff.corruption == "blank image"]
    assert len(blank) == 6 and (blank.p_clean.to_numpy() == pytest.approx(zero.p_clean.to_numpy(), abs=1e-5))
    summ = tr.corruption_summary(eff).set_index("corruption")
    assert summ.loc["zero", "share_drop"] == 0 and summ.loc["zero", "share_flipped"] == 0
    assert 0 <= summ.loc["blank image", "share_flipped"] <= 1
    ids, text = tr.select_by_effect(eff, "zero", below=0.5)
    assert len(ids) == 1 and text.startswith("only 0 of")  # nothing drops: the fallback says so
    ids, text = tr.select_by_effect(eff, "blank image", below=1.01)
    assert len(ids) == (blank.correct).sum() and "below 1.01" in text
    assert math.isclose(blank[blank.correct].p_corrupted.max(), eff.set_index(["corruption", "sample_id"]).loc[
        ("blank image", ids[-1]), "p_corrupted"])
    for only, who in ((True, "correctly answered "), (False, "")):  # nothing to select: the reason, in words
        assert tr.select_by_effect(eff, "no such corruption", only_correct=only) == (
            [], f"no {who}sample was corrupted with 'no such corruption'")


def test_recording_attention_names_an_architecture_without_eager_attention():
    class NoEager(torch.nn.Module):  # defined here: this test module has no eager_attention_forward
        pass

    with pytest.raises(RuntimeError, match="NoEager has no eager_attention_forward; attention weights cannot be "
                                           "recorded for this architecture"):
        at._recording_attention(NoEager(), None, None, None, None)
