"""Route a decoder's attention through a registered function for the length of a ``with`` block.

    with routed(handle, "my_fn", fn, mask_like="sdpa", state={layer: value}):
        handle.model(**inputs)       # fn(module, q, k, v, mask, ...) runs; state(module) -> value

``fn`` is registered once with transformers' ``AttentionInterface`` (and the mask function of
``mask_like`` with ``AttentionMaskInterface``), and the decoder's text config is switched to it;
the vision tower reads its own config and keeps its attention. ``state`` gives each decoder
layer's attention module (Mllama's cross-attention layers: their ``cross_attn``) its per-block
value, which ``fn`` reads with :func:`state`. Everything is restored on exit, even on error;
blocks on one model do not nest. Knockout (:mod:`microscope.knockout`) and attention recording
(:mod:`microscope.attribution`) both use it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

_STATE: dict[int, object] = {}  # id(attention module) -> its value while a block is open


def state(module) -> object | None:
    """The value ``module`` was given by the open :func:`routed` block (``None`` outside one)."""
    return _STATE.get(id(module))


def base_function(module, base: str) -> Callable:
    """The model's own attention function ``base`` (``"sdpa"``: transformers' shared one;
    ``"eager"``: the ``eager_attention_forward`` of ``module``'s modelling file)."""
    if base == "sdpa":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward in its module; "
                           "use the sdpa implementation")
    return fn


def active() -> bool:
    """Whether any routed block is open."""
    return bool(_STATE)


@contextlib.contextmanager
def routed(handle, name: str, fn: Callable, mask_like: str, state: dict[int, object]) -> Iterator[None]:
    """Run the decoder's attention through ``fn`` (registered as ``name``) inside the block."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_like])
    a = handle.adapter
    modules = [a.attention(i) for i in range(a.n_layers)]  # self_attn, or cross_attn in cross-attention layers
    if any(id(m) in _STATE for m in modules):
        raise RuntimeError("an attention intervention is already open on this model; blocks do not nest — "
                           "put everything in one plan")
    cfg = modules[0].config  # the decoder's (text) config, shared by its self- and cross-attention
    current = cfg._attn_implementation
    try:
        for i, value in state.items():
            _STATE[id(modules[i])] = value
        cfg._attn_implementation = name
        yield
    finally:
        cfg._attn_implementation = current
        for m in modules:
            _STATE.pop(id(m), None)
