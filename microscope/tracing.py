"""Causal information tracing (ROME-style, extended to image-text models).

    c = corrupt(handle, sample, "noise", target="constraint")   # clean run + N corrupted inputs
    p = restore(c, [("resid", [3], [12])])                      # p(answer) with one state restored
    df = trace(handle, sample)                                  # full layer × token map, every site
    dfs = trace_dataset(handle, samples); agg = aggregate(dfs)  # mean effect per site × layer × group

The math, line by line (Meng et al. 2022; Basu et al. 2024 for MLLMs):

1. **Clean run.** Record the decoder input ``e`` (embeddings with image features merged in) and, at
   every layer ``l`` and position ``t``, the residual state ``h_l[t]``, the MLP output ``m_l[t]``
   and the attention output ``a_l[t]``. ``p_clean = p(answer | clean)``.
2. **Corrupt** the decoder input at the target positions, ``N`` times (``n`` = 1..N):
   ``noise``: ``e[t] + s·σ·z``, ``z ~ N(0, I)``, ``s = 3`` by default and ``σ`` the standard deviation
   of token embeddings over a data sample (:func:`noise_sigma`); ``replace``: ``e[t]`` becomes the
   embedding of another token. Targets: the constraint tokens, the referred object's image tokens
   (``related-image``), the other image tokens (``other-image``) or every image token (``image``).
   ``p_corrupted = mean_n p(answer | corrupted_n)``.
3. **Restore** one state in every corrupted copy: ``h_l[t]`` (``resid``), or ``m_j[t]`` / ``a_j[t]`` for
   the ``j`` in a window of layers around ``l`` (``mlp`` / ``attn``), to its clean value, and let the
   rest of the forward run. ``p_restored = mean_n p(answer | corrupted_n, restored)``.
4. **Indirect effect** ``IE = p_restored − p_corrupted``.

Positions before the first corrupted one cannot differ from the clean run (causal attention):
their effect is exactly 0, :func:`trace` does not run them, and every restoration forward starts
after them from the clean run's key/value cache (transformers' ``DynamicCache``), computing only
the suffix — with 36 image tokens before the question that is most of the prompt. Batching: every
(restoration, noise sample) pair is one row of a batch of ``inputs_embeds``
forwards, with forward hooks writing the clean values into the rows that restore them; the full
map of one site (L layers × T tokens × N) takes ``ceil(L·T·N / batch_size)`` forwards.
Restoring ``resid`` at every position of a layer gives back ``p_clean`` exactly; zero noise
gives zero effect; the same seed gives the same numbers (all tested).

Cross-attention models (Mllama, :mod:`microscope.crossattn`) have a fourth site, ``cross_attn``:
the output of a cross-attention layer's cross-attention, restored like ``attn`` over the
cross-attention layers of the window (``attn`` is self-attention: absent from those layers, which it
skips). ``resid`` and ``mlp`` work on both layer kinds. Their image is not a run of token
embeddings, so the image targets (noise on image tokens) are refused; the constraint corruptions
and the blank image (:func:`corruption_effects`) work.

The answer is the sample's gold answer, or for ``answer=None`` (VQA-Constraints) the model's own
greedy first token on the clean run, as the published tracing does; every row records it
(``answer_token``, ``answer_source``). :func:`trace_dataset` counts the samples it skips per reason in
``df.attrs["skipped"]`` and says why an empty table is empty (``df.attrs["why_empty"]``);
:func:`aggregate` and :func:`peak_layers` return empty results for it instead of failing.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from microscope import batching, depth, validate
from microscope.answers import MODEL, NoTarget, answer_target, gold_id, only_correct_note
from microscope.crossattn import CrossInputs, has_cross_attention, no_patch_tokens
from microscope.extract import SITES, capture, sites_of
from microscope.grid import image_patch_positions, related_patches
from microscope.prefix import causal_start, clean_cache, next_token_probs, prefix_of
from microscope.prefix import positions as prompt_positions
from microscope.progress import tqdm
from microscope.results import UNSPELLABLE, WHY_EMPTY, WRONG, explain, normal_ci, why_empty
from microscope.roles import ROLE_CODE, ROLES, Batch, adds_special_tokens, prepare_samples

if TYPE_CHECKING:
    from microscope.model import Handle

CORRUPTIONS = ("noise", "replace")
TARGETS = ("constraint", "related-image", "other-image", "image")
#: token groups of the dataset-level aggregation, in display order
TOKEN_GROUPS = ("first constraint", "middle constraint", "last constraint", "other question", "related image",
                "other image", "image_boundary", "template", "last")


def restore_window(n_layers: int) -> int:
    """Layers restored together for ``mlp``/``attn``: the smallest odd ``k >= 10 · L / 48``
    (ROME uses 10 on 48 layers): 7 for 32 layers, 3 for the embedded model's 6."""
    return max(1, 2 * math.ceil((10 * n_layers / 48 - 1) / 2) + 1)


def noise_sigma(handle, samples: Sequence, modality: str = "text", max_samples: int = 64) -> float:
    """Standard deviation of decoder-input embeddings over the ``modality`` tokens of samples.

    ``text``: every non-image prompt token; ``image``: image tokens (projected image features).
    """
    if modality not in ("text", "image"):
        raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
    vals = []
    samples = list(samples)[:max_samples]
    for i in range(0, len(samples), 16):
        batch = prepare_samples(handle, samples[i:i + 16])
        with torch.no_grad(), capture(handle, [-1]) as acts:
            handle.model(**{k: v.to(handle.device) for k, v in batch.inputs.items()}, use_cache=False,
                         logits_to_keep=1)
        img = batch.roles == ROLE_CODE["image"]
        keep = img if modality == "image" else (~img & (batch.roles != ROLE_CODE["pad"]))
        vals.append(acts["resid.-1"][keep.to(handle.device)].float().cpu())
    if not vals:
        raise ValueError("noise_sigma needs at least one sample")
    return float(torch.cat(vals).std())


def token_groups(batch: Batch, row: int, related_positions: torch.Tensor | None) -> list[str]:
    """The aggregation group of every position of ``row`` (``pad`` for padding).

    Constraint tokens in prompt order: the first is ``first constraint``, the last ``last
    constraint``, those between ``middle constraint`` (a one-token constraint is ``last``).
    """
    roles = [ROLES[int(c)] for c in batch.roles[row]]
    cons = [t for t, r in enumerate(roles) if r == "constraint"]
    rel = set(related_positions.tolist()) if related_positions is not None else set()
    out = []
    for t, r in enumerate(roles):
        if r == "constraint":
            out.append("last constraint" if t == cons[-1] else "first constraint" if t == cons[0]
                       else "middle constraint")
        elif r == "question":
            out.append("other question")
        elif r == "image":
            out.append("related image" if t in rel else "other image")
        else:
            out.append(r)
    return out


class NothingToCorrupt(ValueError):
    """The sample has no token of the requested target (e.g. no constraint word)."""


@dataclass
class Corrupted:
    """A clean run and its ``N`` corrupted decoder inputs for one sample (see the module doc)."""

    handle: Handle
    sample: Any                         # a data-set sample (shapes.Sample, vqa.VQASample), by duck typing
    batch: Batch
    answer_id: int
    clean: dict[str, torch.Tensor]      # "site.layer" -> (T, d) clean activations
    corrupted: torch.Tensor             # (N, T, d) corrupted decoder inputs
    positions: torch.Tensor             # (T,) bool: the corrupted positions
    p_clean: float
    p_corrupted: float
    correct: bool                       # the clean run's top token is the answer's
    groups: list[str]
    related_positions: torch.Tensor | None
    first: int = 0                      # first position the corruption can change (causal_start)
    prefix: list | None = None          # clean (key, value) per layer of the positions before it
    # prefix.positions: M-RoPE positions, token_type_ids (cross-attention inputs for Mllama); None if neither
    position_ids: dict[str, torch.Tensor] | CrossInputs | None = None
    answer_source: str = "gold"         # "gold", or "model": the clean run's own greedy answer
    corrupted_top: int = -1             # top token of the mean corrupted next-token distribution

    @property
    def n_noise(self) -> int:
        return self.corrupted.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.corrupted.shape[1]


def _related(handle, batch: Batch, sample) -> torch.Tensor | None:
    patches = related_patches(handle, batch, 0, sample)
    if patches is None:
        return None
    pos = image_patch_positions(handle, batch, 0)
    return pos[list(patches)] if patches else pos[:0]


def _plain_tokens(tok, text: str, image_token_id: int) -> list[tuple[int, int, int]]:
    """``(id, start, end)`` of the prompt's tokens as :func:`microscope.roles.prepare` aligns them
    with the processor's ids (the same call; image placeholders dropped)."""
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=adds_special_tokens(tok, text))
    return [(int(i), int(a), int(b)) for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])
            if int(i) != image_token_id]


def replacement_options(handle, batch: Batch, sample, words: Sequence[str] | None = None
                        ) -> list[tuple[str, list[int], list[tuple[str, list[int]]]]]:
    """For each constraint word of row 0: ``(word, positions, options)``, where ``positions`` are
    its tokens' positions in ``batch`` and ``options`` lists ``(replacement, ids)``: a replacement
    word and the ids it tokenises to *in context* — substituted for the whole word in the prompt
    and tokenised as the question is, so a byte-level BPE's ``Ġtriangle`` becomes ``Ġcross`` (not
    the start-of-text ``cross``) and a word after a newline keeps its context's form.

    A word split into several tokens (``▁rh|omb|us``) is replaced as a whole. Only replacements
    with as many tokens in context as the word, and that leave every other token of the prompt
    unchanged, are options: the corrupted input must keep the clean run's positions (restoration
    writes clean states position by position), so a replacement of another length is not
    re-aligned but left out. Candidates are ``words``, else ``sample.replacements(word)`` (tried
    lower-cased for a capitalised word, whose case the replacements then take). ``ValueError``
    names a word none of whose candidates fits.
    """
    tok = handle.processor.tokenizer
    img = handle.adapter.image_token_id
    prompt = batch.prompts[0]
    q0 = prompt.find(sample.question)
    plain = _plain_tokens(tok, prompt, img)
    ids = batch.inputs["input_ids"][0]
    cons_pos = (batch.roles[0] == ROLE_CODE["constraint"]).nonzero().flatten().tolist()
    out, used = [], 0
    for c in sorted(sample.constraints, key=lambda c: c.start):
        s, e = q0 + c.start, q0 + c.end
        ks = [k for k, (_i, a, b) in enumerate(plain) if a < e and b > s and b > a]
        if not ks:
            continue
        positions = cons_pos[used:used + len(ks)]
        used += len(ks)
        if len(positions) != len(ks) or any(int(ids[p]) != plain[k][0] for p, k in zip(positions, ks)):
            raise RuntimeError(f"internal: constraint {c.word!r} of sample {sample.id!r} is not aligned with the "
                               "processor's ids")
        before, after = plain[:ks[0]], plain[ks[-1] + 1:]
        word = c.word
        pool = list(words) if words is not None else (sample.replacements(word)
                                                      or sample.replacements(word.lower()))
        if word[:1].isupper():
            pool = [w[:1].upper() + w[1:] for w in pool]
        options, lengths = [], {}
        for w in dict.fromkeys(pool):
            if w == word:
                continue
            new = _plain_tokens(tok, prompt[:s] + w + prompt[e:], img)
            n = len(new) - len(before) - len(after)
            lengths[w] = n
            same = ([t[0] for t in new[:len(before)]] == [t[0] for t in before]
                    and [t[0] for t in new[len(new) - len(after):]] == [t[0] for t in after])
            if n == len(ks) and same:
                options.append((w, [t[0] for t in new[len(before):len(before) + n]]))
        if not options:
            raise ValueError(f"no replacement for constraint word {word!r} of sample {sample.id!r}: it is {len(ks)} "
                             f"token(s) in context and the candidates are {lengths or 'none'} (tokens in context); "
                             "pass replace_with=[...] words of the same length in tokens")
        out.append((word, positions, options))
    if used != len(cons_pos):
        raise RuntimeError(f"internal: constraint tokens of sample {sample.id!r} do not match its constraints")
    return out


def _forward_p(handle, embeds: torch.Tensor, answer: int, prefix: list | None = None,
               position_ids: dict[str, torch.Tensor] | CrossInputs | None = None) -> torch.Tensor:
    """p(answer) at the last position of each row (:func:`microscope.prefix.next_token_probs`)."""
    return next_token_probs(handle, embeds, prefix, position_ids)[:, answer]


def corrupt(handle, sample, corruption: str = "noise", target: str = "constraint", n_noise: int = 10,
            scale: float = 3.0, sigma: float | None = None, replace_with: Sequence[str] | None = None,
            seed: int = 0) -> Corrupted:
    """Run ``sample`` clean (recording every site) and build its corrupted decoder inputs.

    ``sigma`` defaults to the standard deviation of this sample's own decoder-input embeddings
    (text or image tokens, to match ``target``) — pass a data-set value (:func:`noise_sigma`) for
    comparable runs. ``replace_with``: words that replace each constraint word as a whole,
    tokenised in context (drawn uniformly per noise sample among those with the word's length in
    tokens, :func:`replacement_options`); by default the sample's own ``replacements()`` when it
    has them (Shapes world: other words of the same kind).
    The measured answer is the sample's gold answer, or with ``answer=None`` the clean run's
    greedy first token (``answer_source="model"``, ``correct`` then True by construction);
    :class:`~microscope.answers.NoTarget` for a gold answer the vocabulary cannot spell.
    """
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; choose one of {list(CORRUPTIONS)}")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    if corruption == "replace" and target != "constraint":
        raise ValueError("token replacement applies to the constraint words; use corruption='noise' for image "
                         "tokens")
    n_noise = validate.positive_int(n_noise, "n_noise")
    scale = validate.scale(scale)
    if target != "constraint" and has_cross_attention(handle):
        raise no_patch_tokens(handle, f"the corruption target {target!r} (noise on image tokens: the <|image|> token's "
                                      "input is a learned embedding, not the image)")
    a = handle.adapter
    batch = prepare_samples(handle, [sample])
    rel = _related(handle, batch, sample)
    roles = batch.roles[0]
    if target == "constraint":
        pos = roles == ROLE_CODE["constraint"]
    elif target == "image":
        pos = roles == ROLE_CODE["image"]
    else:
        if rel is None:
            raise ValueError(f"target {target!r} needs the sample's referred patches (sample.referred_patches()) "
                             "and a model with one image token per patch")
        pos = torch.zeros_like(roles, dtype=torch.bool)
        pos[rel] = True
        if target == "other-image":
            pos = (roles == ROLE_CODE["image"]) & ~pos
    if not pos.any():
        raise NothingToCorrupt(f"sample {sample.id!r} has no {target} tokens to corrupt")
    gold_id(handle.processor, sample.answer)  # NoTarget before any forward
    inputs = {k: v.to(handle.device) for k, v in batch.inputs.items()}
    L = a.n_layers
    with torch.no_grad(), capture(handle, list(range(-1, L)), sites_of(handle)) as acts:
        out = handle.model(**inputs, use_cache=True, **clean_cache(handle), logits_to_keep=1)
    logits = out.logits[0, -1].float()
    gold, source = answer_target(handle.processor, sample.answer, logits)
    clean = {k: v[0] for k, v in acts.items()}
    p_clean = float(logits.softmax(-1)[gold])
    e = clean["resid.-1"]
    # states before the first corrupted position are clean — before the start of a bidirectional
    # block that holds it, where attention is not causal (causal_start)
    first = causal_start(handle, inputs, int(pos.nonzero().min()))
    g = torch.Generator().manual_seed(int(seed))
    rep = e.unsqueeze(0).repeat(n_noise, 1, 1)
    posd = pos.to(e.device)
    if corruption == "noise":
        if sigma is None:  # this sample's decoder-input embeddings of the target's modality
            img = roles == ROLE_CODE["image"]
            sigma = float(e[(img if "image" in target else ~img).to(e.device)].float().std())
        z = torch.randn((n_noise, int(pos.sum()), e.shape[-1]), generator=g).to(e.device, e.dtype)
        rep[:, posd] = rep[:, posd] + scale * sigma * z
    else:
        words = list(replace_with) if replace_with is not None else None
        if words is None and not callable(getattr(sample, "replacements", None)):
            raise ValueError("corruption='replace' needs replace_with=[words...] for samples without "
                             "replacements()")
        for _word, positions, options in replacement_options(handle, batch, sample, words):
            pick = torch.randint(len(options), (n_noise,), generator=g).tolist()
            new = torch.tensor([options[k][1] for k in pick], device=e.device)  # (n_noise, len(positions))
            with torch.no_grad():
                rep[:, positions] = a.embed(new).to(e.dtype)
    prefix = prefix_of(out, first, keep=handle.adapter.cross_attention_layers)
    pos_ids = prompt_positions(handle, inputs)
    with torch.no_grad():
        probs = next_token_probs(handle, rep[:, first:] if prefix else rep, prefix, pos_ids).mean(0)
    return Corrupted(handle=handle, sample=sample, batch=batch, answer_id=gold, clean=clean, corrupted=rep,
                     positions=pos, p_clean=p_clean, p_corrupted=float(probs[gold]),
                     correct=int(logits.argmax()) == gold, groups=token_groups(batch, 0, rel), related_positions=rel,
                     first=first, prefix=prefix, position_ids=pos_ids, answer_source=source,
                     corrupted_top=int(probs.argmax()))


@contextlib.contextmanager
def _restoring(handle, clean: dict, spec: dict, offset: int = 0, inputs_of: dict[int, int] | None = None
               ) -> Iterator[None]:
    """Forward hooks writing ``clean`` values into ``spec[(site, layer)] = (rows, positions)``;
    ``positions`` index the forward's tokens, which start at prompt position ``offset``.
    ``resid`` of layer ``l`` in ``inputs_of`` is written into the input of decoder layer
    ``inputs_of[l]`` (the layer after it: the same tensor, written before that layer runs — a row
    starting there need not run layer ``l``); layer ``-1``, the decoder input, is always layer 0's."""
    a = handle.adapter
    inputs_of = {-1: 0, **(inputs_of or {})}
    hooks = []

    def written(h: torch.Tensor, rows, pos, key: str) -> torch.Tensor:
        h = h.clone()
        h[rows, pos] = clean[key][pos + offset].to(h.dtype)
        return h

    def make_post(key, rows, pos):
        def hook(_m, _inp, out):
            if isinstance(out, tuple):
                return (written(out[0], rows, pos, key), *out[1:])
            return written(out, rows, pos, key)
        return hook

    def make_pre(key, rows, pos):
        def hook(_m, args, kwargs):
            if args:
                return (written(args[0], rows, pos, key), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": written(kwargs["hidden_states"], rows, pos, key)}
        return hook

    try:
        for (site, layer), (rows, pos) in spec.items():
            key = f"{site}.{layer}"
            if site == "resid" and layer in inputs_of:
                hooks.append(a.layers[inputs_of[layer]].register_forward_pre_hook(make_pre(key, rows, pos),
                                                                                 with_kwargs=True))
                continue
            if not a.has_site(layer, site):
                continue  # the layer has no such site (it adds 0 there): nothing to restore
            hooks.append(a.module(site, layer).register_forward_hook(make_post(key, rows, pos)))
        yield
    finally:
        for h in hooks:
            h.remove()


class Restore(NamedTuple):
    """One restoration, as :class:`microscope.knockout.Block` is one knockout: write the clean
    run's values of ``site`` (a site: ``resid``, ``mlp``, ``attn``, or ``cross_attn``; the trace
    table's ``site`` column) at every ``layers`` × ``positions`` into the corrupted run. A plain
    ``(site, layers, positions)`` tuple is the same restoration."""

    site: str
    layers: Sequence[int]
    positions: Sequence[int]


Job = Restore | tuple[str, Sequence[int], Sequence[int]]


def _as_restore(job) -> Restore:
    if isinstance(job, Restore):
        return job
    try:
        site, layers, positions = job
    except (TypeError, ValueError):
        raise ValueError(f"a restoration is Restore(site, layers, positions) or a (site, layers, positions) "
                         f"tuple, got {job!r}") from None
    return Restore(site, layers, positions)


def restore(c: Corrupted, jobs: Sequence[Job], batch_size: int | None = None, progress: bool = False) -> np.ndarray:
    """``p_restored`` (mean over noise samples) for each :class:`Restore` (or ``(site, layers,
    positions)`` tuple) of ``jobs``: the clean values of ``site`` at every (layer, position) of
    the job are written into each corrupted copy (a job with no positions restores nothing).
    ``resid`` layer ``-1`` is the decoder input itself.

    Rows compute only what a restoration can change: the positions from the first corrupted one
    (the clean prefix cache) in the layers from the job's first restored layer on — the corrupted
    run's inputs of the layers below it are recorded once (:mod:`microscope.depth`).
    ``batch_size``: rows per forward (``None``: as many as memory holds, :mod:`microscope.batching`)."""
    h = c.handle
    sites = sites_of(h)
    jobs = [_as_restore(j) for j in jobs]
    for site, layers, positions in jobs:
        if site not in sites:
            raise ValueError(f"unknown site {site!r}; sites are {list(sites)}")
        h.adapter.check_layers(layers, allow_embedding=(site == "resid"))
        validate.positions(positions, c.n_tokens, allow_empty=True)  # restoring nothing: p_corrupted
    N = c.n_noise
    # positions before the first corrupted one are clean in every row: they come from the prefix
    # cache and are not recomputed; restoring one of them is a no-op
    off = c.first if c.prefix else 0
    # a job restoring nothing after the offset is the corrupted run itself; identical jobs run once
    keys = [(k, tuple(int(x) for x in lay), tuple(int(p) - off for p in ps if int(p) >= off)) for k, lay, ps in jobs]
    unique = list(dict.fromkeys(key for key in keys if key[2]))
    jobs = [(k, list(lay), list(ps)) for k, lay, ps in unique]
    if not jobs:  # every job restores nothing: the corrupted run itself
        return np.full(len(keys), c.p_corrupted)
    # the layers below a job's first restored layer see the corrupted run: record its layer inputs
    # once; each row joins its chunk's batch at the first layer it restores (microscope.depth)
    prefix = c.prefix if off else None
    rec = depth.record(h, c.corrupted[:, off:], prefix, c.position_ids)
    # the residual stream after layer l is the input of the next layer the model calls: a row
    # restoring it starts there, the clean state written into that layer's input (_restoring)
    inputs_of = dict(zip(rec.called, rec.called[1:]))

    def first_layer(site: str, layer: int) -> int:
        return inputs_of.get(layer, layer) if site == "resid" else layer

    start = [max(0, min(first_layer(site, int(x)) for x in layers)) if layers else h.adapter.n_layers
             for site, layers, _ps in jobs]
    rows = sorted(((j, n) for j in range(len(jobs)) for n in range(N)), key=lambda jn: start[jn[0]])
    out = np.zeros(len(jobs))
    batch_size = (batching.rows_per_batch(h, prefix, c.corrupted.shape[1] - off) if batch_size is None
                  else validate.positive_int(batch_size, "batch_size"))
    it = range(0, len(rows), batch_size)
    for i in tqdm(it, desc="restore", disable=not progress, mininterval=5):
        chunk = rows[i:i + batch_size]
        spec: dict[tuple[str, int], tuple[list, list]] = {}
        for r, (j, _n) in enumerate(chunk):
            site, layers, positions = jobs[j]
            for layer in layers:
                rr, pp = spec.setdefault((site, int(layer)), ([], []))
                rr += [r] * len(positions)
                pp += [int(p) for p in positions]
        spec_t = {k: (torch.tensor(v[0], dtype=torch.long), torch.tensor(v[1], dtype=torch.long))
                  for k, v in spec.items() if v[0]}
        with torch.no_grad(), _restoring(h, c.clean, spec_t, off, inputs_of):  # rows sorted by first layer
            logits = depth.run_from(h, rec, [start[j] for j, _n in chunk], [n for _j, n in chunk])
        p = logits.float().softmax(-1)[:, c.answer_id].cpu().numpy()
        for (j, _n), pj in zip(chunk, p):
            out[j] += pj / N
    value = dict(zip(unique, out))
    return np.array([value.get(key, c.p_corrupted) for key in keys])


def trace(handle, sample, sites: Sequence[str] = SITES, corruption: str = "noise", target: str = "constraint",
          n_noise: int = 10, scale: float = 3.0, sigma: float | None = None, window: int | None = None,
          positions: Sequence[int] | None = None, replace_with: Sequence[str] | None = None, seed: int = 0,
          batch_size: int | None = None, corrupted: Corrupted | None = None) -> pd.DataFrame:
    """The layer × token map of indirect effects of one sample, for each site.

    One row per (site, layer, position): ``model, sample_id, category, site, corruption, target,
    layer, position, role, group, token, answer_token, answer_source, p_clean, p_corrupted,
    p_restored, effect`` (``target`` is what was corrupted; ``answer_token`` the measured token,
    from the gold answer or, ``answer_source="model"``, the model's own). ``mlp``/``attn``
    restore a window of ``window`` layers centred at ``layer`` (clipped at the ends); ``resid`` also
    has layer ``-1``, the decoder input (restoring it at a corrupted token undoes that token's corruption).
    """
    L = handle.adapter.n_layers
    window = restore_window(L) if window is None else validate.window(window)
    sites = validate.names(sites, sites_of(handle), "sites")
    c = corrupted or corrupt(handle, sample, corruption, target, n_noise, scale, sigma, replace_with, seed)
    pad = ROLE_CODE["pad"]
    positions = [t for t in range(c.n_tokens) if int(c.batch.roles[0, t]) != pad] if positions is None \
        else validate.positions(positions, c.n_tokens)
    # causal attention: states before the first corrupted position equal the clean ones, so
    # restoring them changes nothing (effect exactly 0) and they need no forward
    first = c.first
    run = [t for t in positions if t >= first]
    ids = c.batch.inputs["input_ids"][0]
    toks = handle.processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    jobs, keys = [], []
    def layers_of(site):  # resid includes -1, the decoder input (the corrupted embedding itself)
        return range(-1 if site == "resid" else 0, L)

    for site in sites:
        for layer in layers_of(site):
            lay = [layer] if site == "resid" else list(
                range(max(0, layer - (window - 1) // 2), min(L, layer + window // 2 + 1)))
            for t in run:
                jobs.append(Restore(site, lay, [t]))
                keys.append((site, layer, t))
    p = list(restore(c, jobs, batch_size=batch_size))
    for site in sites:
        for layer in layers_of(site):
            for t in positions:
                if t < first:
                    keys.append((site, layer, t))
                    p.append(c.p_corrupted)
    roles = c.batch.roles[0]
    answer_tok = handle.processor.tokenizer.convert_ids_to_tokens(c.answer_id)
    rows = [{
        "model": handle.name, "sample_id": sample.id, "category": getattr(sample, "category", ""), "site": site,
        "corruption": corruption, "target": target, "layer": layer, "position": t, "role": ROLES[int(roles[t])],
        "group": c.groups[t], "token": toks[t], "answer_token": answer_tok, "answer_source": c.answer_source,
        "p_clean": c.p_clean, "p_corrupted": c.p_corrupted, "p_restored": float(pj),
        "effect": float(pj) - c.p_corrupted,
    } for (site, layer, t), pj in zip(keys, p)]
    return pd.DataFrame(rows, columns=TRACE_COLUMNS).sort_values(["site", "layer", "position"], ignore_index=True)


TRACE_COLUMNS = ["model", "sample_id", "category", "site", "corruption", "target", "layer", "position", "role",
                 "group", "token", "answer_token", "answer_source", "p_clean", "p_corrupted", "p_restored", "effect"]


@dataclass
class Tally:
    """What :func:`corrupted_samples` left out, per reason (``skipped``, for
    :func:`microscope.results.explain`), and how many samples were measured on the model's own
    answer (``n_model``: they have no gold answer)."""

    skipped: Counter = field(default_factory=Counter)
    n_model: int = 0


def corrupted_samples(handle, samples: Sequence, corruption: str, target: str, n_noise: int, scale: float,
                      sigma: float | None, replace_with: Sequence[str] | None, seed: int, only_correct: bool,
                      tally: Tally, desc: str, progress: bool) -> Iterator[tuple[Any, Corrupted]]:
    """``(sample, corrupt(...))`` for each of ``samples`` (sample ``k`` with noise seed ``seed + k``)
    that can be traced: it has tokens to corrupt, its gold answer is spelled by the vocabulary,
    and, with ``only_correct``, the model answers it correctly (samples without a gold answer are
    measured on the model's own answer). The others are counted in ``tally.skipped`` per reason —
    the one loop every per-sample analysis built on :func:`corrupt` runs."""
    for k, s in enumerate(tqdm(samples, desc=desc, disable=not progress, mininterval=5)):
        try:
            c = corrupt(handle, s, corruption, target, n_noise, scale, sigma, replace_with, seed + k)
        except NothingToCorrupt:
            tally.skipped[f"have no {target} tokens to corrupt"] += 1
            continue
        except NoTarget:
            tally.skipped[UNSPELLABLE] += 1
            continue
        tally.n_model += c.answer_source == MODEL
        if only_correct and not c.correct:
            tally.skipped[WRONG] += 1
            continue
        yield s, c


def trace_dataset(handle, samples: Sequence, sites: Sequence[str] = SITES, corruption: str = "noise",
                  target: str = "constraint", n_noise: int = 10, scale: float = 3.0, sigma: float | None = None,
                  window: int | None = None, replace_with: Sequence[str] | None = None, seed: int = 0,
                  batch_size: int | None = None, only_correct: bool = True, progress: bool = True) -> pd.DataFrame:
    """:func:`trace` over ``samples`` (one shared ``sigma``, from the samples unless given), skipping
    samples the model answers wrongly (``only_correct``; it does not apply to samples without a
    gold answer, which are traced on the model's own answer), that have nothing to corrupt, or
    whose gold answer the vocabulary cannot spell. The counts are in ``df.attrs["skipped"]``; an
    empty table (with every column) says why in ``df.attrs["why_empty"]``."""
    scale, sites = validate.scale(scale), validate.names(sites, sites_of(handle), "sites")
    window = None if window is None else validate.window(window)
    if sigma is None and corruption == "noise" and len(samples):
        sigma = noise_sigma(handle, samples, "image" if "image" in target else "text")
    out = []
    tally = Tally()
    for s, c in corrupted_samples(handle, samples, corruption, target, n_noise, scale, sigma, replace_with, seed,
                                  only_correct, tally, "trace", progress):
        out.append(trace(handle, s, sites, corruption, target, n_noise, scale, sigma, window,
                         batch_size=batch_size, corrupted=c))
    if only_correct and tally.n_model:
        warnings.warn(only_correct_note(tally.n_model), stacklevel=2)
    df = pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=TRACE_COLUMNS)
    return explain(df, tally.skipped, len(samples), "traced samples")


AGG_COLUMNS = ["site", "layer", "group", "effect", "ci_low", "ci_high", "n_samples"]


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean indirect effect per site × layer × token group, over samples (a sample's tokens in a
    group are averaged first), with a 95% normal CI: ``site, layer, group, effect, ci_low,
    ci_high, n_samples``. A trace table without rows gives an empty table with these columns and
    a warning saying why (``attrs["why_empty"]``, carried over)."""
    if df.empty:
        why = why_empty(df, "traced samples")
        warnings.warn(f"nothing to aggregate: {why}", stacklevel=2)
        out = pd.DataFrame(columns=AGG_COLUMNS)
        out.attrs[WHY_EMPTY] = why
        return out
    per = df.groupby(["site", "layer", "group", "sample_id"], sort=False).effect.mean().reset_index()
    g = per.groupby(["site", "layer", "group"], sort=False).effect.agg(["mean", "std", "count"]).reset_index()
    low, high = normal_ci(g["mean"], g["std"], g["count"])
    return pd.DataFrame({"site": g.site, "layer": g.layer, "group": g.group, "effect": g["mean"],
                         "ci_low": low, "ci_high": high, "n_samples": g["count"]})


def peak_layers(agg: pd.DataFrame, groups: Sequence[str] | None = None) -> dict[str, dict]:
    """Per site, the decoder layer (``>= 0``: restoring the decoder input at a corrupted token
    merely undoes the corruption) with the largest mean effect in any of ``groups`` (default the
    constraint groups), the group and that effect. Near-ties (within 1% of the maximum, e.g. the
    last position's residual state, equal at every layer after the information arrived) go to the
    earliest layer: where the information is first there. ``{}`` for an empty table."""
    groups = list(groups or ("first constraint", "middle constraint", "last constraint"))
    out: dict[str, dict] = {}
    if agg.empty:
        return out
    for site, g in agg[agg.group.isin(groups) & (agg.layer >= 0)].groupby("site", sort=False):
        top = g.effect.max()
        near = g[g.effect >= top - 0.01 * abs(top)].sort_values(["layer", "effect"], ascending=[True, False])
        best = near.iloc[0]
        out[site] = {"layer": int(best.layer), "group": str(best.group), "effect": float(best.effect)}
    return out


# --------------------------------------------------------------------------- how much each corruption corrupts

#: the corruptions :func:`corruption_effects` compares by default: (label, corruption, target, scale);
#: ``blank`` replaces the image by an empty one (no noise samples)
CORRUPTION_SET = (
    ("noise 1σ (constraint)", "noise", "constraint", 1.0),
    ("noise 3σ (constraint)", "noise", "constraint", 3.0),
    ("noise 10σ (constraint)", "noise", "constraint", 10.0),
    ("word swap (constraint)", "replace", "constraint", 0.0),
    ("noise 3σ (image)", "noise", "image", 3.0),
    ("blank image", "blank", "image", 0.0),
)
EFFECT_COLUMNS = ["model", "sample_id", "category", "corruption", "kind", "target", "scale", "p_clean",
                  "p_corrupted", "drop", "flipped", "correct"]


def corruption_effects(handle, samples: Sequence, corruptions: Sequence[tuple] = CORRUPTION_SET, n_noise: int = 10,
                       sigma_text: float | None = None, sigma_image: float | None = None, seed: int = 0,
                       progress: bool = True) -> pd.DataFrame:
    """How much each corruption moves each sample's answer: the evidence a trace rests on.

    ``corruptions``: ``(label, corruption, target, scale)`` tuples as in :data:`CORRUPTION_SET`;
    ``corruption`` is ``noise`` or ``replace`` (:func:`corrupt`), or ``blank`` (the image replaced
    by an empty one, :func:`microscope.data.blank.blank_like`). Per sample × corruption:
    ``p_corrupted`` = mean over the ``n_noise`` corrupted copies of p(answer) (one copy for
    ``blank``), ``drop = p_clean − p_corrupted``, ``flipped`` = the top token of the mean corrupted
    distribution is not the answer (the gold answer, or with ``answer=None`` the model's own
    clean greedy token). Samples without the target tokens are left out of that corruption, and
    samples whose gold answer the vocabulary cannot spell are left out. Columns: ``model,
    sample_id, category, corruption, kind, target, scale, p_clean,
    p_corrupted, drop, flipped, correct``."""
    from microscope.data.blank import blank_like
    from microscope.objects import probs as _probs

    if has_cross_attention(handle) and any(k == "noise" and t != "constraint" for _, k, t, _ in corruptions):
        if corruptions is not CORRUPTION_SET:
            raise no_patch_tokens(handle, "noise on image tokens")
        corruptions = tuple(c for c in corruptions if not (c[1] == "noise" and c[2] != "constraint"))
        warnings.warn(f"{handle.name}: noise on image tokens left out of the default corruptions (the image enters "
                      "through cross-attention, not token embeddings); the blank image stays", stacklevel=2)
    if sigma_text is None and any(k == "noise" and t == "constraint" for _, k, t, _ in corruptions):
        sigma_text = noise_sigma(handle, samples, "text")
    if sigma_image is None and any(k == "noise" and t != "constraint" for _, k, t, _ in corruptions):
        sigma_image = noise_sigma(handle, samples, "image")
    rows = []
    for i, s in enumerate(tqdm(samples, desc="corruption effects", disable=not progress, mininterval=5)):
        try:
            gold = gold_id(handle.processor, s.answer)  # None: the model's own greedy answer
        except NoTarget:
            continue
        for label, kind, target, scale in corruptions:
            if kind == "blank":
                probs = _probs(handle, [s, blank_like(s)])
                gold = int(probs[0].argmax()) if gold is None else gold
                p_clean, correct = float(probs[0, gold]), int(probs[0].argmax()) == gold
                p_cor, top = float(probs[1, gold]), int(probs[1].argmax())
            else:
                try:
                    c = corrupt(handle, s, kind, target, n_noise=n_noise, scale=scale,
                                sigma=sigma_text if target == "constraint" else sigma_image, seed=seed + i)
                except NothingToCorrupt:
                    continue
                gold = c.answer_id
                p_clean, correct, p_cor, top = c.p_clean, c.correct, c.p_corrupted, c.corrupted_top
            rows.append({"model": handle.name, "sample_id": s.id, "category": getattr(s, "category", ""),
                         "corruption": label, "kind": kind, "target": target, "scale": scale, "p_clean": p_clean,
                         "p_corrupted": p_cor, "drop": p_clean - p_cor, "flipped": top != gold, "correct": correct})
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)


def corruption_summary(effects: pd.DataFrame, drop: float = 0.1, only_correct: bool = True) -> pd.DataFrame:
    """Per corruption, over the samples answered correctly (all with ``only_correct=False``): the
    quartiles and mean of p(corrupted), the share of samples whose p(answer) drops by more than
    ``drop`` and the share whose answer flips. Columns: ``corruption, n_samples, p_clean,
    p_corrupted_mean, p_corrupted_q25, p_corrupted_median, p_corrupted_q75, share_drop,
    share_flipped``."""
    d = effects[effects.correct] if only_correct else effects
    g = d.groupby("corruption", sort=False)
    out = g.agg(n_samples=("sample_id", "size"), p_clean=("p_clean", "mean"), p_corrupted_mean=("p_corrupted", "mean"),
                p_corrupted_q25=("p_corrupted", lambda x: x.quantile(0.25)),
                p_corrupted_median=("p_corrupted", "median"),
                p_corrupted_q75=("p_corrupted", lambda x: x.quantile(0.75)),
                share_drop=("drop", lambda x: float((x > drop).mean())),
                share_flipped=("flipped", "mean")).reset_index()
    return out


def select_by_effect(effects: pd.DataFrame, corruption: str, below: float = 0.5, at_least: int = 1,
                     only_correct: bool = True) -> tuple[list[str], str]:
    """The samples (answered correctly, unless ``only_correct=False``) whose p(answer) under
    ``corruption`` falls below ``below``, and a sentence saying so for figures. If fewer than
    ``at_least`` do, the ``at_least`` with the lowest p(corrupted) are taken instead, and the
    sentence says that; if no sample qualifies at all, ``([], the reason)``."""
    d = effects[effects.corruption == corruption]
    d = (d[d.correct] if only_correct else d).sort_values("p_corrupted", kind="stable")
    if not len(d):  # nothing to trace: an empty selection that says why (the notebooks report it)
        return [], f"no {'correctly answered ' if only_correct else ''}sample was corrupted with {corruption!r}"
    hit, which = d[d.p_corrupted < below], "correct " if only_correct else ""
    if len(hit) >= at_least:
        return list(hit.sample_id), (f"{len(hit)} of {len(d)} {which}samples whose p(answer) falls below {below:g} "
                                     f"under {corruption}")
    pick = d.head(at_least)
    return list(pick.sample_id), (f"only {len(hit)} of {len(d)} {which}samples fall below p = {below:g} under "
                                  f"{corruption}: the {len(pick)} with the lowest p(corrupted) (≥ "
                                  f"{pick.p_corrupted.max():.2f}) instead")
