"""Clean-prefix key/value caches: compute only the positions an intervention can change.

    out = model(**clean_inputs, use_cache=True)              # the clean run, once
    prefix = prefix_of(out, first)                          # its keys/values of positions < first
    model(inputs_embeds=rows[:, first:], **cache_kwargs(handle, prefix, len(rows)), ...)

With causal attention, an intervention that first touches position ``first`` (a corrupted
token, a knocked-out query) leaves every state of the positions before it exactly as in the
clean run. Interventions batched as rows therefore share those positions' keys and values:
they are taken from the clean run's own cache and handed to the model as a transformers ``DynamicCache``; each row
computes only the suffix. The results equal whole-prompt forwards up to float rounding
(tested against them in tests/ and benchmarks/).

transformers 5.0 names the cache keyword of ``forward`` and the output field ``past_key_values``;
by 5.24 both are ``cache``, the old keyword raises a ``FutureWarning`` and reading
``output.past_key_values`` logs a deprecation notice. :func:`cache_kwargs` and :func:`prefix_of`
use the names of the installed version, so nothing warns on either.

Models with multimodal rotary positions (Qwen2-VL) cannot derive a suffix's positions from
``inputs_embeds``; :func:`positions` and :func:`position_kwargs` hand them the clean prompt's own.
Models that read the image through cross-attention layers (Mllama) cannot derive the vision states
either: for them :func:`positions` gives the prompt's :class:`~microscope.crossattn.CrossInputs`
(vision states and cross-attention mask), which :func:`position_kwargs` passes the same way. Their
cache's cross-attention layers hold the vision states' keys and values, not positions: a prefix
keeps them whole (``prefix_of(..., keep=handle.adapter.cross_attention_layers)``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from microscope.crossattn import CrossInputs, cross_inputs
from microscope.errors import MicroscopeError

if TYPE_CHECKING:
    from transformers import Cache

_CACHE_NAMES = ("cache", "past_key_values")  # the current transformers name first, then the old one


@functools.cache
def cache_keyword(forward_owner: type) -> str:
    """The keyword the ``forward`` of models of class ``forward_owner`` takes a key/value cache by:
    ``"cache"`` (current transformers) or ``"past_key_values"`` (transformers 5.0). A ``forward``
    naming neither (one passing ``**kwargs`` to a transformers decoder, like
    :class:`microscope.fusion.FusionModel`) gets the installed transformers' own name."""
    params = inspect.signature(forward_owner.forward).parameters
    for name in _CACHE_NAMES:
        if name in params:
            return name
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def returned_cache(out: Mapping) -> Cache:
    """The key/value cache a forward with ``use_cache=True`` returned, under whichever name
    (``cache`` or ``past_key_values``) the installed transformers gives the output field."""
    for name in _CACHE_NAMES:
        if out.get(name) is not None:
            return out[name]
    raise ValueError(f"the forward returned no key/value cache (fields: {list(out.keys())}); "
                     "was it called with use_cache=True?")


class Prefix(list):
    """Per-layer clean ``(key, value)`` pairs, with the layers kept whole (``keep``)."""

    keep: tuple[int, ...] = ()


def prefix_of(out: Mapping, first: int, keep: Sequence[int] = ()) -> Prefix | None:
    """Per-layer clean ``(key, value)`` of positions ``< first``, sliced from the cache that the
    clean forward's output ``out`` holds (called with ``use_cache=True``; no extra forward);
    ``None`` when ``first == 0`` (nothing to share). Layers in ``keep`` (cross-attention layers,
    whose keys and values are the vision states) are kept whole. ``None`` too when layer 0 is one
    of them: the model reads the number of cached positions off layer 0."""
    keep = tuple(sorted(int(i) for i in keep))
    if first <= 0 or 0 in keep:
        return None
    past = returned_cache(out)
    res = Prefix((layer.keys, layer.values) if i in keep else (layer.keys[..., :first, :], layer.values[..., :first, :])
                 for i, layer in enumerate(past.layers))
    res.keep = keep
    return res


def expand(handle, prefix: list | None, rows: int):
    """A fresh ``DynamicCache`` holding ``prefix`` for ``rows`` rows (``None`` passes through).

    A new cache per forward: the model appends the suffix's keys and values to it."""
    if prefix is None:
        return None
    cross = tuple(getattr(handle.adapter, "cross_attention_layers", ()))
    if tuple(getattr(prefix, "keep", ())) != cross:
        raise MicroscopeError(f"internal: a prefix cache whose whole layers are {list(getattr(prefix, 'keep', ()))}, "
                              f"on a model whose cross-attention layers are {list(cross)}: build it with "
                              "prefix_of(past, first, keep=handle.adapter.cross_attention_layers)")
    from transformers import DynamicCache

    data = [(k.expand(rows, -1, -1, -1).contiguous(), v.expand(rows, -1, -1, -1).contiguous()) for k, v in prefix]
    return DynamicCache(ddp_cache_data=data, config=handle.model.config)


def cache_kwargs(handle, prefix: list | None, rows: int) -> dict:
    """The keyword argument handing :func:`expand`'s cache to ``handle.model``'s forward, under
    the name it takes (:func:`cache_keyword`)."""
    return {cache_keyword(type(handle.model)): expand(handle, prefix, rows)}


def length(prefix: list | None) -> int:
    """Number of cached positions."""
    return 0 if not prefix else int(prefix[0][0].shape[-2])


def positions(handle, inputs: dict) -> torch.Tensor | CrossInputs | None:
    """The rotary positions of one prompt as the processor made it: ``(3, 1, T)`` (time, row,
    column) for Qwen2-VL-style M-RoPE, ``None`` for 1-D RoPE, where the model's own
    ``past_length + arange`` is right; for a cross-attention model (Mllama, 1-D RoPE) its
    :class:`~microscope.crossattn.CrossInputs` instead, which forwards from ``inputs_embeds`` need."""
    if getattr(handle.adapter, "cross_attention_layers", None):
        return cross_inputs(handle, inputs)
    f = handle.adapter.position_ids
    return None if f is None else f(inputs).to(handle.device)


def position_kwargs(pos: torch.Tensor | CrossInputs | None, length: int, rows: int) -> dict:
    """Keyword arguments giving a forward of ``rows`` rows over the last ``length`` positions of
    the prompt whose :func:`positions` are ``pos`` (``{}`` when ``pos`` is None; the
    cross-attention inputs of those positions for :class:`~microscope.crossattn.CrossInputs`)."""
    if isinstance(pos, CrossInputs):
        return pos.kwargs(length, rows)
    return {} if pos is None else {"position_ids": pos[..., pos.shape[-1] - length:].expand(-1, rows, -1)}


def next_token_probs(handle, embeds: torch.Tensor, prefix: list | None = None,
                     position_ids: torch.Tensor | CrossInputs | None = None) -> torch.Tensor:
    """Next-token distributions ``(R, V)`` at the last position of decoder inputs ``embeds``
    ``(R, T, d)``: the rows hold only the suffix after ``prefix`` (the clean cache of the positions
    before them, or ``None``), ``position_ids`` the whole prompt's :func:`positions`. Gradients flow
    when enabled (integrated gradients); callers that need none wrap it in ``torch.no_grad``."""
    R, T = embeds.shape[:2]
    mask = torch.ones((R, T + length(prefix)), dtype=torch.long, device=embeds.device)
    logits = handle.model(inputs_embeds=embeds, attention_mask=mask, **cache_kwargs(handle, prefix, R),
                          use_cache=prefix is not None, logits_to_keep=1,
                          **position_kwargs(position_ids, T, R)).logits
    return logits[:, -1].float().softmax(-1)
