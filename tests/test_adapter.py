"""The adapter finds a model's parts by introspection; a model that lacks one is refused with one
error naming exactly that part."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

import microscope
from microscope.data import shapes
from microscope.errors import MicroscopeError
from microscope.extract import capture
from microscope.model import adapter_for
from tests.tiny_models import TINY


class Odd(torch.nn.Module):
    """A ForConditionalGeneration-shaped model: ``model.language_model`` (a Llama decoder), an
    lm_head, and a config with whatever image-token fields a test gives it."""

    def __init__(self, **config):
        super().__init__()
        lm = LlamaModel(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, vocab_size=40))
        self.model = torch.nn.Module()
        self.model.language_model = lm
        self.lm_head = torch.nn.Linear(16, 40, bias=False)
        self.config = SimpleNamespace(**config)

    def get_input_embeddings(self):
        return self.model.language_model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head


def _processor(token: str):
    tok = SimpleNamespace(unk_token_id=0, convert_tokens_to_ids=lambda t: {"<image>": 39}.get(t, 0))
    return SimpleNamespace(image_token=token, tokenizer=tok)


def test_parts_are_found_by_introspection():
    m = Odd(image_token_index=39)
    a = adapter_for(m)
    assert a.layers is m.model.language_model.layers and a.final_norm is m.model.language_model.norm
    assert a.embed is m.get_input_embeddings() and a.unembed is m.lm_head
    assert a.image_token_id == 39 and a.position_ids is None
    assert adapter_for(Odd(), _processor("<image>")).image_token_id == 39  # from the processor's image_token
    m.logit_scale = 0.5  # a class that scales its logits (CohereForCausalLM) holds the factor
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(adapter_for(m).logits(x), 0.5 * m.lm_head(m.model.language_model.norm(x)))


def test_a_model_without_image_token_id_is_refused_naming_it():
    with pytest.raises(MicroscopeError, match=r"^Odd is not supported: no image-token id: config has neither "
                                              r"image_token_id nor image_token_index\. "):
        adapter_for(Odd(image_token="<image>"))
    with pytest.raises(MicroscopeError, match="no image-token id: config has neither image_token_id nor "
                                              "image_token_index, and the processor's image token '<img>' is not"):
        adapter_for(Odd(), _processor("<img>"))
    with pytest.raises(MicroscopeError, match=r"image-token id 7 is not the processor's image token '<image>' \(39\)"):
        adapter_for(Odd(image_token_id=7), _processor("<image>"))


def test_each_missing_part_is_named():
    m = Odd(image_token_id=39)
    m.model.language_model.norm = None
    with pytest.raises(MicroscopeError, match="no final norm: its language model LlamaModel has none of norm"):
        adapter_for(m)
    m = Odd(image_token_id=39)
    del m.model.language_model.layers[1].self_attn  # a token mixer that is not attention (LFM2's conv layers)
    with pytest.raises(MicroscopeError, match=r"decoder layer 1 \(LlamaDecoderLayer\) has no self_attn module"):
        adapter_for(m)
    m = Odd(image_token_id=39)
    m.model.language_model.layers = torch.nn.Sequential()
    with pytest.raises(MicroscopeError, match="no decoder layers: its language model LlamaModel has no 'layers'"):
        adapter_for(m)
    m = Odd(image_token_id=39)
    m.model.language_model = None
    with pytest.raises(MicroscopeError, match="no language model: Module has none of language_model, text_model"):
        adapter_for(m)
    m = Odd(image_token_id=39)
    m.lm_head = None
    with pytest.raises(MicroscopeError, match=r"no unembedding: get_output_embeddings\(\) gives no Linear"):
        adapter_for(m)


@pytest.mark.parametrize("name", TINY)
def test_the_adapters_logits_are_the_models_own(handles, name):
    """Final norm, unembedding and logit scale turn the last residual stream into the model's own
    logits — what the logit lens relies on. (Aya Vision's Cohere2 text config has logit_scale
    0.0625, but its ForConditionalGeneration class does not apply it: the adapter follows the class.)"""
    h = handles[name]
    b = microscope.prepare_samples(h, shapes.generate(2, seed=0))
    last = h.adapter.n_layers - 1
    with torch.no_grad(), capture(h, [last]) as acts:
        ref = h.model(**b.inputs).logits
    torch.testing.assert_close(h.adapter.logits(acts[f"resid.{last}"]), ref, rtol=1e-4, atol=1e-5)
    if name == "aya_vision":
        assert h.model.config.get_text_config().logit_scale == 0.0625 and h.adapter.logit_scale == 1.0


def test_paligemma2_final_logit_softcapping_is_the_adapters(tmp_path):
    """PaliGemma 2's class soft-caps its logits (``c · tanh(z / c)``, c = Gemma 2's
    ``final_logit_softcapping``): the adapter applies it too, so the logit lens reads the model's own
    logits; Gemma 3's class applies none (and the adapter none). Gemma 2 runs eager attention only."""
    from tests.tiny_models import build_paligemma

    h = microscope.load(str(build_paligemma(tmp_path / "pg2", gemma2=True)), attn_implementation="eager")
    text = h.model.config.get_text_config()
    assert text.final_logit_softcapping == h.adapter.logit_softcap == 30.0 and h.adapter.bidirectional
    text.final_logit_softcapping = 0.05  # tiny random logits are ≪ 30: a cap that bends them
    h.adapter = adapter_for(h.model, h.processor)
    b = microscope.prepare_samples(h, shapes.generate(2, seed=0))
    last = h.adapter.n_layers - 1
    with torch.no_grad(), capture(h, [last]) as acts:
        ref = h.model(**b.inputs).logits
    torch.testing.assert_close(h.adapter.logits(acts[f"resid.{last}"]), ref, rtol=1e-4, atol=1e-5)
    assert (h.adapter.unembed(h.adapter.final_norm(acts[f"resid.{last}"])) - ref).abs().max() > 1e-4
