"""Data-parallel runs (microscope.distributed): torchrun with 2 and 3 gloo ranks on CPU gives the
single process's tables and bit-identical store tensors; a rank killed mid-run is resumed without
losing or recomputing a finished part; the CLI runs a notebook over 2 processes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from microscope import distributed as dist
from microscope import knockout as ko
from microscope import tracing as tr
from microscope.data import load_samples, shapes
from microscope.errors import MicroscopeError
from microscope.extract import extract
from microscope.store import ActivationStore, StoreMismatchError
from tests import distributed_job as job

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def one_thread():
    """The single-process references run on one thread, as every rank does (``ENV``): float32 sums
    split over another number of threads round differently (measured: 1e-6 in ``p_blocked``)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def torchrun(nproc: int, *args, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "tests" / "distributed_job.py"), *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and p.returncode:
        raise AssertionError(f"torchrun failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="module")
def reference(shapes_handle, tmp_path_factory):
    """The job's three analyses in this one process, without microscope.distributed."""
    h, s = shapes_handle, job.samples()
    root = tmp_path_factory.mktemp("single")
    with one_thread():
        store = extract(h, s, root / "store", progress=False, **job.EXTRACT)
        sweep = ko.sweep(h, s, progress=False, **{k: v for k, v in job.SWEEP.items() if k != "part_size"})
        trace = tr.trace_dataset(h, s, progress=False, **{k: v for k, v in job.TRACE.items() if k != "part_size"})
    assert len(sweep) and len(trace) and sweep.sample_id.nunique() >= 3  # enough to split
    return {"store": store, "sweep": sweep, "trace": trace}


def merged(h, out: Path) -> dict:
    """The parts of a finished run, merged in this process (nothing may be recomputed)."""
    def never(j):
        raise AssertionError(f"part {j} recomputed although the run finished")
    s = job.samples()
    return {"store": ActivationStore(out / "store").verify(),
            "sweep": dist.run(ko.sweep, h, s, parts=out / "sweep", progress=False, on_part=never, **job.SWEEP),
            "trace": dist.run(tr.trace_dataset, h, s, parts=out / "trace", progress=False, on_part=never,
                              **job.TRACE)}


def assert_same(got: dict, ref: dict) -> None:
    a, b = ref["store"], got["store"]
    assert a.meta["identity"] == b.meta["identity"] and a.meta["n_shards"] == b.meta["n_shards"] == 3
    for k in range(a.meta["n_shards"]):
        ta, tb = load_file(a.shard_path(k, "safetensors")), load_file(b.shard_path(k, "safetensors"))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta), k  # bit-identical
        assert a.shard_path(k, "safetensors").read_bytes() == b.shard_path(k, "safetensors").read_bytes()
    pd.testing.assert_frame_equal(a.tokens(), b.tokens())
    x_a, _ = a.load(5, site="mlp")
    x_b, _ = b.load(5, site="mlp")
    assert torch.equal(x_a, x_b)
    for name in ("sweep", "trace"):
        pd.testing.assert_frame_equal(got[name], ref[name], check_exact=True)
        assert got[name].attrs == ref[name].attrs, name


@pytest.mark.parametrize("nproc", [2, 3])
def test_ranks_give_the_single_process_results(nproc, reference, shapes_handle, tmp_path):
    out = tmp_path / f"n{nproc}"
    torchrun(nproc, out)
    logs = {r: (out / f"log-{r}.txt").read_text().split("\n")[:-1] for r in range(nproc)}
    for r, lines in logs.items():  # each rank computed exactly its round-robin share, once
        for stage in ("extract", "sweep", "trace"):
            own = sorted(int(x.split()[1]) for x in lines if x.startswith(stage))
            assert own == list(range(r, 3, nproc)), (r, stage)
    assert_same(merged(shapes_handle, out), reference)


def test_killed_rank_resumes_without_losing_a_part(reference, shapes_handle, tmp_path):
    out = tmp_path / "killed"
    p = torchrun(2, out, "sweep:0", check=False)  # rank 0 dies (SIGKILL) right after its first sweep part (of 0, 2)
    assert p.returncode != 0
    parts = dist.Parts.__new__(dist.Parts)  # read-only view of what survived
    parts.path, parts.meta = out / "sweep", json.loads((out / "sweep" / "meta.json").read_text())
    done = {j for j in range(3) if parts.problem(j) is None}
    assert 0 in done and 2 not in done, p.stderr[-3000:]  # its finished part survived it, the next never started
    assert not (out / "trace").exists()  # nobody got past the sweep
    before = {j: parts.part_path(j, "parquet").stat().st_mtime_ns for j in done}
    for r in range(2):
        (out / f"log-{r}.txt").unlink(missing_ok=True)
    torchrun(2, out)  # the same command again
    logs = [x for r in range(2) if (out / f"log-{r}.txt").is_file()
            for x in (out / f"log-{r}.txt").read_text().split("\n")[:-1]]
    assert not [x for x in logs if x.startswith("extract")]  # every shard verified and kept
    assert sorted(int(x.split()[1]) for x in logs if x.startswith("sweep")) == sorted(set(range(3)) - done)
    assert sorted(int(x.split()[1]) for x in logs if x.startswith("trace")) == [0, 1, 2]
    assert all(parts.part_path(j, "parquet").stat().st_mtime_ns == t for j, t in before.items())  # not rewritten
    assert_same(merged(shapes_handle, out), reference)


def test_cli_runs_a_notebook_over_two_processes(shapes_handle, tmp_path):
    out = tmp_path / "nb"
    cmd = [sys.executable, "-m", "microscope", "run", str(ROOT / "notebooks" / "03_attention_knockout.ipynb"),
           "--nproc", "2", "--out", str(out), "--figures", str(tmp_path / "fig"), "--small",
           "-p", "n_samples", "9", "-p", "lens_samples", "2", "-p", "reference_n", "50"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert (out / "03_attention_knockout.ipynb").is_file() and (out / ".ranks" / "rank-1").is_dir()
    meta = json.loads((out / "parts" / "meta.json").read_text())
    assert meta["function"] == "microscope.knockout.sweep" and len(meta["sample_ids"]) == 9
    assert len(list((out / "parts").glob("part-*.json"))) == 2  # one part per rank (8 + 1 samples)
    got = pd.read_parquet(out / "knockout.parquet")
    h = shapes_handle
    with one_thread():
        ref = ko.sweep(h, load_samples("shapes", 9, 1, handle=h), progress=False)  # the notebook's defaults
    pd.testing.assert_frame_equal(got, ref, check_exact=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_samples"] == 9


def test_cli_refuses_a_notebook_without_parts_dir(tmp_path):
    from microscope.__main__ import main

    assert main(["run", str(ROOT / "notebooks" / "02_geometry.ipynb"), "--nproc", "2", "--out", str(tmp_path)]) == 2
    assert main(["run", str(ROOT / "notebooks" / "03_attention_knockout.ipynb"), "--out", str(tmp_path),
                 "-p", "parts_dr", "x"]) == 2  # an unknown parameter, before anything runs


# ------------------------------------------------------------------ in one process (no launcher)
def test_split_covers_every_part_once():
    for size in range(1, 5):
        got = sorted(j for r in range(size) for j in dist.assignment(10, dist.World(r, size, r)))
        assert got == list(range(10))
    assert dist.assignment(10, dist.World(1, 3, 1)) == [1, 4, 7]
    assert dist.rank_devices(1, 2, 8) == [2, 3]
    with pytest.raises(MicroscopeError, match="this node has 4"):
        dist.rank_devices(2, 2, 4)


def test_single_process_with_parts_resumes_and_refuses_another_run(shapes_handle, tmp_path):
    h, s = shapes_handle, shapes.generate(5, seed=11)
    ref = ko.sweep(h, s, edges=["image↛last"], progress=False)
    calls = []
    df = dist.run(ko.sweep, h, s, parts=tmp_path, part_size=2, edges=["image↛last"], progress=False,
                  on_part=calls.append)
    assert calls == [0, 1, 2]
    pd.testing.assert_frame_equal(df, ref, check_exact=True)
    with (tmp_path / "part-00001.parquet").open("r+b") as f:  # a damaged part is recomputed, the others kept
        f.truncate(100)
    calls.clear()
    df = dist.run(ko.sweep, h, s, parts=tmp_path, part_size=2, edges=["image↛last"], progress=False,
                  on_part=calls.append)
    assert calls == [1]
    pd.testing.assert_frame_equal(df, ref, check_exact=True)
    with pytest.raises(StoreMismatchError, match="arguments"):
        dist.run(ko.sweep, h, s, parts=tmp_path, part_size=2, edges=["question↛last"], progress=False)
    with pytest.raises(StoreMismatchError, match="sample_ids"):
        dist.run(ko.sweep, h, s[:4], parts=tmp_path, part_size=2, edges=["image↛last"], progress=False)
    with pytest.raises(MicroscopeError, match="no stable text form"):
        dist.run(ko.sweep, h, s, parts=tmp_path / "x", edges=[object()])


def test_seeded_and_batched_functions_split_exactly(shapes_handle, tmp_path):
    from microscope import attribution as at

    h, s = shapes_handle, shapes.generate(5, seed=12)
    ref = at.restoration_scores(h, s, n_noise=2, seed=5, progress=False)  # seed + k and sigma from all samples
    got = dist.run(at.restoration_scores, h, s, parts=tmp_path / "r", part_size=2, n_noise=2, seed=5, progress=False)
    pd.testing.assert_frame_equal(got, ref, check_exact=True)
    assert got.attrs == ref.attrs
    ref = tr.corruption_effects(h, s, n_noise=2, seed=3, progress=False)  # sigma_text and sigma_image
    got = dist.run(tr.corruption_effects, h, s, parts=tmp_path / "c", part_size=2, n_noise=2, seed=3)
    pd.testing.assert_frame_equal(got, ref, check_exact=True)
    ref = ko.predict(h, s, batch_size=2, progress=False)
    got = dist.run(ko.predict, h, s, parts=tmp_path / "p", batch_size=2, progress=False)
    pd.testing.assert_frame_equal(got, ref, check_exact=True)
    with pytest.raises(ValueError, match="multiple of it"):
        dist.run(ko.predict, h, s, parts=tmp_path / "q", part_size=3, batch_size=2)


def test_many_processes_without_a_launcher_are_refused(shapes_handle, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(MicroscopeError, match="torchrun"):
        dist.run(ko.sweep, shapes_handle, shapes.generate(2, seed=0))
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(MicroscopeError, match="0 <= RANK < WORLD_SIZE"):
        dist.world()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setenv("RANK", "0")
        assert dist.load_kwargs() == {}


def test_edit_evaluation_splits_on_batch_boundaries(shapes_handle, tmp_path):
    from microscope import editing as ed

    h = shapes_handle
    e = ed.zero(h, 1)
    e.delta = 0.3 * torch.randn(e.delta.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = shapes.generate(12, seed=13)
    sets = (ed.requests(s[:5], "circle"), ed.requests(s[5:8], "red"), s[8:12])
    ref = ed.evaluate(h, e, *sets, batch_size=2)
    assert (ref.kl > 1e-4).all()  # the edit moves every answer distribution: a real comparison
    calls = []
    got = dist.evaluate(h, e, *sets, parts=tmp_path / "e", batch_size=2, on_part=calls.append)
    assert calls == list(range(7))  # efficacy 3 parts, generalization 2, specificity 2
    pd.testing.assert_frame_equal(got, ref, check_exact=True)
    e.delta = 2 * e.delta  # another edit: its parts are not adopted
    with pytest.raises(StoreMismatchError, match="edit"):
        dist.evaluate(h, e, *sets, parts=tmp_path / "e", batch_size=2)
    with pytest.raises(ValueError, match="multiple of it"):
        dist.evaluate(h, e, *sets, parts=tmp_path / "f", batch_size=2, part_size=3)


def test_extract_computes_only_the_shards_asked_for(shapes_handle, tmp_path):
    h, s = shapes_handle, shapes.generate(5, seed=14)
    store = extract(h, s, tmp_path, layers=[0], batch_size=2, progress=False, shards=[2, 0])
    assert store.shards == [0, 2] and not store.complete
    with pytest.raises(ValueError, match=r"shards must lie in 0\.\.2"):
        extract(h, s, tmp_path, layers=[0], batch_size=2, progress=False, shards=[3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shard 1 missing between written ones is another rank's, not damage
        done = []
        extract(h, s, tmp_path, layers=[0], batch_size=2, progress=False, shards=[1], on_shard=done.append)
    assert done == [1]
    full = extract(h, s, tmp_path / "one", layers=[0], batch_size=2, progress=False)
    assert torch.equal(ActivationStore(tmp_path).load(0)[0], full.load(0)[0])
