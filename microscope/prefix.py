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

Gemma 3 and PaliGemma need the prompt's ``token_type_ids`` (their masks read the image blocks off
them): :func:`positions` hands those on too.

Where attention is not causal everywhere (Gemma 3's image block, PaliGemma's bidirectional
prompt), a position before ``first`` may read one at or after it: :func:`causal_start` moves
``first`` back to the start of the block so that no cached position depends on what follows.
Caches are kept whole (:func:`full_cache`): a sliding-window layer's cache would keep only its
last ``window − 1`` positions, and a prefix is sliced by position.
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
def cache_keyword(forward_owner: type[torch.nn.Module]) -> str:
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


def full_cache():
    """An empty ``DynamicCache`` whose every layer keeps every position (no sliding-window
    truncation: without a config, transformers makes each layer a plain ``DynamicLayer``). Pass it
    as the cache of the clean forward whose cache :func:`prefix_of` slices (``**cache_kwargs``
    style: ``{cache_keyword(type(model)): full_cache()}``); the model's masks still apply each
    layer's window."""
    from transformers import DynamicCache

    return DynamicCache()


def clean_cache(handle) -> dict:
    """Keyword argument handing a clean forward of ``handle.model`` a :func:`full_cache`, under the
    name its ``forward`` takes (:func:`cache_keyword`)."""
    # ignore: a class is hashable, but mypy checks type[X] against the Hashable that typeshed's
    # functools.cache asks for with the instances' __hash__ (a checker false positive)
    return {cache_keyword(type(handle.model)): full_cache()}  # type: ignore[arg-type]


class Prefix(list):
    """Per-layer clean ``(key, value)`` pairs, with the layers kept whole (``keep``)."""

    keep: tuple[int, ...] = ()


def prefix_of(out: Mapping, first: int, keep: Sequence[int] = ()) -> Prefix | None:
    """Per-layer clean ``(key, value)`` of positions ``< first``, sliced from the cache that the
    clean forward's output ``out`` holds (called with ``use_cache=True`` and the cache
    :func:`full_cache`; no extra forward); ``None`` when ``first == 0`` (nothing to share). Layers
    in ``keep`` (cross-attention layers, whose keys and values are the vision states) are kept
    whole; ``None`` too when layer 0 is one of them: the model reads the number of cached positions
    off layer 0. A layer that dropped positions (a sliding-window cache) is refused: its slice would
    hold other positions."""
    keep = tuple(sorted(int(i) for i in keep))
    if first <= 0 or 0 in keep:
        return None
    from transformers.cache_utils import CacheLayerMixin

    res = Prefix()
    for i, layer in enumerate(returned_cache(out).layers):
        if not isinstance(layer, CacheLayerMixin) or layer.keys is None or layer.values is None:
            raise MicroscopeError(f"layer {i}'s cache ({type(layer).__name__}) holds no keys and values; a prefix "
                                  "cache needs attention layers that cache every position (run the clean forward "
                                  "with the cache microscope.prefix.full_cache())")
        keys, values = layer.keys, layer.values
        if i in keep:
            res.append((keys, values))
            continue
        if keys.shape[-2] != layer.get_seq_length():
            raise RuntimeError(f"internal: layer {i}'s cache keeps {keys.shape[-2]} of {layer.get_seq_length()} "
                               "positions (a sliding window); run the clean forward with the cache "
                               "microscope.prefix.full_cache()")
        res.append((keys[..., :first, :], values[..., :first, :]))
    res.keep = keep
    return res


def causal_start(handle, inputs: dict, first: int) -> int:
    """The largest ``f <= first`` such that no position before ``f`` reads a position at or after
    it in any layer — where an intervention that first touches ``first`` may start computing,
    positions ``< f`` coming unchanged from the clean cache.

    Causal decoders: ``first`` itself. With :attr:`~microscope.model.Adapter.attention_reach`
    ``r`` (the last key each query reads): ``f`` is the fixed point of ``f ← min{p < f : r[p] >= f}``
    — the start of the bidirectional block that straddles ``first`` (Gemma 3: the image block, when
    an intervention touches an image token after its first one; PaliGemma: 0, its whole prompt is
    one block)."""
    reach = handle.adapter.attention_reach
    if reach is None or first <= 0:
        return first
    r = reach({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}).amax(0).cpu()
    f = int(first)
    while f > 0:
        late = (r[:f] >= f).nonzero()
        if len(late) == 0:
            break
        f = int(late.min())
    return f


def expand(handle, prefix: list | None, rows: int | Sequence[int]):
    """A fresh ``DynamicCache`` holding ``prefix`` for ``rows`` rows (``None`` passes through);
    ``rows`` may give each layer its own number of rows.

    A new cache per forward: the model appends the suffix's keys and values to it. Every layer
    keeps every position (as :func:`full_cache`), so attention functions see keys over the whole
    prompt in every layer (a knockout plan's masks are over it); sliding-window layers get their
    window from the model's masks."""
    if prefix is None:
        return None
    cross = tuple(getattr(handle.adapter, "cross_attention_layers", ()))
    if tuple(getattr(prefix, "keep", ())) != cross:
        raise MicroscopeError(f"internal: a prefix cache whose whole layers are {list(getattr(prefix, 'keep', ()))}, "
                              f"on a model whose cross-attention layers are {list(cross)}: build it with "
                              "prefix_of(past, first, keep=handle.adapter.cross_attention_layers)")
    from transformers import DynamicCache

    cache = DynamicCache()
    counts = [rows] * len(prefix) if isinstance(rows, int) else list(rows)
    cache.layers = [_view_layer(k.expand(r, -1, -1, -1), v.expand(r, -1, -1, -1)) for (k, v), r in zip(prefix, counts)]
    return cache


def _view_layer(keys: torch.Tensor, values: torch.Tensor):
    """A ``DynamicLayer`` holding ``keys``/``values`` as they are — here views of one clean row
    expanded over the rows. ``DynamicCache(ddp_cache_data=...)`` would concatenate them onto an
    empty tensor (a copy per row), and the first update of the layer concatenates the suffix onto
    them again; this way the rows' prefix is copied once, by that update. The fields set are those
    ``DynamicLayer.lazy_initialization`` sets."""
    from transformers.cache_utils import DynamicLayer

    layer = DynamicLayer()
    layer.device, layer.keys, layer.values, layer.is_initialized = keys.device, keys, values, True
    return layer


def cache_kwargs(handle, prefix: list | None, rows: int) -> dict:
    """The keyword argument handing :func:`expand`'s cache to ``handle.model``'s forward, under
    the name it takes (:func:`cache_keyword`)."""
    # ignore: a class is hashable (see clean_cache)
    return {cache_keyword(type(handle.model)): expand(handle, prefix, rows)}  # type: ignore[arg-type]


def length(prefix: list | None) -> int:
    """Number of cached positions."""
    return 0 if not prefix else int(prefix[0][0].shape[-2])


def positions(handle, inputs: dict) -> dict[str, torch.Tensor] | CrossInputs | None:
    """What a forward from ``inputs_embeds`` needs of one prompt besides the embeddings, as the
    processor made it: ``position_ids`` ``(3, 1, T)`` (time, row, column) for Qwen2-VL-style M-RoPE,
    and ``token_type_ids`` ``(1, T)`` where the processor gives them (Gemma 3's image tokens,
    PaliGemma's prefix: the model's mask reads its bidirectional blocks off them); ``None`` when
    neither applies (1-D RoPE, causal masks: the model's own ``past_length + arange`` is right).
    For a cross-attention model (Mllama, 1-D RoPE) its :class:`~microscope.crossattn.CrossInputs`
    instead (vision states and cross-attention mask)."""
    if getattr(handle.adapter, "cross_attention_layers", None):
        return cross_inputs(handle, inputs)
    out = {}
    f = handle.adapter.position_ids
    if f is not None:
        out["position_ids"] = f(inputs).to(handle.device)
    if inputs.get("token_type_ids") is not None:
        out["token_type_ids"] = inputs["token_type_ids"].to(handle.device)
    return out or None


def position_kwargs(pos: dict[str, torch.Tensor] | CrossInputs | None, length: int, rows: int) -> dict:
    """Keyword arguments giving a forward of ``rows`` rows over the last ``length`` positions of
    the prompt whose :func:`positions` are ``pos`` (``{}`` when ``pos`` is None): the positions of
    those ``length`` tokens, and the whole prompt's ``token_type_ids`` (the mask functions index
    them by absolute position, cached keys included); the cross-attention inputs of those
    positions for :class:`~microscope.crossattn.CrossInputs`."""
    if pos is None:
        return {}
    if isinstance(pos, CrossInputs):
        return pos.kwargs(length, rows)
    out = {}
    if "position_ids" in pos:
        p = pos["position_ids"]
        out["position_ids"] = p[..., p.shape[-1] - length:].expand(-1, rows, -1)
    if "token_type_ids" in pos:
        out["token_type_ids"] = pos["token_type_ids"].expand(rows, -1)
    return out


def next_token_probs(handle, embeds: torch.Tensor, prefix: list | None = None,
                     position_ids: dict[str, torch.Tensor] | CrossInputs | None = None) -> torch.Tensor:
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
