"""Architecture of ``shapes-omnifusion``: OmniFusion-style fusion around shapes-llava's decoder.

The decoder is a transformers ``LlamaForCausalLM`` of shapes-llava's size, initialised from the
same seed as shapes-llava's (its vocabulary has two more rows, for the marker tokens). Only the
image side differs, as in OmniFusion:

* **two image encoders**: shapes-llava's CLIP tower (the same pre-training) and a small
  convolutional encoder trained self-supervised (masked-patch reconstruction, no labels); both
  give one feature per 16-px patch (36 per image), concatenated per patch:
  ``f_k = [clip_k ; conv_k]`` (96 + 96 dimensions);
* an **adapter** ``A(f) = W_2 GELU(W_1 f + b_1) + b_2`` into the decoder's width;
* learned **begin/end-of-image embeddings** ``s, e``: the prompt is
  ``USER: <SOI><image>×36<EOI>\\n{question} ASSISTANT:`` and the decoder's input is
  ``s`` at ``<SOI>``, ``A(f_k)`` at the k-th ``<image>``, ``e`` at ``<EOI>`` and the token
  embedding elsewhere.

It is a :mod:`microscope.fusion` model: :func:`handle` builds the suite's ``Handle`` with
:func:`microscope.fusion.fuse`; :func:`save` writes a directory (``config.json`` with
``"microscope_fusion": "omnifusion"``, ``model.safetensors``, the tokenizer files and
``processor_config.json``) and :func:`load_dir` reads it back — the one place such a directory
is loaded (:func:`microscope.load` dispatches here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from microscope.errors import ModelNotFoundError

#: tokens written around the image: OmniFusion's start/end-of-image markers
BEGIN_IMAGE, END_IMAGE = "<SOI>", "<EOI>"
TEMPLATE = "USER: " + BEGIN_IMAGE + "{image}" + END_IMAGE + "\n{question} ASSISTANT:"
#: ``config.json`` key that marks a microscope fusion directory (:data:`microscope.zoo.FUSION_READERS`),
#: and this style's value
KIND_KEY, KIND = "microscope_fusion", "omnifusion"
#: sizes of the convolutional encoder and the adapter
CONV: dict[str, int] = {"width": 96, "hidden": 64}
ADAPTER_HIDDEN = 192


class ConvEncoder(nn.Module):
    """A small CNN with one output vector per 16-px patch (raster order), context from a 3×3
    convolution over the 6×6 patch map: ``(B, 3, 96, 96) -> (B, 36, width)``."""

    def __init__(self, width: int = 96, hidden: int = 64):
        super().__init__()
        self.width = width  # channels of the last convolution: the width of a patch's vector
        self.net = nn.Sequential(
            nn.Conv2d(3, hidden // 2, 4, stride=4), nn.GELU(),
            nn.Conv2d(hidden // 2, hidden, 2, stride=2), nn.GELU(),
            nn.Conv2d(hidden, width, 2, stride=2), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values).flatten(2).transpose(1, 2)


class OmniEncoder(nn.Module):
    """Both encoders, the adapter and the begin/end-of-image vectors.

    ``features(pix)`` is the frozen encoders' concatenated per-patch features (what training
    caches); ``adapt(f)`` the adapter; ``forward(pix) = adapt(features(pix))`` is what
    :class:`~microscope.fusion.FusionModel` places at the image positions, and
    :meth:`post_embed` writes ``s`` and ``e`` at the marker tokens.
    """

    def __init__(self, tower: CLIPVisionModel, conv: ConvEncoder, width: int, begin_id: int, end_id: int,
                 feature_layer: int = -1):
        super().__init__()
        self.tower, self.conv = tower, conv
        d = tower.config.hidden_size + conv.width
        self.adapter = nn.Sequential(nn.Linear(d, ADAPTER_HIDDEN), nn.GELU(), nn.Linear(ADAPTER_HIDDEN, width))
        self.begin = nn.Parameter(torch.randn(width) * 0.02)
        self.end = nn.Parameter(torch.randn(width) * 0.02)
        self.begin_id, self.end_id, self.feature_layer = int(begin_id), int(end_id), feature_layer

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[clip_k ; conv_k]`` per patch: CLIP's ``hidden_states[feature_layer]`` without CLS
        (what shapes-llava's projector reads) beside the CNN's patch vector."""
        hs = self.tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        return torch.cat([hs[self.feature_layer][:, 1:], self.conv(pixel_values)], -1)

    def adapt(self, feats: torch.Tensor) -> torch.Tensor:
        return self.adapter(feats)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.adapt(self.features(pixel_values))

    def post_embed(self, model, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Write the learned begin/end-of-image vectors at ``<SOI>`` / ``<EOI>``."""
        b = (input_ids == self.begin_id)[..., None]
        e = (input_ids == self.end_id)[..., None]
        return torch.where(b, self.begin.to(x.dtype), torch.where(e, self.end.to(x.dtype), x))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """shapes-llava's tokenizer with ``<SOI>`` and ``<EOI>`` added as special tokens (ids 39, 40)."""
    from microscope.zoo.shapes_llava import build_tokenizer as llava_tokenizer

    tok = llava_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", BEGIN_IMAGE, END_IMAGE]})
    return tok


def expand(question: str, n_image_tokens: int) -> str:
    """The prompt text with the image placeholder expanded to ``n_image_tokens`` tokens."""
    return TEMPLATE.replace("{image}", "<image>" * n_image_tokens).replace("{question}", question)


def decoder_from_llava(llava, tokenizer, seed: int, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` holding ``llava``'s decoder and LM head (its initialisation when
    ``llava`` is freshly built), with rows for the tokens ``tokenizer`` adds drawn from
    ``N(0, initializer_range²)`` with generator seed ``seed``."""
    tc = llava.config.text_config.to_dict()
    for k in ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype"):
        tc.pop(k, None)
    tc["vocab_size"] = len(tokenizer)
    cfg = LlamaConfig(**tc)
    cfg._attn_implementation = attn_implementation
    dec = LlamaForCausalLM(cfg)
    src = dict(llava.model.language_model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, head in (("embed_tokens.weight", None), ("lm_head", llava.lm_head.weight)):
            old = src[name] if head is None else head
            new = torch.randn(len(tokenizer) - old.shape[0], old.shape[1], generator=g) * cfg.initializer_range
            full = torch.cat([old, new])
            if head is None:
                src[name] = full
            else:
                dec.lm_head.weight.copy_(full)
        dec.model.load_state_dict(src)
    return dec.eval()


def image_processor(image_size: int) -> CLIPImageProcessorPil:
    """shapes-llava's image processor (CLIP normalisation, ``image_size`` px)."""
    return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                 "width": image_size}, do_center_crop=True, do_resize=True, do_convert_rgb=True)


def handle(decoder: LlamaForCausalLM, encoder: OmniEncoder, tokenizer, image_size: int, patch_size: int,
           name: str = "shapes-omnifusion"):
    """The suite's Handle (:func:`microscope.fusion.fuse`) for a decoder and an encoder."""
    from microscope.fusion import fuse

    ip = image_processor(image_size)
    fm = fuse(decoder, tokenizer, encode_images=encoder.eval(),
              preprocess=lambda images: ip(images, return_tensors="pt")["pixel_values"],
              n_image_tokens=(image_size // patch_size) ** 2, template=TEMPLATE, post_embed=encoder.post_embed,
              image_size=image_size, patch_size=patch_size, image_boundary_tokens=(BEGIN_IMAGE, END_IMAGE),
              name=name)
    return fm


def save(h, out: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``h``'s model as a fusion directory (see the module doc); returns ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    enc: OmniEncoder = h.model.encode_images
    cfg = {
        KIND_KEY: KIND, "text_config": h.model.decoder.config.to_dict(),
        "vision_config": enc.tower.config.to_dict(), "conv": CONV, "adapter_hidden": ADAPTER_HIDDEN,
        "feature_layer": enc.feature_layer, "image_size": h.model.image_size, "patch_size": h.model.patch_size,
        "template": TEMPLATE, "image_token": "<image>", "image_boundary_tokens": [BEGIN_IMAGE, END_IMAGE],
        **(extra or {}),
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    state = {k: v.detach().contiguous() for k, v in h.model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    h.processor.tokenizer.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps(
        {"image_processor": image_processor(h.model.image_size).to_dict(), "template": TEMPLATE}, indent=1))
    return out


def is_fusion_dir(path: str | Path) -> bool:
    """Whether ``path/config.json`` marks a microscope fusion directory."""
    f = Path(path) / "config.json"
    try:
        return f.is_file() and json.loads(f.read_text()).get(KIND_KEY) is not None
    except (OSError, ValueError):
        return False


def load_dir(path: str | Path, fix: str, name: str | None = None, attn_implementation: str = "sdpa"):
    """Read a fusion directory written by :func:`save` into a Handle (eval mode, float32).

    ``fix`` is what the error says to do when a file is missing or unreadable."""
    from safetensors.torch import load_file

    path = Path(path)
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise ModelNotFoundError(f"fusion model directory {path} lacks {', '.join(missing)}: {fix}")
    try:
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get(KIND_KEY) != KIND:
            raise ModelNotFoundError(f"{path}/config.json names fusion style {cfg.get(KIND_KEY)!r}; this version "
                                     f"reads {KIND!r}: {fix}")
        tok = PreTrainedTokenizerFast.from_pretrained(path)
        tc = {k: v for k, v in cfg["text_config"].items() if k not in ("architectures", "model_type",
                                                                      "transformers_version")}
        tcfg = LlamaConfig(**tc)
        tcfg._attn_implementation = attn_implementation
        decoder = LlamaForCausalLM(tcfg)
        vc = {k: v for k, v in cfg["vision_config"].items() if k not in ("architectures", "model_type",
                                                                        "transformers_version")}
        tower = CLIPVisionModel(CLIPVisionConfig(**vc))
        begin, end = tok.convert_tokens_to_ids(cfg["image_boundary_tokens"])
        encoder = OmniEncoder(tower, ConvEncoder(**cfg["conv"]), tcfg.hidden_size, begin, end, cfg["feature_layer"])
        h = handle(decoder, encoder, tok, cfg["image_size"], cfg["patch_size"], name=name or str(path))
        h.model.load_state_dict(load_file(str(path / "model.safetensors")))
    except ModelNotFoundError:
        raise
    except Exception as e:
        raise ModelNotFoundError(f"fusion model directory {path} could not be read ({type(e).__name__}: "
                                 f"{str(e)[:300]}): {fix}") from e
    h.model.eval()
    return h
