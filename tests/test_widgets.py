"""The explorers' data logic: a selection in, the slice of a small table out (real numbers)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from microscope import geometry as G  # noqa: E402
from microscope import widgets as W  # noqa: E402
from microscope.plotting import trace_heatmap  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _norms():
    # two samples: sample 0 has tokens at positions 0 (image), 1 (question), 2 (last); sample 1 at 0 (image), 1 (last)
    tokens = pd.DataFrame({"sample_index": [0, 0, 0, 1, 1], "position": [0, 1, 2, 0, 1],
                           "role": ["image", "question", "last", "image", "last"]})
    rows = []
    for layer in (-1, 0, 1):
        rows.append(pd.DataFrame({"layer": layer, "role": tokens.role, "sample_index": tokens.sample_index,
                                  "value": 10 * (layer + 1) + np.arange(5.0)}))
    return pd.concat(rows, ignore_index=True), tokens


def test_norm_view_slices_roles_token_and_strip():
    norms, tokens = _norms()
    t = W.token_norms(norms, tokens)
    assert t.position.tolist() == [0, 1, 2, 0, 1] * 3
    by_role, token, strip = W.norm_view(t, ["image"], 1, 0, 2)
    assert sorted(by_role.value) == [0.0, 3.0, 10.0, 13.0, 20.0, 23.0]
    assert token.layer.tolist() == [-1, 0, 1] and token.value.tolist() == [2.0, 12.0, 22.0]
    assert strip.position.tolist() == [0, 1, 2] and strip.value.tolist() == [20.0, 21.0, 22.0]
    assert strip.role.tolist() == ["image", "question", "last"]
    _, token, strip = W.norm_view(t, ["last"], 0, 1, 1)
    assert token.value.tolist() == [4.0, 14.0, 24.0] and strip.value.tolist() == [13.0, 14.0]


def test_token_norms_refuses_a_token_table_of_another_store():
    norms, tokens = _norms()
    with pytest.raises(ValueError, match="rows per layer for 4 tokens"):
        W.token_norms(norms, tokens.iloc[:4])


def test_norms_explorer_defaults_and_redraw():
    norms, tokens = _norms()
    ex = W.norms_explorer(norms, tokens)
    assert ex.values() == {"roles": ("image", "question", "last"), "layer": 1, "sample": 0, "position": 2}
    fig = ex.figure(layer=0, position=1)
    strip = fig.axes[1]
    assert [round(p.get_height(), 6) for p in strip.patches] == [10.0, 11.0, 12.0]
    assert ex.values()["layer"] == 0


def _geometry():
    rows = []
    for metric, base in (("linearity", 0.5), ("id_twonn", 7.0)):
        for role, off in (("image", 0.0), ("text", 0.1)):
            for layer in range(4):
                rows.append({"model": "m", "metric": metric, "modality": role, "layer": layer,
                             "value": base + off + layer / 100, "ci_low": np.nan, "ci_high": np.nan,
                             "baseline": np.nan, "n": 10})
    return pd.DataFrame(rows)


def test_geometry_view_picks_metric_modalities_and_layer():
    df = _geometry()
    prof, at = W.geometry_view(df, "id_twonn", ["text"], 2)
    assert len(prof) == 4 and set(prof.modality) == {"text"}
    assert at.value.tolist() == pytest.approx([7.12])
    prof, at = W.geometry_view(df, "linearity", ["image", "text"], 0)
    assert sorted(at.value) == pytest.approx([0.5, 0.6])
    with pytest.raises(ValueError, match="no metric 'cka'"):
        W.geometry_view(df, "cka", ["image"], 0)


def test_pca_view_maps_modalities_to_store_roles():
    pts = pd.DataFrame({"role": ["image", "question", "last", "constraint", "template"], "pc1": range(5),
                        "pc2": range(5)})
    assert W.pca_view(pts, ["image"]).pc1.tolist() == [0]
    # the cloud holds the tokens the profile measured: template tokens are in no modality
    assert W.pca_view(pts, ["text"]).pc1.tolist() == [1, 2, 3]
    assert W.MODALITY_ROLES is G.MODALITIES


def test_geometry_explorer_computes_each_layers_cloud_once():
    df = _geometry()
    calls = []

    def points(layer):
        calls.append(layer)
        return pd.DataFrame({"role": ["image", "question"], "pc1": [layer, -layer], "pc2": [0.0, 1.0]})

    ex = W.geometry_explorer(df, points, layer=2)
    ex.figure()
    ex.figure(metric="id_twonn")  # same layer: the cloud is kept
    fig = ex.figure(layer=3)
    assert calls == [2, 3] and ex.computed == 2
    xs = sorted(float(x) for c in fig.axes[1].collections for x in c.get_offsets()[:, 0])
    assert xs == [-3.0, 3.0]


def _knockout():
    rows = []
    for sid, cat, base in (("a", "ChooseAttr", 0.8), ("b", "ChooseAttr", 0.5), ("c", "QueryAttr", 0.4)):
        for edge in ("image↛last", "question↛last"):
            for layer in range(3):
                blocked = base * (1 - 0.1 * (layer + 1)) if edge == "image↛last" else base
                rows.append({"sample_id": sid, "category": cat, "edge": edge, "layer": layer, "window": 1,
                             "p_base": base, "p_blocked": blocked, "change": (blocked - base) / base * 100})
    return pd.DataFrame(rows)


def test_knockout_view_gives_the_curves_and_the_samples_at_the_picked_point():
    df = _knockout()
    curves, at = W.knockout_view(df, "all", ["image↛last"], "image↛last", 1)
    assert len(curves) == 9 and set(curves.edge) == {"image↛last"}
    assert at.sample_id.tolist() == ["a", "b", "c"] and at.change.tolist() == pytest.approx([-20.0] * 3)
    assert at.p_blocked.tolist() == pytest.approx([0.64, 0.4, 0.32])
    curves, at = W.knockout_view(df, "QueryAttr", ["image↛last", "question↛last"], "question↛last", 2)
    assert len(curves) == 6 and at.sample_id.tolist() == ["c"] and at.change.tolist() == [0.0]


def test_knockout_explorer_resweeps_only_for_another_window():
    df = _knockout()
    sweeps = []

    def sweep(k):
        sweeps.append(k)
        return df.assign(window=k, change=df.change * k)

    ex = W.knockout_explorer(df, sweep, ["image↛last", "question↛last"], window=1, n_layers=3)
    ex.figure()
    ex.figure(category="ChooseAttr", edge="question↛last", layer=0)
    assert sweeps == []
    fig = ex.figure(k=2, edge="image↛last", layer=2)
    ex.figure(k=2, layer=1)
    assert sweeps == [2] and ex.computed == 1
    hist = fig.axes[1]
    assert sum(p.get_height() for p in hist.patches) == 2  # two ChooseAttr samples at that point
    mean = [ln for ln in hist.get_lines() if ln.get_label().startswith("mean")][0]
    assert mean.get_xdata()[0] == pytest.approx(-60.0)  # -30% at layer 2, times k = 2


def _trace():
    """A 2 × 2 patch grid (image tokens at positions 1..4), a constraint token at 5, last at 6; resid
    layers -1..1, mlp 0..1."""
    rows = []
    roles = ["template", "image", "image", "image", "image", "constraint", "last"]
    for site, layers in (("resid", (-1, 0, 1)), ("mlp", (0, 1))):
        for layer in layers:
            for pos, role in enumerate(roles):
                eff = 0.0 if pos < 5 and site == "mlp" else 0.01 * (pos + 1) * (layer + 2)
                rows.append({"model": "m", "sample_id": "s", "category": "", "site": site, "corruption": "noise",
                             "target": "constraint", "layer": layer, "position": pos, "role": role,
                             "group": role, "token": f"t{pos}", "answer_token": "x", "answer_source": "gold",
                             "p_clean": 0.9, "p_corrupted": 0.2, "p_restored": 0.2 + eff, "effect": eff})
    return pd.DataFrame(rows)


def test_trace_cell_and_patch_effects():
    d = _trace()
    c = W.trace_cell(d, "resid", 0, 6)
    assert c["token"] == "t6" and c["role"] == "last"
    assert c["effect"] == pytest.approx(0.14) and c["p_restored"] == pytest.approx(0.34)
    assert c["p_clean"] == 0.9 and c["p_corrupted"] == 0.2
    grid = W.patch_effects(d, "resid", 1, 2)
    np.testing.assert_allclose(grid, [[0.06, 0.09], [0.12, 0.15]])
    assert W.patch_effects(d, "resid", 1, 3) is None  # 4 image tokens are no 3 × 3 grid
    with pytest.raises(ValueError, match="0 rows at site 'mlp', layer -1"):
        W.trace_cell(d, "mlp", -1, 6)


def test_heatmap_cell_matches_the_drawn_map():
    d = _trace()
    # mlp: image tokens 1..4 have effect 0 at every layer and collapse into one column (position 1's)
    assert W.heatmap_cell(d, "mlp", 1, 6) == (3, 1)  # columns: 0, 1 (<image>×4), 5, 6
    assert W.heatmap_cell(d, "mlp", 0, 3) == (1, 0)
    assert W.heatmap_cell(d, "resid", -1, 6) == (6, 0)  # nothing collapses
    fig = trace_heatmap(d, "mlp")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[1] == "<image>×4 (0)" and labels[3] == "t6"


class _Sample:
    question, answer, image_size, patch_size, grid, visible_size = "q?", "a", 4, 2, 2, 4
    image = np.zeros((4, 4, 3))
    objects, referred = (), ()


def test_trace_explorer_traces_another_corruption_once_and_reports_the_restored_p():
    d = _trace()
    traced = []

    def trace(sid, cor):
        traced.append((sid, cor))
        return d.assign(corruption=cor, p_restored=d.p_restored / 2)

    ex = W.trace_explorer({("noise", "s"): d}, trace, lambda sid: _Sample(), ["s"], "s")
    assert ex.values() == {"sample": "s", "corruption": "noise", "site": "resid", "layer": 0, "position": 6}
    fig = ex.figure()
    assert "p 0.200 → 0.340 (clean 0.900)" in fig.axes[1].get_title()
    ex.figure(corruption="replace", site="mlp", layer=-1)  # mlp has no layer -1: drawn at layer 0
    ex.figure(corruption="replace", layer=1)
    assert traced == [("s", "replace")] and ex.computed == 1
    img = fig.axes[1].get_images()[-1].get_array()
    np.testing.assert_allclose(img, [[0.04, 0.06], [0.08, 0.10]])  # resid layer 0, positions 1..4


def test_edit_explorer_runs_each_selection_once():
    runs = []

    def run(method, site, layer):
        runs.append((method, site, layer))
        return {"efficacy": 0.5 + layer / 10, "generalization": 0.5, "specificity": 1.0}

    seen = []
    ex = W.edit_explorer(run, ["multedit", "rank_one"], ["mlp", "attn"], "multedit", "mlp", 1, 4,
                         plot=lambda d: seen.append(d) or plt.figure())
    ex.figure()
    ex.figure(layer=3)
    ex.figure(layer=1)
    assert runs == [("multedit", "mlp", 1), ("multedit", "mlp", 3)]
    assert seen[-1].method.tolist() == ["multedit · mlp · layer 1", "multedit · mlp · layer 3"]
    assert seen[-1].efficacy.tolist() == pytest.approx([0.6, 0.8])


def test_controls_refuse_values_outside_their_options():
    with pytest.raises(ValueError, match="outside 0..3"):
        W.slider(5, 0, 3, "layer")
    with pytest.raises(ValueError, match="'x' is not one of"):
        W.dropdown(["a", "b"], "x", "kind")
    with pytest.raises(ValueError, match=r"\['z'\] not among"):
        W.multi(["a"], ["z"], "roles")
    ex = W.norms_explorer(*_norms())
    with pytest.raises(ValueError, match="no control 'colour'"):
        ex.figure(colour="red")


def test_trace_explorer_token_menu_follows_the_sample():
    d = _trace()
    short = d[d.position < 6].assign(sample_id="t")  # sample t ends at the constraint token

    def trace(sid, cor):
        return short if sid == "t" else d

    ex = W.trace_explorer({("noise", "s"): d}, trace, lambda sid: _Sample(), ["s", "t"], "s")
    assert [v for _, v in ex.controls["position"].options] == [0, 1, 2, 3, 4, 5, 6]
    fig = ex.figure(sample="t")  # position 6 is not a token of t: the menu's last, 5, is picked
    assert [v for _, v in ex.controls["position"].options] == [0, 1, 2, 3, 4, 5]
    assert ex.values()["position"] == 5 and "'t5'" in fig.axes[1].get_title()
    ex.figure(position=2)
    assert ex.figure(sample="s") and ex.values()["position"] == 2  # still offered: kept


def test_trace_explorer_without_a_patch_grid_reports_the_cell_only():
    class Plain:  # a sample with no Shapes-world image (e.g. GQA)
        question = "what is it?"

    ex = W.trace_explorer({("noise", "s"): _trace()}, lambda sid, cor: None, lambda sid: Plain(), ["s"], "s")
    fig = ex.figure(layer=1, position=5)
    assert "p 0.200 → 0.380 (clean 0.900)" in fig.axes[1].get_title() and not fig.axes[1].get_images()
