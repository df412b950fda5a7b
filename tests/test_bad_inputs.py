"""Bad and edge inputs, as a new user would give them: each case asserts the exception type and
that the message names the problem (or, for inputs that must be accepted, the value computed).

Tables: damaged stores (verify / load / the verify CLI), damaged stores resumed (recomputed, not
adopted), resumes that must be refused, factory model strings, argument validators at the public
functions, notebook parameters.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import microscope
from microscope import knockout as ko
from microscope import suite, validate
from microscope import tracing as tr
from microscope.data import shapes
from microscope.extract import extract
from microscope.lens import logit_lens
from microscope.model import FactoryNotAllowedError, Handle, adapter_for
from microscope.store import ActivationStore, StoreIntegrityError, StoreMismatchError
from microscope.store import main as store_main

ROOT = Path(__file__).resolve().parents[1]
NB = {n[:2]: p for p in suite.notebooks() for n in [p.name]}
LAYERS = [-1, 2]


def _extract(h, samples, path, **kw):
    return extract(h, samples, path, layers=LAYERS, batch_size=2, progress=False, **kw)


def _samples(**kw):
    return shapes.generate(6, seed=3, **kw)


@pytest.fixture(scope="module")
def pristine(shapes_handle, tmp_path_factory) -> Path:
    """A complete 3-shard store (6 samples, batch 2), copied by each case before damaging it."""
    path = tmp_path_factory.mktemp("pristine") / "store"
    _extract(shapes_handle, _samples(), path)
    return path


@pytest.fixture
def store_dir(pristine, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(pristine, dst)
    return dst


@pytest.fixture(scope="module")
def other_store(shapes_handle, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("other") / "store"
    _extract(shapes_handle, shapes.generate(6, seed=4), path)
    return path


# ---------------------------------------------------------------------------- damaged stores
def _flip(p: Path, at: int = -40) -> None:
    b = bytearray(p.read_bytes())
    b[at] ^= 0x01
    p.write_bytes(bytes(b))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _edit_meta(d: Path, **changes) -> None:
    m = json.loads((d / "meta.json").read_text())
    m.update(changes)
    (d / "meta.json").write_text(json.dumps(m))


DAMAGE = {
    # name: (how to damage the store dir, what the message must say)
    "flipped byte in tensors": (lambda d, o: _flip(d / "shard-00001.safetensors"),
                                r"shard-00001\.safetensors does not match its recorded SHA-256"),
    "flipped byte in table": (lambda d, o: _flip(d / "shard-00001.parquet", 200),
                              r"shard-00001\.parquet does not match its recorded SHA-256"),
    "truncated tensors": (lambda d, o: _truncate(d / "shard-00002.safetensors"),
                          r"shard-00002\.safetensors has \d+ bytes, \d+ recorded \(truncated\)"),
    "truncated table": (lambda d, o: _truncate(d / "shard-00000.parquet"),
                        r"shard-00000\.parquet has \d+ bytes, \d+ recorded \(truncated\)"),
    "missing shard": (lambda d, o: [p.unlink() for p in d.glob("shard-00001.*")],
                      r"shard-00001: missing"),
    "missing tensors file": (lambda d, o: (d / "shard-00002.safetensors").unlink(),
                             r"shard-00002\.safetensors is missing"),
    "missing record": (lambda d, o: (d / "shard-00000.json").unlink(),
                       r"shard-00000: files .* have no record shard-00000\.json"),
    "damaged record": (lambda d, o: (d / "shard-00001.json").write_text("{not json"),
                       r"shard-00001: its record shard-00001\.json is damaged"),
    "swapped meta.json": (lambda d, o: shutil.copy(o / "meta.json", d / "meta.json"),
                          r"shard-00000: recorded for store identity [0-9a-f]{32}, but meta\.json has [0-9a-f]{32}: "
                          r"meta\.json was replaced or the shard comes from another store"),
    "edited meta.json": (lambda d, o: _edit_meta(d, layers=[-1, 3]),
                         r"meta\.json: its identity fields do not hash to its recorded identity [0-9a-f]{32} "
                         r"\(the file was edited or damaged\)"),
    "foreign extra shard": (lambda d, o: [shutil.copy(p, d / p.name.replace("00000", "00007"))
                                          for p in o.glob("shard-00000.*")],
                            r"shard-00007: not part of this store"),
}


@pytest.mark.parametrize("action", ["verify", "load", "cli"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_store_is_named(store_dir, other_store, damage, action, capsys):
    how, message = DAMAGE[damage]
    how(store_dir, other_store)
    if action == "cli":
        assert store_main(["verify", str(store_dir)]) == 1
        out = capsys.readouterr().out
        assert out.startswith(f"FAILED {store_dir}") and re.search(message, out), out
        return
    store = ActivationStore(store_dir)
    with pytest.raises(StoreIntegrityError, match=message):
        store.verify() if action == "verify" else store.load(2, roles="image")


def test_verify_cli_as_a_module(pristine, tmp_path):
    """``python -m microscope.store verify DIR``: status 0 on a good store, 1 naming the bad shard."""
    ok = subprocess.run([sys.executable, "-m", "microscope.store", "verify", str(pristine)], cwd=ROOT,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "3 shards verified" in ok.stdout, ok.stdout + ok.stderr
    bad = tmp_path / "bad"
    shutil.copytree(pristine, bad)
    _flip(bad / "shard-00002.safetensors")
    r = subprocess.run([sys.executable, "-m", "microscope.store", "verify", str(bad)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "shard-00002.safetensors does not match its recorded SHA-256" in r.stdout


REPAIRABLE = ["flipped byte in tensors", "flipped byte in table", "truncated tensors", "truncated table",
              "missing tensors file", "missing record", "damaged record", "missing shard"]


@pytest.mark.parametrize("damage", REPAIRABLE)
def test_resume_recomputes_a_damaged_shard_and_names_it(shapes_handle, store_dir, pristine, other_store, damage):
    how, message = DAMAGE[damage]
    how(store_dir, other_store)
    with pytest.warns(UserWarning, match=message.split(":")[0] + ".*recomputing it"):
        store = _extract(shapes_handle, _samples(), store_dir)
    store.verify()
    for k in range(3):  # bit-identical to the store that was never damaged
        for ext in ("safetensors", "parquet"):
            assert store.shard_path(k, ext).read_bytes() == (pristine / f"shard-{k:05d}.{ext}").read_bytes()


# ---------------------------------------------------------------------------- refused resumes
def _other_weights(h: Handle) -> Handle:
    model = copy.deepcopy(h.model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3  # same config, one weight differs
    return Handle(h.name, model, h.processor, adapter_for(model))


def _other_processor(h: Handle) -> Handle:
    proc = copy.deepcopy(h.processor)
    proc.chat_template = proc.chat_template + " "
    return Handle(h.name, h.model, proc, h.adapter)


REFUSED = {
    "other categories": (lambda h, d: _extract(h, _samples(categories=["ChooseAttr"]), d),
                         r"data set content: sample \d+ \('shapes-3-\d+'\) has other content.*ids match"),
    "other max_objects": (lambda h, d: _extract(h, _samples(max_objects=2), d),
                          r"data set content: sample \d+ .* has other content"),
    "other weights, same config": (lambda h, d: _extract(_other_weights(h), _samples(), d),
                                   r"another run \(model weights \(same config, other parameter values"),
    "other processor": (lambda h, d: _extract(_other_processor(h), _samples(), d),
                        r"another run \(processor \(image settings, vocabulary or chat template\)"),
    "deleted meta.json": (lambda h, d: ((d / "meta.json").unlink(), _extract(h, _samples(), d)),
                          r"holds shard files \(shard-00000\..*\) but no meta\.json: .* not adopted"),
    "store without records": (lambda h, d: (_edit_meta(d, format=None), _extract(h, _samples(), d)),
                              r"written by an older microscope without shard checksums"),
    "unreadable meta.json": (lambda h, d: ((d / "meta.json").write_text("{"), _extract(h, _samples(), d)),
                             r"meta\.json is not readable JSON"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_resume_into_another_run_is_refused_and_nothing_changes(shapes_handle, store_dir, case):
    run, message = REFUSED[case]
    before = {p.name: p.read_bytes() for p in store_dir.iterdir() if p.name != "meta.json"}
    with pytest.raises(StoreMismatchError, match=message), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(shapes_handle, store_dir)
    assert {p.name: p.read_bytes() for p in store_dir.iterdir() if p.name != "meta.json"} == before


def test_missing_store_message_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an activation store") as e:
        ActivationStore(tmp_path / "nothing")
    assert "{self.path" not in str(e.value) and str(tmp_path / "nothing") in str(e.value).split("run ")[-1]


# ---------------------------------------------------------------------------- factory strings
FACTORY = {
    "os:getcwd": None,
    "os:system": None,
    "shutil:rmtree": None,
    "tests.fusion_example:bunny": None,
    "os:getcwd with another module allowed": "tests.fusion_example",
    "os.path:getcwd with 'os' not listed": "o",
    "tests.fusion_exampleX:bunny with a prefix listed": "tests.fusion_example",
}


@pytest.mark.parametrize("case", list(FACTORY))
def test_factory_string_needs_an_explicit_opt_in(case, monkeypatch):
    spec = case.split(" ")[0]
    allowed = FACTORY[case]
    if allowed is None:
        monkeypatch.delenv("MICROSCOPE_FACTORIES", raising=False)
    else:
        monkeypatch.setenv("MICROSCOPE_FACTORIES", allowed)
    with pytest.raises(FactoryNotAllowedError, match=rf"model {spec!r} names a function to import and call.*"
                                                     r"allow_factory=True.*MICROSCOPE_FACTORIES"):
        microscope.load(spec)


def test_factory_allowed_by_environment_loads(monkeypatch):
    monkeypatch.setenv("MICROSCOPE_FACTORIES", "json, tests")
    assert microscope.load("tests.fusion_example:bunny").name == "bunny-tiny"
    with pytest.raises(FactoryNotAllowedError, match="'os:getcwd'"):
        microscope.load("os:getcwd")


# ---------------------------------------------------------------------------- validators
@pytest.fixture(scope="module")
def sample():
    return shapes.generate(2, seed=5)[0]


@pytest.fixture(scope="module")
def corrupted(shapes_handle, sample):
    return tr.corrupt(shapes_handle, sample, n_noise=1, sigma=0.1)


BAD_CALLS = {
    # name: (call(handle, sample, request, tmp_path), exception, message)
    "extract layers '[0, 9]' (papermill string)": (
        lambda h, s, r, t: extract(h, [s], t / "s", layers="[0, 9]", progress=False),
        ValueError, r"layer 9 is out of range: this model has 6 decoder layers"),
    "extract layers '0 to 2' (not a literal)": (
        lambda h, s, r, t: extract(h, [s], t / "s", layers="0 to 2", progress=False),
        ValueError, r"layers='0 to 2' is a string, not layer indices.*layers=\[0, 3\]"),
    "extract layers [2.0]": (
        lambda h, s, r, t: extract(h, [s], t / "s", layers=[2.0], progress=False),
        ValueError, r"layer 2\.0 in layers is not a whole number"),
    "extract layers []": (
        lambda h, s, r, t: extract(h, [s], t / "s", layers=[], progress=False),
        ValueError, r"layers is empty"),
    "extract sites 'bogus'": (
        lambda h, s, r, t: extract(h, [s], t / "s", sites="bogus", progress=False),
        ValueError, r"unknown sites \['bogus'\]: sites are \['resid', 'mlp', 'attn'\]"),
    "extract roles 'imagez'": (
        lambda h, s, r, t: extract(h, [s], t / "s", roles="imagez", progress=False),
        ValueError, r"unknown roles \['imagez'\]"),
    "extract batch_size 2.5": (
        lambda h, s, r, t: extract(h, [s], t / "s", batch_size=2.5, progress=False),
        ValueError, r"batch_size must be a positive whole number, got 2\.5"),
    "extract question with the literal image token": (
        lambda h, s, r, t: extract(h, [dataclasses.replace(s, question="What is <image> here?")], t / "s",
                                   progress=False),
        ValueError, r"question 0 contains \['<image>'\], which this model's processor reserves for images"),
    "predict question with the BOS token": (
        lambda h, s, r, t: ko.predict(h, [dataclasses.replace(s, question="Is <s> red?")], progress=False),
        ValueError, r"question 0 contains \['<s>'\].*remove or reword it"),
    "extract empty question": (
        lambda h, s, r, t: extract(h, [dataclasses.replace(s, question="  ")], t / "s", progress=False),
        ValueError, r"question 0 is empty"),
    "extract no samples": (
        lambda h, s, r, t: extract(h, [], t / "s", progress=False),
        ValueError, r"at least one sample"),
    "sweep window 2.7": (
        lambda h, s, r, t: ko.sweep(h, [s], edges=["image↛last"], window=2.7, progress=False),
        ValueError, r"window must be a positive whole number of layers, got 2\.7"),
    "sweep window '3' (a string)": (
        lambda h, s, r, t: ko.sweep(h, [s], edges=["image↛last"], window="3", progress=False),
        ValueError, r"window must be a positive whole number of layers, got '3' \(str\)"),
    "sweep window True": (
        lambda h, s, r, t: ko.sweep(h, [s], edges=["image↛last"], window=True, progress=False),
        ValueError, r"window must be a positive whole number of layers, got True"),
    "sweep batch_size 0.5": (
        lambda h, s, r, t: ko.sweep(h, [s], edges=["image↛last"], batch_size=0.5, progress=False),
        ValueError, r"batch_size must be a positive whole number, got 0\.5"),
    "predict layers '[0, 9]'": (
        lambda h, s, r, t: ko.predict(h, [s], "image↛last", layers="[0, 9]", progress=False),
        ValueError, r"layer 9 is out of range"),
    "predict layers [np.int64(7)]": (
        lambda h, s, r, t: ko.predict(h, [s], "image↛last", layers=[np.int64(7)], progress=False),
        ValueError, r"layer 7 is out of range"),
    "predict batch_size 0": (
        lambda h, s, r, t: ko.predict(h, [s], progress=False, batch_size=0),
        ValueError, r"batch_size must be >= 1, got 0"),
    "corrupt scale nan": (
        lambda h, s, r, t: tr.corrupt(h, s, n_noise=1, scale=float("nan")),
        ValueError, r"scale must be finite and >= 0, got nan"),
    "corrupt scale inf": (
        lambda h, s, r, t: tr.corrupt(h, s, n_noise=1, scale=float("inf")),
        ValueError, r"scale must be finite and >= 0, got inf"),
    "corrupt scale '3'": (
        lambda h, s, r, t: tr.corrupt(h, s, n_noise=1, scale="3"),
        ValueError, r"scale must be a real number >= 0, got '3' \(str\)"),
    "corrupt n_noise 1.5": (
        lambda h, s, r, t: tr.corrupt(h, s, n_noise=1.5),
        ValueError, r"n_noise must be a positive whole number, got 1\.5"),
    "trace positions [-1]": (
        lambda h, s, r, t: tr.trace(h, s, corrupted=r.getfixturevalue("corrupted"), positions=[-1]),
        ValueError, r"position -1 in positions is out of range: the prompt has (\d+) tokens, positions 0\.\.\d+; "
                    r"use \d+ for -1 from the end"),
    "trace positions [10000]": (
        lambda h, s, r, t: tr.trace(h, s, corrupted=r.getfixturevalue("corrupted"), positions=[10000]),
        ValueError, r"position 10000 in positions is out of range"),
    "trace positions [1.5]": (
        lambda h, s, r, t: tr.trace(h, s, corrupted=r.getfixturevalue("corrupted"), positions=[1.5]),
        ValueError, r"position 1\.5 in positions is not a whole number"),
    "trace window 2.7": (
        lambda h, s, r, t: tr.trace(h, s, corrupted=r.getfixturevalue("corrupted"), window=2.7),
        ValueError, r"window must be a positive whole number of layers, got 2\.7"),
    "trace sites 'bogus'": (
        lambda h, s, r, t: tr.trace(h, s, corrupted=r.getfixturevalue("corrupted"), sites="bogus"),
        ValueError, r"unknown sites \['bogus'\]"),
    "trace_dataset scale nan": (
        lambda h, s, r, t: tr.trace_dataset(h, [s], scale=float("nan"), progress=False),
        ValueError, r"scale must be finite"),
    "restore positions [2.7]": (
        lambda h, s, r, t: tr.restore(r.getfixturevalue("corrupted"), [("resid", [0], [2.7])]),
        ValueError, r"position 2\.7 in positions is not a whole number"),
    "restore layers '[0, 9]'": (
        lambda h, s, r, t: tr.restore(r.getfixturevalue("corrupted"), [("mlp", "[0, 9]", [3])]),
        ValueError, r"layer 9 is out of range"),
    "logit_lens layers '[0, 9]'": (
        lambda h, s, r, t: logit_lens(h, [s], layers="[0, 9]", progress=False),
        ValueError, r"layer 9 is out of range"),
    "logit_lens answer it cannot spell": (
        lambda h, s, r, t: logit_lens(h, [dataclasses.replace(s, answer="zzzqx")], progress=False),
        ValueError, r"answer 'zzzqx' has no token in this model's vocabulary"),
    "logit_lens batch_size 0": (
        lambda h, s, r, t: logit_lens(h, [s], batch_size=0, progress=False),
        ValueError, r"batch_size must be >= 1, got 0"),
    "check_layers True": (
        lambda h, s, r, t: h.adapter.check_layers([True]),
        ValueError, r"layer True in layers is not a whole number"),
    "check_layers 'all'": (
        lambda h, s, r, t: h.adapter.check_layers("all"),
        ValueError, r"layers='all' is a string, not layer indices"),
    "check_layers '[0,'": (
        lambda h, s, r, t: h.adapter.check_layers("[0,"),
        ValueError, r"layers='\[0,' is a string, not layer indices"),
    "validate.positions [-2] of 10": (
        lambda h, s, r, t: validate.positions([-2], 10),
        ValueError, r"position -2 .* positions 0\.\.9; use 8 for -2 from the end"),
    "validate.window 4 of 3 layers": (
        lambda h, s, r, t: validate.window(4, n_layers=3),
        ValueError, r"window=4 is wider than the model's 3 decoder layers"),
    "validate.scale -0.5": (
        lambda h, s, r, t: validate.scale(-0.5),
        ValueError, r"scale must be >= 0, got -0\.5"),
    "validate.names a list literal of unknowns": (
        lambda h, s, r, t: validate.names("['resid', 'mpl']", ["resid", "mlp"], "sites"),
        ValueError, r"unknown sites \['mpl'\]"),
    "validate.as_list a broken list literal": (
        lambda h, s, r, t: validate.as_list("[0, 1", "layers"),
        ValueError, r"layers='\[0, 1' looks like a list but is not a valid list literal"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_argument_is_refused_by_name(case, request, shapes_handle, sample, tmp_path):
    call, exc, message = BAD_CALLS[case]
    with pytest.raises(exc, match=message):
        call(shapes_handle, sample, request, tmp_path)


ACCEPTED = {
    # name: (call, check of the result)
    "extract sites 'resid' is one site": (
        lambda h, s, r, t: extract(h, [s], t / "s", layers=[1], sites="resid", progress=False),
        lambda out: out.meta["sites"] == ["resid"]),
    "extract roles 'image' is one role": (
        lambda h, s, r, t: extract(h, [s], t / "s", layers=[1], roles="image", progress=False),
        lambda out: out.meta["roles"] == ["image"] and set(out.tokens().role) == {"image"}),
    "extract layers (np.int64(0), np.int64(3))": (
        lambda h, s, r, t: extract(h, [s], t / "s", layers=(np.int64(0), np.int64(3)), progress=False),
        lambda out: out.meta["layers"] == [0, 3]),
    "extract layers '[0, 3]' from papermill": (
        lambda h, s, r, t: extract(h, [s], t / "s", layers="[0, 3]", progress=False),
        lambda out: out.meta["layers"] == [0, 3]),
    "check_layers '0, 2' (a tuple literal)": (
        lambda h, s, r, t: h.adapter.check_layers("0, 2"),
        lambda out: out == [0, 2]),
    "check_layers np.int64(3)": (
        lambda h, s, r, t: h.adapter.check_layers([np.int64(3), np.int32(-1)]),
        lambda out: out == [3, -1] and all(type(x) is int for x in out)),
    "check_layers torch.tensor(2)": (
        lambda h, s, r, t: h.adapter.check_layers([torch.tensor(2)]),
        lambda out: out == [2]),
    "predict layers np.arange(6)": (
        lambda h, s, r, t: ko.predict(h, [s], "image↛text", layers=np.arange(6), progress=False),
        lambda out: len(out) == 1),
    "sweep edges 'image↛last' is one edge": (
        lambda h, s, r, t: ko.sweep(h, [s], edges="image↛last", window=np.int64(3), only_correct=False,
                                    progress=False),
        lambda out: set(out.edge) == {"image↛last"} and set(out.window) == {3}),
    "trace sites 'resid', positions np.int64": (
        lambda h, s, r, t: tr.trace(h, s, sites="resid", corrupted=r.getfixturevalue("corrupted"),
                                    positions=[np.int64(3)]),
        lambda out: set(out.site) == {"resid"} and set(out.position) == {3}),
    "logit_lens variants 'lower' is one variant": (
        lambda h, s, r, t: logit_lens(h, [s], layers=[5], variants="lower", progress=False),
        lambda out: set(out.variant) == {"lower"} and len(out) == 1),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_edge_input_is_accepted_as_meant(case, request, shapes_handle, sample, tmp_path):
    call, check = ACCEPTED[case]
    assert check(call(shapes_handle, sample, request, tmp_path))


# ---------------------------------------------------------------------------- notebook parameters
BAD_PARAMS = {
    "unknown 'bogus'": ("03", {"bogus": 1}, r"03_attention_knockout\.ipynb: unknown parameter\(s\) 'bogus'; "
                                            r"it accepts model, n_samples, .*window"),
    "misspelt 'windw'": ("03", {"windw": 3}, r"'windw' \(did you mean 'window'\?\)"),
    "window 2.7": ("03", {"window": 2.7}, r"parameter window=2\.7 \(float\) must be a whole number or None"),
    "small 'yes'": ("00", {"small": "yes"}, r"parameter small='yes' \(str\) must be True or False"),
    "n_samples '10'": ("01", {"n_samples": "10"}, r"parameter n_samples='10' \(str\) must be a whole number"),
    "dataset_args a list": ("04", {"dataset_args": [1]}, r"parameter dataset_args=\[1\] \(list\) must be a mapping"),
    "layers '0,9'": ("01", {"layers": "0,9"}, r"parameter layers='0,9' \(str\) must be a list of layer indices"),
    "layers ['a']": ("01", {"layers": ["a"]}, r"parameter layers=\['a'\] \(list\) must be a list of layer indices"),
    "scale 'big'": ("04", {"scale": "big"}, r"parameter scale='big' \(str\) must be a number"),
    "seed 1.5": ("02", {"seed": 1.5}, r"parameter seed=1\.5 \(float\) must be a whole number"),
    "model 3": ("00", {"model": 3}, r"parameter model=3 \(int\) must be a string"),
    "store_dir 7": ("02", {"store_dir": 7}, r"parameter store_dir=7 \(int\) must be a string or None"),
}


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_bad_notebook_parameter_is_refused(case):
    nb, params, message = BAD_PARAMS[case]
    with pytest.raises(suite.NotebookParameterError, match=message):
        suite.check_parameters(NB[nb], params)


GOOD_PARAMS = {
    "layers '[0, 9]' parsed": ("01", {"layers": "[0, 9]"}, {"layers": [0, 9]}),
    "window np.int64(3)": ("03", {"window": np.int64(3)}, {"window": 3}),
    "categories one string": ("03", {"categories": "ChooseAttr"}, {"categories": ["ChooseAttr"]}),
    "sites one string": ("01", {"sites": "resid"}, {"sites": ["resid"]}),
    "scale an int": ("04", {"scale": 2}, {"scale": 2.0}),
}


@pytest.mark.parametrize("case", list(GOOD_PARAMS))
def test_notebook_parameter_is_normalised(case):
    nb, params, want = GOOD_PARAMS[case]
    got = suite.check_parameters(NB[nb], params)
    assert got == want and [type(v) for v in got.values()] == [type(v) for v in want.values()]


def test_suite_refuses_an_unknown_parameter_before_any_notebook_runs(tmp_path, capsys):
    with pytest.raises(suite.NotebookParameterError, match=r"unknown parameter\(s\) 'bogus'.*no notebook"):
        suite.run(tmp_path / "run", tmp_path / "fig", parameters={"bogus": 1})
    assert not (tmp_path / "run").exists()
    with pytest.raises(suite.NotebookParameterError, match=r"03_attention_knockout\.ipynb: parameter window=2\.7"):
        suite.run(tmp_path / "run", tmp_path / "fig", only=["03", "04"], parameters={"window": 2.7})
    assert not (tmp_path / "run").exists()
    assert suite.main(["--out", str(tmp_path / "run"), "-p", "bogus", "1"]) == 2
    assert "unknown parameter(s) 'bogus'" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_kernel_namespace_check_finds_injected_unknowns():
    ns = {"model": "shapes-llava", "window": 3, "_i1": "", "In": [], "json": json, "bogus": 1}
    with pytest.raises(suite.NotebookParameterError, match=r"unknown parameter\(s\) 'bogus'"):
        suite.check_kernel_parameters(NB["03"], ns)
    del ns["bogus"]
    suite.check_kernel_parameters(NB["03"], ns)
    with pytest.raises(suite.NotebookParameterError, match=r"window=2\.7"):
        suite.check_kernel_parameters(NB["03"], {**ns, "window": 2.7})
