"""Attention of many rows against one shared copy of a clean prefix.

An analysis runs ``R`` rows (knockout windows, restorations × noise draws) that share the clean
prefix: positions ``< P`` whose keys and values come from the clean run (:mod:`microscope.prefix`).
A ``DynamicCache`` holding that prefix for ``R`` rows concatenates each row's suffix onto its own
copy of it in every layer: ``R · P`` keys and values copied per layer, which at LLaVA-1.5's 588
prefix positions costs more than the rows' own layer compute at small width. Here each decoder
layer keeps the prefix once, ``(1, H_kv, P, D)``, and the rows' suffix ``(R, H_kv, S, D)``. The
attention of the rows' queries splits the softmax over the keys ``[prefix, suffix]`` in two::

    prefix:  o_p, a_p = attention of every row's queries against the one prefix, the rows folded
                        into the query dimension ((H_kv, R·g·S, D) queries, one kernel call), and
                        the log-sum-exp a_p = log Σ_k exp(s_k) of its scores s = q·kᵀ·scale + mask
    suffix:  o_s, a_s = the same for each row against its own suffix keys
    out    = w · o_p + (1 − w) · o_s,   w = σ(a_p − a_s) = e^{a_p} / (e^{a_p} + e^{a_s})

``w`` is the prefix's share of the softmax mass, so ``out`` is softmax attention over all
``P + S`` keys — the same numbers as the model's ``sdpa``/``eager`` function on the concatenated
keys, summed in another order (float round-off; tested against whole forwards on every family).
On CPU the prefix part is torch's fused flash-attention kernel, which returns ``a_p``; elsewhere
three products and a softmax. ``g = H / H_kv`` query heads share a key head (grouped-query
attention; their queries fold in too). A logit soft cap ``c`` (``s ↦ c · tanh(s / c)``, before
the mask, as the eager functions apply it) takes one softmax over both parts' capped scores.
Masks are the model's own, over ``P + S`` keys (boolean or additive; ``None`` means causal within
the suffix); a mask that shows every prefix key (a causal one) costs nothing on the prefix part.
What the formula does not cover — attention sinks, position biases, dropout in training, a mask
over other keys — runs the model's function on the concatenated keys instead, so nothing is ever
computed wrongly, only more slowly.

Use: :func:`rows_cache` gives :func:`microscope.depth.run_from` the cache for its rows and routes
the decoder's attention through :func:`attend` for the block (or leaves it to an open knockout
block, whose function calls :func:`attend` itself); models with any other attention function open,
or one row, get the plain expanded cache (:func:`microscope.prefix.expand`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from microscope import attention
from microscope.errors import MicroscopeError

#: the model attention functions :func:`attend` reproduces
BASES = ("sdpa", "eager")
#: registered attention functions that pass shared-prefix keys through :func:`attend` themselves
#: (the knockout functions add their names on import)
AWARE: set[str] = set()
_NAME = "microscope_shared_prefix_{}"
#: id(suffix keys a layer's update returned) -> (those keys, the layer), while a cache is in use
_BY_KEY: dict[int, tuple[torch.Tensor, SharedPrefixLayer]] = {}


def _dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


class SharedPrefixLayer(_dynamic_layer()):  # type: ignore[misc]
    """A cache layer holding the clean prefix once, ``(1, H_kv, P, D)``, and the rows' suffix
    ``(R, H_kv, S, D)``. ``update`` appends to the suffix and returns it (not prefix + suffix):
    the attention function finds the prefix through :func:`attend`; ``pending`` is True from an
    update until the attention function has read it (:func:`check`)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.prefix_keys, self.prefix_values = keys, values
        self.device, self.is_initialized = keys.device, True
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.pending = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.keys is not None and self.values is not None:
            _BY_KEY.pop(id(self.keys), None)
            key_states = torch.cat([self.keys, key_states], dim=-2)
            value_states = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values, self.pending = key_states, value_states, True
        _BY_KEY[id(key_states)] = (key_states, self)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return int(self.prefix_keys.shape[-2]) + (0 if self.keys is None else int(self.keys.shape[-2]))

    def whole(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix and suffix concatenated for ``rows`` rows: what a ``DynamicLayer`` would hold."""
        k, v = self.prefix_keys.expand(rows, -1, -1, -1), self.prefix_values.expand(rows, -1, -1, -1)
        if self.keys is None or self.values is None:
            return k, v
        return torch.cat([k, self.keys], dim=-2), torch.cat([v, self.values], dim=-2)


def shared_layer(key: torch.Tensor) -> SharedPrefixLayer | None:
    """The shared-prefix layer whose update returned ``key`` (``None``: ``key`` holds every key)."""
    entry = _BY_KEY.get(id(key))
    return entry[1] if entry is not None and entry[0] is key else None


def key_length(key: torch.Tensor) -> int:
    """Number of keys the queries attend: prefix + suffix for a shared-prefix layer's keys."""
    layer = shared_layer(key)
    return int(key.shape[-2]) if layer is None else layer.get_seq_length()


def _covered(module, mask: torch.Tensor | None, n_keys: int, kwargs: dict) -> bool:
    """Whether :func:`_attention` computes what the model's function would for these arguments."""
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None or kwargs.get("position_bias") is not None:
        return False
    if module.training and float(kwargs.get("dropout") or 0.0) > 0:
        return False
    return mask is None or (mask.ndim == 4 and mask.shape[-1] == n_keys)


def attend(fn: Callable, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, **kwargs):
    """The attention ``fn`` (the model's ``sdpa`` or ``eager`` function) would compute, for keys
    that may be a shared-prefix layer's suffix: those are attended together with their layer's
    prefix (module docstring); other keys go to ``fn`` as they are."""
    layer = shared_layer(key)
    if layer is None:
        return fn(module, query, key, value, attention_mask, **kwargs)
    layer.pending = False
    if not _covered(module, attention_mask, layer.get_seq_length(), kwargs):
        k, v = layer.whole(query.shape[0])
        return fn(module, query, k, v, attention_mask, **kwargs)
    return _attention(query, layer.prefix_keys, layer.prefix_values, key, value, attention_mask,
                      kwargs.get("scaling"), kwargs.get("softcap")), None


def _heads(m: torch.Tensor, kv: int, g: int, prefix_first: bool) -> torch.Tensor:
    """A mask part ``(R', Hm, S, K)`` (``Hm`` 1 or ``kv · g``) shaped to broadcast against scores
    laid out ``(kv, R, g, S, K)`` (``prefix_first``) or ``(R, kv, g, S, K)``."""
    if m.shape[1] == 1:
        m = m[:, :, None]  # (R', 1, 1, S, K)
    else:
        m = m.reshape(m.shape[0], kv, g, *m.shape[2:])
    return m.transpose(0, 1) if prefix_first else m


def _masked(s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Scores ``s`` (a fresh tensor: edited in place) with mask ``m`` applied: a boolean mask's
    False entries set to the dtype's minimum, an additive one added."""
    if m is None:
        return s
    if m.dtype == torch.bool:
        return s.masked_fill_(~m, torch.finfo(s.dtype).min)
    return s.add_(m)


def _sees_all(m: torch.Tensor) -> bool:
    """Whether mask part ``m`` lets every query read every key (boolean all True, additive all 0)."""
    return bool(m.all()) if m.dtype == torch.bool else not bool(m.any())


def _additive(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mask ``m`` as an additive mask of ``dtype`` (a boolean mask's False: the dtype's minimum)."""
    if m.dtype != torch.bool:
        return m.to(dtype)
    return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, torch.finfo(dtype).min)


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _prefix_part(qf: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, mask: torch.Tensor | None, scale: float,
                 fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the folded queries ``qf`` ``(kv, N, D)`` over the prefix alone: output
    ``(kv, N, Dv)`` and log-sum-exp of the scores ``(kv, N)`` (float32 at least). ``mask``: additive,
    broadcasting to ``(kv, N, P)``, or ``None``. On CPU torch's fused flash-attention kernel, which
    returns the log-sum-exp (``fused``); the same in three products and a softmax otherwise."""
    if fused and _FLASH_CPU is not None and qf.device.type == "cpu" and qf.dtype in (torch.float32, torch.float64):
        m = None if mask is None else mask.to(qf.dtype).expand(qf.shape[0], -1, -1)[None]
        try:
            out, lse = _FLASH_CPU(qf[None], kp, vp, 0.0, False, attn_mask=m, scale=scale)
            return out[0], lse[0]
        except (TypeError, RuntimeError):  # a private op: another torch may take other arguments
            pass
    acc = torch.promote_types(qf.dtype, torch.float32)
    s = torch.bmm(qf, kp[0].transpose(-1, -2)).to(acc).mul_(scale)
    if mask is not None:
        s = s.add_(mask)
    return s.softmax(-1).to(vp.dtype) @ vp[0], torch.logsumexp(s, -1)


def _attention(q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor,
               mask: torch.Tensor | None, scaling: float | None, softcap: float | None,
               fused: bool = True) -> torch.Tensor:
    """Softmax attention of queries ``q`` ``(R, H, S, D)`` over the keys ``[kp, ks]``: prefix
    ``(1, H_kv, P, D)`` shared by the rows, suffix ``(R, H_kv, S', D)``; returns ``(R, S, H, Dv)``
    as the model's attention functions do.

    The prefix part runs once for every row's queries folded into the query dimension (``fused``:
    torch's flash-attention kernel where it returns the log-sum-exp, :func:`_prefix_part`); the
    suffix part per row; the two combine by their log-sum-exps ``a_p``, ``a_s``: with
    ``w = σ(a_p − a_s)`` (the prefix's share of the softmax mass), ``out = w · out_p + (1 − w) · out_s``.
    A soft cap acts on each score, so it takes one softmax over both parts' capped scores."""
    R, H, S, D = q.shape
    kv, P = kp.shape[1], kp.shape[2]
    g = H // kv
    scale = D ** -0.5 if scaling is None else scaling
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in float32 at least, as eager does
    ss = (q.reshape(R, kv, g * S, D) @ ks.transpose(-1, -2)).to(acc).mul_(scale).view(R, kv, g, S, -1)
    if softcap is not None:
        ss = ss.div_(softcap).tanh_().mul_(softcap)
    n = ss.shape[-1]
    mp = None if mask is None else mask[..., :P]
    if mp is not None and _sees_all(mp):  # a causal mask sees every prefix key: no pass over the largest part
        mp = None
    if mask is None:  # causal: every prefix key, the suffix keys up to the query's own position
        ss = _masked(ss, torch.ones(S, n, dtype=torch.bool, device=q.device).tril(n - S))
    else:
        ss = _masked(ss, _heads(mask[..., P:], kv, g, False))
    qf = q.reshape(R, kv, g, S, D).transpose(0, 1).reshape(kv, R * g * S, D)
    if softcap is not None:  # the cap acts on each score: one softmax over both parts' capped scores
        sp = torch.bmm(qf, kp[0].transpose(-1, -2)).to(acc).mul_(scale).view(kv, R, g, S, P)
        sp = sp.div_(softcap).tanh_().mul_(softcap)
        if mp is not None:
            sp = _masked(sp, _heads(mp, kv, g, True))
        probs = torch.cat([sp, ss.transpose(0, 1)], dim=-1).softmax(-1).to(vp.dtype)
        op = (probs[..., :P].reshape(kv, R * g * S, P) @ vp[0]).view(kv, R, g, S, -1).transpose(0, 1)
        os = (probs[..., P:].transpose(0, 1).reshape(R, kv, g * S, n) @ vs).view(R, kv, g, S, -1)
        return (op + os).reshape(R, H, S, -1).transpose(1, 2).contiguous().to(q.dtype)
    folded = None
    if mp is not None:  # (kv or 1, R·g·S, P) additive, in the folded query order (row, group, position)
        m = _heads(mp, kv, g, True)  # (kv or 1, R' , g or 1, S, P)
        folded = _additive(m.expand(m.shape[0], R, g, S, P).reshape(m.shape[0], R * g * S, P), acc)
    op, lse_p = _prefix_part(qf, kp, vp, folded, scale, fused)
    op = op.view(kv, R, g, S, -1).transpose(0, 1)
    lse_p = lse_p.view(kv, R, g, S).transpose(0, 1).to(acc)
    lse_s = torch.logsumexp(ss, -1)
    os = (ss.softmax(-1).to(vs.dtype).view(R, kv, g * S, n) @ vs).view(R, kv, g, S, -1)
    w = torch.sigmoid(lse_p - lse_s)[..., None]
    out = (os + w.to(os.dtype) * (op - os)).reshape(R, H, S, -1)
    return out.transpose(1, 2).contiguous().to(q.dtype)


def _routed_function(base: str) -> Callable:
    def shared_prefix_attention(module, query, key, value, attention_mask, **kwargs):
        return attend(attention.base_function(module, base), module, query, key, value, attention_mask, **kwargs)

    shared_prefix_attention.__name__ = _NAME.format(base)
    return shared_prefix_attention


def cache(handle, prefix: list, rows: int | Sequence[int]):
    """A fresh cache of ``prefix`` for ``rows`` rows (:func:`microscope.prefix.expand`, which checks
    the prefix against the model) whose self-attention layers are :class:`SharedPrefixLayer` s; its
    whole-kept cross-attention layers stay as ``expand`` makes them."""
    from microscope.prefix import expand

    keep = set(getattr(prefix, "keep", ()))
    out = expand(handle, prefix, rows)
    out.layers = [layer if i in keep else SharedPrefixLayer(*prefix[i]) for i, layer in enumerate(out.layers)]
    return out


def check(cache_value) -> None:
    """Raise if a shared-prefix layer's suffix keys never reached :func:`attend` (a model that
    transforms its keys between the cache update and the attention function): its output would
    have ignored the prefix."""
    for i, layer in enumerate(getattr(cache_value, "layers", ())):
        if isinstance(layer, SharedPrefixLayer) and layer.pending:
            raise MicroscopeError(f"internal: decoder layer {i}'s attention did not read its shared prefix (its keys "
                                  "changed between the cache and the attention function); run it with "
                                  "microscope.shared_prefix.disabled()")


_DISABLED = [0]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside the block every run uses the plain expanded prefix cache (for comparisons and for
    models whose attention :func:`attend` does not see)."""
    _DISABLED[0] += 1
    try:
        yield
    finally:
        _DISABLED[0] -= 1


def shares(handle, prefix: list | None) -> bool:
    """Whether runs after ``prefix`` on ``handle`` share one copy of it (:func:`rows_cache`): the
    decoder's attention is ``sdpa``/``eager`` or an :data:`AWARE` function, and nothing disabled it."""
    if not prefix or _DISABLED[0] or any(k.shape[0] != 1 for k, _ in prefix):
        return False
    impl = handle.adapter.attention(0).config._attn_implementation
    return impl in BASES or impl in AWARE


@contextlib.contextmanager
def rows_cache(handle, prefix: list | None, rows: int | Sequence[int]) -> Iterator[object]:
    """The key/value cache for a run of ``rows`` rows after ``prefix`` (``None`` without one; a
    sequence: each layer's number of rows), and,
    where the model's attention is ``sdpa`` or ``eager``, that attention routed through
    :func:`attend` for the block. A shared-prefix cache where the attention reaches :func:`attend`
    (plain ``sdpa``/``eager``, or an open block of an :data:`AWARE` function such as knockout's),
    the expanded one otherwise."""
    from microscope.prefix import expand

    if prefix is None:
        yield None
        return
    impl = handle.adapter.attention(0).config._attn_implementation
    most = rows if isinstance(rows, int) else max(rows, default=0)
    if most <= 1 or not shares(handle, prefix):
        yield expand(handle, prefix, rows)
        return
    value = cache(handle, prefix, rows)
    route = (attention.routed(handle, _NAME.format(impl), _routed_function(impl), impl,
                              {i: None for i in range(handle.adapter.n_layers)})
             if impl in BASES else contextlib.nullcontext())
    try:
        with route:
            yield value
    finally:
        for layer in value.layers:
            if isinstance(layer, SharedPrefixLayer) and layer.keys is not None:
                _BY_KEY.pop(id(layer.keys), None)
