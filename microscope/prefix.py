"""Clean-prefix key/value caches: compute only the positions an intervention can change.

    out = model(**clean_inputs, use_cache=True)              # the clean run, once
    prefix = prefix_of(out.past_key_values, first)          # its keys/values of positions < first
    model(inputs_embeds=rows[:, first:], past_key_values=expand(handle, prefix, len(rows)), ...)

With causal attention, an intervention that first touches position ``first`` (a corrupted
token, a knocked-out query) leaves every state of the positions before it exactly as in the
clean run. Interventions batched as rows therefore share those positions' keys and values:
they are taken from the clean run's own cache and handed to the model as a transformers ``DynamicCache``; each row
computes only the suffix. The results equal whole-prompt forwards up to float rounding
(tested against them in tests/ and benchmarks/).

Models with multimodal rotary positions (Qwen2-VL) cannot derive a suffix's positions from
``inputs_embeds``; :func:`positions` and :func:`position_kwargs` hand them the clean prompt's own,
and the ``token_type_ids`` whose image blocks Gemma 3's and PaliGemma's masks read.

Where attention is not causal everywhere (Gemma 3's image block, PaliGemma's bidirectional
prompt), a position before ``first`` may read one at or after it: :func:`causal_start` moves
``first`` back to the start of the block so that no cached position depends on what follows.
Caches are kept whole (:func:`full_cache`): a sliding-window layer's cache would keep only its
last ``window − 1`` positions, and a prefix is sliced by position.
"""

from __future__ import annotations

import torch


def full_cache():
    """An empty ``DynamicCache`` whose every layer keeps every position (no sliding-window
    truncation: without a config, transformers makes each layer a plain ``DynamicLayer``). Pass it
    as ``past_key_values`` to the clean forward whose cache :func:`prefix_of` slices; the model's
    masks still apply each layer's window."""
    from transformers import DynamicCache

    return DynamicCache()


def prefix_of(past, first: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer clean ``(key, value)`` of positions ``< first``, sliced from the cache ``past`` a
    clean forward returned with ``use_cache=True`` and ``past_key_values=full_cache()`` (no extra
    forward); ``None`` when ``first == 0`` (nothing to share). A layer that dropped positions (a
    sliding-window cache) is refused: its slice would hold other positions."""
    if first <= 0:
        return None
    for i, layer in enumerate(past.layers):
        if layer.keys.shape[-2] != layer.get_seq_length():
            raise RuntimeError(f"internal: layer {i}'s cache keeps {layer.keys.shape[-2]} of {layer.get_seq_length()} "
                               "positions (a sliding window); run the clean forward with "
                               "past_key_values=microscope.prefix.full_cache()")
    return [(layer.keys[..., :first, :], layer.values[..., :first, :]) for layer in past.layers]


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


def expand(handle, prefix: list | None, rows: int):
    """A fresh ``DynamicCache`` holding ``prefix`` for ``rows`` rows (``None`` passes through).

    A new cache per forward: the model appends the suffix's keys and values to it. Every layer
    keeps every position (as :func:`full_cache`), so attention functions see keys over the whole
    prompt in every layer (a knockout plan's masks are over it); sliding-window layers get their
    window from the model's masks."""
    if prefix is None:
        return None
    from transformers import DynamicCache

    data = [(k.expand(rows, -1, -1, -1).contiguous(), v.expand(rows, -1, -1, -1).contiguous()) for k, v in prefix]
    return DynamicCache(ddp_cache_data=data)


def length(prefix: list | None) -> int:
    """Number of cached positions."""
    return 0 if not prefix else int(prefix[0][0].shape[-2])


def positions(handle, inputs: dict) -> dict[str, torch.Tensor] | None:
    """What a forward from ``inputs_embeds`` needs of one prompt besides the embeddings, as the
    processor made it: ``position_ids`` ``(3, 1, T)`` (time, row, column) for Qwen2-VL-style M-RoPE,
    and ``token_type_ids`` ``(1, T)`` where the processor gives them (Gemma 3's image tokens,
    PaliGemma's prefix: the model's mask reads its bidirectional blocks off them); ``None`` when
    neither applies (1-D RoPE, causal masks: the model's own ``past_length + arange`` is right)."""
    out = {}
    f = handle.adapter.position_ids
    if f is not None:
        out["position_ids"] = f(inputs).to(handle.device)
    if inputs.get("token_type_ids") is not None:
        out["token_type_ids"] = inputs["token_type_ids"].to(handle.device)
    return out or None


def position_kwargs(pos: dict[str, torch.Tensor] | None, length: int, rows: int) -> dict:
    """Keyword arguments giving a forward of ``rows`` rows over the last ``length`` positions of
    the prompt whose :func:`positions` are ``pos`` (``{}`` when ``pos`` is None): the positions of
    those ``length`` tokens, and the whole prompt's ``token_type_ids`` (the mask functions index
    them by absolute position, cached keys included)."""
    if pos is None:
        return {}
    out = {}
    if "position_ids" in pos:
        p = pos["position_ids"]
        out["position_ids"] = p[..., p.shape[-1] - length:].expand(-1, rows, -1)
    if "token_type_ids" in pos:
        out["token_type_ids"] = pos["token_type_ids"].expand(rows, -1)
    return out


def next_token_probs(handle, embeds: torch.Tensor, prefix: list | None = None,
                     position_ids: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Next-token distributions ``(R, V)`` at the last position of decoder inputs ``embeds``
    ``(R, T, d)``: the rows hold only the suffix after ``prefix`` (the clean cache of the positions
    before them, or ``None``), ``position_ids`` the whole prompt's :func:`positions`. Gradients flow
    when enabled (integrated gradients); callers that need none wrap it in ``torch.no_grad``."""
    R, T = embeds.shape[:2]
    mask = torch.ones((R, T + length(prefix)), dtype=torch.long, device=embeds.device)
    logits = handle.model(inputs_embeds=embeds, attention_mask=mask, past_key_values=expand(handle, prefix, R),
                          use_cache=prefix is not None, logits_to_keep=1,
                          **position_kwargs(position_ids, T, R)).logits
    return logits[:, -1].float().softmax(-1)
