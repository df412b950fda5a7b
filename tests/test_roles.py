"""Per-token roles from processor ids and character offsets, on three LLaVA layouts."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

import microscope
from microscope.data import shapes
from microscope.errors import ModelNotFoundError
from microscope.roles import MAX_IMAGE_SIDE, ROLES, check_image, reserved_strings
from tests.real_tokenizers import token_runs
from tests.tiny_models import FUSION, MODELS, QUESTION_TAIL

#: models on the Shapes world's word-level tokenizer (the others have their family's real one)
WORD_LEVEL = ("shapes", *FUSION)


@pytest.mark.parametrize("name", ["shapes", *MODELS])
def test_roles_follow_ids_and_offsets(handles, name):
    h = handles[name]
    samples = shapes.generate(12, seed=4)
    b = microscope.prepare_samples(h, samples)
    tok = h.processor.tokenizer
    ids = b.inputs["input_ids"]
    assert torch.equal(b.role_mask("image"), ids == h.adapter.image_token_id)
    assert torch.equal(b.role_mask("pad"), b.inputs["attention_mask"] == 0)
    for i, s in enumerate(samples):
        names = b.role_names(i)
        row = ids[i]
        q_ids = row[b.role_mask(["question", "constraint"])[i]]
        if name in WORD_LEVEL:  # a word-level toy tokenizer: its decode joins words with spaces
            assert tok.convert_ids_to_tokens(q_ids) == tok.tokenize(s.question)
        else:  # real tokenizers: the question's tokens, in its context's form, decode to the question
            tail = QUESTION_TAIL.get(name, "")
            assert tok.decode(q_ids).strip() == s.question.removesuffix(tail)
        runs = token_runs(b.role_mask("constraint")[i])
        assert [tok.decode(row[r]).strip() for r in runs] == [c.word for c in s.constraints]
        assert names[-1] == "last" and names.count("last") == 1  # left padding: last column
        tmpl = [t for t, r in zip(tok.convert_ids_to_tokens(row), names) if r == "template"]
        first = tok(b.prompts[i])["input_ids"][0]
        writes_bos = name == "paligemma"  # its processor writes <bos> after the image tokens, into no prompt
        assert (tmpl[0] == tok.bos_token) == (first == tok.bos_token_id or writes_bos)  # BOS, where the model has one
        # every piece of the prompt outside the question and the image placeholder is template
        tmpl_text = "".join(tok.decode(row[b.role_mask(["template", "last"])[i]]).split())
        for part in b.prompts[i].replace(s.question, h.processor.image_token).split(h.processor.image_token):
            assert "".join(part.split()) in tmpl_text, (part, tmpl_text)
        if name in ("idefics3", "smolvlm"):  # tokens the processor wraps around the image are template, not question
            assert "<fake_token_around_image>" in tmpl and "<global-img>" in tmpl
        if name == "internvl":
            assert "<img>" in tmpl and "</img>" in tmpl
        if name == "aya_vision":
            assert "<|START_OF_IMG|>" in tmpl and "TILE_GLOBAL" in tmpl and "<|END_OF_IMG|>" in tmpl
        if name.startswith("qwen"):
            assert "<|vision_start|>" in tmpl and "<|vision_end|>" in tmpl
        if name == "glm4v":
            assert "<|begin_of_image|>" in tmpl and "<|end_of_image|>" in tmpl
        if name == "gemma3":  # the processor's \n\n<start_of_image> … <end_of_image>\n\n around the image tokens
            assert "<start_of_image>" in tmpl and "<end_of_image>" in tmpl
            assert torch.equal(b.inputs["token_type_ids"][i].bool(), b.role_mask("image")[i])
        if name == "paligemma":  # image tokens first, then <bos> and the question; the processor's "\n" is last
            assert names[:16] == ["image"] * 16 or names[0] == "pad"
            assert tok.convert_ids_to_tokens(int(row[-1])) == "\n" and "labels" not in b.inputs
    out = h.model(**b.inputs)
    assert out.logits.shape[:2] == ids.shape


@pytest.mark.parametrize("name", ["shapes", *MODELS])
def test_a_question_holding_a_reserved_string_is_refused_by_name(handles, name):
    """The image placeholder and the tokenizer's special tokens inside a question would become image
    slots or control tokens; every family refuses them, naming the string."""
    h = handles[name]
    s = shapes.generate(1, seed=4)[0]
    reserved = reserved_strings(h.processor)
    assert h.processor.image_token in reserved
    if name.startswith("qwen"):
        assert {"<|vision_start|>", "<|image_pad|>"} <= set(reserved)
    for r in {h.processor.image_token, h.processor.tokenizer.eos_token} - {None}:
        with pytest.raises(ValueError, match=re.escape(f"contains [{r!r}]")):
            microscope.prepare(h, [s.image], [f"Is {r} the {s.question}"])
    assert microscope.prepare(h, [s.image], [s.question]).roles.shape[0] == 1  # the plain question passes


def test_llava_next_image_tokens_depend_on_image_size(handles):
    h = handles["llava_next"]
    s = shapes.generate(3, seed=1)
    imgs = [s[0].image.resize((56, 56)), s[1].image.resize((56, 112)), s[2].image.resize((150, 60))]
    b = microscope.prepare(h, imgs, [x.question for x in s])
    counts = b.role_mask("image").sum(1).tolist()
    assert len(set(counts)) > 1, counts  # anyres tiling + newline tokens: size-dependent
    assert counts == (b.inputs["input_ids"] == h.adapter.image_token_id).sum(1).tolist()
    h.model(**b.inputs)


def test_image_modes_are_converted_and_bad_images_rejected(handles):
    h = handles["shapes"]
    s = shapes.generate(1, seed=0)[0]
    rgb = s.image
    gray, rgba = rgb.convert("L"), rgb.convert("RGBA")
    b = microscope.prepare(h, [gray, rgba, np.asarray(rgb)], [s.question] * 3)
    assert b.inputs["pixel_values"].shape[0] == 3
    assert check_image(rgba).mode == "RGB"
    with pytest.raises(ValueError, match="image 0: size 9000"):
        check_image(Image.new("RGB", (9000, 10)))
    with pytest.raises(TypeError, match="image 1"):
        microscope.prepare(h, [rgb, "not an image"], [s.question] * 2)
    with pytest.raises(ValueError, match="needs one image per question"):
        microscope.prepare(h, None, [s.question])
    with pytest.raises(ValueError, match="question 0 has no image"):
        microscope.prepare(h, [None], [s.question])


def test_role_and_layer_validation(handles):
    h = handles["shapes"]
    b = microscope.prepare_samples(h, shapes.generate(2, seed=0))
    with pytest.raises(ValueError, match="unknown role.*'answer'"):
        b.role_mask("answer")
    with pytest.raises(ValueError, match="layer 6 is out of range: this model has 6 decoder layers"):
        h.adapter.check_layers([0, 6])
    assert set(ROLES) == {"pad", "template", "image", "question", "constraint", "last", "image_boundary"}


def test_load_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache.*hf download"):
        microscope.load("llava-hf/llava-1.5-7b-hf")
    with pytest.raises(ModelNotFoundError, match="unknown model 'llava-9000'"):
        microscope.load("llava-9000")
    with pytest.raises(ModelNotFoundError, match=str(tmp_path)):
        microscope.load(str(tmp_path))


def test_load_from_the_hf_cache_offline(tiny_dirs, tmp_path):
    """A hub id already in the HF cache loads offline, like a downloaded llava-hf checkpoint."""
    import os
    import shutil
    import subprocess
    import sys

    cache = tmp_path / "hub"
    snap = cache / "models--llava-hf--tiny-llava" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_dirs["llava15"], snap)
    (cache / "models--llava-hf--tiny-llava" / "refs").mkdir()
    (cache / "models--llava-hf--tiny-llava" / "refs" / "main").write_text("0123abcd")
    code = ("import microscope; h = microscope.load('llava-hf/tiny-llava'); "
            "print(type(h.model).__name__, h.adapter.n_layers, h.model.config._attn_implementation)")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["LlavaForConditionalGeneration", "4", "sdpa"]


def test_dtype_and_attention_choice(tiny_dirs):
    h = microscope.load(str(tiny_dirs["llava15"]), dtype="bfloat16", attn_implementation="eager")
    assert h.dtype == torch.bfloat16 and h.model.config._attn_implementation == "eager"
    b = microscope.prepare_samples(h, shapes.generate(2, seed=0))
    assert h.model(**b.inputs).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "glm4v"])
def test_mrope_positions_make_embedding_forwards_equal_id_forwards(handles, name):
    """Qwen2-VL's image tokens have 3-D rotary positions: a forward from inputs_embeds (as
    knockout and tracing run) equals the processor-input forward only with the adapter's
    position ids — without them it is measurably different."""
    from microscope.extract import capture
    from microscope.prefix import cache_kwargs, position_kwargs, positions, prefix_of

    h = handles[name]
    b = microscope.prepare_samples(h, shapes.generate(1, seed=2))
    with torch.no_grad(), capture(h, [-1]) as acts:
        ref = h.model(**b.inputs).logits
    emb, mask = acts["resid.-1"], b.inputs["attention_mask"]
    pos = positions(h, b.inputs)
    T, P = emb.shape[1], pos["position_ids"]
    assert P.shape == (3, 1, T) and not torch.equal(P[1], P[2])  # rows ≠ columns on the image
    with torch.no_grad():
        same = h.model(inputs_embeds=emb, attention_mask=mask, **position_kwargs(pos, T, 1)).logits
        plain = h.model(inputs_embeds=emb, attention_mask=mask,
                        position_ids=torch.arange(emb.shape[1])[None].expand(3, 1, -1)).logits
    torch.testing.assert_close(same, ref, rtol=0, atol=1e-5)
    assert (plain - ref).abs().max() > 1e-3
    # the suffix of a cached prefix gets the prompt's own positions
    first = 10
    with torch.no_grad():
        out = h.model(**b.inputs, use_cache=True)
        suf = h.model(inputs_embeds=emb[:, first:], attention_mask=mask,
                      **cache_kwargs(h, prefix_of(out, first), 1),
                      **position_kwargs(pos, T - first, 1)).logits
    torch.testing.assert_close(suf, ref[:, first:], rtol=0, atol=1e-5)


def test_transparency_is_composited_on_white_and_the_size_limits_are_inclusive():
    px = np.zeros((2, 3, 4), np.uint8)
    px[..., 0] = 200  # red 200 everywhere
    px[0, 0, 3], px[0, 1, 3], px[0, 2, 3] = 0, 255, 128  # transparent, opaque, half
    out = np.asarray(check_image(px))
    assert out.shape == (2, 3, 3)
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent: the white background
    assert out[0, 1].tolist() == [200, 0, 0]
    assert out[0, 2].tolist() == [227, 127, 127]  # 200·a + 255·(1 − a), a = 128/255: 227.4, 127
    la = Image.fromarray(np.stack([np.full((2, 2), 10, np.uint8), np.array([[0, 255], [255, 255]], np.uint8)], -1),
                         "LA")
    assert np.asarray(check_image(la))[0].tolist() == [[255, 255, 255], [10, 10, 10]]
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 50, 60, 70] + [0] * 762)
    pal.info["transparency"] = 1
    assert np.asarray(check_image(pal))[0, 0].tolist() == [255, 255, 255]
    del pal.info["transparency"]
    assert np.asarray(check_image(pal))[0, 0].tolist() == [50, 60, 70]  # no transparency: just RGB
    assert np.asarray(check_image(np.full((2, 2), 7, np.uint8))).tolist() == [[[7] * 3] * 2] * 2  # gray
    assert check_image(Image.new("RGB", (2, 2))).size == (2, 2)  # the smallest side allowed
    assert check_image(Image.new("L", (MAX_IMAGE_SIDE, 2))).size == (MAX_IMAGE_SIDE, 2)
    for size in ((1, 5), (5, 1), (MAX_IMAGE_SIDE + 1, 2), (2, MAX_IMAGE_SIDE + 1)):
        with pytest.raises(ValueError, match=f"image 3: size {size[0]}×{size[1]} is outside 2..{MAX_IMAGE_SIDE}"):
            check_image(Image.new("L", size), index=3)
    for bad in (np.zeros((2, 2), np.float32), np.zeros((2, 2, 3, 1), np.uint8), np.zeros(4, np.uint8)):
        with pytest.raises(TypeError, match="image 2: arrays must be uint8"):
            check_image(bad, 2)
    img = Image.new("RGB", (3, 3))
    assert check_image(img) is img  # already RGB: the same object, not a copy


def test_a_constraint_span_may_end_at_the_end_of_the_question_and_not_beyond(shapes_handle):
    h = shapes_handle
    img = shapes.generate(1, seed=0)[0].image
    q = "What colour is the big circle"
    b = microscope.prepare(h, [img], [q], constraints=[[(len(q) - 6, len(q))]])  # "circle", the last word
    names = b.role_names(0)
    assert names[-1] == "last" and "constraint" in names
    with pytest.raises(ValueError, match=rf"constraint span \({len(q) - 6}, {len(q) + 1}\) is outside question 0 "
                                         rf"\({len(q)} chars\)"):
        microscope.prepare(h, [img], [q], constraints=[[(len(q) - 6, len(q) + 1)]])
    for bad in ((3, 3), (-1, 2)):  # empty, before the start
        with pytest.raises(ValueError, match="is outside question 0"):
            microscope.prepare(h, [img], [q], constraints=[[bad]])


def test_reserved_strings_are_the_placeholders_and_special_tokens_only(shapes_handle):
    """Other string settings of the processor (``vision_feature_select_strategy = "default"``, the chat
    template) are not reserved: a question may say "default"."""
    assert reserved_strings(shapes_handle.processor) == ["</s>", "<image>", "<pad>", "<s>", "<unk>"]
    img = shapes.generate(1, seed=0)[0].image
    assert microscope.prepare(shapes_handle, [img], ["Is the default shape a circle?"]).roles.shape[0] == 1
