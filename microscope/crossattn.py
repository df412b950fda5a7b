"""Models whose text reads the image through cross-attention layers (Mllama, Llama-3.2-Vision).

    states = vision_states(handle, batch.inputs)     # (B, S, d): what every cross-attention layer reads
    ctx = cross_inputs(handle, batch.inputs)         # one prompt's cross-attention inputs, for suffix forwards

What "image" means for these models, and what differs from token-fused ones (LLaVA):

- The prompt holds one ``<|image|>`` token per image. It is a position of the sequence like any
  other: its decoder input is a learned embedding, **not** image features. Its role is ``image``
  (``input_ids == image_token_id``, as for every family), so extraction, geometry and self-attention
  knockout edges treat that placeholder as the image's position.
- The image itself enters as **vision states**: the vision tower's output, projected to the text
  width, ``S = images × tiles × (patches + 1)`` vectors per prompt. Every cross-attention decoder
  layer (``Adapter.cross_attention_layers``) lets each text position attend to them (keys and values
  from the vision states, queries from the sequence), gated: ``h' = h + tanh(g_attn)·CrossAttn(h)``,
  then ``h' + tanh(g_mlp)·r·MLP(h')``. The processor's ``cross_attention_mask`` says which positions
  may read which image's tiles: from an image's ``<|image|>`` token on. A text position allowed no
  tile (those before the first ``<|image|>``, padding) has its MLP term zeroed (``r = 0``) — but in
  transformers its cross-attention row is then *unmasked*, so it still reads every tile; the
  suite measures the model as transformers runs it. :func:`vision_states` returns these states
  (a capture of their own: they are not positions of the sequence).
- Forwards the suite builds from ``inputs_embeds`` (knockout rows, tracing rows) cannot derive
  the vision states: :func:`cross_inputs` gives them, with the cross-attention mask, to every such
  forward through :func:`microscope.prefix.position_kwargs`. With a clean-prefix cache
  (:mod:`microscope.prefix`) the cross-attention layers' cached keys and values (the projected
  vision states, computed once by the clean run) are kept whole and the states are not passed again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from microscope.errors import MicroscopeError

#: processor outputs the vision tower reads
VISION_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


class NotSupported(MicroscopeError, ValueError):
    """An analysis the model's architecture does not support (named, with the reason)."""


def has_cross_attention(handle) -> bool:
    """Whether the handle's decoder reads the image through cross-attention layers."""
    return bool(getattr(handle.adapter, "cross_attention_layers", None))


def no_patch_tokens(handle, what: str) -> NotSupported:
    """The refusal of an analysis that needs one sequence position per image patch, on a
    cross-attention model."""
    return NotSupported(
        f"{what} is not supported for {handle.name} ({type(handle.model).__name__}): its text reads the image "
        "through cross-attention layers, so the sequence holds one <|image|> placeholder per image, not one token "
        "per patch — there are no patch positions to block, corrupt, restore or score. Use the 'image' edges and "
        "the constraint corruptions; the vision states themselves are microscope.crossattn.vision_states")


def vision_states(handle, inputs: dict) -> torch.Tensor:
    """``(B, S, d)``: the vision states every cross-attention layer of row ``b`` reads, computed as
    the model computes them (vision tower on ``pixel_values``, ``aspect_ratio_ids``,
    ``aspect_ratio_mask``, then the multimodal projector), flattened to ``S = images × tiles ×
    (patches + 1)`` in the order the cross-attention's keys take them. Padding tiles are included;
    the cross-attention mask keeps them unread."""
    missing = [k for k in VISION_KEYS if inputs.get(k) is None]
    if missing:
        raise MicroscopeError(f"vision_states needs the processor's {', '.join(missing)} (pass the inputs of "
                              "microscope.prepare_samples, which hold the image)")
    inner = handle.model.model
    dev = handle.device
    out = inner.vision_model(**{k: inputs[k].to(dev) for k in VISION_KEYS}).last_hidden_state
    proj = inner.multi_modal_projector(out)  # (B, images, tiles, patches + 1, d)
    return proj.reshape(proj.shape[0], -1, proj.shape[-1])


@dataclass
class CrossInputs:
    """One prompt's cross-attention inputs for forwards built from ``inputs_embeds``: its vision
    states ``(1, S, d)`` and the processor's ``cross_attention_mask`` ``(1, T, images, tiles)``."""

    states: torch.Tensor
    mask: torch.Tensor

    def kwargs(self, length: int, rows: int) -> dict:
        """Keyword arguments for a forward of ``rows`` rows over the prompt's last ``length``
        positions: the mask of those positions, and the vision states when the forward covers the
        whole prompt (after a clean prefix, the cache holds the cross-attention keys and values)."""
        T = self.mask.shape[1]
        out = {"cross_attention_mask": self.mask[:, T - length:].expand(rows, -1, -1, -1)}
        if length == T:
            out["cross_attention_states"] = self.states.expand(rows, -1, -1)
        return out


def cross_inputs(handle, inputs: dict) -> CrossInputs:
    """:class:`CrossInputs` of a one-prompt batch (``inputs`` as the processor made them)."""
    mask = inputs.get("cross_attention_mask")
    if mask is None or inputs["input_ids"].shape[0] != 1:
        raise MicroscopeError("cross_inputs needs the processor's inputs of one prompt with its image "
                              "(cross_attention_mask missing or several rows)")
    with torch.no_grad():
        states = vision_states(handle, inputs)
    return CrossInputs(states=states, mask=mask.to(handle.device))
