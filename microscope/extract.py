"""Activation extraction into an :class:`~microscope.store.ActivationStore`, resumable.

    store = extract(handle, samples, "runs/acts", layers=None, roles=None, sites=("resid",))
    X, tokens = store.load(layer=3, roles=["image"])

Sites, captured with forward hooks (``capture``), nothing else patched:

- ``resid``: the residual stream *after* decoder layer ``l`` (the layer's output), and for
  ``l = -1`` the embedding output that enters layer 0 (image features already merged in);
- ``mlp`` / ``attn``: the output of layer ``l``'s MLP / self-attention block (what it adds to
  the residual stream).

Batches are deterministic (sample order, ``batch_size``), one shard each; a rerun of the same
call skips complete shards, so an interrupted extraction resumes and ends equal to an
uninterrupted one. Memory holds one batch at a time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

import microscope
from microscope.roles import ROLE_CODE, ROLES, prepare_samples, role_codes
from microscope.store import ActivationStore

SITES = ("resid", "mlp", "attn")


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
    bad = [s for s in sites if s not in SITES]
    if bad:
        raise ValueError(f"unknown site(s) {bad}; sites are {list(SITES)}")
    acts: dict[str, torch.Tensor] = {}
    hooks = []

    def keep(name):
        def hook(_m, _i, out):
            acts[name] = _first(out).detach()
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
                mod = {"resid": a.layers[lay], "mlp": a.layers[lay].mlp,
                       "attn": a.layers[lay].self_attn}[site]
                hooks.append(mod.register_forward_hook(keep(f"{site}.{lay}")))
        yield acts
    finally:
        for h in hooks:
            h.remove()


def extract(handle, samples: Sequence, out_dir, layers: Sequence[int] | None = None,
            roles: Sequence[str] | None = None, sites: Sequence[str] = ("resid",),
            batch_size: int = 16, dtype: str = "float32", progress: bool = True,
            on_shard: Callable[[int], None] | None = None) -> ActivationStore:
    """Extract activations of ``samples`` into the store at ``out_dir`` (resuming if present).

    ``layers``: decoder layers (``-1`` = embedding output); default all plus ``-1``.
    ``roles``: roles of the tokens to keep (default every non-pad token).
    ``on_shard(k)`` is called after shard ``k`` is written (progress reporting, tests).
    """
    a = handle.adapter
    layers = a.check_layers(list(range(-1, a.n_layers)) if layers is None else list(layers))
    roles = [r for r in ROLES if r != "pad"] if roles is None else list(roles)
    role_codes(roles)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sites = list(sites)
    if any(s not in SITES for s in sites):
        raise ValueError(f"unknown site in {sites}; sites are {list(SITES)}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    n_shards = (len(samples) + batch_size - 1) // batch_size
    meta = {
        "model": handle.name, "config_hash": handle.config_hash, "layers": layers, "sites": sites,
        "roles": roles, "dtype": dtype, "sample_ids": [s.id for s in samples], "batch_size": batch_size,
        "n_samples": len(samples), "n_shards": n_shards,
        "hidden_size": int(a.embed.weight.shape[1]), "n_layers": a.n_layers,
        "microscope": microscope.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    store = ActivationStore.create_or_resume(out_dir, meta)
    keep_codes = torch.tensor(role_codes(roles))
    todo = [k for k in range(n_shards) if not store.has_shard(k)]
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
    return ActivationStore(out_dir)
