"""How many rows a batched intervention run holds: sized by memory, not by a constant.

The knockout sweep and the restorations of causal tracing run their rows (windows, restorations ×
noise draws) as batches of a forward over the suffix after a shared clean prefix
(:mod:`microscope.prefix`, :mod:`microscope.shared_prefix`). What one row costs grows with the
suffix ``S``, the prefix ``P`` and the model; a constant batch size either runs out of memory at
LLaVA-NeXT's 2,900 image tokens or leaves a GPU mostly idle on a small model. Per row, summed over
the ``L`` decoder layers of the prefix cache (each layer's ``H_kv`` key heads of width ``D``, the
element size ``b`` of the cache)::

    cache       = Σ_l 2 · H_kv · D · (S + P·[prefix copied per row]) · b
    scores      = H · S · (P + S) · 4                  (one layer's attention scores, float32)
    activations = S · (4 · d + 3 · f) · b              (one layer's residual, q/k/v/o, MLP: width d, f)

and a batch holds ``⌊budget / row⌋`` rows (at least 1, at most ``cap``). The budget is a fixed share
of the device's total memory minus the model's own parameters — not its free memory, which moves
while a run goes on: the same machine always forms the same batches, so reruns give the same numbers.
"""

from __future__ import annotations

import os

import torch

#: share of the device's total memory (less the model's parameters) a batch of rows may take
MEMORY_SHARE = 0.5
#: most rows in one batch: beyond this, larger batches no longer run faster on the machines measured
CAP = 256


def total_memory(device: torch.device | str) -> int:
    """Bytes of memory on ``device``: the GPU's, or the machine's (``MemTotal``) for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return int(pages * size)


def budget(handle) -> int:
    """Bytes a batch of rows may take on ``handle``'s device: :data:`MEMORY_SHARE` of its total
    memory less the model's parameters and buffers (at least 64 MiB)."""
    model = sum(t.numel() * t.element_size() for t in (*handle.model.parameters(), *handle.model.buffers()))
    return max(64 << 20, int(MEMORY_SHARE * total_memory(handle.device)) - model)


def row_bytes(handle, prefix: list | None, suffix: int, shared: bool) -> int:
    """Bytes one row of a batch over ``suffix`` positions after ``prefix`` (per-layer ``(key,
    value)`` of ``(1, H_kv, P, D)``, or ``None``) takes, by the formula of the module docstring;
    ``shared``: whether the rows share one copy of the prefix (else each row holds its own)."""
    attn = handle.adapter.attention(0)
    cfg = attn.config
    d = int(cfg.hidden_size)
    f = int(getattr(cfg, "intermediate_size", 4 * d) or 4 * d)
    heads = int(getattr(cfg, "num_attention_heads", 1))
    item = next(handle.model.parameters()).element_size()
    P = 0 if not prefix else int(prefix[0][0].shape[-2])
    if prefix:
        cache = sum(2 * int(k.shape[1]) * int(k.shape[-1]) * (suffix + (0 if shared else int(k.shape[-2])))
                    * k.element_size() for k, _ in prefix)
    else:
        head_dim = int(getattr(attn, "head_dim", d // heads))
        kv = int(getattr(cfg, "num_key_value_heads", heads) or heads)
        cache = handle.adapter.n_layers * 2 * kv * head_dim * suffix * item
    scores = heads * suffix * (P + suffix) * 4
    return cache + scores + suffix * (4 * d + 3 * f) * item


def rows_per_batch(handle, prefix: list | None, suffix: int, cap: int = CAP, memory: int | None = None) -> int:
    """Rows per batch for a run over ``suffix`` positions after ``prefix`` on ``handle``: as many as
    ``memory`` bytes (default :func:`budget`) hold, at least 1, at most ``cap``."""
    from microscope.shared_prefix import shares

    per_row = row_bytes(handle, prefix, suffix, shares(handle, prefix))
    return max(1, min(int(cap), (budget(handle) if memory is None else int(memory)) // max(1, per_row)))
