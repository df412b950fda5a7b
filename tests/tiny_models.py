"""Tiny random-weight checkpoints of every supported family, built from HF config classes.

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


def _qwen_tokenizer():
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]})
    return tok


#: Qwen2-VL's conversation layout: the image placeholder between vision start/end tokens
QWEN_TEMPLATE = CHAT_TEMPLATE.replace("<image>\n", "<|vision_start|><image><|vision_end|>\n")


def _build_qwen(path: Path, seed: int, family: str) -> Path:
    """Qwen2-VL / Qwen2.5-VL layout: dynamic-resolution tower (here 112 x 112 px → 8 x 8 patches,
    merged 2 x 2 into 16 image tokens), M-RoPE (3-D positions for image tokens), Qwen2 decoder."""
    import transformers

    from microscope.model import image_only

    tok = _qwen_tokenizer()
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in
           {"image_token_id": "<image>", "video_token_id": "<|video_pad|>",
            "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}.items()}
    text = dict(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 10000.0})
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=48, num_heads=2, patch_size=PATCH, spatial_merge_size=2,
                      temporal_patch_size=2)
        cfg, model_cls, proc_cls = transformers.Qwen2VLConfig, "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=48, num_heads=2,
                      patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
        cfg, model_cls, proc_cls = (transformers.Qwen2_5_VLConfig, "Qwen2_5_VLForConditionalGeneration",
                                    "Qwen2_5_VLProcessor")
    config = cfg(vision_config=vision, text_config=text, **ids)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = (2 * SIZE) ** 2
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=PATCH,
                                  merge_size=2, temporal_patch_size=2)
    proc = image_only(getattr(transformers, proc_cls))(image_processor=ip, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def build_qwen2_vl(path: Path, seed: int = 0) -> Path:
    return _build_qwen(path, seed, "qwen2_vl")


def build_qwen2_5_vl(path: Path, seed: int = 0) -> Path:
    return _build_qwen(path, seed, "qwen2_5_vl")


def build_llava_onevision(path: Path, seed: int = 0) -> Path:
    """LLaVA-OneVision layout: SigLIP tower, anyres tiling with every patch token kept ("full"),
    image-newline tokens, Qwen2 decoder."""
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
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=SIZE, patch_size=PATCH)  # SigLIP: no CLS token, every patch kept
    text = Qwen2Config(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    pins = [[SIZE, 2 * SIZE], [2 * SIZE, SIZE], [2 * SIZE, 2 * SIZE]]
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                               vision_feature_select_strategy="full", image_grid_pinpoints=pins)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    ip = LlavaOnevisionImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_grid_pinpoints=pins)
    proc = image_only(LlavaOnevisionProcessor)(image_processor=ip, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                                               num_image_tokens=(SIZE // PATCH) ** 2,
                                               vision_feature_select_strategy="full")
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


#: every tiny family, by name: its builder
BUILDERS = {"llava15": build_llava15, "llava_next": build_llava_next, "idefics3": build_idefics3,
            "qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl, "llava_onevision": build_llava_onevision}
TINY = list(BUILDERS)
#: the custom-fusion examples (tests/fusion_example.py), loaded as "tests.fusion_example:NAME"
FUSION = ["bunny", "omnifusion"]
#: every small model the invariants run on
MODELS = TINY + FUSION
