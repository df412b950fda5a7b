"""Knockout sweep and causal-tracing map at real shapes: ours against the published layout and nnsight.

For one model and the same Shapes-world samples, each analysis is computed four ways and every
way's p(answer) is checked equal to ours (``max |Δp|`` below ``--tol``, else the script fails):

Knockout sweep (every edge of ``microscope.knockout.SWEEP_EDGES`` × window centre, window ``--window``):

- ``ours``: ``microscope.knockout.sweep`` — one plain forward per sample, then every (edge, centre)
  unit a row of batched ``inputs_embeds`` forwards over the positions from the first target query
  on (the clean prefix from a key/value cache), per-row layer masks;
- ``published``: Zhang et al.'s layout (``references.knockout_reference``): one full forward of
  the model (vision tower included) per (sample, edge, centre);
- ``nnsight``: ``nnsight.NNsight`` around a copy of the model whose decoder runs eager attention
  (``set_attn_implementation({"text_config": "eager"})``: its additive mask is a tensor to edit,
  where sdpa may get none; the vision tower stays sdpa), one trace per unit of the processor's
  inputs, in which every decoder layer of the window gets its self-attention's ``attention_mask``
  input replaced by one with the blocked (query, key) entries set to the dtype's minimum;
- ``nnsight-batched``: the same, ``--nnsight-batch-size`` units per trace as rows of a batch of
  identical inputs, each row's mask edited in the layers of its own window.

Causal-tracing map of the residual stream (layer -1, the decoder input, to L-1 × every token from
the first corrupted one; ``N = --noise`` corrupted copies per sample, ``microscope.tracing.corrupt``):

- ``ours``: ``microscope.tracing.trace(h, s, sites=["resid"], corrupted=c)`` — every (layer,
  token, noise) triple a row of ``--batch-size``-row forwards of the suffix after the clean prefix;
- ``published``: ROME's layout (``references.tracing_reference``): one whole-prompt forward of the
  ``N`` corrupted rows per (layer, token) cell;
- ``nnsight``: ``NNsight`` around a copy of the model as loaded (sdpa): the clean run's
  decoder-layer outputs (and layer 0's input) saved in one trace, then one trace per cell on the
  same corrupted embeddings (``c.corrupted`` as ``inputs_embeds``) with that layer's output (layer
  -1: layer 0's input) at that token overwritten by the clean state;
- ``nnsight-batched``: the same, ``--nnsight-batch-size`` (cell, noise) rows per trace.

Models (``--model``): ``shapes-llava`` (the embedded model); ``llava15``: a random LLaVA-1.5 of tiny
width (decoder 64 wide, CLIP tower 32 wide) with the real depth and image-token count — 32 decoder
layers, 24 tower layers, 336 px images in 14 px patches → 576 image tokens; ``llava-next``: the same
widths with LLaVA-NeXT's anyres tiling — 336 px base tiles, 672 × 672 images → 576 + 4 × 576 + 48
newline tokens = 2,928 image tokens. ``--layers``, ``--image-size`` (the base tile side; LLaVA-NeXT
images are twice it) and ``--n`` change one dimension. The random models use the Shapes world's
word-level tokenizer (39 tokens) and a wider weight initialisation (``--init-std``)
than transformers' 0.02, so that their outputs depend on the input enough for the equality
checks to mean something (the table prints the spread of p over the units).

    python benchmarks/real_shapes.py --model llava15 [--layers 32] [--image-size 336] [--n 1]
    python benchmarks/real_shapes.py --model llava15 --layers 4 --image-size 56 --n 1   # seconds
    python benchmarks/real_shapes.py --model llava15 --growth layers --values 4 8 16 32
    python benchmarks/real_shapes.py --model llava15 --analysis tracing --methods ours nnsight-batched

nnsight wraps copies of the model: wrapping installs its controller as every module's ``forward``
for good, which ours must not pay. ``--tol`` (1e-5) is about 100 float32 unit round-offs (1.2e-7):
the methods sum the same terms in other orders (sdpa or eager kernels, a cached prefix or the whole
prompt, 1 or 256 rows), which moved p(answer) by at most 3e-7 in the tiny runs, while a wrong
token restored, a knockout window one layer late or a transposed mask moved it by 6e-3..8e-2.
Ours' rows share one copy of the clean prefix (``microscope.shared_prefix``) and its batches are
sized by memory (``microscope.batching``) unless ``--batch-size`` is given.

Columns: ``forwards`` — model forwards (traces) the method runs (ours: every batch through the
model's last decoder layer, the recordings of depth reuse included); ``time`` — seconds: a method whose
first run takes under ``--repeat-under`` seconds (60) is run ``--repeat`` times (3) and the best
is shown, a slower one runs once; ``ours faster`` — time / ours' time (> 1: ours is faster);
``max |Δp|`` — the largest difference from ours' p(answer) over all units; ``token-layers`` — the
(row, position) pairs all decoder layers computed together (a whole forward of T tokens: L·T), counted
by hooks where the method runs our model (not for nnsight's copies); ``ours less work`` — the
published layout's token-layers over ours'. At real widths the decoder's projections and MLPs, whose
cost is proportional to token-layers, dominate a forward, so that column is about the ratio the
method can reach there with no overhead at all (the vision tower, run once by ours and once per
forward by the published layout, is not in it).

``--growth layers|tokens|samples`` times every method over ``--values`` of that dimension (tokens:
image sizes, the x axis the prompt length), prints a table and writes a log-log plot of time against it per analysis to
``figures/benchmarks/<analysis>_<dimension>.png`` (and ``.pdf``). ``--threads`` CPU threads (2).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from nnsight import NNsight
from references import TracingKey, first_corrupted, knockout_reference, tracing_cells, tracing_reference

import microscope
from microscope import knockout as ko
from microscope import tracing as tr
from microscope.answers import answer_ids
from microscope.data import load_samples
from microscope.grid import related_patches
from microscope.model import Handle

ROOT = Path(__file__).resolve().parents[1]
ANALYSES = ("knockout", "tracing")
METHODS = ("ours", "published", "nnsight", "nnsight-batched")
PATCH = 14
GROWTH_VALUES = {"layers": [4, 8, 16, 32], "tokens": [112, 168, 224, 336], "samples": [1, 2, 4, 8]}


# ------------------------------------------------------------------------------------------ models

def _config(kind: str, layers: int, size: int, vision_layers: int, init_std: float, tok):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=2, image_size=size, patch_size=PATCH, projection_dim=32,
                              initializer_range=init_std)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       initializer_range=init_std)
    common = dict(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                  image_seq_length=(size // PATCH) ** 2, initializer_range=init_std)
    if kind == "llava15":
        return LlavaConfig(**common)
    return LlavaNextConfig(**common, image_grid_pinpoints=_pinpoints(size))


def _pinpoints(size: int) -> list[list[int]]:
    """LLaVA-NeXT's anyres resolutions (336 px base: 336×672, 672×336, 672×672, 1008×336, 336×1008)."""
    return [[size, 2 * size], [2 * size, size], [2 * size, 2 * size], [3 * size, size], [size, 3 * size]]


def build(kind: str, path: Path, layers: int, size: int, vision_layers: int, init_std: float, seed: int = 0) -> Path:
    """Save a random tiny-width ``llava15`` or ``llava-next`` checkpoint with its processor to ``path``
    (as ``tests/tiny_models.py`` does), for ``microscope.load(path)``."""
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from microscope.zoo.shapes_llava import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer()
    tok.model_max_length = 8192
    cfg = _config(kind, layers, size, vision_layers, init_std, tok)
    torch.manual_seed(seed)
    crop = {"height": size, "width": size}
    proc: LlavaProcessor | LlavaNextProcessor
    if kind == "llava15":
        model = LlavaForConditionalGeneration(cfg).eval()
        proc = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=crop),
                              tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                              chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    else:
        model = LlavaNextForConditionalGeneration(cfg).eval()
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size=crop,
                                        image_grid_pinpoints=_pinpoints(size))
        proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                                  vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                                  num_additional_image_tokens=1)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


@dataclass
class Setup:
    """The model for ours and the published layout, two more copies wrapped by nnsight, and the samples.

    nnsight wraps copies: wrapping installs its controller as every module's ``forward`` for good
    (inert outside a trace, but not free), which ours must not pay. The knockout copy's decoder runs
    eager attention (its additive mask is a tensor to edit; sdpa may pass none), its vision tower
    sdpa as the others; the tracing copy is the model as loaded (sdpa).
    """

    name: str
    ours: Handle
    nn_eager: NNsight
    nn_sdpa: NNsight
    samples: list
    tokens: int                                   # prompt length of the first sample
    image_tokens: int
    _dir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return self.ours.adapter.n_layers


def setup(model: str, layers: int | None, size: int | None, vision_layers: int, n: int, init_std: float,
          seed: int = 3) -> Setup:
    tmp = None
    if model == "shapes-llava":
        if layers is not None or size is not None:
            raise SystemExit("--layers and --image-size apply to the random models (llava15, llava-next), "
                             "not to the trained shapes-llava")
        path: str | Path = model
    elif model in ("llava15", "llava-next"):
        tmp = tempfile.TemporaryDirectory(prefix="real_shapes_")
        path = build(model, Path(tmp.name), layers or 32, size or 336, vision_layers, init_std)
    else:
        raise SystemExit(f"--model is shapes-llava, llava15 or llava-next, not {model!r}")
    ours = microscope.load(path)
    eager: Any = microscope.load(path).model  # a transformers model: set_attn_implementation
    eager.set_attn_implementation({"text_config": "eager"})  # the decoder only
    assert eager.config.text_config._attn_implementation == "eager"
    nn_eager, nn_sdpa = NNsight(eager), NNsight(microscope.load(path).model)
    for nn in (nn_eager, nn_sdpa):  # the layers a researcher names: LLaVA's decoder layers in transformers 5
        assert len(nn.model.language_model.layers) == ours.adapter.n_layers
    kw = {"image_size": 2 * (size or 336), "patch_size": 2 * PATCH} if model == "llava-next" else {}
    samples = load_samples("shapes", n, seed, handle=ours, **kw)
    batch = microscope.prepare_samples(ours, samples[:1])
    tokens = int(batch.inputs["attention_mask"][0].sum())
    image_tokens = int((batch.inputs["input_ids"][0] == ours.adapter.image_token_id).sum())
    return Setup(model, ours, nn_eager, nn_sdpa, samples, tokens, image_tokens, tmp)


# --------------------------------------------------------------------------------------- knockout

#: a method's answer: p(answer) per unit, the number of forwards (traces) it ran, and the decoder
#: token-layers it computed (counted where the method runs our model; None for nnsight's copies)
Result = tuple[dict, int, int | None]


def knockout_units(h: Handle, s, edges: Sequence[str]) -> tuple[dict, int, list[tuple[str, torch.Tensor]]]:
    """The processor's inputs of ``s``, its answer token and ``(edge, blocked)`` for every edge the
    sweep runs on it (as ``ko.sweep`` selects them), ``blocked`` the ``(T, T)`` (query, key) pairs."""
    batch = microscope.prepare_samples(h, [s])
    gold = answer_ids(h.processor, [s.answer])[0]
    rel = related_patches(h, batch, 0, s)
    units = []
    for e in edges:
        patch_edge = ko.parse_edge(e)[0] in ("related-image", "other-image")
        if patch_edge and not rel:
            continue
        src, tgt = ko.edge_masks(h, batch, e, [list(rel)] if patch_edge and rel else None)
        if tgt[0].any():
            units.append((e, tgt[0][:, None] & src[0][None, :]))
    return dict(batch.inputs), gold, units


def _forwards(h, fn: Callable[[], object]) -> tuple[object, int, int]:
    """``fn()``, how many batches went through the model's last decoder layer (every forward,
    recording or batch of rows, ends there) and how many (row, position) pairs all decoder layers
    together computed: the decoder's work in token-layers, a whole forward of T tokens being L·T."""
    n, work = [0], [0]
    last = len(h.adapter.layers) - 1

    def count(i: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            work[0] += int(hidden.shape[0]) * int(hidden.shape[1])
            if i == last:  # every forward, recording or batch of rows, ends there
                n[0] += 1
        return hook

    hooks = [layer.register_forward_pre_hook(count(i), with_kwargs=True) for i, layer in enumerate(h.adapter.layers)]
    try:
        return fn(), n[0], work[0]
    finally:
        for hook in hooks:
            hook.remove()


def knockout_ours(S: Setup, edges: Sequence[str], window: int, batch_size: int | None, _nb: int) -> Result:
    df, forwards, work = _forwards(S.ours, lambda: ko.sweep(S.ours, S.samples, edges=edges, window=window,
                                                            batch_size=batch_size, only_correct=False, progress=False))
    return {(r.sample_id, r.edge, int(r.layer)): float(r.p_blocked) for r in df.itertuples()}, forwards, work


def knockout_published(S: Setup, edges: Sequence[str], window: int, _bs: int, _nb: int) -> Result:
    out, _, work = _forwards(S.ours, lambda: knockout_reference(S.ours, S.samples, edges, window))
    return out, len(out), work


def knockout_nnsight(S: Setup, edges: Sequence[str], window: int, _bs: int, _nb: int) -> Result:
    nn, L = S.nn_eager, S.n_layers
    layers = nn.model.language_model.layers
    out = {}
    for s in S.samples:
        inputs, gold, units = knockout_units(S.ours, s, edges)
        for e, blocked in units:
            for c in range(L):
                with torch.no_grad(), nn.trace(**inputs, use_cache=False):
                    for layer in ko.window_layers(c, window, L):
                        args, kwargs = layers[layer].self_attn.inputs
                        mask = kwargs["attention_mask"]  # (1, 1, T, T) additive, eager attention
                        mask = mask.masked_fill(blocked, torch.finfo(mask.dtype).min)
                        layers[layer].self_attn.inputs = (args, {**kwargs, "attention_mask": mask})
                    p = nn.output.logits[0, -1].float().softmax(-1)[gold].save()
                out[(s.id, e, c)] = float(p)
    return out, len(out), None


def knockout_nnsight_batched(S: Setup, edges: Sequence[str], window: int, _bs: int, batch_size: int) -> Result:
    nn, L = S.nn_eager, S.n_layers
    layers = nn.model.language_model.layers
    out, forwards = {}, 0
    for s in S.samples:
        inputs, gold, units = knockout_units(S.ours, s, edges)
        rows = [(e, blocked, c) for e, blocked in units for c in range(L)]
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            r = len(chunk)
            blocked = torch.stack([b for _, b, _ in chunk])[:, None]  # (r, 1, T, T)
            in_window = torch.zeros(r, L, dtype=torch.bool)  # row j is edited in the layers of its window
            for j, (_, _, c) in enumerate(chunk):
                in_window[j, list(ko.window_layers(c, window, L))] = True
            batch = {k: v.repeat(r, *[1] * (v.ndim - 1)) for k, v in inputs.items()}
            with torch.no_grad(), nn.trace(**batch, use_cache=False):
                for layer in range(L):
                    rows_here = in_window[:, layer]
                    if rows_here.any():
                        args, kwargs = layers[layer].self_attn.inputs
                        mask = kwargs["attention_mask"].expand(r, -1, -1, -1)
                        mask = mask.masked_fill(blocked & rows_here[:, None, None, None],
                                                torch.finfo(mask.dtype).min)
                        layers[layer].self_attn.inputs = (args, {**kwargs, "attention_mask": mask})
                p = nn.output.logits[:, -1].float().softmax(-1)[:, gold].save()
            forwards += 1
            for (e, _, c), pj in zip(chunk, p.tolist()):
                out[(s.id, e, c)] = pj
    return out, forwards, None


# ---------------------------------------------------------------------------------------- tracing

def tracing_ours(S: Setup, cs: Sequence[tr.Corrupted], batch_size: int | None, _nb: int) -> Result:
    maps, forwards, work = _forwards(S.ours, lambda: [tr.trace(S.ours, s, sites=["resid"], corrupted=c,
                                                               batch_size=batch_size) for s, c in zip(S.samples, cs)])
    return tracing_cells(cs, maps), forwards, work


def tracing_published(S: Setup, cs: Sequence[tr.Corrupted], _bs: int, _nb: int) -> Result:
    out, _, work = _forwards(S.ours, lambda: tracing_reference(cs))
    return out, len(out), work


def _clean_states(S: Setup, s) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The clean run's decoder input (layer 0's input) and every decoder layer's output, one trace."""
    nn, layers = S.nn_sdpa, S.nn_sdpa.model.language_model.layers
    inputs = dict(microscope.prepare_samples(S.ours, [s]).inputs)
    clean: list[torch.Tensor] = []  # made outside the trace: only saved values leave it, this list is shared
    with torch.no_grad(), nn.trace(**inputs, use_cache=False):
        emb = layers[0].input.save()
        for layer in range(S.n_layers):
            clean.append(layers[layer].output.save())
    return emb[0], [h[0] for h in clean]


def tracing_nnsight(S: Setup, cs: Sequence[tr.Corrupted], _bs: int, _nb: int) -> Result:
    nn, L = S.nn_sdpa, S.n_layers
    layers = nn.model.language_model.layers
    out, forwards = {}, 0
    for k, (s, c) in enumerate(zip(S.samples, cs)):
        emb, clean = _clean_states(S, s)
        forwards += 1
        for layer in range(-1, L):
            for pos in range(first_corrupted(c), c.n_tokens):
                x = c.corrupted.clone()  # layer 0's input is this tensor: the edit below writes into it
                with torch.no_grad(), nn.trace(inputs_embeds=x, use_cache=False):
                    if layer == -1:
                        layers[0].input[:, pos] = emb[pos]
                    else:
                        layers[layer].output[:, pos] = clean[layer][pos]
                    p = nn.output.logits[:, -1].float().softmax(-1)[:, c.answer_id].mean().save()
                out[(k, layer, pos)] = float(p)
                forwards += 1
    return out, forwards, None


def tracing_nnsight_batched(S: Setup, cs: Sequence[tr.Corrupted], _bs: int, batch_size: int) -> Result:
    nn, L = S.nn_sdpa, S.n_layers
    layers = nn.model.language_model.layers
    out: dict[TracingKey, float] = {}
    forwards = 0
    for k, (s, c) in enumerate(zip(S.samples, cs)):
        emb, clean = _clean_states(S, s)
        forwards += 1
        rows = [(layer, pos, n) for layer in range(-1, L) for pos in range(first_corrupted(c), c.n_tokens)
                for n in range(c.n_noise)]
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            lay = torch.tensor([r[0] for r in chunk])
            pos = torch.tensor([r[1] for r in chunk])
            x = c.corrupted[[r[2] for r in chunk]]  # a copy (advanced indexing)
            with torch.no_grad(), nn.trace(inputs_embeds=x, use_cache=False):
                for layer in range(-1, L):
                    idx = (lay == layer).nonzero().flatten()
                    if len(idx):
                        if layer == -1:
                            layers[0].input[idx, pos[idx]] = emb[pos[idx]]
                        else:
                            layers[layer].output[idx, pos[idx]] = clean[layer][pos[idx]]
                p = nn.output.logits[:, -1].float().softmax(-1)[:, c.answer_id].save()
            forwards += 1
            for (layer, t, _), pj in zip(chunk, p.tolist()):
                out[(k, layer, t)] = out.get((k, layer, t), 0.0) + pj / c.n_noise
    return out, forwards, None


KNOCKOUT: dict[str, Callable[..., Result]] = {
    "ours": knockout_ours, "published": knockout_published, "nnsight": knockout_nnsight,
    "nnsight-batched": knockout_nnsight_batched}
TRACING: dict[str, Callable[..., Result]] = {
    "ours": tracing_ours, "published": tracing_published, "nnsight": tracing_nnsight,
    "nnsight-batched": tracing_nnsight_batched}


# ------------------------------------------------------------------------------------------ runs

@dataclass
class Row:
    method: str
    forwards: int
    seconds: float
    diff: float  # max |p - p_ours| (0 for ours)
    work: int | None = None  # decoder token-layers (None: not counted)


def timed(fn: Callable[[], Result], repeat: int, under: float) -> tuple[Result, float]:
    """``fn()`` and its best time of ``repeat`` runs; one run if the first takes ``under`` seconds or more."""
    t = time.perf_counter()
    res = fn()
    best = time.perf_counter() - t
    for _ in range(repeat - 1 if best < under else 0):
        t = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t)
    return res, best


def run_analysis(S: Setup, analysis: str, methods: Sequence[str], args: argparse.Namespace
                 ) -> tuple[list[Row], str]:
    """Time ``methods`` on ``S``, check each against ours; the rows and a line saying what ran."""
    L = S.n_layers
    fns: dict[str, Callable[..., Result]]
    extra: tuple
    if analysis == "knockout":
        window = args.window or ko.knockout_window(L)
        edges = list(ko.SWEEP_EDGES)
        fns, extra = KNOCKOUT, (edges, window, args.batch_size, args.nnsight_batch_size)
        what = f"{len(edges)} edges × {L} centres, window {window}"
    else:
        sigma = tr.noise_sigma(S.ours, S.samples)
        cs = [tr.corrupt(S.ours, s, n_noise=args.noise, sigma=sigma, seed=k) for k, s in enumerate(S.samples)]
        fns, extra = TRACING, (cs, args.batch_size, args.nnsight_batch_size)
        what = f"{L + 1} layers × tokens from the first corrupted one, N = {args.noise}"
    rows, results = [], {}
    for m in ["ours"] + [m for m in methods if m != "ours"]:
        res, sec = timed(functools.partial(fns[m], S, *extra), args.repeat, args.repeat_under)
        results[m] = res[0]
        rows.append(Row(m, res[1], sec, 0.0, res[2]))
    ours = results["ours"]
    for row in rows[1:]:
        got = results[row.method]
        if not set(ours) <= set(got) or (row.method != "published" and set(got) != set(ours)):
            raise AssertionError(f"{analysis}: {row.method} computed {len(got)} units, ours {len(ours)}")
        row.diff = max(abs(got[key] - p) for key, p in ours.items())
    ps = list(ours.values())
    what = (f"{len(ours)} units ({what}); p(answer) over the units: {min(ps):.3g} .. {max(ps):.3g}")
    bad = [r for r in rows if r.diff > args.tol]
    print_rows(S, analysis, rows, what)
    if bad:
        raise AssertionError(f"{analysis}: {', '.join(r.method for r in bad)} differ from ours by more than "
                             f"--tol {args.tol:g}: " + ", ".join(f"{r.diff:.2e}" for r in bad))
    return rows, what


def print_rows(S: Setup, analysis: str, rows: list[Row], what: str) -> None:
    ours = rows[0].seconds
    print(f"\n{analysis} — {S.name}: {S.n_layers} layers, {S.image_tokens} image tokens of {S.tokens}, "
          f"{len(S.samples)} sample(s); {what}")
    print(f"{'method':<17}{'forwards':>9}{'time (s)':>11}{'ours faster':>13}{'max |Δp|':>11}"
          f"{'token-layers':>14}{'ours less work':>16}")
    work = rows[0].work
    for r in rows:
        ratio = "" if r.method == "ours" else f"{r.seconds / ours:.1f}x"
        diff = "" if r.method == "ours" else f"{r.diff:.1e}"
        tl = "" if r.work is None else f"{r.work:,}"
        less = "" if r.method == "ours" or r.work is None or not work else f"{r.work / work:.1f}x"
        print(f"{r.method:<17}{r.forwards:>9}{r.seconds:>11.3f}{ratio:>13}{diff:>11}{tl:>14}{less:>16}")


def growth(args: argparse.Namespace, analyses: Sequence[str]) -> None:
    dim = args.growth
    values = args.values or GROWTH_VALUES[dim]
    table: dict[str, list[tuple[int, dict[str, float]]]] = {a: [] for a in analyses}
    for v in values:
        layers, size, n = args.layers, args.image_size, args.n
        if dim == "layers":
            layers = v
        elif dim == "tokens":
            size = v
        else:
            n = v
        S = setup(args.model, layers, size, args.vision_layers, n, args.init_std)
        x = {"layers": S.n_layers, "tokens": S.tokens, "samples": len(S.samples)}[dim]
        warm_up(S)
        for a in analyses:
            rows, _ = run_analysis(S, a, args.methods, args)
            table[a].append((x, {r.method: r.seconds for r in rows}))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from microscope.plotting import save, use_style

    use_style()
    label = {"layers": "decoder layers", "tokens": "prompt tokens", "samples": "samples"}[dim]
    for a in analyses:
        methods = list(table[a][0][1])
        print(f"\n{a}: seconds against {label} ({args.model})")
        print(f"{label:>15}" + "".join(f"{m:>17}" for m in methods))
        for x, t in table[a]:
            print(f"{x:>15}" + "".join(f"{t[m]:>17.3f}" for m in methods))
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for m in methods:
            ax.plot([x for x, _ in table[a]], [t[m] for _, t in table[a]], marker="o", label=m)
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="seconds",
               title=f"{a} ({args.model}, threads: {args.threads})")
        ax.legend()
        fig.tight_layout()
        paths = save(fig, f"{a}_{dim}", ROOT / "figures" / "benchmarks")
        plt.close(fig)
        print(f"wrote {paths[-1].relative_to(ROOT)}")


def warm_up(S: Setup) -> None:
    """One forward of each model, the nnsight ones in a trace, so that no method pays a first call."""
    inputs = dict(microscope.prepare_samples(S.ours, S.samples[:1]).inputs)
    with torch.no_grad():
        S.ours.model(**inputs, use_cache=False)
        for nn in (S.nn_eager, S.nn_sdpa):
            with nn.trace(**inputs, use_cache=False):
                nn.model.language_model.layers[0].output[:, -1] = 0
                nn.output.logits.save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-llava", choices=["shapes-llava", "llava15", "llava-next"])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the random models (32)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="image (LLaVA-NeXT: base tile) side in px, a multiple of 14 (336)")
    ap.add_argument("--vision-layers", type=int, default=24, help="CLIP tower layers of the random models (24)")
    ap.add_argument("--n", type=int, default=1, help="samples")
    ap.add_argument("--analysis", choices=[*ANALYSES, "both"], default="both")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--window", type=int, default=None, help="knockout window (default: scaled to depth, 9 for 32)")
    ap.add_argument("--noise", type=int, default=10, help="corrupted copies per sample (tracing)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="ours' rows per forward (default: the library's, sized by memory)")
    ap.add_argument("--nnsight-batch-size", type=int, default=16, help="rows per trace of nnsight-batched")
    ap.add_argument("--repeat", type=int, default=3, help="runs of a fast method; the best time is shown")
    ap.add_argument("--repeat-under", type=float, default=60.0,
                    help="a method whose first run takes longer runs once (seconds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tol", type=float, default=1e-5, help="largest |Δp| accepted between a method and ours")
    ap.add_argument("--init-std", type=float, default=0.2, help="weight initialisation of the random models")
    ap.add_argument("--growth", choices=list(GROWTH_VALUES), default=None)
    ap.add_argument("--values", type=int, nargs="+", default=None,
                    help="values of the --growth dimension (layers; image sizes for tokens; samples)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    analyses = ANALYSES if args.analysis == "both" else (args.analysis,)
    if args.growth:
        growth(args, analyses)
        return
    S = setup(args.model, args.layers, args.image_size, args.vision_layers, args.n, args.init_std)
    warm_up(S)
    for a in analyses:
        run_analysis(S, a, args.methods, args)


if __name__ == "__main__":
    main()
