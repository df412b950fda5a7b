"""Model handle: one loader for bundled, local and cached HF image-text-to-text models.

    h = microscope.load("shapes-llava")             # bundled
    h = microscope.load("/data/llava-1.5-7b-hf")    # a local save_pretrained directory
    h = microscope.load("llava-hf/llava-1.5-7b-hf") # an id already in the HF cache (offline)
    h = microscope.load("my_models.bunny:handle")   # a function returning a Handle (microscope.fusion)
    h.model, h.processor, h.adapter.layers, h.adapter.final_norm, h.adapter.unembed

The :class:`Adapter` is the only place that knows where an architecture keeps its decoder
layers, final norm and unembedding; everything else asks it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import torch

from microscope import validate
from microscope.checkpoint import (
    DIR_FIX,
    Checkpoint,
    attention_error,
    chat_template_error,
    check_dtype,
    check_files,
    excerpt,
    hub_cache,
    hub_fix,
    is_attention_error,
    processor_error,
    weights_error,
)
from microscope.errors import MicroscopeError, ModelNotFoundError
from microscope.roles import lays_out_prompt

if TYPE_CHECKING:
    from transformers import PretrainedConfig, ProcessorMixin

#: attention implementation the suite loads models with: its interventions work through
#: transformers' attention interface, which ``sdpa`` and ``eager`` both honour
DEFAULT_ATTENTION = "sdpa"
#: families refused because they are image classifiers built on a bidirectional-image decoder, not
#: image-text-to-text models (ShieldGemma 2 scores a policy; Gemma 3 and PaliGemma themselves are
#: supported: their bidirectional image block is read off the model's own mask, :attr:`Adapter.attention_reach`)
BIDIRECTIONAL_IMAGE_ATTENTION = ("shieldgemma2",)
#: families whose text reads the image through cross-attention layers the suite does not model:
#: refused with a reason (IDEFICS 1: its gated cross-attention blocks sit inside the decoder layers,
#: beside their self-attention; Mllama's own cross-attention layers are supported, see
#: :attr:`Adapter.cross_attention_layers`)
CROSS_ATTENTION_IMAGE_INPUT = ("idefics",)
#: attribute name of a decoder layer's cross-attention module (Mllama's cross-attention layers have
#: it instead of ``self_attn``); the site that reads it
CROSS_ATTN = "cross_attn"
#: the few families whose transformers class is not the image-text-to-text auto mapping's (none
#: today; every other family's class comes from that mapping, and its parts are found by
#: :func:`adapter_for`'s introspection)
CLASS_OVERRIDES: dict[str, str] = {}
#: attribute names, tried in order, of a ForConditionalGeneration model's inner model's language
#: model (Idefics3 / SmolVLM: ``text_model``) and of that language model's final norm
LANGUAGE_MODEL_ATTRS = ("language_model", "text_model")
NORM_ATTRS = ("norm", "final_layernorm", "final_norm", "ln_f")
#: ``(after attention, after MLP)`` attribute names of the norms a decoder layer applies to its
#: attention and MLP outputs before adding them to the residual stream (GLM-4 / GLM-4.1V); what a
#: layer's "attn" and "mlp" sites read when it has them
POST_NORMS = (("post_self_attn_layernorm", "post_mlp_layernorm"),
              # Gemma 2 / 3 (``post_attention_layernorm`` alone is Llama's pre-MLP norm: the pair must exist)
              ("post_attention_layernorm", "post_feedforward_layernorm"))


def image_text_classes() -> dict[str, str]:
    """``model_type -> class name`` of every image-text-to-text family transformers ships (its
    own auto mapping), with :data:`CLASS_OVERRIDES` applied."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return {**MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, **CLASS_OVERRIDES}


def _submodule(parent: torch.nn.Module, name: str) -> torch.nn.Module:
    """``parent``'s child module ``name``; a missing one is an internal error naming it."""
    child = getattr(parent, name, None)
    if not isinstance(child, torch.nn.Module):
        raise MicroscopeError(f"internal: {type(parent).__name__} has no module {name!r}")
    return child


@dataclass
class Adapter:
    """Where an architecture keeps the parts the suite needs."""

    embed: torch.nn.Module
    layers: torch.nn.ModuleList
    final_norm: torch.nn.Module
    unembed: torch.nn.Module
    image_token_id: int
    #: ``inputs -> (3, B, T)`` rotary position ids for models whose positions are not simply
    #: 0..T-1 (Qwen2-VL's multimodal RoPE: image tokens get (time, row, column) positions and the
    #: text after an image resumes at the image's largest position + 1); ``None`` for 1-D RoPE.
    #: Forwards the suite builds from ``inputs_embeds`` pass these explicitly (see
    #: :func:`microscope.prefix.positions`), since the model cannot derive them without ids.
    position_ids: Callable[[dict], torch.Tensor] | None = None
    #: factor the model multiplies its output logits by after the unembedding (the ``logit_scale``
    #: attribute of a class that applies one, such as Cohere's causal LM); 1 for most models
    logit_scale: float = 1.0
    #: decoder layers that read the image through cross-attention instead of self-attending over the
    #: sequence (Mllama: layers with a ``cross_attn`` module and no ``self_attn``), found by
    #: introspection; empty for token-fused models
    cross_attention_layers: list[int] = field(default_factory=list)

    def attention(self, layer: int) -> torch.nn.Module:
        """Decoder layer ``layer``'s attention module: its ``self_attn``, or in a cross-attention
        layer its ``cross_attn`` (queries from the sequence, keys and values from the vision states)."""
        return _submodule(self.layers[layer], CROSS_ATTN if layer in self.cross_attention_layers else "self_attn")

    def has_site(self, layer: int, site: str) -> bool:
        """Whether decoder layer ``layer`` has ``site``: ``attn`` (self-attention) is absent from
        cross-attention layers and ``cross_attn`` from the others; what a layer lacks adds exactly 0."""
        if site == "attn":
            return layer not in self.cross_attention_layers
        if site == CROSS_ATTN:
            return layer in self.cross_attention_layers
        return True
    #: final logit soft-capping ``c`` of classes that apply it after the scale (Gemma 2 / PaliGemma 2):
    #: ``logits ↦ c · tanh(logits / c)``; ``None`` for none
    logit_softcap: float | None = None
    #: ``inputs -> (B, T)`` long: the last key position each query may read in any decoder layer, for
    #: models whose attention is not causal everywhere (Gemma 3: image tokens attend to their whole
    #: image; PaliGemma: the whole prompt is one bidirectional prefix). Read off the model's own
    #: attention masks for the processor's ``token_type_ids`` (:func:`_attention_reach`); ``None``
    #: for causal decoders, where it is each query's own position.
    attention_reach: Callable[[dict], torch.Tensor] | None = None

    @property
    def bidirectional(self) -> bool:
        """Whether some query may read a later key (see :attr:`attention_reach`)."""
        return self.attention_reach is not None

    def module(self, site: str, layer: int) -> torch.nn.Module:
        """The module whose output is decoder layer ``layer``'s ``site`` (the one place a site is
        looked up): ``"resid"`` the layer (its output is the residual stream), ``"attn"`` /
        ``"mlp"`` what the attention and the MLP add to it — their own outputs, or the norm after
        them where the layer has one (GLM-4's sandwich norms, :data:`POST_NORMS`).

        Cross-attention layers (Mllama) have ``"cross_attn"`` instead of ``"attn"``: the
        cross-attention's output ``c`` and the MLP's output ``m`` *before* the layer's tanh gates —
        the layer computes ``h' = h + tanh(g_attn)·c``, ``out = h' + tanh(g_mlp)·r·m`` with ``r`` the
        row mask that is 0 for text rows allowed no image tile (``full_text_row_masked_out_mask``).
        A site the layer does not have is refused (:meth:`has_site`)."""
        lay = self.layers[layer]
        if site == "resid":
            return lay
        if not self.has_site(layer, site):
            kind = "a cross-attention layer (no self-attention)" if site == "attn" else "a self-attention layer"
            raise MicroscopeError(f"decoder layer {layer} is {kind}: it has no {site!r} site (it adds exactly 0 "
                                  "there); cross-attention layers are "
                                  f"{self.cross_attention_layers}")
        if site == CROSS_ATTN:
            return _submodule(lay, CROSS_ATTN)
        for attn_norm, mlp_norm in POST_NORMS:
            if all(isinstance(getattr(lay, n, None), torch.nn.Module) for n in (attn_norm, mlp_norm)):
                return _submodule(lay, attn_norm if site == "attn" else mlp_norm)
        return _submodule(lay, "mlp" if site == "mlp" else "self_attn")

    def logits(self, resid: torch.Tensor) -> torch.Tensor:
        """The model's own next-token logits from a final residual stream: final norm, unembedding,
        logit scale."""
        out = self.unembed(self.final_norm(resid))
        out = out * self.logit_scale if self.logit_scale != 1.0 else out
        if self.logit_softcap is not None:
            out = torch.tanh(out / self.logit_softcap) * self.logit_softcap
        return out

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def check_layers(self, layers, allow_embedding: bool = True) -> list[int]:
        """Validate layer indices: 0..n_layers-1 are decoder layers, -1 is the embedding output.

        Raises ``ValueError`` naming the bad layer and the valid range. numpy/torch integers are
        integers; a string is a list literal (``'[0, 3]'``, papermill's ``-p``) or refused by name
        (:func:`microscope.validate.layers`).
        """
        return validate.layers(layers, self.n_layers, allow_embedding=allow_embedding, allow_empty=True)


@dataclass
class Handle:
    """A loaded model with its processor and adapter."""

    name: str
    model: torch.nn.Module
    #: a transformers processor (``ProcessorMixin``) or a custom-fusion one
    #: (:class:`microscope.fusion.FusionProcessor`): used by duck typing, hence ``Any``
    processor: Any
    adapter: Adapter

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def config_hash(self) -> str:
        """SHA-256 (first 16 hex digits) of the model config's canonical JSON."""
        # cast: torch types module attributes as Tensor | Module; a model's config is neither
        d = cast("PretrainedConfig", self.model.config).to_dict()
        d.pop("_name_or_path", None)
        d.pop("transformers_version", None)
        encoder = getattr(self.model, "encode_images", None)  # a custom-fusion model: its image side too
        if encoder is not None:
            d["fusion"] = [repr(encoder), self.model.image_token_id, self.processor.n_image_tokens,
                           self.processor.template]
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def weights_hash(self) -> str:
        """SHA-256 (first 16 hex digits) of the parameters and buffers as loaded (see
        :func:`weights_fingerprint`): two checkpoints with one config but other weights, or one
        checkpoint loaded in another dtype, differ. One pass over the weights, on their devices."""
        return weights_fingerprint(self.model)

    @property
    def processor_hash(self) -> str:
        """SHA-256 (first 16 hex digits) of the processor's configuration, vocabulary and chat
        template (see :func:`processor_fingerprint`)."""
        return processor_fingerprint(self.processor)


_WORDS = 1 << 24  # 64 MiB of int32 words per reduction chunk


def weights_fingerprint(model: torch.nn.Module, n_sample: int = 1024) -> str:
    """A cheap, exact fingerprint of a model's weights: per named parameter and buffer, its
    name, dtype, shape, the int64 sum of its bytes read as int32 words (integer addition, so the
    same on every device and thread count), and ``n_sample`` evenly spaced raw elements.

    Reads every weight once (memory bandwidth: about a second per 10 GB on a GPU, a few on a
    CPU) but hashes only a few kilobytes; any retraining or fine-tune changes the sums. A
    file-based hash would miss an in-memory model and a different dtype at load time."""
    h = hashlib.sha256()
    with torch.no_grad():
        tensors = list(model.named_parameters(remove_duplicate=True)) + list(model.named_buffers())
        for name, t in sorted(tensors, key=lambda x: x[0]):
            flat = t.detach().reshape(-1)
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            if flat.numel() == 0 or flat.device.type == "meta":  # offloaded: its name, dtype and shape only
                continue
            raw = flat.contiguous().view(torch.uint8)
            words = raw[: raw.numel() // 4 * 4].view(torch.int32)
            total = sum(int(words[i:i + _WORDS].sum(dtype=torch.int64)) for i in range(0, words.numel(), _WORDS))
            total += int(raw[words.numel() * 4:].sum(dtype=torch.int64))
            idx = torch.linspace(0, flat.numel() - 1, min(n_sample, flat.numel()), device=flat.device).long()
            h.update(f"{total}|".encode())
            h.update(flat[idx].contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _type_name(o) -> str:
    """JSON fallback without memory addresses (``repr`` of a function holds one)."""
    return f"<{type(o).__module__}.{type(o).__qualname__}>"


def processor_fingerprint(processor) -> str:
    """SHA-256 (first 16 hex digits) of what the processor turns a sample into: its serialised
    configuration (image processor settings, chat template), and its tokenizer's vocabulary,
    special tokens and chat template. A custom-fusion processor contributes its plain attributes
    (template, image token, token count; functions by type only)."""
    parts: dict = {"class": type(processor).__qualname__}
    to_dict = getattr(processor, "to_dict", None)
    if callable(to_dict):
        try:
            parts["config"] = to_dict()
        except Exception as e:  # a processor that cannot serialise itself: its type stands in
            parts["config"] = f"unserialisable: {type(e).__name__}"
    else:
        parts["attrs"] = {k: v for k, v in vars(processor).items() if k != "tokenizer"}
    tok = getattr(processor, "tokenizer", None)
    if tok is not None and hasattr(tok, "get_vocab"):
        parts["vocab"] = sorted(tok.get_vocab().items())
        parts["special"] = getattr(tok, "all_special_tokens", None)
        parts["tok_template"] = getattr(tok, "chat_template", None)
    parts["template"] = getattr(processor, "chat_template", None)
    blob = json.dumps(parts, sort_keys=True, default=_type_name).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _refuse(model, part: str) -> MicroscopeError:
    return MicroscopeError(f"{type(model).__name__} is not supported: {part}. The suite needs an image-text-to-text "
                           "model with a causal decoder (a ModuleList of layers, each with self_attn and mlp), a "
                           "final norm, input and output embeddings, and image tokens marked by one token id")


def _language_model(model):
    """The decoder of an image-text-to-text model: ``model.model.language_model`` (or
    ``text_model``), else what ``get_decoder()`` returns."""
    inner = getattr(model, "model", model)
    for name in LANGUAGE_MODEL_ATTRS:
        lm = getattr(inner, name, None)
        if isinstance(lm, torch.nn.Module):
            return lm
    get = getattr(model, "get_decoder", None)
    lm = get() if callable(get) else None
    if isinstance(lm, torch.nn.Module) and lm is not model:
        return lm
    raise _refuse(model, f"no language model: {type(inner).__name__} has none of "
                         f"{', '.join(LANGUAGE_MODEL_ATTRS)} and get_decoder() gives none")


def _image_token_id(model, processor=None) -> int:
    """The image-token id: config ``image_token_id`` or ``image_token_index``, else the id of the
    processor's ``image_token``; a mismatch between config and processor is refused."""
    cfg = model.config
    config_id = next((getattr(cfg, k) for k in ("image_token_id", "image_token_index")
                      if isinstance(getattr(cfg, k, None), int)), None)
    proc_id = getattr(processor, "image_token_id", None)  # the id it fills (Aya Vision: not its placeholder's)
    token = getattr(processor, "image_token", None)
    tok = getattr(processor, "tokenizer", None)
    if isinstance(proc_id, int):
        token = tok.convert_ids_to_tokens(proc_id) if tok is not None else token
    elif isinstance(token, str) and tok is not None:
        i = tok.convert_tokens_to_ids(token)
        proc_id = i if isinstance(i, int) and i != tok.unk_token_id else None
    image_id = config_id if config_id is not None else proc_id
    if image_id is None:
        where = "" if processor is None else (f", and the processor's image token {token!r} is not in its vocabulary"
                                              if isinstance(token, str) else ", nor has the processor an image_token")
        raise _refuse(model, f"no image-token id: config has neither image_token_id nor image_token_index{where}")
    marked = getattr(processor, "image_token_ids", None)  # ids it marks as image (Gemma 3: not its placeholder's)
    if config_id is not None and isinstance(marked, list) and config_id in marked:
        proc_id = config_id
    if config_id is not None and proc_id is not None and config_id != proc_id:
        raise _refuse(model, f"the config's image-token id {config_id} is not the processor's image token "
                             f"{token!r} ({proc_id}): the processor would mark other positions than the model fills")
    return int(image_id)


def adapter_for(model, processor=None) -> Adapter:
    """The :class:`Adapter` of a loaded image-text-to-text model, found by introspection: the
    language model's ``layers`` (a ModuleList whose layers all have ``self_attn`` and ``mlp``),
    its final norm, ``get_input_embeddings()`` / ``get_output_embeddings()``, the image-token id
    (config, or ``processor``'s ``image_token``) and, when the model has ``get_rope_index``, its
    multimodal rotary positions. A part that cannot be found: one :class:`MicroscopeError` naming it."""
    lm = _language_model(model)
    layers = getattr(lm, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise _refuse(model, f"no decoder layers: its language model {type(lm).__name__} has no 'layers' ModuleList")
    cross = []
    for i, layer in enumerate(layers):
        if not isinstance(getattr(layer, "self_attn", None), torch.nn.Module) and isinstance(
                getattr(layer, CROSS_ATTN, None), torch.nn.Module):
            cross.append(i)  # Mllama's cross-attention layers: cross_attn instead of self_attn
            parts: tuple[str, ...] = ("mlp",)
        else:
            parts = ("self_attn", "mlp")
        for part in parts:
            if not isinstance(getattr(layer, part, None), torch.nn.Module):
                raise _refuse(model, f"decoder layer {i} ({type(layer).__name__}) has no {part} module: tokens "
                                     "would mix or change outside the attention and MLP the suite hooks and knocks out")
    norm = next((getattr(lm, k) for k in NORM_ATTRS if isinstance(getattr(lm, k, None), torch.nn.Module)), None)
    if norm is None:
        raise _refuse(model, f"no final norm: its language model {type(lm).__name__} has none of "
                             f"{', '.join(NORM_ATTRS)}")
    embed, unembed = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embed, torch.nn.Embedding):
        raise _refuse(model, "no input embeddings: get_input_embeddings() gives no Embedding")
    if not isinstance(unembed, torch.nn.Linear):
        raise _refuse(model, "no unembedding: get_output_embeddings() gives no Linear (lm_head)")
    image_token_id = _image_token_id(model, processor)
    inner = getattr(model, "model", model)
    rope_index = getattr(inner, "get_rope_index", None)
    position_ids: Callable[[dict], torch.Tensor] | None = None
    if callable(rope_index):
        get_rope_index = rope_index

        def position_ids(inputs: dict) -> torch.Tensor:
            keys = ("mm_token_type_ids", "image_grid_thw", "attention_mask")
            return get_rope_index(inputs["input_ids"], **{k: inputs[k] for k in keys if inputs.get(k) is not None})[0]

    scale = getattr(model, "logit_scale", None)  # set by the class that scales its logits (CohereForCausalLM)
    return Adapter(embed=embed, layers=layers, final_norm=norm, unembed=unembed, image_token_id=image_token_id,
                   position_ids=position_ids,
                   logit_scale=float(scale) if isinstance(scale, (int, float)) else 1.0,
                   cross_attention_layers=cross, logit_softcap=_logit_softcap(model),
                   attention_reach=_attention_reach(model))


def _logit_softcap(model) -> float | None:
    """The text config's ``final_logit_softcapping`` when the model's class applies it to its
    logits (PaliGemma does for its Gemma 2 decoder; Gemma 3's class does not, and Gemma 3 has none):
    read off the class's ``forward``, like :attr:`Adapter.logit_scale` is read off the class."""
    import inspect

    get_text = getattr(model.config, "get_text_config", None)
    cap = getattr(get_text() if callable(get_text) else model.config, "final_logit_softcapping", None)
    if not isinstance(cap, (int, float)) or not cap:
        return None
    try:
        applies = "final_logit_softcapping" in inspect.getsource(type(model).forward)
    except (OSError, TypeError):  # no source: trust the config
        applies = True
    return float(cap) if applies else None


def _attention_reach(model) -> Callable[[dict], torch.Tensor] | None:
    """For a model whose mask depends on ``token_type_ids`` (its forward takes them and its class
    builds its masks from them, ``create_masks_for_generate(..., token_type_ids=...)``: Gemma 3,
    PaliGemma), ``inputs -> (B, T)`` long: ``reach[b, q] = max{k : query q may read key k in some
    layer}`` from the model's own masks (every layer type: full and sliding); ``None`` otherwise.

    ``reach[q] > q`` means q reads a later position — bidirectional attention, which knockout edges
    and the clean-prefix shortcut (:func:`microscope.prefix.causal_start`) must take into account."""
    import inspect

    build = getattr(type(model), "create_masks_for_generate", None)
    try:
        takes = ("token_type_ids" in inspect.signature(model.forward).parameters
                 and build is not None and "token_type_ids" in inspect.signature(build).parameters)
    except (TypeError, ValueError):
        takes = False
    if build is None or not takes:
        return None

    def reach(inputs: dict) -> torch.Tensor:
        ids = inputs["input_ids"]
        B, T = ids.shape
        att = inputs.get("attention_mask")
        tt = inputs.get("token_type_ids")
        pos = torch.arange(T, device=ids.device).expand(B, T)
        if tt is None:
            return pos
        probe = torch.zeros(B, T, 1, dtype=model.dtype, device=ids.device)  # shape, dtype and device only
        masks = build(config=model.config, inputs_embeds=probe, attention_mask=att, cache=None, position_ids=None,
                      token_type_ids=tt.to(ids.device), is_first_iteration=True)
        out = pos.clone()
        for m in (masks.values() if isinstance(masks, dict) else [masks]):
            if m is None:  # a causal mask sdpa may skip
                continue
            allowed = m if m.dtype == torch.bool else m == 0
            allowed = allowed.any(1).expand(B, T, T)  # over heads
            k = torch.arange(T, device=ids.device)
            out = torch.maximum(out, torch.where(allowed, k, -1).amax(-1))
        return out

    return reach


class _NoVideo:
    """The video processor of an :func:`image_only` processor: every setting is ``None`` (SmolVLM's
    ``apply_chat_template`` reads its ``num_frames`` and ``fps`` even for an image-only conversation)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __repr__(self) -> str:
        return "<no video processor>"


def image_only(processor_cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``processor_cls`` without its video processor: the same class name, preprocessing and
    token expansion for images and text, and ``videos=`` unsupported.

    transformers builds video processors on torchvision; without it (there is no CPU build of
    torchvision for every torch release), processors such as Qwen2-VL's or LLaVA-OneVision's
    cannot even be constructed, although the suite never passes videos. Positional arguments
    follow the image-only attribute order (``image_processor, tokenizer``), also for classes
    whose own ``__init__`` takes the video processor first (LLaVA-NeXT-Video).
    """

    class Attributes:  # get_attributes(): without the video processor, except while __init__ runs
        def __get__(self, obj, cls):
            full = processor_cls.get_attributes  # read off the parent's own __init__
            if obj is not None and obj.__dict__.get("_video_slot"):
                return full
            return lambda: [a for a in full() if a != "video_processor"]

    def init(self, given: dict):
        self.__dict__["_video_slot"] = True  # the parent's __init__ may pass video_processor=None positionally
        try:
            processor_cls.__init__(self, **{"video_processor": None, **given})
        finally:
            del self.__dict__["_video_slot"]
        self.__dict__.pop("video_processor", None)

    # an __init__ with the image-only attributes first and the parent's other named parameters after
    # them (from_pretrained passes the attributes positionally and reads the accepted names off the signature)
    import inspect

    attrs = [a for a in processor_cls.get_attributes() if a != "video_processor"]
    named = [p.name for p in list(inspect.signature(processor_cls.__init__).parameters.values())[1:]
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "video_processor"]
    order = attrs + [n for n in named if n not in attrs]
    src = (f"def __init__(self, {''.join(f'{n}=_UNSET, ' for n in order)}**kwargs):\n"
           f"    given = {{{''.join(f'{n!r}: {n}, ' for n in order)}}}\n"
           "    init(self, {**{k: v for k, v in given.items() if v is not _UNSET}, **kwargs})\n")
    scope = {"_UNSET": object(), "init": init}
    exec(src, scope)
    __init__ = scope["__init__"]

    def check_argument_for_proper_class(self, name, arg):
        if name == "video_processor" and arg is None:
            return None
        return processor_cls.check_argument_for_proper_class(self, name, arg)

    sub = type(processor_cls.__name__, (processor_cls,),
               {"get_attributes": Attributes(), "__init__": __init__, "__module__": processor_cls.__module__,
                "check_argument_for_proper_class": check_argument_for_proper_class,
                "video_processor": _NoVideo()})
    return sub


def _load_processor(path: Path, model_type: str):
    """``AutoProcessor.from_pretrained``; without torchvision, the image-only processor (warned)."""
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.utils import is_torchvision_available

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception:
        name = PROCESSOR_MAPPING_NAMES.get(model_type)
        if is_torchvision_available() or name is None:
            raise
        import transformers

        cls = getattr(transformers, name)
        if "video_processor" not in cls.get_attributes():
            raise
    warnings.warn(f"torchvision is not installed: {name} loaded without its video processor (the suite "
                  "passes images only)", stacklevel=3)
    return image_only(cls).from_pretrained(path, local_files_only=True)


_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def is_factory_spec(name_or_path: object) -> TypeGuard[str]:
    """``name_or_path`` names a handle factory (``"package.module:function"``), not a path."""
    return isinstance(name_or_path, str) and bool(_FACTORY.fullmatch(name_or_path)) and not Path(name_or_path).exists()
#: environment variable: comma-separated modules (and their submodules) whose functions model
#: strings may name, e.g. ``MICROSCOPE_FACTORIES=tests.fusion_example,my_models``
FACTORIES_ENV = "MICROSCOPE_FACTORIES"


class FactoryNotAllowedError(MicroscopeError, PermissionError):
    """A ``"module:function"`` model string that was not explicitly allowed."""


def factory_allowed(spec: str, allow_factory: bool = False) -> bool:
    """Whether the model string ``"module:function"`` may be imported and called: with
    ``allow_factory=True``, or when its module (or a package above it) is listed in
    ``$MICROSCOPE_FACTORIES``."""
    if allow_factory:
        return True
    mod = spec.split(":")[0]
    listed = [m.strip() for m in os.environ.get(FACTORIES_ENV, "").split(",") if m.strip()]
    return any(mod == m or mod.startswith(m + ".") for m in listed)


def _from_factory(spec: str, device, dtype, allow_factory: bool = False) -> Handle:
    """``"package.module:function"``: import it and call ``function()``, which returns a Handle
    (a custom-fusion model, :mod:`microscope.fusion`) — only when explicitly allowed
    (:func:`factory_allowed`): a model string is a notebook parameter, and importing and calling a
    function it names would run any code (``"os:system"``, ``"shutil:rmtree"``)."""
    import importlib

    mod_name, fn_name = spec.split(":")
    if not factory_allowed(spec, allow_factory):
        raise FactoryNotAllowedError(
            f"model {spec!r} names a function to import and call (a model factory); that is refused unless "
            "allowed explicitly, since a model string can come from a notebook parameter and would run any code. "
            f"If you trust {mod_name!r}: microscope.load({spec!r}, allow_factory=True), or export "
            f"{FACTORIES_ENV}={mod_name} (comma-separated modules) for notebooks and the suite "
            "(python -m microscope.suite --allow-factory)")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ModelNotFoundError(f"model factory {spec!r} could not be imported ({e}); put its package on "
                                 "PYTHONPATH (or install it) and check the function name") from e
    import inspect

    try:
        required = [p for p in inspect.signature(fn).parameters.values()
                    if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        required = []
    if required:
        raise MicroscopeError(f"model factory {spec!r} must be callable without arguments; it requires "
                              f"{[p.name for p in required]}")
    h = fn()
    if not isinstance(h, Handle):
        raise MicroscopeError(f"model factory {spec!r} returned {type(h).__name__}, not a microscope Handle "
                              "(build one with microscope.fusion.fuse)")
    dtype = None if dtype == "auto" else dtype  # a factory's model is already in its own dtype
    if device is not None or dtype is not None:
        h.model.to(device=device, dtype=dtype)
    return h


def _resolve(name_or_path: str) -> Checkpoint:
    """The checkpoint directory of a bundled name, a local directory or a cached hub id, with the
    fix its errors will suggest (the bundled model's file check applies to bundled names only)."""
    from microscope.zoo import BUNDLED, model_dir, rebuild

    if name_or_path in BUNDLED:
        return Checkpoint(model_dir(name_or_path), rebuild(name_or_path))
    path = Path(name_or_path).expanduser()
    if name_or_path.startswith((".", "~", "/")) or path.is_dir():
        if not path.is_dir():
            raise ModelNotFoundError(
                f"model directory {path} does not exist: check the path (a checkpoint directory is one written "
                "by save_pretrained or `hf download ORG/NAME --local-dir DIR`)")
        return Checkpoint(path, DIR_FIX)
    if "/" in name_or_path:
        from huggingface_hub import snapshot_download

        cache = hub_cache()
        try:
            snap = snapshot_download(name_or_path, local_files_only=True, cache_dir=cache)
        except Exception as e:
            raise ModelNotFoundError(
                f"model {name_or_path!r} is not in the local Hugging Face cache ({cache}) and the hub cannot be "
                "reached from here: download it where there is internet (`hf download "
                f"{name_or_path} --local-dir DIR`), copy DIR here and call microscope.load(DIR)"
            ) from e
        return Checkpoint(Path(snap), hub_fix(name_or_path))
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: pass a bundled name ({', '.join(BUNDLED)}), a local "
        "directory written by save_pretrained, or a hub id (org/name) already in the HF cache"
    )


def _fusion_reader(path: Path) -> Callable | None:
    """The reader of a microscope fusion directory (:data:`microscope.zoo.FUSION_READERS`, by the
    value of ``config.json``'s ``"microscope_fusion"``), ``None`` for any other directory; an
    unknown value is a :class:`ModelNotFoundError` naming the known ones."""
    import importlib
    import json

    from microscope.zoo import FUSION_KEY, FUSION_READERS

    try:
        kind = json.loads((path / "config.json").read_text()).get(FUSION_KEY)
    except (OSError, ValueError, AttributeError):
        return None  # judged by the ordinary checks
    if kind is None:
        return None
    if kind not in FUSION_READERS:
        raise ModelNotFoundError(f"{path}/config.json names fusion style {kind!r}; this version reads "
                                 f"{sorted(FUSION_READERS)}: re-save it with a matching microscope")
    mod, fn = FUSION_READERS[kind].split(":")
    return getattr(importlib.import_module(mod), fn)


def _check_supported(config, path: Path) -> str:
    """The transformers class name for ``config``'s model type (transformers' image-text-to-text
    auto mapping); a reasoned refusal for families whose attention or image input the suite does
    not model, for text-only and encoder-decoder models, and for types transformers does not know."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mt = config.model_type
    if mt in BIDIRECTIONAL_IMAGE_ATTENTION:
        raise MicroscopeError(
            f"model type {mt!r} of {path} is refused: it is an image classifier (a policy score), not an "
            "image-text-to-text model answering questions; load its base model (Gemma 3) instead")
    if mt in CROSS_ATTENTION_IMAGE_INPUT:
        raise MicroscopeError(
            f"model type {mt!r} of {path} is refused: its text reads the image through gated cross-attention "
            "blocks kept outside its decoder layers (applied before every few of them), which the suite's hooks, "
            "knockout and tracing do not reach (Mllama's cross-attention decoder layers are supported)")
    classes = image_text_classes()
    cls_name = classes.get(mt)
    if cls_name is None:
        if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise MicroscopeError(f"model type {mt!r} of {path} is a text-only model (no vision tower, no image "
                                  "tokens): the suite studies how image tokens reach the text; load an "
                                  "image-text-to-text model")
        raise MicroscopeError(f"model type {mt!r} of {path} is not supported: it is not an image-text-to-text model "
                              "transformers knows (not in its image-text-to-text auto mapping)")
    deepstack = getattr(getattr(config, "vision_config", None), "deepstack_visual_indexes", None)
    if deepstack:
        raise MicroscopeError(
            f"model type {mt!r} of {path} is refused: it adds image features into the hidden states of its first "
            f"decoder layers too (DeepStack, vision layers {list(deepstack)}), not only at the "
            "decoder input, while the suite's knockout, tracing and attribution forwards start from the decoder "
            "input alone")
    if getattr(config, "is_encoder_decoder", False):
        raise MicroscopeError(f"model type {mt!r} of {path} is refused: it is an encoder-decoder model, while the "
                              "suite studies image tokens inside one causal decoder")
    return cls_name


def load(name_or_path: str | Path = "shapes-llava", device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None, attn_implementation: str = DEFAULT_ATTENTION,
         device_map: str | dict | None = None, allow_pickle: bool = False, allow_factory: bool = False
         ) -> Handle:
    """Load a model, its processor and adapter, offline, in eval mode.

    ``name_or_path``: a bundled name, a ``save_pretrained`` directory, a hub id already in the HF
    cache, or ``"package.module:function"`` — a function without arguments returning a Handle
    (a custom-fusion model, :mod:`microscope.fusion`; ``device``/``dtype`` then move it). Such a
    factory string is imported and called only with ``allow_factory=True`` or when its module is
    listed in ``$MICROSCOPE_FACTORIES`` (comma-separated): otherwise
    :class:`FactoryNotAllowedError`, before anything is imported.

    A directory (or cached snapshot) is read in every layout ``from_pretrained`` reads: single or
    sharded safetensors (``model.safetensors.index.json`` and its shards), with or without
    ``processor_config.json`` (Qwen's releases have ``preprocessor_config.json`` only), with the chat
    template in ``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``. Pickle
    weights (``pytorch_model.bin``) load only with ``allow_pickle=True``: unpickling can execute code.
    Its files are checked first (:mod:`microscope.checkpoint`); every failure is one error naming
    the directory, what is missing or wrong, and the fix.

    ``dtype``: ``"float32"``, ``"float16"``, ``"bfloat16"``, ``"float64"``, a floating torch.dtype,
    or ``"auto"``/``None`` for the checkpoint's own (float32 for shapes-llava); ``device`` defaults
    to CPU. ``attn_implementation``: ``"sdpa"`` or ``"eager"`` (others, such as
    ``"flash_attention_2"``, if installed). ``device_map`` (e.g. ``"auto"``) shards a large model over
    the visible GPUs with accelerate, as ``from_pretrained`` does; hooks and interventions work on
    the sharded model unchanged.
    """
    dtype = check_dtype(dtype)
    if is_factory_spec(name_or_path):
        return _from_factory(name_or_path, device, dtype, allow_factory)
    if device_map is not None and device is not None:
        raise ValueError("give either device (one device) or device_map (sharding), not both")
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError as e:
            raise MicroscopeError("device_map needs the accelerate package: pip install accelerate") from e
    import transformers
    from transformers import AutoConfig

    ckpt = _resolve(str(name_or_path))
    path = ckpt.path
    reader = _fusion_reader(path)
    if reader is not None:  # a microscope fusion directory (shapes-omnifusion's format)
        if device_map is not None:
            raise MicroscopeError(f"{path} is a microscope fusion model: load it on one device (device=...), "
                                  "not with device_map")
        h = reader(path, ckpt.fix, name=str(name_or_path), attn_implementation=attn_implementation)
        if device is not None or dtype not in (None, "auto"):
            h.model.to(device=device, dtype=None if dtype == "auto" else dtype)
        return h
    config_error: Exception | None = None
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        config_error = e
    if config_error is not None:
        check_files(ckpt, allow_pickle)  # a missing or unreadable config.json is named here first
        raise ModelNotFoundError(f"model directory {path}: config.json could not be read as a transformers "
                                 f"config ({excerpt(config_error)}): {ckpt.fix}") from config_error
    # an unsupported family is refused for that reason, before its files are judged
    cls_name = _check_supported(config, path)
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise MicroscopeError(f"model type {config.model_type!r} of {path}: transformers has no class "
                              f"{cls_name} to load it with (upgrade transformers)")
    check_files(ckpt, allow_pickle)
    try:
        processor = _load_processor(path, config.model_type)
    except Exception as e:
        raise processor_error(ckpt, e) from e
    tokenizer_template = getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    if getattr(processor, "chat_template", None) is None and tokenizer_template:
        processor.chat_template = tokenizer_template  # the template kept in tokenizer_config.json
    if getattr(processor, "chat_template", None) is None and not lays_out_prompt(processor):
        raise chat_template_error(ckpt)
    extra = {"device_map": device_map} if device_map is not None else {}
    try:
        model = cls.from_pretrained(path, local_files_only=True, dtype=dtype or "auto",
                                    attn_implementation=attn_implementation,
                                    use_safetensors=None if allow_pickle else True, **extra)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        if is_attention_error(e):
            raise attention_error(ckpt, attn_implementation, e) from e
        raise weights_error(ckpt, e) from e
    model.eval()
    if device is not None:
        model.to(device)
    return Handle(name=str(name_or_path), model=model, processor=processor, adapter=adapter_for(model, processor))
