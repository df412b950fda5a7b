"""Worked example: two custom-fusion models (not transformers classes) wrapped for the suite.

Both are small and random-weight, with the real models' structure; swap in the real parts
(``SiglipVisionModel.from_pretrained(...)``, the checkpoint's projector weights,
``PhiForCausalLM.from_pretrained(..., attn_implementation="sdpa")``) and nothing else changes.

* :func:`bunny` — Bunny style: SigLIP tower → two-layer MLP projector → Phi-2 decoder.
* :func:`omnifusion` — OmniFusion style: CLIP tower (penultimate layer, CLS dropped) → adapter →
  Mistral decoder, with learned start/end-of-image vectors written around the image by
  ``post_embed``.

Use them like any model: ``h = bunny()`` in Python, or ``model="tests.fusion_example:bunny"`` as a
notebook parameter (the repository root on ``PYTHONPATH``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    MistralConfig,
    MistralForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from microscope.fusion import fuse
from microscope.zoo.shapes_llava import build_tokenizer

SIZE, PATCH, WIDTH = 56, 14, 48  # a 4 × 4 patch grid: 16 image vectors per image


def _preprocess(image_processor):
    """PIL images → the tower's ``pixel_values`` tensor."""
    return lambda images: image_processor(images, return_tensors="pt")["pixel_values"]


class BunnyEncoder(nn.Module):
    """SigLIP's last hidden states (one vector per patch) through an MLP projector."""

    def __init__(self, tower: SiglipVisionModel, width: int):
        super().__init__()
        d = tower.config.hidden_size
        self.tower = tower
        self.projector = nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tower(pixel_values=pixel_values).last_hidden_state)


@functools.cache
def bunny():
    """A Bunny-style model as a suite handle."""
    torch.manual_seed(0)
    tok = build_tokenizer()  # holds an "<image>" token; a real Phi-2 tokenizer needs it added
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, image_size=SIZE, patch_size=PATCH))
    decoder = PhiForCausalLM(PhiConfig(vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=96,
                                       num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id, attn_implementation="sdpa"))
    ip = SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    return fuse(decoder.eval(), tok, encode_images=BunnyEncoder(tower, WIDTH).eval(), preprocess=_preprocess(ip),
                n_image_tokens=(SIZE // PATCH) ** 2, template="USER: {image}\n{question} ASSISTANT:",
                image_size=SIZE, patch_size=PATCH, name="bunny-tiny")


class OmniFusionEncoder(nn.Module):
    """CLIP's penultimate hidden states without CLS, through a small adapter, plus the learned
    start/end-of-image vectors OmniFusion places around the image."""

    def __init__(self, tower: CLIPVisionModel, width: int):
        super().__init__()
        self.tower = tower
        self.adapter = nn.Sequential(nn.LayerNorm(tower.config.hidden_size), nn.Linear(tower.config.hidden_size, width))
        self.soi = nn.Parameter(torch.randn(width) * 0.02)
        self.eoi = nn.Parameter(torch.randn(width) * 0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
        return self.adapter(h[:, 1:])


@functools.cache
def omnifusion():
    """An OmniFusion-style model as a suite handle."""
    torch.manual_seed(1)
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<SOI>", "<EOI>"]})
    soi, eoi = tok.convert_tokens_to_ids(["<SOI>", "<EOI>"])
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=SIZE, patch_size=PATCH))
    decoder = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=96,
                                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               attn_implementation="sdpa"))
    encoder = OmniFusionEncoder(tower, WIDTH).eval()

    def post_embed(model, input_ids, x):
        """Write the learned ⟨SOI⟩/⟨EOI⟩ vectors at their marker tokens."""
        x = x.clone()
        x[input_ids == soi] = encoder.soi.to(x.dtype)
        x[input_ids == eoi] = encoder.eoi.to(x.dtype)
        return x

    ip = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return fuse(decoder.eval(), tok, encode_images=encoder, preprocess=_preprocess(ip),
                n_image_tokens=(SIZE // PATCH) ** 2, template="USER: <SOI>{image}<EOI>\n{question} ASSISTANT:",
                post_embed=post_embed, image_size=SIZE, patch_size=PATCH, name="omnifusion-tiny")
