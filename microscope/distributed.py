"""Data-parallel runs: samples split over processes launched by ``torchrun`` (one per GPU, or per
CPU group; several nodes through the same launcher), each writing its own parts into one
resumable directory that merges into the table a single process returns.

    torchrun --nproc_per_node 4 my_study.py          # in my_study.py:
    from microscope import distributed as dist
    h = microscope.load(model, **dist.load_kwargs())  # this rank's GPU (or GPUs: gpus_per_rank=2)
    store = dist.extract(h, samples, "runs/acts")     # the same store a single process writes
    df = dist.run(ko.sweep, h, samples, parts="runs/sweep")     # the same table, on every rank
    df = dist.run(tr.trace_dataset, h, samples, parts="runs/trace", seed=2)
    scores = dist.evaluate(h, edit, sets.requests, sets.generalization, sets.unrelated, parts="runs/edit")

    python -m microscope run notebooks/03_attention_knockout.ipynb --nproc 4   # a notebook, the same way

**Split.** The samples are cut into consecutive *parts* of ``part_size`` samples (shards of
``batch_size`` samples for :func:`extract`); part ``j`` belongs to rank ``j mod world_size``. The
cut depends on the data and ``part_size`` only, never on the number of processes, so a run can be
resumed with another number of processes. Every analysis run here computes each sample on its own
(the knockout sweep and tracing batch the rows *of one sample*); functions that batch samples
together (:func:`~microscope.attribution.attention_contributions`, :func:`~microscope.knockout.predict`,
:func:`~microscope.lens.logit_lens`, and :func:`evaluate`) get parts that are whole multiples of their
``batch_size``, so every batch is the one a single process forms. Randomness is per sample in this
suite (``seed + k`` for the ``k``-th sample), so a part starting at sample ``a`` runs with
``seed + a``; a noise scale (``sigma``, ``sigma_text``, ``sigma_image``) the function would estimate
from its samples is estimated once from all of them (:func:`~microscope.tracing.noise_sigma`, as the
single process does) and handed to every part; a function not known to do so is refused until the
scale is passed. Result: the merged table equals the single-process one
(``DataFrame.equals``, attrs included), and extracted tensors are bit-identical.

**Parts directory.** ``meta.json`` (the run's identity: function, arguments, model config, weights
and processor hashes, sample ids and content hashes, part size) + ``part-NNNNN.parquet`` + its
record ``part-NNNNN.json`` (the identity digest, row count, size, SHA-256 and the table's
``attrs``), each written atomically, record last. A part is done when its record exists and its
file matches it; a rerun (any number of processes) recomputes only the parts that are not done, so
a killed rank loses at most the part it was writing. A directory of another run is refused,
naming what differs.

**Coordination** is a gloo process group (``torch.distributed``, initialised from the variables
``torchrun`` sets: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) used for barriers only;
the results travel through the shared directory (on several nodes: a shared file system). Without
those variables everything runs in the calling process (world size 1).

**Ranks × model shards.** :func:`load_kwargs` gives each rank its own GPU, or ``gpus_per_rank``
consecutive GPUs over which ``device_map="auto"`` shards a model too large for one
(``nproc_per_node × gpus_per_rank`` = GPUs of the node).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import hashlib
import inspect
import json
import math
import os
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from microscope.errors import MicroscopeError
from microscope.store import ActivationStore, StoreMismatchError, _atomic_write, file_sha256, read_meta, short

#: samples per part when the function does not batch samples together
PART_SIZE = 8
#: hours a rank waits at a barrier for the slowest rank (``$MICROSCOPE_DIST_TIMEOUT_H`` overrides)
TIMEOUT_H = 24.0


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int
    size: int
    local_rank: int


def world() -> World:
    """The run this process belongs to: from ``torch.distributed`` when initialised, else from the
    variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else rank 0 of 1."""
    import torch.distributed as td

    local = int(os.environ.get("LOCAL_RANK", 0))
    if td.is_available() and td.is_initialized():
        return World(td.get_rank(), td.get_world_size(), local)
    size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if size < 1 or not 0 <= rank < size:
        raise MicroscopeError(f"RANK={rank} and WORLD_SIZE={size} do not describe a run (need 0 <= RANK < WORLD_SIZE):"
                              " launch with torchrun, which sets both")
    return World(rank, size, local)


def init() -> World:
    """Join the process group ``torchrun`` set up (gloo: barriers only), once; a no-op for a
    single process. Returns :func:`world`."""
    import torch.distributed as td

    w = world()
    if w.size > 1 and not td.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise MicroscopeError(f"WORLD_SIZE={w.size} but {', '.join(missing)} not set: launch the processes with "
                                  "torchrun (or accelerate launch), which sets them")
        hours = float(os.environ.get("MICROSCOPE_DIST_TIMEOUT_H", TIMEOUT_H))
        td.init_process_group("gloo", timeout=datetime.timedelta(hours=hours))
        atexit.register(_shutdown)
    return world()


def _shutdown() -> None:
    import torch.distributed as td

    if td.is_initialized():
        td.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    import torch.distributed as td

    if td.is_initialized() and td.get_world_size() > 1:
        td.barrier()


def assignment(n_parts: int, w: World | None = None) -> list[int]:
    """The parts rank ``w.rank`` computes: ``j`` with ``j mod size == rank`` (round robin, so ranks
    get early and late parts alike)."""
    w = world() if w is None else w
    return list(range(w.rank, n_parts, w.size))


def rank_devices(local_rank: int, gpus_per_rank: int, n_gpus: int) -> list[int]:
    """The GPUs of local rank ``local_rank`` when each rank holds ``gpus_per_rank`` consecutive ones."""
    lo = local_rank * gpus_per_rank
    if gpus_per_rank < 1 or lo + gpus_per_rank > n_gpus:
        raise MicroscopeError(f"local rank {local_rank} with {gpus_per_rank} GPU(s) per rank needs GPUs "
                              f"{lo}..{lo + gpus_per_rank - 1}, but this node has {n_gpus}: launch "
                              f"{max(1, n_gpus // max(gpus_per_rank, 1))} processes per node (--nproc_per_node)")
    return list(range(lo, lo + gpus_per_rank))


def load_kwargs(gpus_per_rank: int = 1) -> dict:
    """Keyword arguments for :func:`microscope.load` placing this rank's model: ``{}`` for a single
    process or without CUDA (it stays where ``load`` puts it), ``{"device": "cuda:i"}`` for one GPU
    per rank, else ``device_map="auto"`` restricted (through ``max_memory``) to this rank's
    ``gpus_per_rank`` consecutive GPUs — ranks × model shards."""
    w = world()
    if w.size == 1 or not torch.cuda.is_available():
        return {}
    gpus = rank_devices(w.local_rank, gpus_per_rank, torch.cuda.device_count())
    if gpus_per_rank == 1:
        return {"device": f"cuda:{gpus[0]}"}
    return {"device_map": "auto",
            "max_memory": {g: torch.cuda.get_device_properties(g).total_memory for g in gpus}}


# ---------------------------------------------------------------------------------------------- parts
class Parts:
    """A directory of result parts of one run (see the module docstring)."""

    def __init__(self, path: str | Path, identity: dict):
        self.path = Path(path)
        self.meta = {**identity, "identity": _digest(identity)}
        self.path.mkdir(parents=True, exist_ok=True)
        f = self.path / "meta.json"
        old = read_meta(f, "pass another parts directory, or delete it to start over")
        if old is not None:
            diff = [k for k in identity if old.get(k) != identity[k]]
            if diff:
                raise StoreMismatchError(
                    f"{self.path} holds parts of another run (differs in {', '.join(diff)}: "
                    f"{'; '.join(f'{k}: {short(old.get(k))} there, {short(identity[k])} now' for k in diff)}); "
                    "nothing was overwritten: pass another parts directory, or delete it to start over")
        else:  # every rank may get here and writes the same bytes, each through its own temporary file
            tmp = f.with_name(f"meta.json.{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(json.dumps(self.meta, indent=1, sort_keys=True).encode())
            os.replace(tmp, f)

    def part_path(self, j: int, ext: str) -> Path:
        return self.path / f"part-{j:05d}.{ext}"

    def problem(self, j: int) -> str | None:
        """What keeps part ``j`` from counting as done (``None``: its file matches its record)."""
        rec_path, file = self.part_path(j, "json"), self.part_path(j, "parquet")
        if not rec_path.is_file():
            return f"part {j}: not written"
        try:
            rec = json.loads(rec_path.read_text())
            size, sha = int(rec["bytes"]), rec["sha256"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            return f"part {j}: record damaged ({type(e).__name__}: {e})"
        if rec.get("identity") != self.meta["identity"]:
            return f"part {j}: recorded for another run"
        if not file.is_file() or file.stat().st_size != size or file_sha256(file) != sha:
            return f"part {j}: {file.name} is missing or does not match its record"
        return None

    def write(self, j: int, df: pd.DataFrame) -> None:
        """Write part ``j`` atomically (table, then its record)."""
        self.part_path(j, "json").unlink(missing_ok=True)
        tmp = self.part_path(j, "parquet.tmp")
        df.to_parquet(tmp, index=False)
        rec = {"part": j, "identity": self.meta["identity"], "rows": len(df), "bytes": tmp.stat().st_size,
               "sha256": file_sha256(tmp), "attrs": _jsonable(df.attrs)}
        os.replace(tmp, self.part_path(j, "parquet"))
        _atomic_write(self.part_path(j, "json"), json.dumps(rec, indent=1).encode())

    def read(self, j: int) -> pd.DataFrame:
        df = pd.read_parquet(self.part_path(j, "parquet"))
        df.attrs = json.loads(self.part_path(j, "json").read_text())["attrs"]
        return df

    def merge(self, n_parts: int, n_samples: int) -> pd.DataFrame:
        """All parts in order as one table; ``attrs["skipped"]`` summed and ``why_empty`` restated
        over all samples (:func:`microscope.results.explain`). Raises naming parts not done."""
        from microscope.results import SKIPPED, WHY_EMPTY, explain

        bad = [p for j in range(n_parts) if (p := self.problem(j)) is not None]
        if bad:
            raise MicroscopeError(f"{self.path}: {len(bad)} of {n_parts} parts are not done ({'; '.join(bad[:5])}): "
                                  "rerun the same call (any number of processes) to compute them")
        frames = [self.read(j) for j in range(n_parts)]
        full = [f for f in frames if len(f)]
        df = pd.concat(full, ignore_index=True) if full else frames[0].copy()
        if not any(SKIPPED in f.attrs for f in frames):
            df.attrs = {}
            return df
        skipped: Counter = Counter()
        for f in frames:
            skipped.update(f.attrs.get(SKIPPED, {}))
        whys = [f.attrs[WHY_EMPTY] for f in frames if WHY_EMPTY in f.attrs]
        what = whys[0].split(":", 1)[0].removeprefix("no ") if whys else "rows"
        df.attrs = {}
        return explain(df, dict(skipped), n_samples, what)


def _jsonable(v):
    return json.loads(json.dumps(v, default=repr))


def _digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=repr).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------- running
def _batched() -> dict[Callable, str]:
    """Functions that batch *samples* together, and their batch-size argument."""
    from microscope import attribution, knockout
    from microscope.lens import logit_lens

    return {attribution.attention_contributions: "batch_size", knockout.predict: "batch_size",
            logit_lens: "batch_size"}


def _sigmas(fn: Callable, kw: dict) -> dict[str, str]:
    """The noise scales ``fn`` would estimate from its samples: ``{argument: modality}``."""
    from microscope import attribution, tracing

    if fn is tracing.trace_dataset:
        noise = kw["corruption"] == "noise" and kw.get("sigma") is None
        return {"sigma": "image" if "image" in kw["target"] else "text"} if noise else {}
    if fn in (attribution.restoration_scores, attribution.group_restoration_scores):
        return {"sigma": "image"} if kw.get("sigma") is None else {}
    if fn is tracing.corruption_effects:
        noise = [t for _, k, t, _ in kw["corruptions"] if k == "noise"]
        out = {}
        if kw.get("sigma_text") is None and "constraint" in noise:
            out["sigma_text"] = "text"
        if kw.get("sigma_image") is None and any(t != "constraint" for t in noise) and not kw["_cross"]:
            out["sigma_image"] = "image"
        return out
    unresolved = [k for k in kw if k.startswith("sigma") and kw[k] is None]
    if unresolved:
        raise MicroscopeError(f"{fn.__name__} estimates {', '.join(unresolved)} from its samples, which a part would "
                              "do from its own samples only: pass it explicitly (microscope.tracing.noise_sigma("
                              "handle, samples, 'text' or 'image') over all samples)")
    return {}


def run(fn: Callable[..., pd.DataFrame], handle, samples: Sequence, *, parts: str | Path | None = None,
        part_size: int | None = None, progress: bool = True,
        on_part: Callable[[int], None] | None = None, **kwargs) -> pd.DataFrame:
    """``fn(handle, samples, **kwargs)`` over all ranks; every rank returns the merged table.

    ``fn`` is an analysis of this suite taking ``(handle, samples, ...)`` and returning a tidy
    table, one sample at a time or in batches of its ``batch_size``: :func:`~microscope.knockout.sweep`,
    :func:`~microscope.tracing.trace_dataset`, the attribution scores, :func:`~microscope.knockout.predict`,
    :func:`~microscope.lens.logit_lens`, ... ``parts``: the shared directory of result parts
    (required with more than one process; with one, it makes the run resumable). ``part_size``:
    samples per part (default :data:`PART_SIZE`, or the batch size for functions that batch
    samples, of which it must be a multiple). ``on_part(j)`` runs after part ``j`` is written.
    Without ``parts`` in a single process this is exactly ``fn(handle, samples, **kwargs)``.
    """
    w = init()
    if parts is None:
        if w.size > 1:
            raise MicroscopeError(f"a run over {w.size} processes needs parts=DIR, a directory every rank can "
                                  "reach (the ranks write their results there and read each other's)")
        return fn(handle, samples, **kwargs)
    samples = list(samples)
    if not samples:
        return fn(handle, samples, **kwargs)
    sig = inspect.signature(fn)
    unknown = [k for k in kwargs if k not in sig.parameters]
    if unknown:
        raise TypeError(f"{fn.__name__} takes no argument(s) {', '.join(unknown)}; it takes "
                        f"{', '.join(list(sig.parameters)[2:])}")
    kw = {k: p.default for k, p in sig.parameters.items()
          if p.default is not inspect.Parameter.empty and k != "progress"}
    kw.update(kwargs)
    from microscope.crossattn import has_cross_attention
    from microscope.tracing import noise_sigma

    for name, modality in _sigmas(fn, {**kw, "_cross": has_cross_attention(handle)}).items():
        kw[name] = noise_sigma(handle, samples, modality)  # what fn estimates from all its samples, once
    part_size = _part_size(fn, kw, part_size)
    return _run_parts(fn, handle, samples, Path(parts), part_size, kw, w, progress, on_part,
                      "seed" in sig.parameters, "progress" in sig.parameters)


def _part_size(fn: Callable, kw: dict, part_size: int | None) -> int:
    from microscope import validate

    key = _batched().get(fn)
    if part_size is None:
        return int(kw[key]) if key else PART_SIZE
    part_size = validate.positive_int(part_size, "part_size")
    if key and part_size % int(kw[key]):
        raise ValueError(f"{fn.__name__} batches samples ({key}={kw[key]}): part_size={part_size} must be a "
                         f"multiple of it, so every batch is the one a single process forms")
    return part_size


def _identity(fn_name: str, handle, samples: Sequence, kw: dict, part_size: int) -> dict:
    from microscope.extract import sample_hash

    text = json.dumps(kw, sort_keys=True, default=repr)
    if " at 0x" in text:  # a repr with a memory address differs between processes
        raise MicroscopeError(f"{fn_name}: an argument has no stable text form ({short(text)}), so the ranks cannot "
                              "agree on the run's identity: pass plain values (numbers, strings, lists, dicts)")
    return {"function": fn_name, "arguments": json.loads(text),
            "model": handle.name, "config_hash": handle.config_hash, "weights_hash": handle.weights_hash,
            "processor_hash": handle.processor_hash, "sample_ids": [s.id for s in samples],
            "sample_hashes": [sample_hash(s) for s in samples], "part_size": part_size}


def _run_parts(fn, handle, samples, path: Path, part_size: int, kw: dict, w: World, progress: bool,
               on_part, seeded: bool, quiet: bool) -> pd.DataFrame:
    name = f"{fn.__module__}.{fn.__qualname__}"
    store = Parts(path, _identity(name, handle, samples, kw, part_size))
    n = len(samples)
    n_parts = math.ceil(n / part_size)

    def compute(j: int) -> pd.DataFrame:
        a = j * part_size
        args = {**kw, **({"seed": kw["seed"] + a} if seeded else {}), **({"progress": False} if quiet else {})}
        return fn(handle, samples[a:a + part_size], **args)

    _compute(store, n_parts, compute, w, f"{fn.__name__} rank {w.rank}/{w.size}", progress, on_part)
    return store.merge(n_parts, n)


def _compute(store: Parts, n_parts: int, compute: Callable[[int], pd.DataFrame], w: World, desc: str,
             progress: bool, on_part) -> None:
    """Compute and write this rank's parts that are not done, then wait for every rank."""
    from microscope.progress import tqdm

    todo = [j for j in assignment(n_parts, w) if store.problem(j) is not None]
    for j in tqdm(todo, desc=desc, disable=not progress, mininterval=5):
        store.write(j, compute(j))
        if on_part is not None:
            on_part(j)
    barrier()


def evaluate(handle, e, efficacy: Sequence, generalization: Sequence = (), specificity: Sequence = (),
             neighbours: Sequence = (), *, parts: str | Path | None = None, batch_size: int = 64,
             part_size: int | None = None, progress: bool = True,
             on_part: Callable[[int], None] | None = None) -> pd.DataFrame:
    """:func:`microscope.editing.evaluate` over all ranks (every rank holds the same edit ``e``,
    computed deterministically by :func:`microscope.editing.edit`, or loaded). Each set is cut into
    parts of ``part_size`` (a multiple of ``batch_size``, default equal) items, so every batch is the
    one a single process forms; the merged table equals ``editing.evaluate(...)``'s. The identity
    of the parts directory includes the edit's method, layer, site and the SHA-256 of its weight
    change."""
    from microscope import editing, validate
    from microscope.extract import sample_hash

    w = init()
    sets = {"efficacy": list(efficacy), "generalization": list(generalization), "specificity": list(specificity),
            "neighbours": list(neighbours)}
    batch_size = validate.positive_int(batch_size, "batch_size")

    def run(s: dict[str, list]) -> pd.DataFrame:
        return editing.evaluate(handle, e, efficacy=s["efficacy"], generalization=s["generalization"],
                                specificity=s["specificity"], neighbours=s["neighbours"], batch_size=batch_size)

    if parts is None:
        if w.size > 1:
            raise MicroscopeError(f"a run over {w.size} processes needs parts=DIR, a directory every rank can reach")
        return run(sets)
    part_size = batch_size if part_size is None else validate.positive_int(part_size, "part_size")
    if part_size % batch_size:
        raise ValueError(f"evaluate batches samples (batch_size={batch_size}): part_size={part_size} must be a "
                         "multiple of it, so every batch is the one a single process forms")
    jobs = [(name, a) for name, items in sets.items() for a in range(0, len(items), part_size)]
    if not jobs:
        return run(sets)

    def item(x) -> list:
        s = getattr(x, "sample", x)
        return [s.id, sample_hash(s), getattr(x, "answer", None) if hasattr(x, "sample") else None]

    delta = e.delta.detach().cpu().contiguous()
    identity = {"function": "microscope.editing.evaluate",
                "edit": {"method": e.method, "layer": e.layer, "site": e.site, "position": e.position,
                         "delta": f"{delta.dtype}{tuple(delta.shape)}:" + hashlib.sha256(
                             delta.view(torch.uint8).numpy().tobytes()).hexdigest()},
                "sets": {k: [item(x) for x in v] for k, v in sets.items()}, "batch_size": batch_size,
                "part_size": part_size, "model": handle.name, "config_hash": handle.config_hash,
                "weights_hash": handle.weights_hash, "processor_hash": handle.processor_hash}
    store = Parts(parts, identity)

    def compute(j: int) -> pd.DataFrame:
        name, a = jobs[j]
        chunk: dict[str, list] = {k: [] for k in sets}
        chunk[name] = sets[name][a:a + part_size]
        return run(chunk)

    _compute(store, len(jobs), compute, w, f"evaluate rank {w.rank}/{w.size}", progress, on_part)
    return store.merge(len(jobs), sum(map(len, sets.values())))


def extract(handle, samples: Sequence, out_dir: str | Path, **kwargs) -> ActivationStore:
    """:func:`microscope.extract.extract` over all ranks into one store: rank 0 creates (or checks)
    it, then shard ``k`` (``batch_size`` samples, as in a single process) is written by rank
    ``k mod world_size``; every rank returns the complete store. Resuming, with any number of
    processes, recomputes only the shards that do not verify."""
    from microscope.extract import extract as _extract

    w = init()
    if w.size == 1:
        return _extract(handle, samples, out_dir, **kwargs)
    samples = list(samples)
    if w.rank == 0:
        _extract(handle, samples, out_dir, **{**kwargs, "shards": []})
    barrier()
    n_shards = math.ceil(len(samples) / int(kwargs.get("batch_size", 16)))
    _extract(handle, samples, out_dir, **{**kwargs, "shards": assignment(n_shards, w)})
    barrier()
    store = ActivationStore(out_dir)
    if w.rank == 0:
        store.verify()
    return store


# ------------------------------------------------------------------------------------------ notebooks
def run_notebook(notebook: str | Path, out_dir: str | Path, parameters: dict, kernel: str = "python3") -> Path:
    """Execute ``notebook`` with papermill as this rank's part of a distributed notebook run.

    Rank 0 writes the executed notebook, tables and figures where asked (``out_dir``, the given
    ``figures_dir``); rank ``k > 0`` runs the same cells with ``out_dir`` and ``figures_dir`` under
    ``out_dir/.ranks/rank-k`` (its copies are not results). The analyses the notebook routes
    through :func:`run` / :func:`extract` split their samples over the ranks and hand every rank
    the merged table, so rank 0's notebook is the single-process notebook on the merged results."""
    import papermill as pm

    from microscope.suite import headless_kernels

    w = world()
    out_dir = Path(out_dir).resolve()
    notebook = Path(notebook).resolve()
    params = dict(parameters)
    if w.rank == 0:
        dest = out_dir / notebook.name
    else:
        scratch = out_dir / ".ranks" / f"rank-{w.rank}"
        params.update(out_dir=str(scratch), figures_dir=str(scratch / "figures"))
        dest = scratch / notebook.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with headless_kernels() as config:
        pm.execute_notebook(str(notebook), str(dest), kernel_name=kernel, cwd=str(notebook.parent),
                            progress_bar=False, parameters=params, config=config)
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m microscope.distributed notebook NOTEBOOK OUT_DIR PARAMS_JSON``: one rank of a
    distributed notebook run (what ``python -m microscope run --nproc N`` launches per process)."""
    ap = argparse.ArgumentParser(prog="python -m microscope.distributed")
    sub = ap.add_subparsers(dest="command", required=True)
    nb = sub.add_parser("notebook", help="execute a notebook as this rank (launched by torchrun)")
    nb.add_argument("notebook")
    nb.add_argument("out_dir")
    nb.add_argument("parameters", help="papermill parameters as a JSON object")
    args = ap.parse_args(argv)
    run_notebook(args.notebook, args.out_dir, json.loads(args.parameters))
    return 0


if __name__ == "__main__":
    sys.exit(main())
