"""Custom fusion (microscope.fusion): the fused input, roles, patch edges, loading by factory, and
clear errors. The knockout/tracing/extraction invariants run on these models beside the HF
families (tests/test_knockout.py, test_tracing.py, test_extract.py, test_notebooks.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import microscope
from microscope import grid
from microscope import knockout as ko
from microscope.data import load_samples
from microscope.errors import MicroscopeError, ModelNotFoundError
from microscope.fusion import fuse
from tests import fusion_example as fx


def test_fused_input_is_token_embeddings_with_image_vectors_at_image_positions():
    h = fx.omnifusion()
    s = load_samples("shapes", 3, 0, handle=h)
    b = microscope.prepare_samples(h, s)
    ids = b.inputs["input_ids"]
    enc = h.model.encode_images
    with torch.no_grad():
        x = h.model.embed(ids, b.inputs["pixel_values"])
        feats = enc(b.inputs["pixel_values"])
        ref = h.model.decoder(inputs_embeds=x, attention_mask=b.inputs["attention_mask"]).logits
        out = h.model(**b.inputs).logits
    img = b.role_mask("image")
    assert torch.equal(img, ids == h.adapter.image_token_id) and (img.sum(1) == 16).all()
    torch.testing.assert_close(x[img], feats.reshape(-1, feats.shape[-1]), rtol=0, atol=0)
    soi, eoi = h.processor.tokenizer.convert_tokens_to_ids(["<SOI>", "<EOI>"])
    assert torch.equal(x[ids == soi], enc.soi.expand(3, -1)) and torch.equal(x[ids == eoi], enc.eoi.expand(3, -1))
    text = ~img & (ids != soi) & (ids != eoi)
    assert torch.equal(x[text], h.adapter.embed(ids[text]))
    assert torch.equal(out, ref)
    # the markers are template tokens, the question's words are question/constraint tokens
    names = b.role_names(0)
    toks = h.processor.tokenizer.convert_ids_to_tokens(ids[0])
    assert names[toks.index("<SOI>")] == "template" and names[toks.index("<EOI>")] == "template"
    assert [t for t, r in zip(toks, names) if r in ("question", "constraint")] == \
        h.processor.tokenizer.tokenize(s[0].question)


def test_patch_edges_use_the_fusion_patch_grid():
    h = fx.bunny()
    s = load_samples("shapes", 2, 5, handle=h)
    assert s[0].grid == 4 and s[0].referred_patches()
    b = microscope.prepare_samples(h, s[:1])
    assert torch.equal(grid.image_patch_positions(h, b, 0), b.role_mask("image")[0].nonzero().flatten())
    df = ko.sweep(h, s, edges=["related-image↛question", "other-image↛question"], only_correct=False,
                  progress=False)
    assert set(df.edge) == {"related-image↛question", "other-image↛question"} and len(df) == 2 * 2 * 4
    # the image's vectors are the only way the image reaches the decoder: blocking image→text
    # everywhere makes the answer independent of the picture
    other = load_samples("shapes", 1, 9, handle=h)[0]
    swapped = dataclasses.replace(s[0], image=other.image)
    p, p_swapped, p_open = (ko.predict(h, [x], edge=e, progress=False).p_answer.iloc[0]
                            for x, e in ((s[0], "image↛text"), (swapped, "image↛text"), (swapped, None)))
    assert p_swapped == pytest.approx(p, abs=1e-6)
    assert abs(p_open - ko.predict(h, [s[0]], progress=False).p_answer.iloc[0]) > 1e-6  # the image does matter


def test_factory_loading_and_its_errors():
    assert microscope.load("tests.fusion_example:bunny", allow_factory=True) is fx.bunny()
    with pytest.raises(ModelNotFoundError, match="PYTHONPATH"):
        microscope.load("tests.fusion_example:no_such_model", allow_factory=True)
    with pytest.raises(ModelNotFoundError, match="could not be imported"):
        microscope.load("no_such_package.models:bunny", allow_factory=True)
    with pytest.raises(MicroscopeError, match="callable without arguments"):
        microscope.load("json:dumps", allow_factory=True)
    with pytest.raises(MicroscopeError, match="not a microscope Handle"):
        microscope.load("os:getcwd", allow_factory=True)


def test_hash_includes_the_image_side():
    """Same decoder, tokenizer and template, another image encoder: another identity (a store
    written by one is refused by the other)."""
    b = fx.bunny()
    same = fuse(b.model.decoder, b.processor.tokenizer, b.model.encode_images, b.processor.preprocess, 16)
    other = fuse(b.model.decoder, b.processor.tokenizer, torch.nn.Sequential(b.model.encode_images, torch.nn.Tanh()),
                 b.processor.preprocess, 16)
    assert same.config_hash == fuse(b.model.decoder, b.processor.tokenizer, b.model.encode_images,
                                    b.processor.preprocess, 16).config_hash
    assert other.config_hash != same.config_hash


def _decoder(tok, impl="sdpa"):
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, attn_implementation=impl))


def test_bad_fusion_input_gets_clear_errors():
    from microscope.zoo.shapes_llava import build_tokenizer

    tok = build_tokenizer()
    enc = fx.bunny().model.encode_images
    pre = fx.bunny().processor.preprocess
    dec = _decoder(tok)
    with pytest.raises(ValueError, match="must be one"):
        fuse(dec, tok, enc, pre, 16, image_token="<im>age>")
    with pytest.raises(ValueError, match="template must contain"):
        fuse(dec, tok, enc, pre, 16, template="{image} only")
    with pytest.raises(ValueError, match="patch grid is not"):
        fuse(dec, tok, enc, pre, 9, image_size=56, patch_size=14)
    with pytest.raises(MicroscopeError, match="PreTrainedModel"):
        fuse(torch.nn.Linear(2, 2), tok, enc, pre, 16)
    with pytest.raises(MicroscopeError, match="attn_implementation='sdpa'"):
        fuse(_decoder(tok, "flex_attention"), tok, enc, pre, 16)
    h = fuse(dec, tok, enc, pre, 9)  # the encoder gives 16 vectors per image, not 9
    s = load_samples("shapes", 1, 0)
    b = microscope.prepare_samples(h, s)
    with pytest.raises(ValueError, match=r"encode_images gave \(1, 16, 48\) for 9 image positions"):
        h.model(**b.inputs)
    # a parameter-free embedding module (or plain callable) works as well
    fixed = torch.randn(16, 48)

    class Fixed(torch.nn.Module):
        def forward(self, px):
            return fixed.expand(px.shape[0], -1, -1)

    h2 = fuse(dec, tok, Fixed(), pre, 16)
    b2 = microscope.prepare_samples(h2, s)
    with torch.no_grad():
        x = h2.model.embed(b2.inputs["input_ids"], b2.inputs["pixel_values"])
    assert torch.equal(x[b2.inputs["input_ids"] == h2.adapter.image_token_id], fixed)
    with pytest.raises(ValueError, match="one image per prompt"):
        h.processor(images=[], text=["USER: <image> x"])
