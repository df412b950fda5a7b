"""Tiny random-weight LLaVA-OneVision checkpoints at an image size that is *not* a multiple of
the patch size, as the real SigLIP-384/14 tower has.

SigLIP embeds an ``S × S`` image with a ``p × p`` convolution of stride ``p`` and no padding, so
it sees ``g = S // p`` patches per side and never the last ``S - g·p`` rows and columns of pixels
(384 px / 14 px: a 27 × 27 grid over the first 378 px; 62 px / 14 px: 4 × 4 over the first 56 px).

``tower_layers=1, feature_layer=-2`` makes the model read the tower's patch embeddings
(convolution plus position embedding, before its attention layer: ``hidden_states[0]``, asked
for as -2 because transformers collects no hidden states when the requested layer is 0). Image
token k's input embedding then depends on patch k's pixels alone, so a test can check cell by
cell which image tokens a pixel change reaches, end to end through the processor, the
convolution and the anyres packing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from microscope.zoo.shapes_llava import CHAT_TEMPLATE, build_tokenizer


def build_onevision_native(path: Path, size: int = 62, patch: int = 14, tower_layers: int = 2,
                           feature_layer: int = -1, seed: int = 0) -> Path:
    """Write a LLaVA-OneVision checkpoint (SigLIP tower of ``size`` px and ``patch`` px patches,
    anyres tiling with every patch token kept, Qwen2 decoder) and its processor to ``path``.

    The processor resizes every view to ``size × size``; the base view is the whole image, and
    the grid pinpoints are 1 × 1, 1 × 2, 2 × 1 and 2 × 2 tiles of ``size`` px. ``feature_layer``:
    the tower hidden state the projector reads (-1: the last layer; ``-(tower_layers + 1)``: the
    patch embeddings).
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from microscope.model import image_only

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<video>"]})
    tok.model_max_length = 8 * (size // patch) ** 2 + 512  # anyres: base view, crops and newlines
    grid = size // patch
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=tower_layers,
                                num_attention_heads=2, image_size=size, patch_size=patch)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=tok.model_max_length,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    pins = [[size, size], [size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"),
                               vision_feature_layer=feature_layer, vision_feature_select_strategy="full",
                               image_grid_pinpoints=pins)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    ip = LlavaOnevisionImageProcessorPil(size={"height": size, "width": size}, image_grid_pinpoints=pins)
    proc = image_only(LlavaOnevisionProcessor)(image_processor=ip, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                                               num_image_tokens=grid * grid, vision_feature_select_strategy="full")
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path
