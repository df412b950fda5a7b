"""Custom fusion: models that are not transformers classes, as a suite :class:`~microscope.model.Handle`.

OmniFusion (a CLIP/SigLIP encoder and an adapter feeding Mistral, with learned start/end-of-image
embeddings) and Bunny (SigLIP, an MLP projector, Phi-2) are research code around a transformers
causal LM. The suite needs three things from such a model:

* an **embedding function** ``encode_images(pixel_values) -> (N, n, d)``: each image as ``n``
  vectors in the decoder's input space (vision tower + projector/adapter);
* a **decoder**: the transformers causal LM (``PhiForCausalLM``, ``MistralForCausalLM``, …)
  that reads ``inputs_embeds``; knockout, tracing and extraction work through its layers and its
  attention interface, exactly as for the HF families;
* an **image-position mask**: where in the sequence those vectors go. Here the processor writes
  one placeholder token per image vector and the mask is ``input_ids == image_token_id``, so roles,
  knockout edges and corruption targets come from the ids as for every other model.

    h = fuse(decoder, tokenizer, encode_images=encoder, preprocess=image_processor,
             n_image_tokens=729, template="USER: {image}\\n{question} ASSISTANT:", name="bunny")
    microscope.knockout.sweep(h, samples)            # any analysis of the suite

The fused input is ``x_t = E[ids_t]`` for text positions and ``x_t = f(image)_k`` for the k-th
image position (row-major over the batch, one image per prompt); ``post_embed(model, ids, x)``
may rewrite it further (OmniFusion's learned ⟨SOI⟩/⟨EOI⟩ vectors; name those marker tokens in
``image_boundary_tokens`` and they get the role ``image_boundary``). The placeholder id need not
exist in the decoder's vocabulary: its rows are overwritten before the decoder sees them.

Notebooks take such a model as ``model="package.module:function"`` — a function that builds and
returns the handle (see :func:`microscope.model.load`). ``tests/fusion_example.py`` is a worked,
runnable example of both styles on small random-weight models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import BatchFeature, PreTrainedModel

from microscope.errors import MicroscopeError
from microscope.model import Adapter, Handle

DEFAULT_TEMPLATE = "USER: {image}\n{question} ASSISTANT:"


class FusionProcessor:
    """An HF-processor-shaped front end: a prompt template, a tokenizer and an image preprocessor.

    ``processor(images=, text=)`` expands each placeholder ``image_token`` to ``n_image_tokens``
    copies and returns ``input_ids``, ``attention_mask`` and ``pixel_values``.
    """

    def __init__(self, tokenizer, preprocess: Callable, n_image_tokens: int, image_token: str = "<image>",
                 template: str = DEFAULT_TEMPLATE, image_boundary_tokens: Sequence[str] = ()):
        if template.count("{image}") != 1 or template.count("{question}") != 1:
            raise ValueError(f"template must contain {{image}} and {{question}} once each, got {template!r}")
        if not isinstance(n_image_tokens, int) or n_image_tokens < 1:
            raise ValueError(f"n_image_tokens must be a positive integer, got {n_image_tokens!r}")
        ids = tokenizer(image_token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"image_token {image_token!r} is {len(ids)} tokens for this tokenizer; it must be one: "
                             f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}})")
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.n_image_tokens = n_image_tokens
        self.image_token = image_token
        self.image_token_id = int(ids[0])
        self.template = template
        for t in image_boundary_tokens:
            if len(tokenizer(t, add_special_tokens=False)["input_ids"]) != 1 or t not in template:
                raise ValueError(f"image boundary token {t!r} must be one token of this tokenizer and appear in the "
                                 f"template {template!r}")
        #: begin/end-of-image marker tokens (role ``image_boundary``, :mod:`microscope.roles`)
        self.image_boundary_tokens = tuple(image_boundary_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **_) -> str:
        """The prompt of one user turn (an image and text): ``template`` filled in."""
        if len(messages) != 1 or messages[0].get("role") != "user":
            raise ValueError("a fusion processor renders one user message (an image and a question)")
        text = "".join(it["text"] for it in messages[0]["content"] if it.get("type") == "text")
        return self.template.replace("{image}", self.image_token).replace("{question}", text)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True,
                 **_) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else list(images)
        counts = [t.count(self.image_token) for t in texts]
        if any(c != 1 for c in counts) or len(images) != len(texts):
            raise ValueError(f"a fusion processor takes one image per prompt and one {self.image_token!r} per "
                             f"prompt; got {len(images)} images and placeholder counts {counts}")
        expanded = [t.replace(self.image_token, self.image_token * self.n_image_tokens) for t in texts]
        enc = self.tokenizer(expanded, padding=padding, return_tensors="pt")
        got = (enc["input_ids"] == self.image_token_id).sum(1)
        if not bool((got == self.n_image_tokens).all()):
            raise ValueError(f"the tokenizer split the image placeholders: {got.tolist()} image positions per row, "
                             f"expected {self.n_image_tokens}")
        pixels = self.preprocess(images)
        if not isinstance(pixels, torch.Tensor):  # an HF image processor's BatchFeature
            pixels = torch.as_tensor(pixels["pixel_values"])
        return BatchFeature({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                             "pixel_values": pixels})


class FusionModel(torch.nn.Module):
    """``decoder(inputs_embeds=embed(input_ids, pixel_values))`` — see the module doc."""

    def __init__(self, decoder: PreTrainedModel, encode_images: Callable, image_token_id: int,
                 post_embed: Callable | None = None, image_size: int | None = None,
                 patch_size: int | None = None):
        super().__init__()
        self.decoder = decoder
        self.encode_images = encode_images  # registered as a submodule when it is one
        self.image_token_id = int(image_token_id)
        self.post_embed = post_embed
        self.image_size, self.patch_size = image_size, patch_size

    @property
    def config(self):
        return self.decoder.config

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.decoder.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.decoder.get_output_embeddings()

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the positions the image vectors fill."""
        return input_ids == self.image_token_id

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """The decoder's input: token embeddings with each image's vectors at its positions."""
        mask = self.image_mask(input_ids)
        emb = self.get_input_embeddings()
        x = emb(input_ids.masked_fill(mask, 0))
        if mask.any():
            if pixel_values is None:
                raise ValueError("input_ids hold image positions but no pixel_values were given")
            enc = self.encode_images
            param = next(enc.parameters(), None) if isinstance(enc, torch.nn.Module) else None
            dt = param.dtype if param is not None else x.dtype
            feats = enc(pixel_values.to(x.device, dt))
            if feats.ndim != 3 or feats.shape[-1] != x.shape[-1] or feats.shape[0] * feats.shape[1] != int(mask.sum()):
                raise ValueError(f"encode_images gave {tuple(feats.shape)} for {int(mask.sum())} image positions of "
                                 f"width {x.shape[-1]}: it must return (images, n_image_tokens, decoder width)")
            x = x.masked_scatter(mask[..., None], feats.to(x.dtype))
        if self.post_embed is not None:
            x = self.post_embed(self, input_ids, x)
        return x

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None, **kwargs):
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("FusionModel.forward needs input_ids or inputs_embeds; got neither")
            inputs_embeds = self.embed(input_ids, pixel_values)
        return self.decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


def _decoder_parts(decoder: PreTrainedModel) -> tuple[torch.nn.ModuleList, torch.nn.Module]:
    base = decoder.get_decoder() if hasattr(decoder, "get_decoder") else getattr(decoder, "model", None)
    layers = getattr(base, "layers", None)
    norm = getattr(base, "norm", None) or getattr(base, "final_layernorm", None)
    if not isinstance(layers, torch.nn.ModuleList) or norm is None or decoder.get_output_embeddings() is None:
        raise MicroscopeError(f"{type(decoder).__name__} is not a transformers causal LM with decoder layers, a final "
                              "norm and an LM head (e.g. PhiForCausalLM, MistralForCausalLM, LlamaForCausalLM)")
    return layers, norm


def fuse(decoder: PreTrainedModel, tokenizer, encode_images: Callable, preprocess: Callable, n_image_tokens: int,
         *, image_token: str = "<image>", template: str = DEFAULT_TEMPLATE, post_embed: Callable | None = None,
         image_size: int | None = None, patch_size: int | None = None, image_boundary_tokens: Sequence[str] = (),
         name: str = "fusion") -> Handle:
    """A :class:`~microscope.model.Handle` for a custom-fusion model (see the module doc).

    ``preprocess(images) -> pixel_values``: PIL images to the encoder's input tensor (an HF image
    processor works). ``image_size``/``patch_size``: give them when the ``n_image_tokens`` vectors
    are one per patch of a fixed ``(image_size / patch_size)²`` grid in raster order; the
    related/other-image knockout edges and corruption targets then work too. ``image_boundary_tokens``:
    begin/end-of-image marker tokens of ``template`` (OmniFusion's ``<SOI>``, ``<EOI>``), which
    get the role ``image_boundary`` instead of ``template``.
    """
    if not isinstance(decoder, PreTrainedModel):
        raise MicroscopeError(f"decoder must be a transformers PreTrainedModel (a causal LM), got "
                              f"{type(decoder).__name__}")
    impl = decoder.config._attn_implementation
    if impl not in ("sdpa", "eager"):
        raise MicroscopeError(f"the decoder runs attention with {impl!r}; load it with attn_implementation='sdpa' "
                              "(or 'eager') — the suite's interventions wrap those")
    if (image_size is None) != (patch_size is None):
        raise ValueError("give both image_size and patch_size, or neither")
    if image_size is not None and patch_size is not None and (image_size // patch_size) ** 2 != n_image_tokens:
        raise ValueError(f"a {image_size // patch_size}² patch grid is not {n_image_tokens} image tokens")
    layers, norm = _decoder_parts(decoder)
    processor = FusionProcessor(tokenizer, preprocess, n_image_tokens, image_token, template, image_boundary_tokens)
    model = FusionModel(decoder, encode_images, processor.image_token_id, post_embed, image_size, patch_size).eval()
    adapter = Adapter(embed=decoder.get_input_embeddings(), layers=layers, final_norm=norm,
                      unembed=decoder.get_output_embeddings(), image_token_id=processor.image_token_id)
    return Handle(name=name, model=model, processor=processor, adapter=adapter)
