"""Activation extraction into an :class:`~microscope.store.ActivationStore`, resumable.

    store = extract(handle, samples, "runs/acts", layers=None, roles=None, sites=("resid",))
    X, tokens = store.load(layer=3, roles=["image"])

Sites, captured with forward hooks (``capture``), nothing else patched:

- ``resid``: the residual stream *after* decoder layer ``l`` (the layer's output), and for
  ``l = -1`` the embedding output that enters layer 0 (image features already merged in);
- ``mlp`` / ``attn``: the output of layer ``l``'s MLP / self-attention block (what it adds to
  the residual stream);
- ``cross_attn`` (models with cross-attention layers, Mllama): the output of layer ``l``'s
  cross-attention. A layer has ``attn`` or ``cross_attn``, not both; the one it lacks adds nothing
  and is recorded as exact zeros. In a cross-attention layer ``cross_attn`` and ``mlp`` are taken
  before the layer's tanh gates (:meth:`microscope.model.Adapter.site`).

Batches are deterministic (sample order, ``batch_size``), one shard each; a rerun of the same
call skips shards that verify against their records (size, rows, SHA-256) and recomputes the
others (each named in a warning), so an interrupted extraction resumes and ends bit-identical to
an uninterrupted one. The store's identity covers the model's config, weights and processor, the
layers, sites, roles, dtype, batch size, and the samples' ids *and content* (:func:`sample_hash`):
resuming with anything else is refused, naming what differs. Memory holds one batch at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import pandas as pd
import torch

import microscope
from microscope import validate
from microscope.progress import tqdm
from microscope.roles import ROLE_CODE, ROLES, prepare_samples, role_codes
from microscope.store import ActivationStore, file_sha256

SITES = ("resid", "mlp", "attn")
#: the site of a cross-attention layer's cross-attention (:func:`sites_of`)
CROSS_SITE = "cross_attn"


def sites_of(handle) -> tuple[str, ...]:
    """The sites of ``handle``'s layers: :data:`SITES`, plus ``cross_attn`` when it has
    cross-attention layers."""
    return SITES + ((CROSS_SITE,) if getattr(handle.adapter, "cross_attention_layers", None) else ())


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def capture(handle, layers: Sequence[int], sites: Sequence[str] = ("resid",)) -> Iterator[dict]:
    """Record activations during forwards: ``with capture(h, [0, 3]) as acts: h.model(**x)``.

    ``acts[f"{site}.{layer}"]`` is the (B, T, d) tensor of the last forward. Hooks are removed
    on exit, even on error. Layer ``-1`` (``resid`` only) is the embedding output.
    """
    a = handle.adapter
    layers = a.check_layers(layers)
    sites = validate.names(sites, sites_of(handle), "sites")
    acts: dict[str, torch.Tensor] = {}
    hooks = []

    def keep(name):
        def hook(_m, _i, out):
            acts[name] = _first(out).detach()
        return hook

    def zero(name):  # a site the layer does not have: it adds exactly nothing
        def hook(_m, _i, out):
            acts[name] = torch.zeros_like(_first(out)).detach()
        return hook

    try:
        for lay in layers:
            for site in sites:
                if lay == -1:
                    if site == "resid":
                        # the decoder's input: embeddings with the image features scattered in
                        hooks.append(a.layers[0].register_forward_pre_hook(
                            lambda _m, args, kwargs: acts.__setitem__(
                                "resid.-1", (args[0] if args else kwargs["hidden_states"]).detach()),
                            with_kwargs=True))
                    continue
                if not a.has_site(lay, site):
                    hooks.append(a.layers[lay].register_forward_hook(zero(f"{site}.{lay}")))
                    continue
                mod = a.module(site, lay)
                hooks.append(mod.register_forward_hook(keep(f"{site}.{lay}")))
        yield acts
    finally:
        for h in hooks:
            h.remove()


def extract(handle, samples: Sequence, out_dir, layers: Sequence[int] | None = None,
            roles: Sequence[str] | None = None, sites: Sequence[str] = ("resid",),
            batch_size: int = 16, dtype: str = "float32", progress: bool = True,
            on_shard: Callable[[int], None] | None = None, shards: Sequence[int] | None = None
            ) -> ActivationStore:
    """Extract activations of ``samples`` into the store at ``out_dir`` (resuming if present).

    ``layers``: decoder layers (``-1`` = embedding output); default all plus ``-1``.
    ``roles``: roles of the tokens to keep (default every non-pad token).
    ``on_shard(k)`` is called after shard ``k`` is written (progress reporting, tests).
    ``shards``: compute only these shards (default all); the others are left to other processes
    writing into the same store (:func:`microscope.distributed.extract`). ``[]`` only creates or
    checks the store.
    """
    a = handle.adapter
    layers = validate.layers(list(range(-1, a.n_layers)) if layers is None else layers, a.n_layers)
    roles = [r for r in ROLES if r != "pad"] if roles is None else validate.names(roles, ROLES, "roles")
    batch_size = validate.positive_int(batch_size, "batch_size")
    sites = validate.names(sites, sites_of(handle), "sites")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    samples = list(samples)
    if not samples:
        raise ValueError("extract needs at least one sample; samples is empty")
    n_shards = (len(samples) + batch_size - 1) // batch_size
    meta = {
        "model": handle.name, "config_hash": handle.config_hash, "weights_hash": handle.weights_hash,
        "processor_hash": handle.processor_hash, "layers": layers, "sites": sites,
        "roles": roles, "dtype": dtype, "sample_ids": [s.id for s in samples],
        "sample_hashes": [sample_hash(s) for s in samples], "batch_size": batch_size,
        "n_samples": len(samples), "n_shards": n_shards,
        "hidden_size": int(a.embed.weight.shape[1]), "n_layers": a.n_layers,
        "microscope": microscope.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    store = ActivationStore.create_or_resume(out_dir, meta)
    keep_codes = torch.tensor(role_codes(roles))
    own: Sequence[int]
    if shards is None:
        own = range(n_shards)
    else:
        own = sorted({int(k) for k in shards})
        if any(k < 0 or k >= n_shards for k in own):
            raise ValueError(f"shards must lie in 0..{n_shards - 1} ({len(samples)} samples in batches of "
                             f"{batch_size}), got {list(shards)}")
    todo = []
    last_recorded = max((k for k in own if store.shard_path(k, "json").is_file()), default=-1)
    for k in own:
        problem = store.shard_problem(k)
        if problem is None:
            continue
        todo.append(k)
        # present but unverifiable, or missing between written shards: recomputed, never adopted
        absent = not any(store.shard_path(k, ext).exists() for ext in ("json", "safetensors", "parquet"))
        if not absent or k < last_recorded:
            warnings.warn(f"{out_dir}: {problem}; recomputing it", stacklevel=2)
    for k in tqdm(todo, desc="extract", disable=not progress, mininterval=5):
        chunk = samples[k * batch_size:(k + 1) * batch_size]
        batch = prepare_samples(handle, chunk)
        inputs = {n: v.to(handle.device) for n, v in batch.inputs.items()}
        with torch.no_grad(), capture(handle, layers, sites) as acts:
            handle.model(**inputs, logits_to_keep=1)  # no (B, T, vocab) logits: only the states are kept
        keep = torch.isin(batch.roles, keep_codes)
        rows, cols = keep.nonzero(as_tuple=True)
        first = (batch.roles != ROLE_CODE["pad"]).int().argmax(-1)
        tokens = pd.DataFrame({
            "sample_index": (rows + k * batch_size).numpy(),
            "sample_id": [chunk[int(r)].id for r in rows],
            "position": (cols - first[rows]).numpy(),
            "role": [ROLES[int(c)] for c in batch.roles[rows, cols]],
        })
        tdt = getattr(torch, dtype)
        tensors = {}
        for site in sites:
            for lay in layers:
                if site != "resid" and lay == -1:
                    continue
                tensors[f"{site}.{lay}"] = acts[f"{site}.{lay}"][rows, cols].to("cpu", tdt)
        store.write_shard(k, tensors, tokens)
        if on_shard is not None:
            on_shard(k)
    return store


def sample_hash(sample) -> str:
    """SHA-256 (first 16 hex digits) of what a sample contributes to a store: its id, question,
    answer, category, options, constraint spans and image (pixels of an in-memory image, bytes
    of an image file). Two data sets whose ids match but whose content differs (other generate
    options, other files) differ here."""
    h = hashlib.sha256()
    cons = [(c.word, c.start, c.end) for c in getattr(sample, "constraints", ())]
    for part in (sample.id, sample.question, sample.answer, getattr(sample, "category", ""),
                 list(getattr(sample, "options", ())), cons):
        h.update(repr(part).encode() + b"\x00")
    path = getattr(sample, "image_path", None)
    if path is not None:
        h.update(file_sha256(path).encode())
    else:
        im = sample.image
        h.update(f"{im.mode}|{im.size}|".encode())
        h.update(im.tobytes())
    return h.hexdigest()[:16]
