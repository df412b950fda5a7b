"""Attention knockout: invariants, the batched sweep against one forward per
window, edges, errors, and the logit lens."""

from __future__ import annotations

import pytest
import torch

import microscope
from microscope import grid
from microscope import knockout as ko
from microscope.data import load_samples, shapes
from microscope.extract import capture
from microscope.lens import logit_lens
from tests.tiny_models import MODELS

HANDLES = ["shapes", *MODELS]


def _samples(handle, n=6, seed=11):
    return load_samples("shapes", n, seed, handle=handle)  # on the model's patch grid where it has one


def _logits(handle, batch):
    with torch.no_grad():
        return handle.model(**batch.inputs, use_cache=False).logits


@pytest.mark.parametrize("name", HANDLES)
def test_empty_plan_gives_identical_logits(handles, name):
    h = handles[name]
    batch = microscope.prepare_samples(h, _samples(h))
    base = _logits(h, batch)
    for impl in (None, "sdpa"):
        with ko.knockout(h, [], implementation=impl):
            same = _logits(h, batch)
        assert torch.equal(base, same)


@pytest.mark.parametrize("name", HANDLES)
def test_eager_and_sdpa_agree_under_a_plan(handles, name):
    h = handles[name]
    batch = microscope.prepare_samples(h, _samples(h))  # different lengths: left padding included
    plan = [ko.edge_block(h, batch, "question↛last", [0, 1]), ko.edge_block(h, batch, "image↛question", [1, 2])]
    real = batch.roles != microscope.roles.ROLE_CODE["pad"]
    with ko.knockout(h, plan, implementation="sdpa"):
        a = _logits(h, batch)
    with ko.knockout(h, plan, implementation="eager"):
        b = _logits(h, batch)
    base = _logits(h, batch)
    assert (a[real] - b[real]).abs().max() < 1e-4
    assert (a[:, -1] - base[:, -1]).abs().max() > 1e-3  # the plan did something


@pytest.mark.parametrize("name", HANDLES)
def test_blocking_image_from_all_text_makes_last_logits_image_independent(handles, name):
    h = handles[name]
    s = _samples(h, n=2, seed=5)
    q = s[0].question
    batch = microscope.prepare(h, [s[0].image, s[1].image], [q, q])
    base = _logits(h, batch)[:, -1]
    assert (base[0] - base[1]).abs().max() > 1e-3  # the image matters without the knockout
    with ko.knockout(h, [ko.edge_block(h, batch, "image↛text", range(h.adapter.n_layers))]):
        blocked = _logits(h, batch)[:, -1]
    assert (blocked[0] - blocked[1]).abs().max() < 1e-5


@pytest.mark.parametrize("name", HANDLES)
def test_a_plan_on_layer_l_leaves_everything_below_unchanged(handles, name):
    h = handles[name]
    batch = microscope.prepare_samples(h, _samples(h, n=3))
    L = h.adapter.n_layers
    layers = list(range(-1, L))
    src, tgt = ko.edge_masks(h, batch, "question↛last")
    with torch.no_grad(), capture(h, layers) as clean:
        h.model(**batch.inputs)
    clean = dict(clean)
    lay = 2
    with torch.no_grad(), capture(h, layers) as acts, ko.knockout(h, [ko.Block(src, tgt, [lay])]):
        h.model(**batch.inputs)
    for i in range(-1, lay):
        assert torch.equal(acts[f"resid.{i}"], clean[f"resid.{i}"]), i
    assert not torch.allclose(acts[f"resid.{lay}"], clean[f"resid.{lay}"])


def test_the_vision_tower_is_untouched_and_everything_is_restored_after_an_error(shapes_handle, monkeypatch):
    h = shapes_handle
    batch = microscope.prepare_samples(h, _samples(h, n=2))
    untouched = _logits(h, batch)
    pv = batch.inputs["pixel_values"]
    with torch.no_grad():
        feats = h.model.model.get_image_features(pixel_values=pv)
    src, tgt = ko.edge_masks(h, batch, "image↛text")
    before = h.adapter.layers[0].self_attn.config._attn_implementation
    tower_impl = h.model.config.vision_config._attn_implementation
    routed = []  # every attention module that runs through the knockout function
    real_state = microscope.attention.state
    monkeypatch.setattr(microscope.attention, "state", lambda m: routed.append(id(m)) or real_state(m))
    decoder = {id(lay.self_attn) for lay in h.adapter.layers}
    with pytest.raises(KeyError), ko.knockout(h, [ko.Block(src, tgt, range(6))]):
        assert h.model.config.vision_config._attn_implementation == tower_impl
        with torch.no_grad():
            inside = h.model.model.get_image_features(pixel_values=pv)
        assert routed == []  # the tower's attention never reaches the knockout
        with torch.no_grad():
            h.model(**batch.inputs)
        assert set(routed) == decoder  # a whole forward routes exactly the decoder's layers
        raise KeyError("boom")
    f0 = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    f1 = inside.pooler_output if hasattr(inside, "pooler_output") else inside
    for x, y in zip(f0, f1):
        assert torch.equal(x, y)
    assert h.adapter.layers[0].self_attn.config._attn_implementation == before
    assert not microscope.attention.active()
    assert torch.equal(_logits(h, batch), untouched)  # nothing left patched after the error


def test_related_and_other_image_partition_the_image_tokens(shapes_handle):
    h = shapes_handle
    s = [x for x in _samples(h, n=12) if x.referred_patches()][:4]
    batch = microscope.prepare_samples(h, s)
    rel = [x.referred_patches() for x in s]
    r, q = ko.edge_masks(h, batch, "related-image↛question", rel)
    o, _ = ko.edge_masks(h, batch, "other-image↛question", rel)
    img = batch.role_mask("image")
    assert torch.equal(r | o, img) and not (r & o).any()
    assert r.sum(1).tolist() == [len(p) for p in rel]
    assert torch.equal(q, batch.role_mask(["question", "constraint"]))
    # the related tokens are the patches the referred object covers, in raster order
    pos = grid.image_patch_positions(h, batch, 0)
    assert r[0].nonzero().flatten().tolist() == pos[list(rel[0])].tolist()


def test_sweep_equals_one_full_forward_per_window_centre(shapes_handle):
    h = shapes_handle
    s = _samples(h, n=8, seed=2)
    df = ko.sweep(h, s, window=3, batch_size=7, progress=False)
    assert len(df) > 0 and df.window.eq(3).all()
    assert set(df.edge) <= set(ko.SWEEP_EDGES)
    sid = df.sample_id.iloc[0]
    sample = next(x for x in s if x.id == sid)
    batch = microscope.prepare_samples(h, [sample])
    gold = microscope.answers.answer_ids(h.processor, [sample.answer])[0]
    for edge in ("image↛question", "question↛last", "related-image↛question"):
        src, tgt = ko.edge_masks(h, batch, edge, [sample.referred_patches()])
        for c in range(6):
            w = ko.window_layers(c, 3, 6)
            with ko.knockout(h, [ko.Block(src, tgt, list(w))]):
                p = _logits(h, batch)[0, -1].softmax(-1)[gold].item()
            row = df[(df.sample_id == sid) & (df.edge == edge) & (df.layer == c)].iloc[0]
            assert row.p_blocked == pytest.approx(p, abs=1e-5)
            assert (row.layer_lo, row.layer_hi) == (w.start, w.stop - 1)
            assert row.change == pytest.approx((row.p_blocked - row.p_base) / row.p_base * 100)
    # the base probability is the unpatched model's
    assert df[df.sample_id == sid].p_base.iloc[0] == pytest.approx(
        _logits(h, batch)[0, -1].softmax(-1)[gold].item(), abs=1e-6)


def test_sweep_keeps_only_correct_samples_and_predict_reports_accuracy(shapes_handle):
    h = shapes_handle
    s = _samples(h, n=16, seed=4)
    plain = ko.predict(h, s, progress=False)
    df = ko.sweep(h, s, edges=["image↛last"], progress=False)
    assert set(df.sample_id) == set(plain.sample_id[plain.correct])
    assert len(df) == plain.correct.sum() * h.adapter.n_layers
    blind = ko.predict(h, s, "image↛text", progress=False)
    assert plain.correct.mean() > 0.8
    # without the image in any layer, the prediction is one per question text
    batch_q = {}
    for row, smp in zip(blind.itertuples(), s):
        batch_q.setdefault(smp.question, set()).add(row.prediction)
    assert all(len(v) == 1 for v in batch_q.values())


def test_window_defaults_and_clipping():
    assert ko.knockout_window(32) == 9
    assert ko.knockout_window(40) == 13
    assert ko.knockout_window(6) == 3
    assert ko.knockout_window(1) == 1
    assert list(ko.window_layers(0, 9, 32)) == list(range(0, 5))
    assert list(ko.window_layers(31, 9, 32)) == list(range(27, 32))
    assert list(ko.window_layers(10, 9, 32)) == list(range(6, 15))
    assert list(ko.window_layers(2, 1, 6)) == [2]


def test_bad_input_gets_clear_errors(handles):
    h = handles["shapes"]
    batch = microscope.prepare_samples(h, _samples(h, n=2))
    with pytest.raises(ValueError, match="named edges"):
        ko.parse_edge("image to last")
    with pytest.raises(ValueError, match="unknown role"):
        ko.parse_edge("pixels↛last")
    with pytest.raises(ValueError, match="only be a source"):
        ko.parse_edge("question->related-image")
    src, tgt = ko.edge_masks(h, batch, "image->last")
    with pytest.raises(ValueError, match="out of range"), ko.knockout(h, [ko.Block(src, tgt, [6])]):
        pass
    with pytest.raises(ValueError, match="sdpa' or 'eager"), ko.knockout(h, [], implementation="flash_attention_2"):
        pass
    with pytest.raises(ValueError, match="related patches"):
        ko.edge_masks(h, batch, "related-image↛question")
    with pytest.raises(ValueError, match="window"):
        ko.sweep(h, _samples(h, n=1), window=0)
    other = microscope.prepare_samples(h, _samples(h, n=3))
    with pytest.raises(ValueError, match="same batch"), ko.knockout(h, [ko.Block(src, tgt, [0])]):
        _logits(h, other)
    nxt = handles["llava_next"]
    nb = microscope.prepare_samples(nxt, _samples(nxt, n=1))
    with pytest.raises(ValueError, match="must lie in"):
        ko.edge_masks(nxt, nb, "related-image↛question", [[16]])
    assert not microscope.attention.active()


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_anyres_related_patches_are_the_base_view_grid(handles, name):
    h = handles[name]
    batch = microscope.prepare_samples(h, _samples(h, n=1))
    img = batch.role_mask("image")[0].nonzero().flatten()
    assert len(img) > 16  # base view (4 x 4) + anyres crops + newline tokens
    pos = grid.image_patch_positions(h, batch, 0)
    assert pos.tolist() == img[:16].tolist()
    # those positions hold the base (whole-image) view's projected patches, in raster order
    inner, cfg = h.model.model, h.model.config
    with torch.no_grad(), capture(h, [-1]) as acts:
        h.model(**batch.inputs)
        hs = inner.vision_tower(batch.inputs["pixel_values"][:, 0], output_hidden_states=True).hidden_states
        feats = hs[cfg.vision_feature_layer]
        base = inner.multi_modal_projector(feats[:, 1:] if cfg.vision_feature_select_strategy == "default" else feats)
    torch.testing.assert_close(acts["resid.-1"][0, pos], base[0], rtol=0, atol=1e-5)
    r, _ = ko.edge_masks(h, batch, "related-image↛question", [[0, 5]])
    o, _ = ko.edge_masks(h, batch, "other-image↛question", [[0, 5]])
    assert r[0].nonzero().flatten().tolist() == [int(img[0]), int(img[5])]
    assert int(o.sum()) == 14 and not (r & o).any()


def test_logit_lens_last_layer_is_the_model_output(shapes_handle):
    h = shapes_handle
    s = _samples(h, n=5)
    df = logit_lens(h, s, progress=False)
    assert set(df.layer) == set(range(6)) and set(df.variant) == {"lower"}  # word-level vocab: no "Red"
    batch = microscope.prepare_samples(h, s)
    probs = _logits(h, batch)[:, -1].softmax(-1)
    gold = microscope.answers.answer_ids(h.processor, [x.answer for x in s])
    last = df[df.layer == 5].set_index("sample_id")
    for x, g, p in zip(s, gold, probs):
        assert last.loc[x.id, "prob"] == pytest.approx(p[g].item(), abs=1e-5)
        assert last.loc[x.id, "rank"] == int((p > p[g]).sum())
    assert ((df.prob >= 0) & (df.prob <= 1)).all() and (df["rank"] >= 0).all()


def test_answer_variants_find_capitalised_tokens_when_the_vocabulary_has_them():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "red": 1, "Red": 2, "blue": 3}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")
    assert microscope.answers.variant_id(tok, "red", "capitalised") == 2
    assert microscope.answers.variant_id(tok, "blue", "capitalised") is None
    assert microscope.answers.answer_ids(tok, ["red", "blue"]) == [1, 3]
    with pytest.raises(ValueError, match="no token"):
        microscope.answers.answer_ids(tok, ["green"])


@pytest.mark.parametrize("name", MODELS)
def test_sweep_on_other_layouts_matches_full_forwards(handles, name):
    h = handles[name]
    s = _samples(h, n=2, seed=8)
    df = ko.sweep(h, s, edges=["image↛question", "question↛last"], window=1, only_correct=False, progress=False)
    assert len(df) == 2 * 2 * h.adapter.n_layers
    for row in df.sample(6, random_state=0).itertuples():
        sample = next(x for x in s if x.id == row.sample_id)
        batch = microscope.prepare_samples(h, [sample])
        gold = microscope.answers.answer_ids(h.processor, [sample.answer])[0]
        with ko.knockout(h, [ko.edge_block(h, batch, row.edge, [row.layer])]):
            p = _logits(h, batch)[0, -1].softmax(-1)[gold].item()
        assert row.p_blocked == pytest.approx(p, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "glm4v"])
def test_dynamic_resolution_patch_grid_is_raster_over_merged_patches(handles, name):
    """Qwen2-VL: Shapes samples are drawn at a side the processor keeps (112 px here → 8 × 8
    patches → 4 × 4 tokens), and image token k covers cell k of that grid in raster order: a
    change to one 28-px cell changes exactly the k-th group of m² patch rows the merger joins."""
    h = handles[name]
    s = _samples(h, n=2)
    assert (s[0].image_size, s[0].patch_size, s[0].grid) == (112, 28, 4)
    b = microscope.prepare_samples(h, s)
    assert grid.image_patch_positions(h, b, 1).tolist() == b.role_mask("image")[1].nonzero().flatten().tolist()
    import numpy as np
    from PIL import Image

    base = np.full((112, 112, 3), 200, np.uint8)
    ip = h.processor.image_processor
    ref = ip(images=[Image.fromarray(base)], return_tensors="pt")["pixel_values"]
    for r, c in ((0, 0), (1, 2), (3, 3)):
        img = base.copy()
        img[28 * r:28 * (r + 1), 28 * c:28 * (c + 1)] = 0
        px = ip(images=[Image.fromarray(img)], return_tensors="pt")["pixel_values"]
        changed = ((px - ref).abs().sum(-1) > 0).nonzero().flatten() // 4  # m² = 4 patch rows per token
        assert set(changed.tolist()) == {4 * r + c}
    df = ko.sweep(h, s, edges=["related-image↛question", "other-image↛question"], only_correct=False,
                  progress=False)
    assert len(df) == 2 * 2 * 4


def test_samples_on_another_patch_grid_are_refused(handles):
    h = handles["llava15"]  # 4 x 4 patches
    s = shapes.generate(2, 0)  # drawn on the default 6 x 6 grid
    with pytest.raises(ValueError, match="6×6 grid but .* 4×4 grid: load samples with load_samples"):
        ko.sweep(h, s, only_correct=False, progress=False)


BIDIRECTIONAL = ["gemma3", "paligemma"]


def _manual_logits(h, batch, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Logits with (query, key) pairs removed from the model's own masks in every layer, built by
    hand: the model's mask builder for the processor's token_type_ids, edited, passed as the mask."""
    m = h.model
    inputs = batch.inputs
    probe = torch.zeros(*inputs["input_ids"].shape, 1)
    masks = type(m).create_masks_for_generate(config=m.config, inputs_embeds=probe,
                                              attention_mask=inputs["attention_mask"], cache=None, position_ids=None,
                                              token_type_ids=inputs["token_type_ids"], is_first_iteration=True)
    cut = (query[:, :, None] & key[:, None, :])[:, None]

    def edit(mask):
        return mask & ~cut if mask.dtype == torch.bool else mask.masked_fill(cut, torch.finfo(mask.dtype).min)

    masks = {k: edit(v) for k, v in masks.items()} if isinstance(masks, dict) else edit(masks)
    with torch.no_grad():
        return m(**{k: v for k, v in inputs.items() if k != "attention_mask"}, attention_mask=masks).logits


@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_bidirectional_image_blocks_are_read_off_the_models_own_mask(handles, name):
    """Gemma 3: image tokens read their whole image, every other query reads no later position;
    PaliGemma: the whole prompt is one bidirectional prefix. Causal families have no reach."""
    h = handles[name]
    batch = microscope.prepare_samples(h, _samples(h, n=2))
    reach = h.adapter.attention_reach(batch.inputs)
    T = reach.shape[1]
    pos = torch.arange(T).expand_as(reach)
    image, real = batch.role_mask("image"), batch.inputs["attention_mask"].bool()
    if name == "gemma3":
        for i in range(2):
            img = image[i].nonzero().flatten()
            assert (reach[i, img] == img.max()).all()  # every image token reads the last one
            assert torch.equal(reach[i][~image[i] & real[i]], pos[i][~image[i] & real[i]])  # text: causal
    else:
        assert (reach[real] == T - 1).all()
    assert handles["llava15"].adapter.attention_reach is None and not handles["llava15"].adapter.bidirectional


@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_knockout_on_bidirectional_families_equals_a_hand_edited_mask(handles, name):
    """image↛last and image↛image (both directions inside the image block) in every layer equal the
    model run on its own masks with those pairs removed by hand; text queries' edges change them."""
    h = handles[name]
    batch = microscope.prepare_samples(h, _samples(h, n=2))
    base = _logits(h, batch)
    L = range(h.adapter.n_layers)
    for edge in ("image↛last", "image↛image"):
        src, tgt = ko.edge_masks(h, batch, edge)
        with ko.knockout(h, [ko.Block(src, tgt, L)]):
            got = _logits(h, batch)
        want = _manual_logits(h, batch, tgt, src)
        real = batch.inputs["attention_mask"].bool()
        torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
        assert (got[:, -1] - base[:, -1]).abs().max() > 1e-3, edge
    if name == "gemma3":  # the first image token reads later image tokens: image↛image changes it at layer 0
        src, tgt = ko.edge_masks(h, batch, "image↛image")
        first = int(batch.role_mask("image")[0].nonzero().min())
        with torch.no_grad(), capture(h, [0]) as clean:
            h.model(**batch.inputs)
        clean = dict(clean)
        with torch.no_grad(), capture(h, [0]) as acts, ko.knockout(h, [ko.Block(src, tgt, [0])]):
            h.model(**batch.inputs)
        assert not torch.allclose(acts["resid.0"][0, first], clean["resid.0"][0, first])


def test_gemma3_pooled_image_tokens_form_a_patch_grid(handles):
    """Gemma 3 average-pools its tower's 8 × 8 patches 2 × 2 into 16 image tokens in raster order:
    one token covers 28 px, samples are drawn on that 4 × 4 grid, and related/other-image edges work."""
    from microscope.grid import image_geometry, patch_grid

    h = handles["gemma3"]
    assert image_geometry(h.model) == (112, 28) and patch_grid(h.model) == 4
    s = next(x for x in _samples(h, n=20) if x.referred_patches())
    assert s.grid == 4
    batch = microscope.prepare_samples(h, [s])
    src, tgt = ko.edge_masks(h, batch, "related-image↛question", [s.referred_patches()])
    image = batch.role_mask("image")[0].nonzero().flatten()
    assert torch.equal(src[0].nonzero().flatten(), image[list(s.referred_patches())])


def test_a_shared_position_mask_blocks_the_same_edges_in_every_row(shapes_handle):
    """A ``(T,)`` source/target pair is the ``(B, T)`` pair repeated on every row, with plain layers and
    with per-row ``(B, n_layers)`` layers; rows whose layers are all False are untouched."""
    h = shapes_handle
    s = _samples(h, n=2, seed=5)
    q = s[0].question
    batch = microscope.prepare(h, [s[0].image, s[1].image], [q, q])  # one question: same positions per row
    src, tgt = batch.role_mask("image")[0], batch.role_mask("last")[0]
    assert src.ndim == 1 and src.any() and tgt.any()
    L = h.adapter.n_layers
    base = _logits(h, batch)[:, -1]
    with ko.knockout(h, [ko.Block(src, tgt, range(L))]):
        shared = _logits(h, batch)[:, -1]
    with ko.knockout(h, [ko.Block(src.expand(2, -1), tgt.expand(2, -1), range(L))]):
        per_row = _logits(h, batch)[:, -1]
    assert torch.equal(shared, per_row)
    assert (shared - base).abs().amax(-1).min() > 1e-3  # both rows changed
    rows = torch.zeros(2, L, dtype=torch.bool)
    rows[1] = True  # only row 1 is blocked, in every layer
    with ko.knockout(h, [ko.Block(src, tgt, rows)]):
        one = _logits(h, batch)[:, -1]
    assert torch.allclose(one[0], base[0], atol=1e-5) and torch.allclose(one[1], shared[1], atol=1e-5)
    with pytest.raises(ValueError, match=r"per-row layers must be a \(B, 6\) boolean tensor, got \(3, 6\)"):
        with ko.knockout(h, [ko.Block(src.expand(2, -1), tgt.expand(2, -1), torch.ones(3, L, dtype=torch.bool))]):
            pass


def test_sweep_names_a_bad_batch_size_and_warns_only_when_patch_edges_are_asked_for(shapes_handle, monkeypatch):
    h = shapes_handle
    s = _samples(h, n=1, seed=3)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        ko.sweep(h, s, batch_size=0, progress=False)

    def no_grid(*_a, **_k):
        raise ValueError("no patch grid here")

    monkeypatch.setattr(ko, "image_patch_positions", no_grid)  # a layout without a patch grid
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: no related/other-image edge was asked for
        df = ko.sweep(h, s, edges=["image↛last"], window=3, only_correct=False, progress=False)
    assert set(df.edge) == {"image↛last"} and len(df) == h.adapter.n_layers
    with pytest.warns(UserWarning, match="related/other-image edges skipped: no patch grid here"):
        df = ko.sweep(h, s, edges=["related-image↛last", "image↛last"], window=3, only_correct=False,
                      progress=False)
    assert set(df.edge) == {"image↛last"}


def test_predict_blocks_each_rows_own_related_patches(shapes_handle):
    """A batch of samples under a related-image edge gives each sample what it gets alone: every row's
    related patches are its own sample's."""
    h = shapes_handle
    s = [x for x in _samples(h, n=12, seed=4) if x.referred_patches()][:3]
    both = ko.predict(h, s, "related-image↛last", progress=False).set_index("sample_id")
    for x in s:
        alone = ko.predict(h, [x], "related-image↛last", progress=False).iloc[0]
        assert both.loc[x.id, "p_answer"] == pytest.approx(alone.p_answer, abs=1e-4)
        assert both.loc[x.id, "prediction"] == alone.prediction
