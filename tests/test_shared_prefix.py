"""Attention against one shared copy of the clean prefix (microscope.shared_prefix): the two-part
softmax equals attention over the concatenated keys — grouped heads, boolean, additive and absent
masks, a logit soft cap — what it does not cover goes to the model's function on the whole keys,
and depth reuse really runs its rows through it (one prefix copy per layer, not one per row)."""

from __future__ import annotations

import pytest
import torch

import microscope
from microscope import depth, shared_prefix
from microscope.data import load_samples
from microscope.errors import MicroscopeError
from microscope.extract import capture
from microscope.prefix import clean_cache, positions, prefix_of

R, H, KV, S, P, D = 3, 4, 2, 5, 7, 8


def _reference(q, kp, vp, ks, vs, mask, scale, softcap):
    """Eager attention over ``[prefix, suffix]`` keys, each row holding its own copy of the prefix."""
    k = torch.cat([kp.expand(R, -1, -1, -1), ks], -2).repeat_interleave(H // KV, 1)
    v = torch.cat([vp.expand(R, -1, -1, -1), vs], -2).repeat_interleave(H // KV, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if mask is None:
        mask = torch.ones(S, P + S, dtype=torch.bool).tril(P)[None, None]
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min) if mask.dtype == torch.bool else s + mask
    return (s.softmax(-1) @ v).transpose(1, 2)


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(*shape, generator=g, dtype=dtype) for shape in
         [(R, H, S, D), (1, KV, P, D), (1, KV, P, D), (R, KV, S, D), (R, KV, S, D)]]
    boolean = torch.rand(R, 1, S, P + S, generator=g) < 0.6
    boolean[..., 0] = True  # every query keeps a key
    additive = torch.zeros(1, H, S, P + S, dtype=dtype)
    additive[torch.rand(1, H, S, P + S, generator=g) < 0.3] = torch.finfo(dtype).min
    additive[..., P] = 0.0
    return t, {"none": None, "bool": boolean, "additive (per head)": additive}


def _bound(v: torch.Tensor, n_keys: int) -> float:
    """Round-off of a softmax-weighted sum of ``n_keys`` values summed in another order: a few
    units of rounding per term, relative to the largest value."""
    return 8 * n_keys * torch.finfo(v.dtype).eps * float(v.abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("fused", [True, False])
def test_two_part_softmax_equals_attention_over_the_concatenated_keys(dtype, softcap, fused):
    """Both prefix kernels (torch's fused one with its log-sum-exp, and the plain products)."""
    (q, kp, vp, ks, vs), masks = _inputs(dtype)
    for name, mask in masks.items():
        got = shared_prefix._attention(q, kp, vp, ks, vs, mask, 0.3, softcap, fused)
        want = _reference(q, kp, vp, ks, vs, mask, 0.3, softcap)
        assert got.shape == (R, S, H, D) and got.dtype == dtype
        err = float((got - want).abs().max())
        assert err <= _bound(vs, P + S), f"{name} mask, softcap {softcap}: max |Δ| {err:.2e}"


def test_it_matches_transformers_sdpa_on_the_whole_keys():
    """The function the models call, on each row's concatenated keys (grouped heads, boolean mask)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    (q, kp, vp, ks, vs), masks = _inputs(torch.float32)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = H // KV, True
    k, v = torch.cat([kp.expand(R, -1, -1, -1), ks], -2), torch.cat([vp.expand(R, -1, -1, -1), vs], -2)
    want, _ = sdpa_attention_forward(module, q, k, v, masks["bool"], scaling=0.3)
    got = shared_prefix._attention(q, kp, vp, ks, vs, masks["bool"], 0.3, None)
    assert float((got - want).abs().max()) <= _bound(vs, P + S)


def test_what_the_formula_does_not_cover_goes_to_the_models_function_on_the_whole_keys():
    (q, kp, vp, ks, vs), _ = _inputs(torch.float32)
    layer = shared_prefix.SharedPrefixLayer(kp, vp)
    keys, values = layer.update(ks, vs)
    seen = {}

    def fn(module, query, key, value, mask, **kw):
        seen["keys"] = key
        return "model's", None

    module = torch.nn.Module()
    module.training = False
    try:
        assert shared_prefix.key_length(keys) == P + S and shared_prefix.key_length(ks[:1]) == S
        out = shared_prefix.attend(fn, module, q, keys, values, None, s_aux=torch.zeros(H))  # attention sinks
        assert out[0] == "model's" and torch.equal(seen["keys"], torch.cat([kp.expand(R, -1, -1, -1), ks], -2))
        assert not layer.pending
        other = torch.ones(R, 1, S, P + S + 1, dtype=torch.bool)  # a mask over other keys than these
        seen.clear()
        assert shared_prefix.attend(fn, module, q, keys, values, other)[0] == "model's" and len(seen) == 1
        out = shared_prefix.attend(fn, module, q, ks.clone(), vs, None)  # not a shared layer's keys: as they are
        assert out[0] == "model's" and seen["keys"].shape[-2] == S
    finally:
        shared_prefix._BY_KEY.clear()


def test_keys_that_never_reach_the_attention_are_an_error():
    (_q, kp, vp, ks, vs), _ = _inputs(torch.float32)
    cache = type("C", (), {})()
    cache.layers = [shared_prefix.SharedPrefixLayer(kp, vp)]
    cache.layers[0].update(ks, vs)
    try:
        with pytest.raises(MicroscopeError, match="did not read its shared prefix"):
            shared_prefix.check(cache)
    finally:
        shared_prefix._BY_KEY.clear()


@pytest.fixture(scope="module")
def recording(shapes_handle):
    h = shapes_handle
    s = load_samples("shapes", 1, 3, handle=h)[0]
    inputs = {k: v.to(h.device) for k, v in microscope.prepare_samples(h, [s]).inputs.items()}
    with torch.no_grad(), capture(h, [-1]) as acts:
        out = h.model(**inputs, use_cache=True, **clean_cache(h), logits_to_keep=1)
    first = int(inputs["input_ids"].shape[1]) - 4
    return depth.record(h, acts["resid.-1"][:, first:], prefix_of(out, first), positions(h, inputs)), out


def test_depth_reuse_attends_one_prefix_copy_per_layer(shapes_handle, recording, monkeypatch):
    """Rows of a run read the prefix through the two-part softmax in every layer they compute
    (not through R concatenated copies), with the same logits as the expanded cache."""
    h = shapes_handle
    rec, out = recording
    calls = []
    inner = shared_prefix._attention

    def counted(q, kp, *a):
        calls.append((q.shape[0], kp.shape[0]))
        return inner(q, kp, *a)

    monkeypatch.setattr(shared_prefix, "_attention", counted)
    with torch.no_grad():
        got = depth.run_from(h, rec, 2, [0, 0, 0]).float()
        assert calls == [(3, 1)] * (h.adapter.n_layers - 2)
        with shared_prefix.disabled():
            plain = depth.run_from(h, rec, 2, [0, 0, 0]).float()
    assert len(calls) == h.adapter.n_layers - 2  # the expanded cache does not use it
    ref = out.logits[0, -1].float()
    bound = 64 * torch.finfo(torch.float32).eps * max(1.0, float(ref.abs().max()))
    assert float((got - ref).abs().max()) <= bound and float((plain - ref).abs().max()) <= bound
    assert not shared_prefix._BY_KEY  # nothing is kept after the run


def test_a_fused_kernel_that_refuses_its_arguments_falls_back_to_the_plain_products(monkeypatch):
    """The fused CPU kernel is a private torch op: if another torch takes other arguments, the
    prefix part is computed by the plain products, with the same numbers."""
    (q, kp, vp, ks, vs), masks = _inputs(torch.float32)

    def refuses(*a, **k):
        raise TypeError("unexpected keyword argument")

    monkeypatch.setattr(shared_prefix, "_FLASH_CPU", refuses)
    got = shared_prefix._attention(q, kp, vp, ks, vs, masks["bool"], 0.3, None, True)
    want = _reference(q, kp, vp, ks, vs, masks["bool"], 0.3, None)
    assert float((got - want).abs().max()) <= _bound(vs, P + S)
