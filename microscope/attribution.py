"""Visual-token attribution: which image tokens carry the image's information to the question.

    df = attention_contributions(handle, samples)   # per sample × layer × image patch
    rs = restoration_scores(handle, samples)        # indirect effect of restoring one image token
    gr = group_restoration_scores(handle, samples)  # Shapley value of restoring whole objects together
    ig = integrated_gradients(handle, samples)      # Captum IG on the image tokens' decoder inputs
    ob = objectness_scores(handle, samples)         # question-blind baseline: where anything is
    table = attribution_table(groundtruth.patch_truth(samples), {"restoration": rs, ...})

Score them with :mod:`microscope.groundtruth` (patches covered ≥ 15%, precision@k, top-1,
ROC-AUC, referred-vs-distractor, each beside objectness and chance); ``precision_at_k`` below is
the older any-pixel yardstick, kept for comparison.

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
import itertools
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from microscope import attention, groundtruth, tracing
from microscope.answers import answer_ids, only_correct_note
from microscope.crossattn import has_cross_attention, no_patch_tokens
from microscope.data.blank import blank_like
from microscope.grid import image_patch_positions
from microscope.prefix import next_token_probs
from microscope.prefix import positions as prompt_positions
from microscope.progress import tqdm
from microscope.results import explain
from microscope.roles import prepare_samples

_NAME = "microscope_record_eager"


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    try:
        fn = attention.base_function(module, "eager")
    except RuntimeError:
        raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward; attention weights cannot be "
                           "recorded for this architecture") from None
    out, weights = fn(module, query, key, value, attention_mask, **kwargs)
    entry = attention.state(module)
    if isinstance(entry, tuple):  # (store, layer) inside record_attention, None outside
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
    if has_cross_attention(handle):
        raise no_patch_tokens(handle, "attention contributions of image tokens")
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
                scores = sc.mean(0).cpu().numpy()
                related = set(getattr(s, "referred_patches", lambda: ())())
                for p, (t, v) in enumerate(zip(pos.tolist(), scores)):
                    rows.append({"model": handle.name, "sample_id": s.id, "category": getattr(s, "category", ""),
                                 "layer": layer, "patch": p, "position": t, "score": float(v),
                                 "related": p in related})
    return pd.DataFrame(rows, columns=["model", "sample_id", "category", "layer", "patch", "position", "score",
                                       "related"])


def restoration_scores(handle, samples: Sequence, n_noise: int = 10, scale: float = 3.0,
                       sigma: float | None = None, layer: int = -1, seed: int = 0, batch_size: int | None = None,
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
    tally = tracing.Tally()
    for s, c in tracing.corrupted_samples(handle, samples, "noise", "image", n_noise, scale, sigma, None, seed,
                                          only_correct, tally, "restoration scores", progress):
        pos = image_patch_positions(handle, c.batch, 0, getattr(s, "grid", None))
        p = tracing.restore(c, [tracing.Restore("resid", [layer], [int(t)]) for t in pos], batch_size=batch_size)
        related = set(getattr(s, "referred_patches", lambda: ())())
        for j, (t, pj) in enumerate(zip(pos.tolist(), p)):
            rows.append({"model": handle.name, "sample_id": s.id, "category": getattr(s, "category", ""),
                         "patch": j, "position": t, "score": float(pj - c.p_corrupted), "related": j in related,
                         "answer_source": c.answer_source, "p_clean": c.p_clean, "p_corrupted": c.p_corrupted})
    if only_correct and tally.n_model:
        warnings.warn(only_correct_note(tally.n_model), stacklevel=2)
    df = pd.DataFrame(rows, columns=["model", "sample_id", "category", "patch", "position", "score", "related",
                                     "answer_source", "p_clean", "p_corrupted"])
    return explain(df, tally.skipped, len(samples), "restoration scores")


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


# --------------------------------------------------------------------------- baselines and group methods

def _image_tokens(handle, sample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(positions, clean, blank)``: the patch-grid positions of the sample's image tokens and the
    decoder inputs (T, d) of the sample and of its :func:`blank_like` copy."""
    from microscope.objects import decoder_inputs

    batch = prepare_samples(handle, [sample])
    pos = image_patch_positions(handle, batch, 0, getattr(sample, "grid", None))
    clean, blank = decoder_inputs(handle, [sample, blank_like(sample)])
    return pos, clean, blank


def objectness_scores(handle, samples: Sequence, progress: bool = True) -> pd.DataFrame:
    """Question-blind objectness of every image token: ``‖e_j − b_j‖₂``, the distance of patch
    ``j``'s decoder input from the one the tower gives the empty scene (:func:`blank_like`) at
    the same position. The image tokens come before the question, so under causal attention the
    score cannot depend on it. One row per sample × patch: ``model, sample_id, category, patch,
    position, score``."""
    if has_cross_attention(handle):
        raise no_patch_tokens(handle, "objectness scores of image tokens")
    rows = []
    for s in tqdm(samples, desc="objectness", disable=not progress, mininterval=5):
        pos, clean, blank = _image_tokens(handle, s)
        d = (clean[pos] - blank[pos]).float().norm(dim=-1).cpu().numpy()
        rows += [{"model": handle.name, "sample_id": s.id, "category": getattr(s, "category", ""), "patch": j,
                  "position": int(t), "score": float(v)} for j, (t, v) in enumerate(zip(pos.tolist(), d))]
    return pd.DataFrame(rows, columns=["model", "sample_id", "category", "patch", "position", "score"])


def group_restoration_scores(handle, samples: Sequence, min_coverage: float = 0.15, n_noise: int = 10,
                             scale: float = 3.0, sigma: float | None = None, seed: int = 0,
                             batch_size: int | None = None, only_correct: bool = True,
                             progress: bool = True) -> pd.DataFrame:
    """Restoration of whole objects: every image token corrupted with noise (as in
    :func:`restoration_scores`), then the decoder inputs of a *set* ``K`` of objects' patches
    (patches an object covers ≥ ``min_coverage``) restored together, for every ``K``:
    ``v(K) = p_restored(K)``. An object's score is its Shapley value
    ``φ_i = Σ_{K ⊆ N∖i} |K|!(n−|K|−1)!/n! (v(K ∪ i) − v(K))`` (Σφ = v(N) − p_corrupted), which
    credits both objects of a question that needs two at once (each alone restores little);
    each patch gets its owner's φ, background patches 0. Needs samples with objects (Shapes
    world). One row per sample × patch: ``model, sample_id, category, patch, position, score,
    owner, p_clean, p_corrupted``."""
    from microscope.objects import shapley_values

    if sigma is None:
        sigma = tracing.noise_sigma(handle, samples, "image")
    rows = []
    for k, s in enumerate(tqdm(samples, desc="group restoration", disable=not progress, mininterval=5)):
        if getattr(s, "objects", None) is None:
            raise ValueError(f"sample {s.id!r} has no objects: group restoration needs object masks (Shapes world)")
        c = tracing.corrupt(handle, s, "noise", "image", n_noise=n_noise, scale=scale, sigma=sigma, seed=seed + k)
        if only_correct and not c.correct:
            continue
        pos = image_patch_positions(handle, c.batch, 0, getattr(s, "grid", None))
        owner = groundtruth.object_owners(s, min_coverage)
        n = len(s.objects)
        sets = [frozenset(K) for r in range(n + 1) for K in itertools.combinations(range(n), r)]
        jobs = [tracing.Restore("resid", [-1], [int(pos[j]) for j in np.flatnonzero(np.isin(owner, list(K)))])
                for K in sets]
        p = tracing.restore(c, jobs, batch_size=batch_size)
        phi = shapley_values(dict(zip(sets, p)), n)
        for j, t in enumerate(pos.tolist()):
            rows.append({"model": handle.name, "sample_id": s.id, "category": getattr(s, "category", ""), "patch": j,
                         "position": t, "score": float(phi[owner[j]]) if owner[j] >= 0 else 0.0,
                         "owner": int(owner[j]), "p_clean": c.p_clean, "p_corrupted": c.p_corrupted})
    return pd.DataFrame(rows, columns=["model", "sample_id", "category", "patch", "position", "score", "owner",
                                       "p_clean", "p_corrupted"])


def _answer_probability(handle, clean: torch.Tensor, pos: torch.Tensor, gold: int, pos_ids):
    """``x ↦ p(answer)`` for image-token decoder inputs ``x`` (B, P, d) written at ``pos`` into the
    clean decoder input ``clean`` (T, d); differentiable."""
    def p_answer(x: torch.Tensor) -> torch.Tensor:
        emb = clean.unsqueeze(0).expand(x.shape[0], -1, -1).clone()
        emb[:, pos] = x
        return next_token_probs(handle, emb, None, pos_ids)[:, gold]

    return p_answer


def integrated_gradients(handle, samples: Sequence, n_steps: int = 32, internal_batch_size: int = 64,
                         only_correct: bool = True, progress: bool = True) -> pd.DataFrame:
    """Integrated gradients (Sundararajan et al. 2017, through Captum) of ``p(answer)`` with
    respect to the image tokens' decoder inputs ``x``, from the empty scene's ``b``
    (:func:`blank_like`): ``IG_j = Σ_d (x_jd − b_jd) ∫₀¹ ∂p(b + α(x − b)) / ∂x_jd dα`` (Riemann
    sum over ``n_steps`` points, Gauss-Legendre). Completeness: ``Σ_j IG_j = p(x) − p(b)`` up to
    the integration error, returned as ``delta``. One row per sample × patch: ``model,
    sample_id, category, patch, position, score, delta``."""
    if has_cross_attention(handle):
        raise no_patch_tokens(handle, "integrated gradients over image tokens")
    from captum.attr import IntegratedGradients

    rows = []
    for s in tqdm(samples, desc="integrated gradients", disable=not progress, mininterval=5):
        batch = prepare_samples(handle, [s])
        inputs = {k: v.to(handle.device) for k, v in batch.inputs.items()}
        pos, clean, blank = _image_tokens(handle, s)
        gold = answer_ids(handle.processor, [s.answer])[0]
        pos_ids = prompt_positions(handle, inputs)
        p_answer = _answer_probability(handle, clean, pos, gold, pos_ids)
        with torch.no_grad():
            p = p_answer(clean[pos].unsqueeze(0))
        if only_correct:
            with torch.no_grad():
                top = handle.model(**inputs, use_cache=False, logits_to_keep=1).logits[0, -1].argmax()
            if int(top) != gold:
                continue
        with torch.enable_grad():
            attr, delta = IntegratedGradients(p_answer).attribute(
                clean[pos].unsqueeze(0), baselines=blank[pos].unsqueeze(0), n_steps=n_steps,
                internal_batch_size=internal_batch_size, return_convergence_delta=True)
        score = attr[0].sum(-1).detach().float().cpu().numpy()
        rows += [{"model": handle.name, "sample_id": s.id, "category": getattr(s, "category", ""), "patch": j,
                  "position": int(t), "score": float(v), "delta": float(delta), "p_clean": float(p)}
                 for j, (t, v) in enumerate(zip(pos.tolist(), score))]
    return pd.DataFrame(rows, columns=["model", "sample_id", "category", "patch", "position", "score", "delta",
                                       "p_clean"])


def attribution_table(truth: pd.DataFrame, methods: dict[str, pd.DataFrame], common: bool = True) -> pd.DataFrame:
    """One row per sample × patch: the :func:`microscope.groundtruth.patch_truth` columns and one
    column per method (its ``score`` summed over layers where it has several). ``common``: only
    the samples every method scored (methods skip samples the model answers wrongly)."""
    out = truth
    for name, df in methods.items():
        per = df.groupby(["sample_id", "patch"], sort=False).score.sum().rename(name).reset_index()
        out = out.merge(per, on=["sample_id", "patch"], how="left")
    if common and methods:
        ok = out.groupby("sample_id")[list(methods)].apply(lambda g: bool(g.notna().all().all()))
        out = out[out.sample_id.isin(ok[ok].index)]
    return out.reset_index(drop=True)
