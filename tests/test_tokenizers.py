"""The tiny checkpoints on their families' real tokenizers: pinned files, image-token counts,
constraint tokens (words split into several tokens, ``▁``/``Ġ`` forms, a word at the start of the
question), answer ids in the generated form, and token replacement in context."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from PIL import Image

import microscope
from microscope import tracing as tr
from microscope.answers import answer_ids, variant_id
from microscope.data import load_samples
from microscope.data.shapes import Constraint
from microscope.roles import lays_out_prompt
from tests import real_tokenizers
from tests.real_tokenizers import token_runs
from tests.tiny_models import QUESTION_TAIL, TINY, VARIANTS

REAL = [*TINY, *VARIANTS]
#: the word-boundary marker of each family's tokenizer: SentencePiece ``▁``, byte-level BPE ``Ġ``
SPACE = {"llava15": "▁", "llava_next": "▁", "llava_next_mistral": "▁", "idefics3": "Ġ", "qwen2_vl": "Ġ",
         "qwen2_5_vl": "Ġ", "llava_onevision": "Ġ", "vipllava": "▁", "llava_next_video": "▁", "internvl": "Ġ",
         "smolvlm": "Ġ", "aya_vision": "Ġ", "glm4v": "Ġ", "mllama": "Ġ", "gemma3": "▁", "paligemma": "▁", "janus": "Ġ"}
#: the answer "red" as each model generates it after its chat template's generation prompt
RED = {"llava15": "▁red", "llava_next": "▁red", "llava_next_mistral": "▁red",  # after "ASSISTANT:" / "[/INST]"
       "idefics3": "Ġred", "smolvlm": "Ġred",  # after "Assistant:"
       "vipllava": "▁red", "llava_next_video": "▁red",  # after "###Assistant:" / "ASSISTANT:"
       "qwen2_vl": "red", "qwen2_5_vl": "red", "llava_onevision": "red",  # after "<|im_start|>assistant\n"
       "internvl": "red", "aya_vision": "red",  # ... and after "<|CHATBOT_TOKEN|>"
       "glm4v": "red", "gemma3": "red",  # after "<|assistant|>\n" / "<start_of_turn>model\n"
       "mllama": "red",  # after "<|start_header_id|>assistant<|end_header_id|>\n\n"
       "janus": "Ġred"}  # after "<|Assistant|>:" and its space
#: families without a chat template (the processor lays the prompt out): PaliGemma's answer follows its
#: processor's "\n" in the same text (checked in test_answer_ids_follow_the_processors_own_layout)
NO_TEMPLATE = ("paligemma",)
#: the tokens a family's processor puts around the image tokens (template role, not image)
WRAPPERS = {"idefics3": ["<fake_token_around_image>", "<global-img>"],
            "smolvlm": ["<fake_token_around_image>", "<global-img>"], "internvl": ["<img>", "</img>"],
            "janus": ["<begin_of_image>", "<end_of_image>"],
            "aya_vision": ["<|START_OF_IMG|>", "<|END_OF_IMG|>", "TILE_GLOBAL"] + [f"TILE_{i}" for i in range(1, 13)]}
#: (question, constraint words): a word split into several tokens, two constraints, a word first
QUESTIONS = [("Is the rhombus red or blue?", ["rhombus"]),
             ("What color is the rhombus and is the heptagon red?", ["rhombus", "heptagon"]),
             ("Rhombus or circle: which one is red?", ["Rhombus"]),
             ("Red or blue, which is the parallelogram?", ["Red", "parallelogram"])]


@pytest.fixture(scope="module")
def real(handles, tmp_path_factory):
    """Every tiny family's handle plus the tokenizer variants (LLaVA-NeXT-Mistral)."""
    root = tmp_path_factory.mktemp("variants")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torchvision is not installed")
        extra = {k: microscope.load(str(build(root / k))) for k, build in VARIANTS.items()}
    return {**{k: handles[k] for k in TINY}, **extra}


def _spans(question: str, words: list[str]) -> list[tuple[int, int]]:
    out = []
    for w in words:
        i = question.index(w)
        out.append((i, i + len(w)))
    return out


def test_tokenizer_files_are_the_pinned_ones(monkeypatch):
    """Every source decompresses or fetches to its pinned SHA-256, and is the family's real
    tokenizer (its model type and size); a file that is not the pinned one is refused."""
    expect = {"llama2": ("BPE", 32000, "▁the"), "mistral": ("BPE", 32000, "▁the"), "qwen2": ("BPE", 151643, "Ġthe"),
              "llama3": ("BPE", 128000, "Ġthe")}
    for name, (kind, size, the) in expect.items():
        j = json.loads(real_tokenizers.tokenizer_json(name))
        assert (j["model"]["type"], len(j["model"]["vocab"])) == (kind, size) and the in j["model"]["vocab"]
    qwen_special = {t["content"] for t in json.loads(real_tokenizers.tokenizer_json("qwen2"))["added_tokens"]}
    assert {"<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|im_start|>"} <= qwen_special
    bad = dataclasses.replace(real_tokenizers.SOURCES["mistral"], sha256="0" * 64)
    monkeypatch.setitem(real_tokenizers.SOURCES, "mistral", bad)
    with pytest.raises(RuntimeError, match="not the pinned"):
        real_tokenizers.tokenizer_json("mistral")


@pytest.mark.parametrize("name", REAL)
def test_tiny_checkpoints_are_sharded_with_the_real_vocabulary(real, name):
    h = real[name]
    tok = h.processor.tokenizer
    if name == "mllama":  # Llama-3.2-Vision: lm_head over the 128,256 text tokens; <|image|> (128256) is only
        # an input, and the input embedding has 8 rows more (128,264), as in the released checkpoints
        assert h.model.config.get_text_config().vocab_size == len(tok) - 1 == 128256
        assert h.adapter.embed.weight.shape[0] == 128256 + 8
    else:
        assert h.model.config.get_text_config().vocab_size == len(tok) > 32000
        assert h.adapter.embed.weight.shape[0] == len(tok)
    d = microscope.zoo.model_dir(h.name)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2 and not (d / "model.safetensors").exists()


@pytest.mark.parametrize("name", REAL)
def test_image_roles_are_the_processors_expanded_image_tokens(real, name):
    h = real[name]
    s = load_samples("shapes", 3, 4, handle=h)
    imgs = [s[0].image, s[1].image.resize((s[1].image.width, 2 * s[1].image.height)), s[2].image]
    b = microscope.prepare(h, imgs, [x.question for x in s])
    ids = b.inputs["input_ids"]
    tok = h.processor.tokenizer
    for i, im in enumerate(imgs):
        if name == "mllama":  # the text holds one <|image|> per image: the image enters by cross-attention
            n = 1
        elif hasattr(h.processor, "_get_num_multimodal_tokens"):
            n = h.processor._get_num_multimodal_tokens(image_sizes=[(im.height, im.width)]).num_image_tokens[0]
        elif name == "janus":  # <begin_of_image> + num_image_tokens image tokens + <end_of_image>
            n = h.processor.num_image_tokens + 2
        else:  # SmolVLM's processor has none: an unsplit image is <fake><global-img><image> × len <fake>
            assert name == "smolvlm" and not h.processor.image_processor.do_image_splitting
            n = h.processor.image_seq_len + 3
        img = int(b.role_mask("image")[i].sum())
        if name in WRAPPERS:  # n counts the wrapper tokens around the image too
            if name == "janus":
                assert img == h.processor.num_image_tokens
            elif name in ("idefics3", "smolvlm"):
                assert img == h.processor.image_seq_len
            elif name == "internvl":  # image_seq_length tokens per tile (the thumbnail and any crops)
                assert img > 0 and img % h.processor.image_seq_length == 0
            else:  # Aya Vision: (img_size / patch)² tokens per tile
                assert img > 0 and img % (h.processor.img_size // h.processor.patch_size) ** 2 == 0
            wrap = torch.isin(ids[i], torch.tensor(tok.convert_tokens_to_ids(WRAPPERS[name])))
            assert img + int(wrap.sum()) == n
        else:
            assert img == n, (i, img, n)


@pytest.mark.parametrize("name", REAL)
def test_constraint_and_question_tokens_decode_to_their_words(real, name):
    h = real[name]
    tok = h.processor.tokenizer
    s = load_samples("shapes", 12, 4, handle=h)
    questions = [q for q, _ in QUESTIONS] + [x.question for x in s]
    words = [w for _, w in QUESTIONS] + [[c.word for c in x.constraints] for x in s]
    images = [s[0].image] * len(QUESTIONS) + [x.image for x in s]
    b = microscope.prepare(h, images, questions, [_spans(q, w) for q, w in zip(questions, words)])
    ids = b.inputs["input_ids"]
    split = 0
    for i, (q, ws) in enumerate(zip(questions, words)):
        qmask = b.role_mask(["question", "constraint"])[i]
        assert tok.decode(ids[i][qmask]).strip() == q.removesuffix(QUESTION_TAIL.get(name, ""))
        runs = token_runs(b.role_mask("constraint")[i])
        assert [tok.decode(ids[i][r]).strip() for r in runs] == ws, (q, runs)
        for r, w in zip(runs, ws):
            first = tok.convert_ids_to_tokens(int(ids[i][r[0]]))
            split += len(r) > 1
            # inside the question a word starts at a word boundary ("▁red", "Ġred"); first in the
            # question it follows the template's newline or image token and has no boundary mark
            # (PaliGemma's question follows <bos>, where the substitute Mistral tokenizer starts a text
            # with "▁" — Gemma's own adds no dummy prefix — so its first word is not checked)
            if not (name in NO_TEMPLATE and q.startswith(w)):
                assert first.startswith(SPACE[name]) != q.startswith(w), (q, w, first)
    # rhombus (x2), heptagon, parallelogram are several tokens in the 32k–152k vocabularies; Gemma's 256k
    # (PaliGemma) and 262k (Gemma 3) ones have single pieces for most of them
    assert split >= (2 if name in ("gemma3", "paligemma") else 4)


@pytest.mark.parametrize("name", [n for n in REAL if n not in NO_TEMPLATE])
def test_answer_ids_are_what_the_model_generates_after_the_template(real, name):
    """The id answer_ids gives is the token that follows the generation prompt when the whole
    conversation (with the assistant's answer) goes through the processor — and it has the
    family's form ("▁red", "Ġred" or "red")."""
    h = real[name]
    p, tok = h.processor, h.processor.tokenizer
    s = load_samples("shapes", 1, 0, handle=h)[0]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]
    prompt = p.apply_chat_template(msgs, add_generation_prompt=True)
    gold = answer_ids(p, ["red", "yes", "left", "triangle"])
    for a, g in zip(["red", "yes", "left", "triangle"], gold):
        full = p.apply_chat_template(msgs + [{"role": "assistant", "content": [{"type": "text", "text": a}]}])
        assert full.startswith(prompt)
        x = p(images=[s.image], text=[prompt], return_tensors="pt")["input_ids"][0]
        y = p(images=[s.image], text=[full], return_tensors="pt")["input_ids"][0]
        assert torch.equal(y[:len(x)], x) and int(y[len(x)]) == g, (a, tok.convert_ids_to_tokens(y[len(x) - 2:]))
    assert tok.convert_ids_to_tokens(gold[0]) == RED[name]
    cap = variant_id(p, "red", "capitalised")
    assert tok.convert_ids_to_tokens(cap) == RED[name].replace("red", "Red")


def test_answer_ids_follow_the_processors_own_layout(real):
    """PaliGemma has no chat template: its processor writes image tokens, <bos>, the prompt and
    "\n", and the answer is the first token after that "\n" in the same text (Gemma's tokenizer
    adds no word-boundary mark there, "red"; a separately tokenised training suffix would, "▁red",
    which is why this is not checked through ``suffix=``)."""
    from microscope.roles import lays_out_prompt

    h = real["paligemma"]
    p, tok = h.processor, h.processor.tokenizer
    assert lays_out_prompt(p) and not lays_out_prompt(real["gemma3"].processor)
    for a, g in zip(["red", "yes"], answer_ids(p, ["red", "yes"])):
        laid = p.prepare_inputs_layout(images=[Image.new("RGB", (8, 8))], text=[p.image_token + "What?"])[1][0]
        ids = tok(laid + a, add_special_tokens=False)["input_ids"]
        nl = len(ids) - 1 - ids[::-1].index(tok.convert_tokens_to_ids("\n"))  # Gemma's own "\n" piece
        assert ids[nl + 1] == g and tok.convert_ids_to_tokens(g) == a


def test_replacement_uses_the_in_context_form_on_byte_level_bpe(real):
    """Item 4: on Qwen2's byte-level BPE the constraint token is "Ġcross"; its replacements are
    "Ġcircle", "Ġsquare", "Ġtriangle" — tokenised in the question, not the start-of-text
    "circle" that answer_ids-style tokenisation of the bare word gives."""
    h = real["qwen2_vl"]
    tok = h.processor.tokenizer
    s = next(x for x in load_samples("shapes", 12, 2, handle=h) if x.question == "What color is the cross?")
    c = tr.corrupt(h, s, "replace", n_noise=12, seed=0)
    t = int(c.positions.nonzero()[0])
    assert tok.convert_ids_to_tokens(int(c.batch.inputs["input_ids"][0, t])) == "Ġcross"
    emb = h.adapter.embed.weight
    ctx = tok.convert_tokens_to_ids(["Ġcircle", "Ġsquare", "Ġtriangle"])
    bare = tok.convert_tokens_to_ids(["circle", "square", "triangle"])
    seen = set()
    for n in range(12):
        d = (emb[ctx] - c.corrupted[n, t]).abs().sum(-1)
        assert d.min() < 1e-6, [(emb[b] - c.corrupted[n, t]).abs().sum().item() for b in bare]
        seen.add(int(d.argmin()))
    assert seen == {0, 1, 2}
    # a capitalised word at the start of the question: "Cross" → "Circle" / "Square" / "Triangle"
    q = "Cross or circle, which one is red?"
    first = dataclasses.replace(s, question=q, constraints=(Constraint("Cross", 0, 5),))
    opts = tr.replacement_options(h, microscope.prepare_samples(h, [first]), first)
    assert [(w, tok.convert_ids_to_tokens(i)) for w, i in opts[0][2]] == [
        ("Circle", ["Circle"]), ("Square", ["Square"]), ("Triangle", ["Triangle"])]


@pytest.mark.parametrize("name", ["llava15", "qwen2_5_vl"])
def test_a_word_split_into_several_tokens_is_replaced_as_a_whole(real, name):
    """Item 4: "rhombus" is three tokens (▁rh|omb|us, Ġrh|omb|us); it is replaced by whole words
    of three tokens in context (heptagon, lozenge), never fragment by fragment and never by a
    word of another length (hexagon: 2, star: 1, trapezoid: 4), which would shift every later
    position. Restoring the decoder input at those positions gives back the clean run."""
    h = real[name]
    tok = h.processor.tokenizer
    base = load_samples("shapes", 1, 0, handle=h)[0]
    q = "What color is the rhombus?"
    s = dataclasses.replace(base, question=q, constraints=(Constraint("rhombus", 18, 25),))
    pool = ["heptagon", "hexagon", "star", "lozenge", "trapezoid"]
    c = tr.corrupt(h, s, "replace", n_noise=8, replace_with=pool, seed=1)
    pos = c.positions.nonzero().flatten()
    ids = c.batch.inputs["input_ids"][0]
    assert len(pos) == 3 and tok.decode(ids[pos]).strip() == "rhombus"
    whole = {}
    for w in ("heptagon", "lozenge"):
        x = tok(c.batch.prompts[0].replace("rhombus", w), add_special_tokens=False)["input_ids"]
        y = tok(c.batch.prompts[0], add_special_tokens=False)["input_ids"]
        k = next(i for i, (a, b) in enumerate(zip(x, y)) if a != b)
        whole[w] = x[k:k + 3]
        assert tok.decode(whole[w]).strip() == w
    emb = h.adapter.embed.weight
    seen = set()
    for n in range(8):
        got = c.corrupted[n, pos]
        match = [w for w, i in whole.items() if (emb[i] - got).abs().max() < 1e-6]
        assert len(match) == 1, n
        seen.add(match[0])
    assert seen == {"heptagon", "lozenge"}
    p = tr.restore(c, [("resid", [-1], pos.tolist())])
    assert p[0] == pytest.approx(c.p_clean, abs=1e-5)
    with pytest.raises(ValueError, match="no replacement for constraint word 'rhombus'.*'hexagon': 2"):
        tr.corrupt(h, s, "replace", n_noise=2, replace_with=["hexagon", "star", "trapezoid"])


def test_knockout_and_tracing_invariants_on_the_mistral_variant(real):
    """LLaVA-NeXT-Mistral (checked here only, not through every notebook): an empty knockout plan
    changes no logit, blocking the image from all text in every layer makes the answer
    image-independent, and restoring a whole layer's residual stream undoes noise and
    replacement corruption alike."""
    from microscope import knockout as ko

    h = real["llava_next_mistral"]
    s = load_samples("shapes", 2, 5, handle=h)
    batch = microscope.prepare(h, [s[0].image, s[1].image], [s[0].question] * 2)
    with torch.no_grad():
        base = h.model(**batch.inputs).logits[:, -1]
        with ko.knockout(h, []):
            assert torch.equal(h.model(**batch.inputs).logits[:, -1], base)
        src, tgt = ko.edge_masks(h, batch, "image↛text")
        with ko.knockout(h, [ko.Block(src, tgt, range(h.adapter.n_layers))]):
            blocked = h.model(**batch.inputs).logits[:, -1]
    assert (base[0] - base[1]).abs().max() > 1e-3 and (blocked[0] - blocked[1]).abs().max() < 1e-5
    for corruption in ("noise", "replace"):
        c = tr.corrupt(h, s[0], corruption, n_noise=3, sigma=0.5)
        p = tr.restore(c, [("resid", [1], list(range(c.n_tokens)))])
        assert c.p_corrupted != c.p_clean and p[0] == pytest.approx(c.p_clean, abs=1e-5)


@pytest.mark.parametrize("name", REAL)
def test_a_prompt_holds_one_bos_even_when_the_template_writes_it(real, name):
    """A chat template that writes ``{{ bos_token }}`` itself (Gemma 3's) over a tokenizer that adds
    ``<bos>`` to every text: the prompt is tokenised without special tokens (transformers' rule for
    ``apply_chat_template(tokenize=True)``), so the ids hold the BOS token once — and exactly once for
    every family whose tokenizer or template has one."""
    h = real[name]
    tok = h.processor.tokenizer
    s = load_samples("shapes", 2, 4, handle=h)
    b = microscope.prepare_samples(h, s)
    if name == "gemma3":
        assert all(p.startswith(tok.bos_token) for p in b.prompts)  # the template writes it
        assert tok(b.prompts[0])["input_ids"][:2] == [tok.bos_token_id] * 2  # and the tokenizer adds one
    if tok.bos_token_id is None:
        return
    adds = tok("x")["input_ids"][0] == tok.bos_token_id
    for i in range(len(s)):
        ids = b.inputs["input_ids"][i][b.inputs["attention_mask"][i].bool()]
        writes = lays_out_prompt(h.processor)  # PaliGemma's processor writes <bos> after the image tokens
        expected = int(adds or writes or b.prompts[i].startswith(tok.bos_token))
        assert int((ids == tok.bos_token_id).sum()) == expected, (name, tok.convert_ids_to_tokens(ids[:4]))
