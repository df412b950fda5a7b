"""Tiny random-weight LLaVA-1.5 and LLaVA-NeXT checkpoints, built from HF config classes.

Each is written with ``save_pretrained`` (model and processor) to a directory, so tests load
them with the same calls as a hub checkpoint. Their tokenizer is a word-level one over the Shapes
world's words (the real ones are SentencePiece; roles only need ids and character offsets).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from microscope.zoo.shapes_llava import CHAT_TEMPLATE, build_tokenizer

SIZE, PATCH = 56, 14  # 4 x 4 = 16 patches per tile


def _configs(tok):
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=SIZE, patch_size=PATCH, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return vision, text


def build_llava15(path: Path, seed: int = 0) -> Path:
    """LLaVA-1.5 layout: CLIP (penultimate layer, CLS dropped), MLP projector, Llama."""
    tok = build_tokenizer()
    vision, text = _configs(tok)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=(SIZE // PATCH) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    ip = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                          chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def build_llava_next(path: Path, seed: int = 0) -> Path:
    """LLaVA-NeXT layout: anyres tiling (base image + tiles), image-newline tokens, Llama."""
    tok = build_tokenizer()
    vision, text = _configs(tok)
    pins = [[SIZE, 2 * SIZE], [2 * SIZE, SIZE], [2 * SIZE, 2 * SIZE]]
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_grid_pinpoints=pins, image_seq_length=(SIZE // PATCH) ** 2)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                    image_grid_pinpoints=pins)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                              vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                              num_additional_image_tokens=1)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def build_idefics3(path: Path, seed: int = 0) -> Path:
    """Idefics3 layout (SmolVLM's family): SigLIP-style tower, pixel-shuffle connector (scale 2),
    image tokens wrapped in <fake_token_around_image> / <global-img> tokens, Llama text model."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<global-img>",
                                                         "<end_of_utterance>"]})
    _, text = _configs(tok)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=SIZE, patch_size=PATCH)
    cfg = Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=2,
                         image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    ip = Idefics3ImageProcessorPil(size={"longest_edge": SIZE}, max_image_size={"longest_edge": SIZE},
                                   do_image_splitting=False)
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                             image_seq_len=(SIZE // PATCH // 2) ** 2)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path
