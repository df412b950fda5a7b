"""Tiny random-weight checkpoints of every tested family, built from HF config classes, with
the families' real tokenizers (or the closest pinned one, named below) and chat-template formats.

Each is written with ``save_pretrained`` (model sharded into several safetensors files with an
index, and processor) to a directory, so tests load them with the same calls as a hub checkpoint.
Tokenizers (``tests/real_tokenizers.py``; sources and licences in ``tests/tokenizers/README.md``):

- LLaVA-1.5, LLaVA-NeXT (Vicuna): Llama 2's SentencePiece BPE + ``<image>``, ``<pad>``;
  ``USER: <image>\\n{question} ASSISTANT:``
- LLaVA-NeXT-Mistral (:func:`build_llava_next_mistral`): Mistral 7B's SentencePiece BPE;
  ``[INST] <image>\\n{question} [/INST]``
- Qwen2-VL, Qwen2.5-VL: Qwen2's byte-level BPE with its own vision tokens; ChatML with the
  default system prompt and ``<|vision_start|><|image_pad|><|vision_end|>``
- LLaVA-OneVision: the same Qwen2 tokenizer + ``<image>``, ``<video>``;
  ``<|im_start|>user <image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n``
- Idefics3: Llama 3's byte-level BPE + Idefics3's image tokens (``<fake_token_around_image>``,
  ``<image>``, ``<end_of_utterance>``, ``<global-img>``, the 6 × 6 ``<row_i_col_j>`` tokens);
  ``<|begin_of_text|>User:<image>{question}<end_of_utterance>\\nAssistant:``
- VipLLaVA (Vicuna): Llama 2 + ``<image>``, ``<pad>``; llava-hf's prompt: a system sentence, then
  ``###Human: <image>\\n{question}###Assistant:``
- LLaVA-NeXT-Video (Vicuna; single images only): Llama 2 + ``<video>``, ``<image>``, ``<pad>``;
  ``USER: <image>\\n{question} ASSISTANT:``
- InternVL (Qwen2.5 decoders): Qwen2 + ``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<video>``; ChatML with
  ``<IMG_CONTEXT>\\n`` before the question (no system prompt)
- SmolVLM: SmolLM2's tokenizer is not pinned here; Llama 3's byte-level BPE (the closest pinned one)
  + SmolVLM's image tokens and ``<|im_start|>``;
  ``<|im_start|>User:<image>{question}<end_of_utterance>\\nAssistant:``
- Aya Vision: Cohere's tokenizer is not pinned here; Llama 3's byte-level BPE + Aya's turn, image and
  tile tokens; ``<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|><image>{question}<|END_OF_TURN_TOKEN|>``
  ``<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>``
- GLM-4.1V: GLM-4's tokenizer is not pinned here; Qwen2's byte-level BPE (the closest pinned one) +
  GLM's prompt and vision tokens;
  ``[gMASK]<sop><|user|>\\n<|begin_of_image|><|image|><|end_of_image|>{question}<|assistant|>\\n``

Chat templates are written from each family's published prompt format (not copied from the hub).

The vocabulary of each tiny model is ``len(tokenizer)``; hidden sizes stay tiny (text 48, vision
32), so even Qwen2's 151k-token embedding is a few million parameters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from tests.real_tokenizers import tokenizer_json

SIZE, PATCH = 56, 14  # 4 x 4 = 16 patches per tile
#: shard size for save_pretrained: every tiny model is written as several shards plus an index
SHARD = "4MB"
MAX_POSITIONS = 512


def chat_template(user: str, image: str, end_user: str, generation: str, sep: str, end_assistant: str,
                  start: str = "") -> str:
    """A Jinja chat template: ``start`` once; a user turn is ``user`` + its items (an image is
    ``image``, text verbatim) + ``end_user``; an assistant turn is ``generation + sep`` + its text +
    ``end_assistant``; the generation prompt is ``generation``."""
    items = ("{% for item in message['content'] %}{% if item['type'] == 'image' %}" + image +
             "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}")
    text = ("{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
            "{% endfor %}")
    return (start + "{% for message in messages %}{% if message['role'] == 'user' %}" + user + items + end_user +
            "{% else %}" + generation + sep + text + end_assistant + "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + generation + "{% endif %}")


#: LLaVA-1.5 / LLaVA-NeXT-Vicuna: ``USER: <image>\n{question} ASSISTANT:``
LLAVA_TEMPLATE = chat_template("USER: ", "<image>\n", "", " ASSISTANT:", " ", "</s>")
#: LLaVA-NeXT-Mistral: ``[INST] <image>\n{question} [/INST]``
MISTRAL_TEMPLATE = chat_template("[INST] ", "<image>\n", "", " [/INST]", " ", "</s>")
#: Qwen2-VL / Qwen2.5-VL: ChatML with the default system prompt, the image between vision tokens
QWEN_TEMPLATE = chat_template("<|im_start|>user\n", "<|vision_start|><|image_pad|><|vision_end|>", "<|im_end|>\n",
                              "<|im_start|>assistant\n", "", "<|im_end|>\n",
                              start="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
#: LLaVA-OneVision: ChatML without a system prompt, ``<image>\n`` before the text
ONEVISION_TEMPLATE = chat_template("<|im_start|>user ", "<image>\n", "<|im_end|>\n", "<|im_start|>assistant\n", "",
                                   "<|im_end|>\n")
#: VipLLaVA (llava-hf/vip-llava-7b-hf's prompt format): a system sentence, then
#: ``###Human: <image>\n{question}###Assistant:``
VIPLLAVA_TEMPLATE = chat_template("###Human: ", "<image>\n", "", "###Assistant:", " ", "</s>",
                                  start="A chat between a curious human and an artificial intelligence assistant. "
                                        "The assistant gives helpful, detailed, and polite answers to the human's "
                                        "questions.")
#: InternVL (OpenGVLab's -hf releases): ChatML, the image placeholder ``<IMG_CONTEXT>\n`` before the text
#: (the processor expands it to ``<img>`` + image tokens + ``</img>``)
INTERNVL_TEMPLATE = chat_template("<|im_start|>user\n", "<IMG_CONTEXT>\n", "<|im_end|>\n", "<|im_start|>assistant\n",
                                  "", "<|im_end|>\n")
#: SmolVLM (HuggingFaceTB/SmolVLM-Instruct's template):
#: ``<|im_start|>User:<image>{question}<end_of_utterance>\nAssistant:``
SMOLVLM_TEMPLATE = chat_template("User:", "<image>", "<end_of_utterance>\n", "Assistant:", " ", "<end_of_utterance>\n",
                                 start="<|im_start|>")
#: Aya Vision (Cohere's turn tokens): ``<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|><image>{question}``
#: ``<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>``
AYA_TEMPLATE = chat_template("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", "<image>", "<|END_OF_TURN_TOKEN|>",
                             "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", "", "<|END_OF_TURN_TOKEN|>",
                             start="<BOS_TOKEN>")
#: GLM-4.1V: ``[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>{question}<|assistant|>\n``
GLM4V_TEMPLATE = chat_template("<|user|>\n", "<|begin_of_image|><|image|><|end_of_image|>", "", "<|assistant|>\n", "",
                               "", start="[gMASK]<sop>")
#: Idefics3: ``<|begin_of_text|>User:<image>{question}<end_of_utterance>\nAssistant:``
IDEFICS3_TEMPLATE = chat_template("User:", "<image>", "<end_of_utterance>\n", "Assistant:", " ",
                                  "<end_of_utterance>\n", start="<|begin_of_text|>")


def _tokenizer(name: str, added: list[str], extra: dict[str, str] | None = None, **special: str
               ) -> PreTrainedTokenizerFast:
    """Real tokenizer ``name`` with special tokens ``added`` (appended to the vocabulary in order),
    left padding, and ``extra`` named special tokens (e.g. ``image_token``)."""
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json(name)), padding_side="left",
                                  model_max_length=MAX_POSITIONS, extra_special_tokens=extra or {}, **special)
    tok.add_special_tokens({"additional_special_tokens": added})
    pad = special.get("pad_token")
    if pad is not None and pad in added:
        tok.pad_token = pad
    return tok


def llama2_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 2's tokenizer as llava-hf's LLaVA-1.5 extends it: ``<image>`` (32000), ``<pad>`` (32001)."""
    return _tokenizer("llama2", ["<image>", "<pad>"], {"image_token": "<image>"}, bos_token="<s>", eos_token="</s>",
                      unk_token="<unk>", pad_token="<pad>")


def llava_video_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 2's tokenizer as llava-hf's LLaVA-NeXT-Video extends it: ``<video>`` (32000), ``<image>``
    (32001), ``<pad>``."""
    return _tokenizer("llama2", ["<video>", "<image>", "<pad>"], {"image_token": "<image>", "video_token": "<video>"},
                      bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def mistral_tokenizer() -> PreTrainedTokenizerFast:
    """Mistral 7B's tokenizer with ``<image>`` and ``<pad>`` added (LLaVA-NeXT-Mistral)."""
    return _tokenizer("mistral", ["<image>", "<pad>"], {"image_token": "<image>"}, bos_token="<s>", eos_token="</s>",
                      unk_token="<unk>", pad_token="<pad>")


def qwen2_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2's tokenizer: its vision tokens are already in the vocabulary (``<|image_pad|>`` …)."""
    return _tokenizer("qwen2", [], {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                      eos_token="<|im_end|>", pad_token="<|endoftext|>")


def onevision_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2's tokenizer with LLaVA-OneVision's ``<image>`` and ``<video>`` added."""
    return _tokenizer("qwen2", ["<image>", "<video>"], {"image_token": "<image>", "video_token": "<video>"},
                      eos_token="<|im_end|>", pad_token="<|endoftext|>")


def internvl_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2's tokenizer (InternVL3's decoders are Qwen2.5) with InternVL's ``<img>``, ``</img>``,
    ``<IMG_CONTEXT>`` and ``<video>`` added, named as its processor reads them."""
    names = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    return _tokenizer("qwen2", list(names.values()), names, eos_token="<|im_end|>", pad_token="<|endoftext|>")


IDEFICS3_TOKENS = (["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
                   + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)] + ["<global-img>"])


def idefics3_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 3's tokenizer with Idefics3's image and utterance tokens added."""
    return _tokenizer("llama3", IDEFICS3_TOKENS, {"image_token": "<image>"}, bos_token="<|begin_of_text|>",
                      eos_token="<end_of_utterance>", pad_token="<|reserved_special_token_0|>")


def smolvlm_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 3's byte-level BPE (the closest pinned one to SmolLM2's) with SmolVLM's image and
    utterance tokens and ``<|im_start|>`` (its BOS) added."""
    return _tokenizer("llama3", ["<|im_start|>", *IDEFICS3_TOKENS], {"image_token": "<image>"},
                      bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                      pad_token="<|reserved_special_token_0|>")


AYA_TOKENS = (["<BOS_TOKEN>", "<PAD>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
               "<|CHATBOT_TOKEN|>", "<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>",
               "<|IMG_LINE_BREAK|>", "TILE_GLOBAL"] + [f"TILE_{i}" for i in range(1, 13)])


def aya_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 3's byte-level BPE (the closest pinned one to Cohere's) with Aya Vision's turn and image
    tokens added, the tile markers (``TILE_GLOBAL``, ``TILE_i``) as single tokens as its processor
    counts them."""
    return _tokenizer("llama3", AYA_TOKENS, {"image_token": "<image>"}, bos_token="<BOS_TOKEN>",
                      eos_token="<|END_OF_TURN_TOKEN|>", pad_token="<PAD>")


GLM4V_TOKENS = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_image|>", "<|image|>",
                "<|end_of_image|>", "<|begin_of_video|>", "<|video|>", "<|end_of_video|>"]


def glm4v_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2's byte-level BPE (the closest pinned one to GLM-4's 151k-token BPE) with GLM-4.1V's
    prompt and vision tokens added."""
    return _tokenizer("qwen2", GLM4V_TOKENS, {"image_token": "<|image|>", "video_token": "<|video|>"},
                      eos_token="<|user|>", pad_token="<|endoftext|>")


def _save(model, proc, path: Path) -> Path:
    """Model (sharded, with ``model.safetensors.index.json``) and processor into ``path``."""
    model.save_pretrained(path, max_shard_size=SHARD)
    proc.save_pretrained(path)
    return path


def _text_ids(tok) -> dict:
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def _vision() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=SIZE, patch_size=PATCH, projection_dim=32)


def _llama(tok, cls=LlamaConfig, positions: int = MAX_POSITIONS):
    return cls(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=positions, **_text_ids(tok))


def build_llava15(path: Path, seed: int = 0) -> Path:
    """LLaVA-1.5 layout: CLIP (penultimate layer, CLS dropped), MLP projector, Llama."""
    tok = llama2_tokenizer()
    cfg = LlavaConfig(vision_config=_vision(), text_config=_llama(tok),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=(SIZE // PATCH) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    ip = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                          chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1)
    return _save(model, proc, path)


def _build_llava_next(path: Path, seed: int, tok, text, template: str) -> Path:
    pins = [[SIZE, 2 * SIZE], [2 * SIZE, SIZE], [2 * SIZE, 2 * SIZE]]
    cfg = LlavaNextConfig(vision_config=_vision(), text_config=text,
                          image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_grid_pinpoints=pins,
                          image_seq_length=(SIZE // PATCH) ** 2)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                    image_grid_pinpoints=pins)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                              vision_feature_select_strategy="default", chat_template=template,
                              num_additional_image_tokens=1)
    return _save(model, proc, path)


def build_llava_next(path: Path, seed: int = 0) -> Path:
    """LLaVA-NeXT (Vicuna) layout: anyres tiling (base image + tiles), image-newline tokens, Llama."""
    tok = llama2_tokenizer()
    return _build_llava_next(path, seed, tok, _llama(tok), LLAVA_TEMPLATE)


def build_llava_next_mistral(path: Path, seed: int = 0) -> Path:
    """LLaVA-NeXT-Mistral layout: as :func:`build_llava_next` with a Mistral decoder, Mistral's
    tokenizer and its ``[INST] … [/INST]`` format."""
    tok = mistral_tokenizer()
    return _build_llava_next(path, seed, tok, _llama(tok, MistralConfig), MISTRAL_TEMPLATE)


def build_vipllava(path: Path, seed: int = 0) -> Path:
    """VipLLaVA layout: CLIP features of several tower layers concatenated (CLS dropped), a
    layer-normed MLP projector, Llama (Vicuna); LLaVA's processor."""
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

    tok = llama2_tokenizer()
    cfg = VipLlavaConfig(vision_config=_vision(), text_config=_llama(tok),
                         image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=[-2, -1],
                         image_seq_length=(SIZE // PATCH) ** 2)
    torch.manual_seed(seed)
    model = VipLlavaForConditionalGeneration(cfg).eval()
    ip = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                          chat_template=VIPLLAVA_TEMPLATE, num_additional_image_tokens=1)
    return _save(model, proc, path)


def build_llava_next_video(path: Path, seed: int = 0) -> Path:
    """LLaVA-NeXT-Video layout (single images only): LLaVA-NeXT's anyres tiling and image-newline
    tokens, Llama (Vicuna), its processor without the video part (no torchvision here)."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor

    from microscope.model import image_only

    tok = llava_video_tokenizer()
    pins = [[SIZE, 2 * SIZE], [2 * SIZE, SIZE], [2 * SIZE, 2 * SIZE]]
    cfg = LlavaNextVideoConfig(vision_config=_vision(), text_config=_llama(tok),
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-2,
                               vision_feature_select_strategy="default", image_grid_pinpoints=pins,
                               image_seq_length=(SIZE // PATCH) ** 2)
    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration(cfg).eval()
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                    image_grid_pinpoints=pins)
    proc = image_only(LlavaNextVideoProcessor)(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                                               vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                                               num_additional_image_tokens=1)
    return _save(model, proc, path)


def _build_pixel_shuffle(path: Path, seed: int, config_cls, model_cls, processor_cls, vision_cls, ip_cls, tok,
                         template: str) -> Path:
    """The Idefics3 / SmolVLM layout: SigLIP-style tower, pixel-shuffle connector (scale 2), image
    tokens wrapped in <fake_token_around_image> / <global-img> tokens, Llama decoder, no splitting."""
    vision = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=SIZE, patch_size=PATCH)
    cfg = config_cls(vision_config=vision.to_dict(), text_config=_llama(tok).to_dict(), scale_factor=2,
                     image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    ip = ip_cls(size={"longest_edge": SIZE}, max_image_size={"longest_edge": SIZE}, do_image_splitting=False)
    proc = processor_cls(image_processor=ip, tokenizer=tok, chat_template=template,
                         image_seq_len=(SIZE // PATCH // 2) ** 2)
    return _save(model, proc, path)


def build_idefics3(path: Path, seed: int = 0) -> Path:
    """Idefics3 layout (SmolVLM's family): SigLIP-style tower, pixel-shuffle connector (scale 2),
    image tokens wrapped in <fake_token_around_image> / <global-img> tokens, Llama 3 text model."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return _build_pixel_shuffle(path, seed, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor,
                                Idefics3VisionConfig, Idefics3ImageProcessorPil, idefics3_tokenizer(),
                                IDEFICS3_TEMPLATE)


def build_internvl(path: Path, seed: int = 0) -> Path:
    """InternVL layout: InternViT-style tower, pixel-shuffle connector (ratio 0.5: 4 × 4 patches →
    4 image tokens between ``<img>`` and ``</img>``), Qwen2 decoder; one 56 px tile (no cropping)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    from microscope.model import image_only

    tok = internvl_tokenizer()
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=SIZE, patch_size=PATCH)
    n = (SIZE // PATCH // 2) ** 2
    cfg = InternVLConfig(vision_config=vision, text_config=_llama(tok, Qwen2Config), downsample_ratio=0.5,
                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=n)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg).eval()
    ip = GotOcr2ImageProcessorPil(size={"height": SIZE, "width": SIZE}, crop_to_patches=False)
    proc = image_only(InternVLProcessor)(image_processor=ip, tokenizer=tok, chat_template=INTERNVL_TEMPLATE,
                                         image_seq_length=n)
    return _save(model, proc, path)


def build_smolvlm(path: Path, seed: int = 0) -> Path:
    """SmolVLM layout: as Idefics3 (SigLIP-style tower, pixel shuffle, image tokens wrapped in
    ``<fake_token_around_image>`` / ``<global-img>``) with SmolVLM's own classes and prompt."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from microscope.model import image_only

    return _build_pixel_shuffle(path, seed, SmolVLMConfig, SmolVLMForConditionalGeneration,
                                image_only(SmolVLMProcessor), SmolVLMVisionConfig, SmolVLMImageProcessorPil,
                                smolvlm_tokenizer(), SMOLVLM_TEMPLATE)


def build_aya_vision(path: Path, seed: int = 0) -> Path:
    """Aya Vision layout: SigLIP tower, pixel-shuffle connector (factor 2: 4 × 4 patches → 4
    ``<|IMG_PATCH|>`` tokens per 56 px tile), the global thumbnail after up to 4 crops, Cohere2
    decoder (parallel attention and MLP, logits scaled by ``logit_scale``)."""
    from transformers import (
        AyaVisionConfig,
        AyaVisionForConditionalGeneration,
        AyaVisionProcessor,
        Cohere2Config,
        SiglipVisionConfig,
    )
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = aya_tokenizer()
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=SIZE, patch_size=PATCH)
    text = Cohere2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, sliding_window=64,
                         **_text_ids(tok))
    cfg = AyaVisionConfig(vision_config=vision, text_config=text, downsample_factor=2,
                          image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"))
    torch.manual_seed(seed)
    model = AyaVisionForConditionalGeneration(cfg).eval()
    ip = GotOcr2ImageProcessorPil(size={"height": SIZE, "width": SIZE}, crop_to_patches=True, max_patches=4,
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    proc = AyaVisionProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, img_size=SIZE, downsample_factor=2,
                              chat_template=AYA_TEMPLATE)
    return _save(model, proc, path)


def build_glm4v(path: Path, seed: int = 0) -> Path:
    """GLM-4.1V layout: dynamic-resolution tower (112 px → 8 × 8 patches merged 2 × 2 into 16 image
    tokens), M-RoPE, GLM-4 decoder with sandwich norms (the attention and MLP outputs are normed
    before they join the residual stream)."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vProcessor
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    from microscope.model import image_only

    tok = glm4v_tokenizer()
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in
           {"image_token_id": "<|image|>", "video_token_id": "<|video|>", "image_start_token_id": "<|begin_of_image|>",
            "image_end_token_id": "<|end_of_image|>", "video_start_token_id": "<|begin_of_video|>",
            "video_end_token_id": "<|end_of_video|>"}.items()}
    text = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=MAX_POSITIONS, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 1], "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.5})  # half of head_dim 12 rotates: 3 frequencies
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48, image_size=2 * SIZE,
                  patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2)
    cfg = Glm4vConfig(vision_config=vision, text_config=text, **ids)
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(cfg).eval()
    pixels = 2 * (2 * SIZE) ** 2  # GLM's pixel budget counts the temporal patch (2 frames) too
    ip = Glm4vImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=PATCH, merge_size=2,
                                temporal_patch_size=2)
    proc = image_only(Glm4vProcessor)(image_processor=ip, tokenizer=tok, chat_template=GLM4V_TEMPLATE)
    return _save(model, proc, path)


def _build_qwen(path: Path, seed: int, family: str) -> Path:
    """Qwen2-VL / Qwen2.5-VL layout: dynamic-resolution tower (here 112 x 112 px → 8 x 8 patches,
    merged 2 x 2 into 16 image tokens), M-RoPE (3-D positions for image tokens), Qwen2 decoder."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from microscope.model import image_only

    tok = qwen2_tokenizer()
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in
           {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
            "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}.items()}
    text = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, **_text_ids(tok),
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
    pixels = (2 * SIZE) ** 2
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=PATCH,
                                  merge_size=2, temporal_patch_size=2)
    proc = image_only(getattr(transformers, proc_cls))(image_processor=ip, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    return _save(model, proc, path)


def build_qwen2_vl(path: Path, seed: int = 0) -> Path:
    return _build_qwen(path, seed, "qwen2_vl")


def build_qwen2_5_vl(path: Path, seed: int = 0) -> Path:
    return _build_qwen(path, seed, "qwen2_5_vl")


def build_llava_onevision(path: Path, seed: int = 0, size: int = SIZE, patch: int = PATCH, tower_layers: int = 2,
                          feature_layer: int = -1, square_pin: bool = False) -> Path:
    """LLaVA-OneVision layout: SigLIP tower, anyres tiling with every patch token kept ("full"),
    image-newline tokens, Qwen2 decoder.

    ``size`` need not be a multiple of ``patch``: SigLIP's stride-``patch`` convolution sees
    ``g = size // patch`` patches per side and never the last ``size − g·patch`` pixels (the real
    SigLIP-384/14 tower: 27 × 27 over 378 px). The pinpoints are 1 × 2, 2 × 1 and 2 × 2 tiles of
    ``size`` px, and 1 × 1 with ``square_pin`` (a square image then gets one crop, not four).
    ``feature_layer``: the tower hidden state the projector reads (-1: the
    last layer; ``-(tower_layers + 1)``: the patch embeddings, so that image token k depends on
    patch k's pixels alone — transformers collects no hidden states when asked for layer 0).
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

    grid = size // patch
    positions = max(MAX_POSITIONS, 5 * grid * (grid + 1) + 256)  # base view + 2 × 2 crops with newlines
    tok = onevision_tokenizer()
    tok.model_max_length = positions
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=tower_layers,
                                num_attention_heads=2, image_size=size, patch_size=patch)  # no CLS token
    pins = [[size, size]] * square_pin + [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=_llama(tok, Qwen2Config, positions),
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"),
                               vision_feature_layer=feature_layer, vision_feature_select_strategy="full",
                               image_grid_pinpoints=pins)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    ip = LlavaOnevisionImageProcessorPil(size={"height": size, "width": size}, image_grid_pinpoints=pins)
    proc = image_only(LlavaOnevisionProcessor)(image_processor=ip, tokenizer=tok, chat_template=ONEVISION_TEMPLATE,
                                               num_image_tokens=grid * grid, vision_feature_select_strategy="full")
    return _save(model, proc, path)


#: every tiny family, by name: its builder
BUILDERS = {"llava15": build_llava15, "llava_next": build_llava_next, "idefics3": build_idefics3,
            "qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl, "llava_onevision": build_llava_onevision,
            "vipllava": build_vipllava, "llava_next_video": build_llava_next_video, "internvl": build_internvl,
            "smolvlm": build_smolvlm, "aya_vision": build_aya_vision,
            "glm4v": build_glm4v}
TINY = list(BUILDERS)
#: tokenizer variants checked by tests/test_tokenizers.py only (not run through every invariant)
VARIANTS = {"llava_next_mistral": build_llava_next_mistral}
#: the custom-fusion examples (tests/fusion_example.py), loaded as "tests.fusion_example:NAME"
FUSION = ["bunny", "omnifusion"]
#: every small model the invariants run on
MODELS = TINY + FUSION


#: Llama-3.2-Vision-Instruct with one image and no system message (its template then writes no
#: system block): ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>{question}<|eot_id|>``
#: ``<|start_header_id|>assistant<|end_header_id|>\n\n``
MLLAMA_TEMPLATE = chat_template("<|start_header_id|>user<|end_header_id|>\n\n", "<|image|>", "<|eot_id|>",
                                "<|start_header_id|>assistant<|end_header_id|>\n\n", "", "<|eot_id|>",
                                start="<|begin_of_text|>")
#: Llama-3.2-Vision's text vocabulary (its lm_head's size): the 128,256 Llama 3 tokens; ``<|image|>``
#: is id 128256, one past it (the input embedding has 8 rows more)
MLLAMA_VOCAB = 128256


def mllama_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 3's tokenizer as Llama-3.2-Vision extends it: ``<|image|>`` appended (id 128256, its
    config's ``image_token_index``); padding with id 128004 (Llama 3.1's ``<|finetune_right_pad_id|>``,
    named ``<|reserved_special_token_2|>`` in the pinned Llama 3.0 file)."""
    tok = _tokenizer("llama3", ["<|image|>"], {"image_token": "<|image|>"}, bos_token="<|begin_of_text|>",
                     eos_token="<|eot_id|>", pad_token="<|reserved_special_token_2|>")
    if tok.convert_tokens_to_ids("<|image|>") != MLLAMA_VOCAB:
        raise RuntimeError("the pinned Llama 3 tokenizer does not give <|image|> id 128256")
    return tok


def build_mllama(path: Path, seed: int = 0) -> Path:
    """Mllama (Llama-3.2-Vision) layout: a tiled vision tower (local + global encoder, up to 2 tiles
    of 56 px, 4 × 4 patches + CLS per tile), a linear projector to the vision states, and a 4-layer
    Llama 3 decoder whose layers 1 and 3 are gated cross-attention layers reading them; the text
    holds one ``<|image|>`` token per image. The gates are set non-zero (a fresh model's are 0, which
    would hide the image from the text)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = mllama_tokenizer()
    vision = MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                attention_heads=2, image_size=SIZE, patch_size=PATCH, max_num_tiles=2,
                                supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], intermediate_layers_indices=[0],
                                vision_output_dim=64)
    text = MllamaTextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, cross_attention_layers=[1, 3],
                            vocab_size=MLLAMA_VOCAB, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    cfg = MllamaConfig(vision_config=vision, text_config=text, image_token_index=MLLAMA_VOCAB)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for i in text.cross_attention_layers:
            layer = model.model.language_model.layers[i]
            layer.cross_attn_attn_gate.fill_(0.8)
            layer.cross_attn_mlp_gate.fill_(0.6)
    ip = MllamaImageProcessorPil(size={"height": SIZE, "width": SIZE}, max_image_tiles=2)
    proc = MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=MLLAMA_TEMPLATE)
    return _save(model, proc, path)


# registered here, below the table above, since its builder is defined after it


# ------------------------------------------------------------------- Gemma 3 and PaliGemma (bidirectional image tokens)

#: Gemma 3 (google/gemma-3-*-it's template): ``<bos><start_of_turn>user\n<start_of_image>{question}<end_of_turn>\n``
#: ``<start_of_turn>model\n``. The template writes ``<bos>`` itself, and the tokenizer adds one to every text:
#: a prompt that starts with the BOS token is tokenised without special tokens (as transformers'
#: ``apply_chat_template(tokenize=True)`` does), or it would start ``<bos><bos>``. The processor expands
#: ``<start_of_image>`` into ``\n\n<start_of_image>`` + image tokens + ``<end_of_image>\n\n``
GEMMA3_TEMPLATE = chat_template("<start_of_turn>user\n", "<start_of_image>", "<end_of_turn>\n",
                                "<start_of_turn>model\n", "", "<end_of_turn>\n", start="{{ bos_token }}")
#: Gemma's sliding window in the tiny models: shorter than their prompts, so the local layers see only part of them
GEMMA_WINDOW = 16


def _gemma_bos(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tok.add_bos_token = True  # Gemma's <bos>, not Mistral's <s>, starts every text (the post-processor is rebuilt)
    return tok


def gemma3_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma 3's own tokenizer (SentencePiece BPE with byte fallback, 262,144 pieces; its turn and
    image tokens already in the vocabulary), named as its processor reads them (``boi_token``,
    ``eoi_token``, ``image_token``); it starts every text with ``<bos>``, as Gemma's does."""
    names = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    return _gemma_bos(_tokenizer("gemma3", [], names, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                 pad_token="<pad>"))


def paligemma_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma's own tokenizer (SentencePiece BPE with byte fallback, 256,000 pieces) with PaliGemma's
    ``<image>`` added; PaliGemmaProcessor adds its ``<locNNNN>`` / ``<segNNN>`` tokens itself."""
    return _gemma_bos(_tokenizer("gemma", ["<image>"], {"image_token": "<image>"}, bos_token="<bos>",
                                 eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"))


def build_gemma3(path: Path, seed: int = 0) -> Path:
    """Gemma 3 layout: SigLIP tower (112 px, 14 px patches: 8 × 8), its patches average-pooled 2 × 2
    into 16 image tokens (``mm_tokens_per_image``), Gemma 3 decoder with sliding-window local
    layers (window shorter than the prompt) and a global one, embeddings scaled by √hidden; image
    tokens attend to each other bidirectionally (the processor's ``token_type_ids``)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, SiglipVisionConfig
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = gemma3_tokenizer()
    side = 2 * SIZE
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=side, patch_size=PATCH, vision_use_head=False)
    text = Gemma3TextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=12,
                            max_position_embeddings=MAX_POSITIONS, sliding_window=GEMMA_WINDOW,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                         "sliding_attention"], **_text_ids(tok))
    n = (side // PATCH // 2) ** 2
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in {"image_token_index": "<image_soft_token>",
                                                        "boi_token_index": "<start_of_image>",
                                                        "eoi_token_index": "<end_of_image>"}.items()}
    cfg = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=n, **ids)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers initialises the projection to zeros (a fresh model would not see its image)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.03)
    ip = Gemma3ImageProcessorPil(size={"height": side, "width": side}, do_pan_and_scan=False,
                                 image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=n)
    return _save(model, proc, path)


def build_paligemma(path: Path, seed: int = 0, gemma2: bool = False) -> Path:
    """PaliGemma layout: SigLIP tower (56 px: 4 × 4 = 16 image tokens), linear projector, Gemma
    decoder (``gemma2``: PaliGemma 2's Gemma 2 decoder, with sliding-window layers and attention
    and final-logit soft-capping; transformers runs it with eager attention only); no chat template —
    its processor writes the image tokens, ``<bos>``, the prompt and ``\n``, and the whole prompt is
    one bidirectional prefix (``token_type_ids`` 0)."""
    from transformers import (
        Gemma2Config,
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = paligemma_tokenizer()
    n = (SIZE // PATCH) ** 2
    ip = SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    ip.image_seq_length = n
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds its <loc>/<seg> tokens to the vocabulary
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=SIZE, patch_size=PATCH, vision_use_head=False)
    common = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=12, max_position_embeddings=MAX_POSITIONS, **_text_ids(tok))
    text = (Gemma2Config(query_pre_attn_scalar=12, sliding_window=GEMMA_WINDOW, **common) if gemma2
            else GemmaConfig(**common))
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=48, hidden_size=48,
                          vocab_size=len(tok), image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    return _save(model, proc, path)


BUILDERS.update({"mllama": build_mllama, "gemma3": build_gemma3, "paligemma": build_paligemma})
TINY[:] = list(BUILDERS)
MODELS[:] = TINY + FUSION



#: Janus / Janus-Pro (deepseek-community's -hf format, no system prompt):
#: ``<|User|>: <image_placeholder>\n{question}\n\n<|Assistant|>:`` (the processor wraps the image tokens in
#: ``<begin_of_image>`` … ``<end_of_image>``)
JANUS_TEMPLATE = chat_template("<|User|>: ", "<image_placeholder>\n", "\n\n", "<|Assistant|>:", " ",
                               "<｜end▁of▁sentence｜>", start="<｜begin▁of▁sentence｜>")


def janus_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 3's byte-level BPE (DeepSeek-LLM's own byte-level BPE, which Janus uses, is not pinned
    here; Llama 3's is the closest committed one) with Janus's sentence, turn and image tokens added."""
    names = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}
    added = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<|User|>", "<|Assistant|>", "<image_placeholder>",
             "<begin_of_image>", "<end_of_image>", "<｜▁pad▁｜>"]
    return _tokenizer("llama3", added, names, bos_token="<｜begin▁of▁sentence｜>",
                      eos_token="<｜end▁of▁sentence｜>", pad_token="<｜▁pad▁｜>")


def build_janus(path: Path, seed: int = 0) -> Path:
    """Janus layout (understanding path): SigLIP-style tower (56 px, 14 px patches: 16 image tokens),
    a 2-layer MLP aligner, Llama decoder; image tokens wrapped in ``<begin_of_image>`` …
    ``<end_of_image>``. The VQ image generator it also carries is tiny and unused."""
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    tok = janus_tokenizer()
    n = (SIZE // PATCH) ** 2
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
                               patch_size=PATCH, projection_dim=48, mlp_ratio=2.0, num_image_tokens=n)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=48, image_token_embed_dim=48)
    cfg = JanusConfig(text_config=_llama(tok), vision_config=vision, vq_config=vq,
                      image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(cfg).eval()
    ip = JanusImageProcessorPil(size={"height": SIZE, "width": SIZE})
    proc = JanusProcessor(image_processor=ip, tokenizer=tok, chat_template=JANUS_TEMPLATE, num_image_tokens=n)
    return _save(model, proc, path)


BUILDERS["janus"] = build_janus
TINY[:] = list(BUILDERS)
#: families whose tokenizer merges the question's last characters with the template text after it into
#: one token (Janus: its ``\n\n`` after the user turn, and a byte-level BPE has ``?\n\n`` as one token):
#: that token straddles question and template, so it has the template role and the question-role
#: tokens decode to the question without those characters
QUESTION_TAIL = {"janus": "?"}
MODELS[:] = TINY + FUSION
