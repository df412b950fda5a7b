"""Architecture of ``shapes-llava``: a real HF LLaVA (CLIP tower, MLP projector, Llama decoder).

``build_processor()`` makes the ``LlavaProcessor`` (a word-level ``tokenizers`` tokenizer,
a CLIP image processor and the LLaVA-1.5 chat template ``USER: <image>\\n{question} ASSISTANT:``);
``build_model(processor)`` makes a randomly initialised ``LlavaForConditionalGeneration`` whose
sizes are in :data:`ARCH`. Both are saved with ``save_pretrained`` and reloaded with
``from_pretrained``, exactly as a hub checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from microscope.data import shapes

#: sizes of the network; the image side and patch side give 6 x 6 = 36 image tokens
ARCH: dict[str, Any] = {
    "image_size": 96,
    "patch_size": 16,
    "vision_hidden": 96,
    "vision_layers": 3,
    "vision_heads": 4,
    "vision_intermediate": 384,
    "text_hidden": 192,
    "text_layers": 6,
    "text_heads": 6,
    "text_intermediate": 512,
    "max_positions": 256,
}
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
TEMPLATE_WORDS = ["USER", ":", "ASSISTANT"]
#: LLaVA-1.5's conversation format, as a chat template for ``apply_chat_template``
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "{% else %} ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
PROMPT = "USER: <image>\n{question} ASSISTANT:"


def prompt(question: str) -> str:
    """The LLaVA-1.5 prompt for one image and one question (what the chat template renders)."""
    return PROMPT.format(question=question)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the Shapes world's words; BOS ``<s>`` is prepended."""
    words = TEMPLATE_WORDS + shapes.vocabulary()
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left", model_max_length=ARCH["max_positions"],
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def build_processor() -> LlavaProcessor:
    """The ``LlavaProcessor`` of shapes-llava (36 image tokens per image)."""
    size = ARCH["image_size"]
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        do_center_crop=True, do_resize=True, do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(),
        patch_size=ARCH["patch_size"], vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1,
    )


def build_config(processor: LlavaProcessor) -> LlavaConfig:
    """The ``LlavaConfig`` for :data:`ARCH` and the processor's vocabulary."""
    tok = processor.tokenizer
    a = ARCH
    vision = CLIPVisionConfig(
        hidden_size=a["vision_hidden"], intermediate_size=a["vision_intermediate"],
        num_hidden_layers=a["vision_layers"], num_attention_heads=a["vision_heads"],
        image_size=a["image_size"], patch_size=a["patch_size"], num_channels=3,
        projection_dim=a["vision_hidden"],
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=a["text_hidden"], intermediate_size=a["text_intermediate"],
        num_hidden_layers=a["text_layers"], num_attention_heads=a["text_heads"],
        num_key_value_heads=a["text_heads"], max_position_embeddings=a["max_positions"],
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    n_img = (a["image_size"] // a["patch_size"]) ** 2
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=-1, image_seq_length=n_img, tie_word_embeddings=False,
    )


def build_model(processor: LlavaProcessor, seed: int = 0) -> LlavaForConditionalGeneration:
    """A randomly initialised shapes-llava (deterministic for ``seed``)."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(processor))
    model.eval()
    return model
