"""Mllama (Llama-3.2-Vision): the text reads the image through gated cross-attention layers.

What the suite defines for it (microscope.crossattn, microscope.knockout) and the invariants that
hold it: the image's position is its <|image|> token, its vision states are what every
cross-attention layer reads; a knockout removes the vision states from target queries in the
cross-attention layers; tracing restores resid / mlp on both layer kinds and cross_attn in the
cross-attention ones; the clean-prefix cache keeps the cross-attention layers whole. The
family-parametrised invariants (roles, capture, empty plan, eager = sdpa, image↛text makes the
answer image-independent, the sweep equals full forwards, tracing runs) include it via
tests/tiny_models.py's MODELS."""

from __future__ import annotations

import pytest
import torch

import microscope
from microscope import attribution as at
from microscope import grid
from microscope import knockout as ko
from microscope import objects as ob
from microscope import tracing as tr
from microscope.crossattn import NotSupported, cross_inputs, vision_states
from microscope.errors import MicroscopeError
from microscope.extract import capture, extract
from microscope.prefix import expand, next_token_probs, prefix_of
from microscope.roles import ROLE_CODE
from tests.tiny_models import build_mllama


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    return microscope.load(str(build_mllama(tmp_path_factory.mktemp("mllama"))))


def _samples(h, n=3, seed=3):
    return microscope.data.load_samples("shapes", n, seed, handle=h)


def _logits(h, inputs, **kw):
    with torch.no_grad():
        return h.model(**inputs, use_cache=False, **kw).logits


def test_adapter_finds_the_cross_attention_layers_and_the_image_position(h):
    a = h.adapter
    assert a.cross_attention_layers == [1, 3] == list(h.model.config.text_config.cross_attention_layers)
    assert a.image_token_id == 128256 and a.attention(1) is a.layers[1].cross_attn
    assert a.attention(0) is a.layers[0].self_attn
    with pytest.raises(MicroscopeError, match="decoder layer 1 is a cross-attention layer.*no 'attn' site"):
        a.module("attn", 1)
    with pytest.raises(MicroscopeError, match="decoder layer 0 is a self-attention layer.*no 'cross_attn' site"):
        a.module("cross_attn", 0)
    b = microscope.prepare_samples(h, _samples(h))
    img = b.role_mask("image")
    assert img.sum(1).tolist() == [1, 1, 1]  # one <|image|> position per prompt, nothing else
    assert torch.equal(img, b.inputs["input_ids"] == 128256)
    # the processor lets positions read the image's tiles from its <|image|> token on, never before
    allowed = b.inputs["cross_attention_mask"].any(-1).any(-1).bool()
    first = img.int().argmax(1)
    for r in range(3):
        assert not allowed[r, :first[r]].any() and allowed[r, first[r]:].all()


def test_vision_states_are_what_the_cross_attention_layers_read(h):
    b = microscope.prepare_samples(h, _samples(h))
    seen = {}

    def pre(_m, _args, kwargs):
        seen["s"] = kwargs["cross_attention_states"]

    hook = h.adapter.layers[3].cross_attn.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        _logits(h, b.inputs)
    finally:
        hook.remove()
    states = vision_states(h, b.inputs)
    assert states.shape == (3, 2 * 17, 48)  # 2 tiles (one of them padding) × (4 × 4 patches + CLS)
    assert torch.equal(states, seen["s"].reshape(3, -1, 48))


def test_gated_cross_attention_layers_decompose_into_their_sites(h):
    """out = in + tanh(g_attn)·cross_attn + tanh(g_mlp)·r·mlp in a cross-attention layer, r = 0 for
    rows allowed no tile; in = out of the layer below; a self-attention layer has no cross_attn."""
    b = microscope.prepare_samples(h, _samples(h))
    L = h.adapter.n_layers
    with torch.no_grad(), capture(h, list(range(-1, L)), ["resid", "attn", "mlp", "cross_attn"]) as acts:
        h.model(**b.inputs)
    r = b.inputs["cross_attention_mask"].any(-1).any(-1)[..., None].float()
    for lay in range(L):
        x = acts[f"resid.{lay - 1}"]
        if lay in h.adapter.cross_attention_layers:
            layer = h.adapter.layers[lay]
            ga, gm = layer.cross_attn_attn_gate.tanh(), layer.cross_attn_mlp_gate.tanh()
            want = x + ga * acts[f"cross_attn.{lay}"] + gm * r * acts[f"mlp.{lay}"]
            assert not acts[f"attn.{lay}"].any()
        else:
            want = x + acts[f"attn.{lay}"] + acts[f"mlp.{lay}"]
            assert not acts[f"cross_attn.{lay}"].any()
        torch.testing.assert_close(want, acts[f"resid.{lay}"], rtol=1e-5, atol=1e-5)


def test_extraction_stores_the_cross_attention_site(h, tmp_path):
    s = _samples(h, n=2)
    store = extract(h, s, tmp_path / "acts", layers=[1, 2], sites=["resid", "cross_attn"], progress=False)
    X, t = store.load(1, roles=["image"], site="cross_attn")
    assert len(X) == 2 and set(t.role) == {"image"} and X.abs().sum() > 0
    b = microscope.prepare_samples(h, s)
    with torch.no_grad(), capture(h, [1], ["cross_attn"]) as acts:
        h.model(**b.inputs)
    torch.testing.assert_close(X, acts["cross_attn.1"][b.role_mask("image")], rtol=0, atol=1e-6)


def test_blocking_the_vision_states_from_every_position_closes_the_cross_attention_gates(h):
    """Every query losing every vision key in every cross-attention layer (vision=True, all
    positions) is the model with its cross-attention gates at tanh(0) = 0: bit-identical logits."""
    b = microscope.prepare_samples(h, _samples(h))
    every = torch.ones_like(b.roles, dtype=torch.bool)
    block = ko.Block(torch.zeros_like(every), every, h.adapter.cross_attention_layers, vision=True)
    with ko.knockout(h, [block]):
        blocked = _logits(h, b.inputs)
    gates = [h.adapter.layers[i].cross_attn_attn_gate for i in h.adapter.cross_attention_layers]
    saved = [g.detach().clone() for g in gates]
    try:
        with torch.no_grad():
            for g in gates:
                g.zero_()
        closed = _logits(h, b.inputs)
    finally:
        with torch.no_grad():
            for g, v in zip(gates, saved):
                g.copy_(v)
    assert torch.equal(blocked, closed)
    assert (blocked - _logits(h, b.inputs)).abs().max() > 1e-3  # and it is not the plain model


def test_a_cross_attention_block_changes_only_its_target_queries(h):
    b = microscope.prepare_samples(h, _samples(h))
    L = h.adapter.n_layers
    with torch.no_grad(), capture(h, list(range(-1, L))) as clean:
        h.model(**b.inputs)
    clean = dict(clean)
    last = b.role_mask("last")
    block = ko.edge_block(h, b, "image↛last", [1])
    with torch.no_grad(), capture(h, list(range(-1, L))) as acts, ko.knockout(h, [block]):
        h.model(**b.inputs)
    for lay in (-1, 0):
        assert torch.equal(acts[f"resid.{lay}"], clean[f"resid.{lay}"])
    assert torch.equal(acts["resid.1"][~last], clean["resid.1"][~last])  # non-target positions: untouched
    diff = (acts["resid.1"][last] - clean["resid.1"][last]).abs().amax(-1)
    assert (diff > 1e-4).all()
    # the target's cross-attention term is gone: resid.1 = resid.0 + tanh(g_mlp)·mlp at the last position
    with torch.no_grad(), capture(h, [0, 1], ["resid", "mlp"]) as k2, ko.knockout(h, [block]):
        h.model(**b.inputs)
    gm = h.adapter.layers[1].cross_attn_mlp_gate.tanh()
    torch.testing.assert_close(k2["resid.1"][last], (k2["resid.0"] + gm * k2["mlp.1"])[last], rtol=1e-5, atol=1e-6)


def test_image_to_text_needs_both_the_cross_attention_and_the_image_position(h):
    """image↛text in the cross-attention layers alone leaves the answer image-dependent: the
    <|image|> position reads the vision states and passes them on by self-attention. With the
    self-attention layers too (edge_block over every layer) the answer is image-independent."""
    s = _samples(h, n=2, seed=5)
    b = microscope.prepare(h, [s[0].image, s[1].image], [s[0].question] * 2)
    cross_only = ko.edge_block(h, b, "image↛text", h.adapter.cross_attention_layers)
    with ko.knockout(h, [cross_only]):
        x = _logits(h, b.inputs)[:, -1]
    assert (x[0] - x[1]).abs().max() > 1e-4
    with ko.knockout(h, [ko.edge_block(h, b, "image↛text", range(h.adapter.n_layers))]):
        y = _logits(h, b.inputs)[:, -1]
    assert (y[0] - y[1]).abs().max() < 1e-5


def test_blocks_say_whether_they_block_the_vision_states(h, shapes_handle):
    b = microscope.prepare_samples(h, _samples(h, n=1))
    src, tgt = ko.edge_masks(h, b, "image↛last")
    with pytest.raises(MicroscopeError, match=r"reaches cross-attention layer\(s\) \[1\].*vision=True"):
        with ko.knockout(h, [ko.Block(src, tgt, [0, 1])]):
            pass
    with ko.knockout(h, [ko.Block(src, tgt, [0, 2])]):  # self-attention layers only: positions as usual
        pass
    with pytest.raises(MicroscopeError, match="vision=True, but this model has no cross-attention layers"):
        sb = microscope.prepare_samples(shapes_handle, microscope.data.shapes.generate(1, 0))
        s2, t2 = ko.edge_masks(shapes_handle, sb, "image↛last")
        with ko.knockout(shapes_handle, [ko.Block(s2, t2, [0], vision=True)]):
            pass
    assert ko.edge_block(h, b, "question↛last", [1]).vision is False
    assert not microscope.attention.active()


def test_the_clean_prefix_keeps_the_cross_attention_layers_whole(h):
    """Suffix forwards after the clean prefix cache equal whole-prompt forwards and the model's own
    logits; a prefix that slices the cross-attention layers is refused."""
    b = microscope.prepare_samples(h, _samples(h, n=1))
    inputs = dict(b.inputs)
    with torch.no_grad(), capture(h, [-1]) as acts:
        out = h.model(**inputs, use_cache=True)
    p_model = out.logits[0, -1].float().softmax(-1)
    ctx = cross_inputs(h, inputs)
    e = acts["resid.-1"]
    with torch.no_grad():
        whole = next_token_probs(h, e, None, ctx)[0]
        diffs = []
        for first in (1, 8, 12, e.shape[1] - 1):
            prefix = prefix_of(out, first, keep=h.adapter.cross_attention_layers)
            assert prefix[1][0].shape[-2] == 34 and prefix[0][0].shape[-2] == first
            diffs.append(float((next_token_probs(h, e[:, first:], prefix, ctx)[0] - whole).abs().max()))
    assert float((whole - p_model).abs().max()) < 1e-6 and max(diffs) < 1e-6, diffs
    with pytest.raises(MicroscopeError, match="cross-attention layers are \\[1, 3\\]"):
        expand(h, prefix_of(out, 8), 1)


def _close(a: float, b: float, rel: float = 1e-4) -> bool:
    """Equal up to float rounding, relative to ``b`` (random weights give the answer p ~ 1e-5)."""
    return abs(a - b) <= rel * abs(b)


def test_restoring_a_layer_undoes_the_corruption_on_both_layer_kinds(h):
    s = _samples(h, n=2)[1]
    c = tr.corrupt(h, s, n_noise=3, sigma=3.0)
    assert c.prefix is not None and not _close(c.p_corrupted, c.p_clean, 1e-2)
    T, L = c.n_tokens, h.adapter.n_layers
    every = list(range(T))
    p = tr.restore(c, [("resid", [lay], every) for lay in range(-1, L)] + [("cross_attn", [1], [])])
    assert all(_close(x, c.p_clean) for x in p[:-1]), (p, c.p_clean)
    assert p[-1] == c.p_corrupted  # restoring nothing: the corrupted run
    # every site of every layer, after the decoder input: the clean run again
    allsites = [("resid", [-1], every)] + [(k, list(range(L)), every) for k in ("attn", "cross_attn", "mlp")]
    assert _close(tr.restore(c, allsites)[0], c.p_clean)
    # restoring a site a layer lacks restores nothing; cross_attn in a cross-attention layer acts
    none, some = tr.restore(c, [("cross_attn", [0, 2], every), ("cross_attn", [1, 3], every)])
    assert _close(none, c.p_corrupted, 1e-6) and not _close(some, c.p_corrupted, 1e-5)


def test_a_restored_cross_attention_output_is_the_clean_one(h):
    s = _samples(h, n=2)[1]
    c = tr.corrupt(h, s, n_noise=2, sigma=3.0)
    pos = torch.arange(c.first, c.n_tokens) - c.first
    rows = torch.arange(2).repeat_interleave(len(pos))
    with torch.no_grad(), tr._restoring(h, c.clean, {("cross_attn", 3): (rows, pos.repeat(2))}, c.first), \
            capture(h, [3], ["cross_attn"]) as acts:
        next_token_probs(h, c.corrupted[:, c.first:], c.prefix, c.position_ids)
    clean = c.clean["cross_attn.3"][c.first:]
    assert torch.equal(acts["cross_attn.3"][0], clean) and torch.equal(acts["cross_attn.3"][1], clean)


def test_trace_has_a_cross_attention_kind(h):
    s = _samples(h, n=2)[1]
    df = tr.trace(h, s, sites=["cross_attn", "resid"], n_noise=2, sigma=3.0, window=1)
    cross = df[df.site == "cross_attn"]
    assert set(cross.layer) == set(range(4))
    # window 1 on a self-attention layer restores nothing: effect 0 (up to the rounding of another batch)
    p = df.p_corrupted.iloc[0]
    assert (cross[cross.layer.isin([0, 2])].effect.abs() <= 1e-6 * p).all()
    assert (cross[cross.layer.isin([1, 3])].effect.abs() > 1e-5 * p).any()


def test_what_needs_patch_tokens_is_refused_naming_mllama(h):
    s = _samples(h, n=1)
    b = microscope.prepare_samples(h, s)
    msg = "not supported for .*MllamaForConditionalGeneration.*cross-attention layers"
    for call in (lambda: ko.edge_masks(h, b, "related-image↛question", [[0]]),
                 lambda: tr.corrupt(h, s[0], target="image"),
                 lambda: at.restoration_scores(h, s, progress=False),
                 lambda: at.integrated_gradients(h, s, progress=False),
                 lambda: at.objectness_scores(h, s, progress=False),
                 lambda: at.attention_contributions(h, s, progress=False),
                 lambda: ob.object_tests(h, s, progress=False),
                 lambda: grid.image_patch_positions(h, b, 0)):
        with pytest.raises(NotSupported, match=msg):
            call()
    with pytest.warns(UserWarning, match="related/other-image edges skipped: .*not supported"):
        df = ko.sweep(h, s, window=1, only_correct=False, progress=False)
    assert set(df.edge) == {"image↛question", "image↛last", "question↛last", "last↛last"}
    with pytest.warns(UserWarning, match="noise on image tokens left out"):
        eff = tr.corruption_effects(h, s, n_noise=2)
    assert "blank image" in set(eff.corruption) and "noise 3σ (image)" not in set(eff.corruption)
    assert int(ROLE_CODE["image"]) in b.roles[0].tolist()
    # object tests on redrawn images need no patch positions: they run
    obj = ob.object_tests(h, _samples(h, n=2), spaces=["pixels"], only_correct=False, progress=False)
    assert len(obj) and set(obj.space) == {"pixels"} and obj.effect.notna().all()


def test_editing_by_layer_leaves_out_the_sites_a_layer_does_not_have(h):
    """The by-layer editing sweep edits the MLP of every layer and the self-attention of the
    self-attention layers only: a cross-attention layer has no ``attn`` site to edit."""
    from microscope import editing as ed
    from microscope.data import shapes

    samples = shapes.generate(6, seed=3)
    reqs = ed.requests(samples[:2], "circle")
    by = ed.by_layer(h, reqs, reqs, samples[2:], method="multedit", position="last", progress=False, steps=2)
    got = {(r.site, r.layer) for r in by.itertuples()}
    assert got == {("mlp", 0), ("mlp", 1), ("mlp", 2), ("mlp", 3), ("attn", 0), ("attn", 2)}
    with pytest.raises(MicroscopeError, match="cannot edit layer 3's attn"):
        ed.edit(h, reqs, 3, "multedit", "attn", "last", steps=2)
