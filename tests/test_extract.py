"""Hooks, the activation store, resumable extraction."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import microscope
from microscope import store as st
from microscope.data import shapes
from microscope.extract import capture, extract
from microscope.store import ActivationStore, StoreMismatchError
from tests.tiny_models import MODELS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["shapes", *MODELS])
def test_capture_matches_output_hidden_states(handles, name):
    h = handles[name]
    b = microscope.prepare_samples(h, shapes.generate(3, seed=0))
    L = h.adapter.n_layers
    a = h.adapter
    mods = [m for i, lay in enumerate(a.layers) for m in (lay, lay.mlp, a.attention(i))]
    with torch.no_grad():  # transformers installs its own recording hooks on first use
        h.model(**b.inputs, output_hidden_states=True)
    n_hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in mods]
    with torch.no_grad(), capture(h, list(range(-1, L)), ["resid", "mlp", "attn"]) as acts:
        out = h.model(**b.inputs, output_hidden_states=True)
    hs = out.hidden_states
    for lay in range(-1, L - 1):
        assert torch.equal(acts[f"resid.{lay}"], hs[lay + 1])
    # HF's last entry is after the final norm; ours is the residual stream itself
    normed = h.adapter.final_norm(acts[f"resid.{L - 1}"])
    assert torch.allclose(normed, hs[-1], atol=1e-5)
    # a layer's output = its input + attention output + MLP output (Mllama's gated cross-attention
    # layers: tests/test_mllama.py; their self-attention site is exactly 0)
    for lay in range(L):
        if lay in a.cross_attention_layers:
            assert not acts[f"attn.{lay}"].any()
            continue
        total = acts[f"resid.{lay - 1}"] + acts[f"attn.{lay}"] + acts[f"mlp.{lay}"]
        assert torch.allclose(total, acts[f"resid.{lay}"], atol=1e-4)
    # our hooks are gone afterwards (transformers keeps its own recording hooks)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in mods] == n_hooks


def test_store_holds_what_capture_sees_and_loads_lazily(handles, tmp_path):
    h = handles["shapes"]
    samples = shapes.generate(10, seed=2)
    store = extract(h, samples, tmp_path / "s", layers=[-1, 2, 5], sites=["resid", "mlp"], batch_size=4,
                    progress=False)
    assert store.complete and store.shards == [0, 1, 2]
    X, t = store.load(2, roles=["constraint"])
    assert len(X) == len(t) == sum(len(s.constraints) for s in samples)
    b = microscope.prepare_samples(h, samples[4:8])
    with torch.no_grad(), capture(h, [2]) as acts:
        h.model(**b.inputs)
    rows = t[t.shard == 1]
    mask = b.role_mask("constraint")
    assert torch.allclose(X[t.index[t.shard == 1]], acts["resid.2"][mask], atol=1e-6)
    assert list(rows.sample_index) == [4 + int(i) for i in mask.nonzero()[:, 0]]
    Xi, ti = store.load(-1, roles="image")
    assert len(Xi) == 36 * 10 and set(ti.role) == {"image"}
    assert set(store.tokens().role) == {"template", "image", "question", "constraint", "last"}
    with pytest.raises(ValueError, match="layer 3 is not in this store"):
        store.load(3)
    with pytest.raises(ValueError, match="unknown role"):
        store.load(2, roles=["answer"])
    with pytest.raises(ValueError, match="site 'attn'"):
        store.load(2, site="attn")
    with pytest.raises(ValueError, match="out of range"):
        extract(h, samples, tmp_path / "bad", layers=[7], progress=False)


def test_resuming_into_another_models_store_is_refused(handles, tmp_path):
    samples = shapes.generate(4, seed=2)
    extract(handles["llava15"], samples, tmp_path / "s", batch_size=2, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()}
    with pytest.raises(StoreMismatchError, match="another run.*model"):
        extract(handles["llava_next"], samples, tmp_path / "s", batch_size=2, progress=False)
    with pytest.raises(StoreMismatchError, match="layers"):
        extract(handles["llava15"], samples, tmp_path / "s", layers=[0], batch_size=2, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()} == before
    with pytest.raises(FileNotFoundError, match="not an activation store"):
        ActivationStore(tmp_path / "nothing")


def test_a_store_is_created_under_missing_parents_and_a_long_identity_value_is_cut_in_the_message(tmp_path):
    meta = {"model": "m", "layers": [0, 1], "sites": ["resid"], "sample_ids": [f"s{i}" for i in range(40)],
            "batch_size": 2}
    path = tmp_path / "a" / "b" / "store"  # neither a nor b exists yet
    store = ActivationStore.create_or_resume(path, meta)
    assert store.path == path and store.meta["identity"] == st.identity_digest(meta) and not store.legacy
    assert ActivationStore.create_or_resume(path, meta).meta == store.meta  # the same identity resumes
    other = {**meta, "sample_ids": [f"t{i}" for i in range(40)]}
    with pytest.raises(StoreMismatchError) as e:
        ActivationStore.create_or_resume(path, other)
    msg = str(e.value)
    assert ('(sample ids: store has ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s..., '
            'this run ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7", "t8", "t...);') in msg  # 60 characters each


def test_short_cuts_at_sixty_characters():
    assert st.short("a" * 57) == '"' + "a" * 57 + '"'  # 59 characters: whole
    assert st.short("a" * 58) == '"' + "a" * 56 + "..."  # 60: cut to 57 + "..."
    assert len(st.short(list(range(100)))) == 60
    assert st.short(Path("x")) == json.dumps(repr(Path("x")))  # what JSON cannot hold: its repr
    assert st.short(None) == "null"


SCRIPT = """
import sys, time, microscope
from microscope.data import shapes
from microscope.extract import extract
h = microscope.load(sys.argv[1])
slow = len(sys.argv) > 3
extract(h, shapes.generate(16, seed=9), sys.argv[2], batch_size=2, progress=False,
        on_shard=(lambda k: time.sleep(0.4)) if slow else None)
"""


def test_sigkill_then_rerun_equals_uninterrupted_run(tiny_dirs, tmp_path):
    model = str(tiny_dirs["llava15"])
    run = [sys.executable, "-c", SCRIPT, model]
    subprocess.run(run + [str(tmp_path / "clean")], check=True, cwd=ROOT, capture_output=True)
    victim = tmp_path / "killed"
    p = subprocess.Popen(run + [str(victim), "slow"], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while len(list(victim.glob("shard-*.safetensors"))) < 2 and time.time() - t0 < 120:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = len(list(victim.glob("shard-*.safetensors")))
    assert 2 <= done < 8, done  # really interrupted mid-way
    subprocess.run(run + [str(victim)], check=True, cwd=ROOT, capture_output=True)
    a, b = ActivationStore(tmp_path / "clean"), ActivationStore(victim)
    assert a.complete and b.complete and a.shards == b.shards
    a.verify(), b.verify()  # every shard matches its recorded checksum
    for k in a.shards:
        ta, tb = load_file(a.shard_path(k, "safetensors")), load_file(b.shard_path(k, "safetensors"))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)
    assert a.tokens().equals(b.tokens())
    assert not list(victim.glob("*.tmp"))


def test_the_store_cli_needs_a_command(capsys):
    with pytest.raises(SystemExit) as e:
        st.main([])
    assert e.value.code == 2 and "required: command" in capsys.readouterr().err


def test_a_table_with_other_rows_than_recorded_is_named(tmp_path):
    """The record's row count is checked against the parquet table even when its size was made to match."""
    import pandas as pd

    store = ActivationStore.create_or_resume(tmp_path / "s", {"model": "m", "n_shards": 1})
    store.write_shard(0, {"resid.0": torch.zeros(3, 2)}, pd.DataFrame({"role": [1, 2, 3]}))
    assert store.problems() == []
    rec_path = store.shard_path(0, "json")
    rec = json.loads(rec_path.read_text())
    rec["rows"] = 4
    rec_path.write_text(json.dumps(rec))
    assert ActivationStore(tmp_path / "s").problems() == ["shard-00000: shard-00000.parquet has 3 rows, 4 recorded"]
