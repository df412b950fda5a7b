"""Visual-token attribution: which image tokens carry the image's information to the question.

    df = attention_contributions(handle, samples)   # per sample × layer × image patch
    rs = restoration_scores(handle, samples)        # indirect effect of restoring one image token
    precision_at_k(df, "score")                     # top-k patches vs the referred object's patches

Two measures, both per image token ``j`` (patch index in raster order):

- **Attention contribution** to the constraint tokens ``C`` at layer ``l`` (Basu et al. 2024; the
  norm-based view of Kobayashi et al. 2020): ``score_l(j) = mean_{c∈C} Σ_h α^h_{cj} ‖W_O^h W_V^h x_j‖``,
  with ``α^h`` head ``h``'s attention probabilities and ``x_j`` the layer's normalised input. Summing
  ``α^h_{cj} W_O^h W_V^h x_j`` over heads and *all* keys gives the attention output at ``c`` exactly
  (tested), so the score is the size of ``j``'s share of what attention writes into ``c``. The
  weights are recorded by an attention function registered with transformers'
  ``AttentionInterface`` that wraps the model's eager attention (nothing else changes).
- **Restoration**: every image token corrupted with Gaussian noise (:mod:`microscope.tracing`), then
  one image token's decoder input restored at a time; ``score(j) = p_restored − p_corrupted``.

``precision_at_k``: for each sample, the ``k`` highest-scoring patches (``k`` = number of patches
the referred object(s) cover, unless given) against those patches; chance is ``|related| / n_patches``.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from microscope import attention, tracing
from microscope.answers import MODEL, NoTarget, only_correct_note
from microscope.knockout import image_patch_positions
from microscope.results import explain
from microscope.roles import prepare_samples

_NAME = "microscope_record_eager"


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward; attention weights cannot be "
                           "recorded for this architecture")
    out, weights = fn(module, query, key, value, attention_mask, **kwargs)
    entry = attention.state(module)
    if entry is not None:
        store, layer = entry
        store[layer] = weights.detach()
    return out, weights


@contextlib.contextmanager
def record_attention(handle, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """``with record_attention(h, [0, 1]) as att: h.model(**x)`` → ``att[l]`` = (B, H, Q, K) probabilities.

    The decoder runs its eager attention while the block is open (same outputs as sdpa up to
    float rounding); the configuration is restored on exit, even on error.
    """
    layers = handle.adapter.check_layers(list(layers), allow_embedding=False)
    store: dict[int, torch.Tensor] = {}
    with attention.routed(handle, _NAME, _recording_attention, "eager", {lay: (store, lay) for lay in layers}):
        yield store


def output_projection(attn) -> torch.nn.Linear:
    """The attention block's output projection W_O (``o_proj``; Phi's ``dense``). Its bias, where it
    has one, is added once per position and belongs to no token."""
    for name in ("o_proj", "dense"):
        if isinstance(getattr(attn, name, None), torch.nn.Linear):
            return getattr(attn, name)
    raise RuntimeError(f"{type(attn).__name__} has no o_proj/dense: attention contributions need separate value "
                       "and output projections")


def _head_outputs(attn, x: torch.Tensor) -> torch.Tensor:
    """``W_O^h W_V^h x_j`` for every position and head: (B, T, H, d)."""
    o_proj = output_projection(attn)
    if not hasattr(attn, "v_proj"):
        raise RuntimeError(f"{type(attn).__name__} has no v_proj: attention contributions need separate value "
                           "and output projections")
    hd = attn.head_dim
    v = attn.v_proj(x)
    B, T, _ = v.shape
    v = v.view(B, T, -1, hd)
    v = v.repeat_interleave(attn.config.num_attention_heads // v.shape[2], dim=2)  # GQA: share kv heads
    W = o_proj.weight.view(o_proj.weight.shape[0], -1, hd)  # (d, H, hd)
    return torch.einsum("dhk,bthk->bthd", W, v)


def head_contributions(handle, batch, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(α, W_O^h W_V^h x)`` of ``layer`` for ``batch``: (B, H, T, T) attention probabilities and
    (B, T, H, d) per-head value outputs; ``Σ_h α^h @ out[..., h, :]`` (plus W_O's bias, if any) is
    the attention output."""
    a = handle.adapter
    attn = a.layers[layer].self_attn
    seen = {}

    def pre(_m, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

    hook = attn.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad(), record_attention(handle, [layer]) as att:
            handle.model(**{k: v.to(handle.device) for k, v in batch.inputs.items()}, use_cache=False,
                         logits_to_keep=1)
    finally:
        hook.remove()
    with torch.no_grad():
        out = _head_outputs(attn, seen["x"])
    return att[layer], out


def attention_contributions(handle, samples: Sequence, layers: Sequence[int] | None = None,
                            target: str = "constraint", batch_size: int = 16,
                            progress: bool = True) -> pd.DataFrame:
    """Attention contribution of every image token to the ``target`` tokens, per layer.

    ``layers`` default to the first quarter of the decoder (at least 2 layers: "early").
    One row per sample × layer × image token: ``model, sample_id, category, layer, patch,
    position, score, related``.
    """
    a = handle.adapter
    L = a.n_layers
    layers = list(range(max(2, L // 4))) if layers is None else a.check_layers(list(layers), allow_embedding=False)
    rows = []
    for i in tqdm(range(0, len(samples), batch_size), desc="attention contributions", disable=not progress,
                  mininterval=5):
        chunk = samples[i:i + batch_size]
        batch = prepare_samples(handle, chunk)
        tgt = batch.role_mask(target)
        for layer in layers:
            alpha, norms = head_contributions(handle, batch, layer)
            for r, s in enumerate(chunk):
                if not tgt[r].any():
                    continue
                pos = image_patch_positions(handle, batch, r, getattr(s, "grid", None))
                c = tgt[r].nonzero().flatten()
                # score(j) = mean_c sum_h alpha[h, c, j] * ||W_O^h W_V^h x_j||
                sc = torch.einsum("hcj,jh->cj", alpha[r][:, c][:, :, pos].float(),
                                  norms[r][pos].norm(dim=-1).float())
                sc = sc.mean(0).cpu().numpy()
                related = set(getattr(s, "referred_patches", lambda: ())())
                for p, (t, v) in enumerate(zip(pos.tolist(), sc)):
                    rows.append({"model": handle.name, "sample_id": s.id, "category": getattr(s, "category", ""),
                                 "layer": layer, "patch": p, "position": t, "score": float(v),
                                 "related": p in related})
    return pd.DataFrame(rows, columns=["model", "sample_id", "category", "layer", "patch", "position", "score",
                                       "related"])


def restoration_scores(handle, samples: Sequence, n_noise: int = 10, scale: float = 3.0,
                       sigma: float | None = None, layer: int = -1, seed: int = 0, batch_size: int = 256,
                       only_correct: bool = True, progress: bool = True) -> pd.DataFrame:
    """Indirect effect of restoring each image token (its residual state at ``layer``; ``-1`` =
    decoder input) with every image token corrupted. One row per sample × image token:
    ``model, sample_id, category, patch, position, score, related, answer_source, p_clean,
    p_corrupted``. Samples without a gold answer are scored on the model's own answer
    (``only_correct`` does not apply to them); skipped samples are counted in
    ``df.attrs["skipped"]``, and an empty table says why (``df.attrs["why_empty"]``)."""
    if sigma is None and len(samples):
        sigma = tracing.noise_sigma(handle, samples, "image")
    rows = []
    skipped: Counter = Counter()
    n_model = 0
    for k, s in enumerate(tqdm(samples, desc="restoration scores", disable=not progress, mininterval=5)):
        try:
            c = tracing.corrupt(handle, s, "noise", "image", n_noise=n_noise, scale=scale, sigma=sigma,
                                seed=seed + k)
        except NoTarget:
            skipped["have a gold answer the vocabulary cannot spell"] += 1
            continue
        n_model += c.answer_source == MODEL
        if only_correct and not c.correct:
            skipped["answered wrongly (only_correct=True)"] += 1
            continue
        pos = image_patch_positions(handle, c.batch, 0, getattr(s, "grid", None))
        p = tracing.restore(c, [("resid", [layer], [int(t)]) for t in pos], batch_size=batch_size)
        related = set(getattr(s, "referred_patches", lambda: ())())
        for j, (t, pj) in enumerate(zip(pos.tolist(), p)):
            rows.append({"model": handle.name, "sample_id": s.id, "category": getattr(s, "category", ""),
                         "patch": j, "position": t, "score": float(pj - c.p_corrupted), "related": j in related,
                         "answer_source": c.answer_source, "p_clean": c.p_clean, "p_corrupted": c.p_corrupted})
    if only_correct and n_model:
        warnings.warn(only_correct_note(n_model), stacklevel=2)
    df = pd.DataFrame(rows, columns=["model", "sample_id", "category", "patch", "position", "score", "related",
                                     "answer_source", "p_clean", "p_corrupted"])
    return explain(df, skipped, len(samples), "restoration scores")


def precision_at_k(df: pd.DataFrame, score: str = "score", k: int | None = None) -> pd.DataFrame:
    """Per sample: precision of the top-``k`` patches (scores summed over layers if several) against
    the related patches, and the chance level ``|related| / n_patches``. Samples without related
    patches are left out. Columns: ``sample_id, category, k, precision, chance``."""
    out = []
    for sid, g in df.groupby("sample_id", sort=False):
        per = g.groupby("patch").agg(score=(score, "sum"), related=("related", "first"))
        n_rel = int(per.related.sum())
        if n_rel == 0:
            continue
        kk = n_rel if k is None else int(k)
        top = per.sort_values("score", ascending=False, kind="stable").head(kk)
        out.append({"sample_id": sid, "category": g.category.iloc[0], "k": kk,
                    "precision": float(top.related.mean()), "chance": n_rel / len(per)})
    return pd.DataFrame(out, columns=["sample_id", "category", "k", "precision", "chance"])


def summary(prec: pd.DataFrame) -> dict:
    """Mean precision and chance over samples."""
    return {"precision": float(np.mean(prec.precision)) if len(prec) else float("nan"),
            "chance": float(np.mean(prec.chance)) if len(prec) else float("nan"), "n_samples": int(len(prec))}
