"""Clean-prefix key/value caches: compute only the positions an intervention can change.

    prefix = prefix_cache(handle, embeds, first)            # clean run of positions < first
    model(inputs_embeds=rows[:, first:], past_key_values=expand(handle, prefix, len(rows)), ...)

With causal attention, an intervention that first touches position ``first`` (a corrupted
token, a knocked-out query) leaves every state of the positions before it exactly as in the
clean run. Interventions batched as rows therefore share those positions' keys and values:
they are computed once and handed to the model as a transformers ``DynamicCache``; each row
computes only the suffix. The results equal whole-prompt forwards up to float rounding
(tested against them in tests/ and benchmarks/).
"""

from __future__ import annotations

import torch


def prefix_cache(handle, embeds: torch.Tensor, first: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer clean ``(key, value)`` of decoder positions ``< first`` of ``embeds`` (1, T, d)
    (the decoder input); ``None`` when ``first == 0`` (nothing to share)."""
    if first <= 0:
        return None
    embeds = embeds if embeds.ndim == 3 else embeds[None]
    mask = torch.ones((1, first), dtype=torch.long, device=embeds.device)
    with torch.no_grad():
        out = handle.model(inputs_embeds=embeds[:, :first], attention_mask=mask, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def expand(handle, prefix: list | None, rows: int):
    """A fresh ``DynamicCache`` holding ``prefix`` for ``rows`` rows (``None`` passes through).

    A new cache per forward: the model appends the suffix's keys and values to it."""
    if prefix is None:
        return None
    from transformers import DynamicCache

    data = [(k.expand(rows, -1, -1, -1).contiguous(), v.expand(rows, -1, -1, -1).contiguous()) for k, v in prefix]
    return DynamicCache(ddp_cache_data=data, config=handle.model.config)


def length(prefix: list | None) -> int:
    """Number of cached positions."""
    return 0 if not prefix else int(prefix[0][0].shape[-2])
