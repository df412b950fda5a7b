"""Every notebook runs headlessly under papermill at small parameters, through the suite runner."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from microscope import suite
from tests.tiny_models import FUSION, MODELS, TINY

#: what a headless run must not print, none of it caused by the user: transformers' deprecation
#: notices (its FutureWarning and its logged one), torch's warning on wrapping a read-only numpy
#: array, ipykernel's notice that it listens on TCP without encryption
UNCAUSED = re.compile(r"FutureWarning|DeprecationWarning|(is|are) deprecated|not writable|without encryption")


def uncaused(text: str) -> list[str]:
    """The lines of ``text`` that :data:`UNCAUSED` matches."""
    return [line for line in text.splitlines() if UNCAUSED.search(line)]


@contextlib.contextmanager
def output_log(path: Path) -> Iterator[None]:
    """Everything this process and the kernels it starts print (``sys.stdout``/``sys.stderr`` and file
    descriptors 1 and 2, which the kernels inherit) goes to ``path`` instead."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab", buffering=0) as raw, open(path, "a", buffering=1) as text, \
            contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
        os.dup2(raw.fileno(), 1)
        os.dup2(raw.fileno(), 2)
        try:
            yield
        finally:
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)


#: the tests that read the suite's one run: kept on one worker when the notebooks run in parallel
#: (``make test``: ``pytest -n 2 --dist loadgroup``), so the suite runs once
SUITE = pytest.mark.xdist_group("suite")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The whole suite at small parameters; what it printed is in ``root / "suite.log"``."""
    root = tmp_path_factory.mktemp("suite")
    with output_log(root / "suite.log"):
        summary = suite.run(root / "run", root / "figures", small=True)
    return root, summary


def test_notebooks_are_stored_without_outputs_and_have_parameters():
    books = suite.notebooks()
    assert [b.name for b in books] == ["00_tour.ipynb", "01_extraction.ipynb", "02_geometry.ipynb",
                                       "03_attention_knockout.ipynb", "04_information_tracing.ipynb",
                                       "05_model_editing.ipynb"]
    for b in books:
        nb = nbformat.read(b, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), b.name
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), b.name
        assert suite.declared_parameters(b)["interactive"] is True, b.name  # widgets by default, in Jupyter


def _outputs(path: Path) -> list[dict]:
    return [o for c in nbformat.read(path, as_version=4).cells for o in c.get("outputs", [])]


@SUITE
def test_suite_writes_executed_notebooks_figures_and_summary(run):
    root, summary = run
    books = suite.notebooks()
    assert set(summary["notebooks"]) == {b.stem for b in books}
    on_disk = json.loads((root / "run" / "summary.json").read_text())
    assert on_disk["notebooks"].keys() == summary["notebooks"].keys()
    for b in books:
        assert (root / "run" / b.name).is_file()
        # headless: each explore panel drawn once as a plain figure, no widget (they can stall nbclient)
        outs = _outputs(root / "run" / b.name)
        assert not [o for o in outs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})], b.name
        assert [o for o in outs if "image/png" in o.get("data", {})], b.name
        # no warning the user did not cause, in the notebook's outputs or in the runner's log
        assert not uncaused("".join(o.get("text", "") for o in outs if o.get("output_type") == "stream")), b.name
    assert "[suite] 00_tour.ipynb" in (log := (root / "suite.log").read_text())  # the log caught the runner
    assert not uncaused(log)
    figs = {p.name for p in (root / "figures").iterdir()}
    for name in ("00_tour_sample", "00_tour_roles", "01_extraction_norms"):
        assert {f"{name}.pdf", f"{name}.png"} <= figs


@SUITE
def test_tour_and_extraction_headline_numbers(run):
    root, summary = run
    tour = summary["notebooks"]["00_tour"]
    assert tour["n_image_tokens"] == 36 and tour["n_image_tokens"] > tour["n_text_tokens"]
    assert 0.0 <= tour["p_answer"] <= 1.0 and len(tour["topk"]) == 5
    ext = summary["notebooks"]["01_extraction"]
    assert ext["n_samples"] == 24 and ext["layers"] == list(range(-1, 6))
    assert ext["tokens_per_role"]["image"] == 24 * 36 and ext["tokens_per_role"]["last"] == 24
    store = root / "run" / "01_extraction" / "store"
    assert len(list(store.glob("shard-*.safetensors"))) == 2  # 24 samples, batch 16
    assert (root / "run" / "01_extraction" / "norms.parquet").is_file()


@SUITE
def test_geometry_notebook_reuses_the_store_and_reports_per_modality_means(run):
    root, summary = run
    geo = summary["notebooks"]["02_geometry"]
    means = geo["per_modality_mean"]
    assert set(means) == {"linearity", "linearity_wo_residual", "id_twonn", "id_mle", "anisotropy_pc1",
                          "anisotropy_cosine"}
    for m in means.values():
        assert set(m) == {"image", "text"}
    assert 0 < means["linearity"]["image"] <= 1 and means["id_twonn"]["text"] > 0
    # equal token counts per modality, from notebook 01's store (24 samples: ~10 text tokens each)
    assert 100 < geo["tokens_per_modality"] <= 24 * 36
    assert not (root / "run" / "02_geometry" / "store").exists()
    figs = {p.name for p in (root / "figures").iterdir()}
    assert {"02_geometry_panel.pdf", "02_geometry_pca.png"} <= figs
    # the fusion comparison of the bundled pair: one overlay figure per metric, a verdict per finding
    from microscope.comparison import bundled_pair

    pair, why_not = bundled_pair()
    if not pair:  # shapes-omnifusion not installed: skipped, and the notebook said why
        assert geo["compare"] == [] and geo["findings"] == {}, why_not
        return
    assert geo["compare"] == ["shapes-llava", "shapes-omnifusion"]
    assert {f"02_compare_{m}.pdf" for m in means} <= figs
    assert set(geo["findings"]) == {"higher_id", "lower_anisotropy", "consistent_layers"}
    assert set(geo["findings"].values()) <= {"reproduced", "reversed", "inseparable"}
    import pandas as pd

    table = pd.read_parquet(root / "run" / "02_geometry" / "compare_verdicts.parquet")
    assert len(table) == 6 and set(table.verdict) <= {"reproduced", "reversed", "inseparable"}
    assert table.mean_a.notna().all() and table.mean_b.notna().all()
    # the committed seed tables are read with the ledger: the verdict over the seeds that met the bar beside
    assert set(table.verdict_bar) <= {"reproduced", "reversed", "inseparable"}
    assert set(geo["findings_bar"]) == set(geo["findings"])


@SUITE
def test_knockout_notebook_reports_accuracies_and_largest_drops(run):
    root, summary = run
    ko = summary["notebooks"]["03_attention_knockout"]
    assert ko["n_samples"] == 36 and 0 < ko["n_correct"] <= 36 and ko["window"] == 3
    assert ko["base_accuracy"] == ko["n_correct"] / 36
    # the image blocked from every text position in all layers: near the question-only prior
    assert ko["accuracy_image_blocked"] < ko["base_accuracy"] - 0.2
    assert abs(ko["accuracy_image_blocked"] - ko["question_only_prior"]) < 0.25
    edges = {"image↛question", "image↛last", "question↛last", "last↛last", "related-image↛question",
             "other-image↛question"}
    assert set(ko["largest_drop"]) == edges
    for d in ko["largest_drop"].values():
        assert 0 <= d["layer"] < 6 and -100 <= d["change"] <= 100
    assert ko["largest_drop"]["question↛last"]["change"] < -20
    import pandas as pd

    df = pd.read_parquet(root / "run" / "03_attention_knockout" / "knockout.parquet")
    assert set(df.edge) == edges and df.sample_id.nunique() == ko["n_correct"]
    figs = {p.name for p in (root / "figures").iterdir()}
    assert {"03_knockout_by_category.pdf", "03_knockout_related_vs_other.png", "03_logit_lens.pdf"} <= figs


@SUITE
def test_tracing_notebook_reports_corruptions_peak_layers_and_attribution_against_ground_truth(run):
    root, summary = run
    t = summary["notebooks"]["04_information_tracing"]
    assert 1 <= t["n_traced"] <= 6 and t["n_noise"] == 3 and t["window"] == 3
    assert t["p_corrupted"] < t["p_clean"]
    assert "below 0.5" in t["traced"] and "noise 3σ (constraint)" in t["traced"]  # how the traced set was chosen
    assert set(t["peak_layer"]) == {"resid", "mlp", "attn"}
    for v in t["peak_layer"].values():
        assert 0 <= v["layer"] < 6 and v["effect"] > 0
    # the embedded model moves the answer into the last position in its first layers
    assert t["peak_layer"]["attn"]["group"] == "last" and t["peak_layer"]["attn"]["layer"] <= 2
    assert set(t["corruptions"]) == {"noise 1σ (constraint)", "noise 3σ (constraint)", "noise 10σ (constraint)",
                                     "word swap (constraint)", "noise 3σ (image)", "blank image"}
    for c in t["corruptions"].values():
        assert 0 <= c["share_drop"] <= 1 and 0 <= c["share_flipped"] <= 1 and c["n_samples"] >= 1
    att = t["attribution"]
    assert {"attention → constraint", "attention → last", "restoration", "group restoration", "integrated gradients",
            "objectness", "objectness (oracle)", f"{t['best_method']} (shuffled)"} == set(att)
    for m in att.values():  # every score next to its objectness baseline and chance
        assert {"value", "objectness", "chance", "n_samples"} <= set(m["precision@k"])
    r = att["restoration"]["precision@k"]
    assert r["value"] > r["chance"] + 0.2
    objs = t["objects"]
    assert set(objs) == {f"{s}/{x}" for s in ("pixels", "embeddings") for x in ("occlude", "restore", "variable")}
    assert set(objs["pixels/variable"]) == {"QueryAttr", "ChooseAttr", "ChooseCat", "LogicalObj", "ChooseRel",
                                            "CompareAttr"}
    assert set(t["headline"]) == {"object_accuracy_worst_category", "single_referent_precision_at_k",
                                  "referred_vs_distractor"}
    figs = {p.name for p in (root / "figures").iterdir()}
    assert {"04_corruption_effects.pdf", "04_tracing_by_layer.pdf", "04_tracing_example.png",
            "04_attribution_scores.pdf", "04_object_tests.png"} <= figs
    import pandas as pd

    agg = pd.read_parquet(root / "run" / "04_information_tracing" / "trace_by_group.parquet")
    assert {"site", "layer", "group", "effect", "ci_low", "ci_high", "n_samples"} <= set(agg.columns)
    table = pd.read_parquet(root / "run" / "04_information_tracing" / "attribution_table.parquet")
    assert {"coverage", "truth", "owner", "restoration", "integrated gradients"} <= set(table.columns)


@SUITE
def test_editing_notebook_reports_the_three_numbers_per_method_and_the_by_layer_figure(run):
    import pandas as pd

    root, summary = run
    e = summary["notebooks"]["05_model_editing"]
    assert e["concept"] == "cross" and e["new_answer"] == "circle" and e["n_requests"] == 4
    assert 0 <= e["traced_layer"] < 6 and e["layer"] == e["traced_layer"]
    assert set(e["methods"]) == {"multedit", "rank_one", "finetune"}
    for m in e["methods"].values():
        assert m["efficacy"] == 1.0  # 4 requests, optimised until p(new answer) ≈ 0.95
        assert 0 <= m["generalization"] <= 1 and 0 <= m["specificity"] <= 1
    by = pd.read_parquet(root / "run" / "05_model_editing" / "by_layer.parquet")
    assert sorted(zip(by.site, by.layer)) == sorted((s, lay) for s in ("attn", "mlp") for lay in range(6))
    figs = {p.name for p in (root / "figures").iterdir()}
    assert {"05_edit_methods.pdf", "05_edit_by_layer.png"} <= figs


def test_knockout_and_tracing_notebooks_run_on_a_gqa_layout(tmp_path, shapes_handle):
    """Notebooks 01, 03 and 04 pointed at files in GQA's layout through papermill parameters."""
    import papermill as pm

    from microscope.data import shapes
    from tests.gqa_fixture import write_gqa

    files = write_gqa(shapes.generate(36, 21), tmp_path / "gqa")
    args = {k: str(v) for k, v in files.items()}
    out = {}
    for nb in ("01_extraction", "03_attention_knockout", "04_information_tracing"):
        o = tmp_path / nb
        pm.execute_notebook(str(suite.NOTEBOOKS / f"{nb}.ipynb"), str(tmp_path / f"{nb}.ipynb"),
                            cwd=str(suite.NOTEBOOKS), progress_bar=False, execution_timeout=CELL_TIMEOUT,
                            parameters={"dataset": "gqa", "dataset_args": args, "out_dir": str(o),
                                        "figures_dir": str(tmp_path / "fig"), "small": True, "run_dir": str(tmp_path),
                                        "interactive": False})
        out[nb] = json.loads((o / "summary.json").read_text())
    assert out["01_extraction"]["n_samples"] == 24  # small: 24 of the 36 questions
    ko = out["03_attention_knockout"]
    assert ko["n_samples"] == 36 and ko["base_accuracy"] > 0.7 and ko["accuracy_image_blocked"] < ko["base_accuracy"]
    assert 0 <= ko["question_only_prior"] <= 1  # leave-one-out prior on a real data set
    tr = out["04_information_tracing"]
    assert tr["n_traced"] >= 1 and tr["p_corrupted"] < tr["p_clean"]


# Every notebook runs on every model type the suite supports (tests/tiny_models.py) and on a custom fusion
# given as ``module:function`` (the OmniFusion example). One family per distinct image layout runs at the
# notebooks' small parameters — fixed grid (LLaVA-1.5), any-resolution crops with newline tokens
# (LLaVA-NeXT), image splitting with row/column markers (Idefics3), native grid with M-RoPE (Qwen2-VL), the
# custom fusion; the others at smaller sample counts still (BREADTH_PARAMS): every code path the notebooks
# take on them runs, at a fraction of the time (each notebook costs a kernel start and a model load).
LAYOUT_FAMILIES = ["llava15", "llava_next", "idefics3", "qwen2_vl", "omnifusion"]
NOTEBOOK_FAMILIES = LAYOUT_FAMILIES + [n for n in TINY if n not in LAYOUT_FAMILIES]
assert set(NOTEBOOK_FAMILIES) <= set(MODELS)
#: per notebook, the parameters of the families outside LAYOUT_FAMILIES (min()-ed with the small ones)
BREADTH_PARAMS = {"01": {"n_samples": 12}, "03": {"n_samples": 12, "reference_n": 300, "lens_samples": 6},
                  "04": {"n_samples": 4, "n_attribution": 4},
                  "05": {"n_errors": 24, "n_unrelated": 8, "steps": 10, "layers": [0, 3]}}
CELL_TIMEOUT = 600  # seconds per cell: a hung kernel fails the test instead of stalling the run


@pytest.mark.parametrize("name", NOTEBOOK_FAMILIES)
def test_every_notebook_runs_on_every_model_type(tmp_path, tiny_dirs, name, monkeypatch):
    """The whole suite through papermill parameters on each tiny random-weight family (random weights
    answer at chance: every sample is kept)."""
    import papermill as pm

    root = str(Path(__file__).resolve().parents[1])  # the kernels import tests.fusion_example from here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MICROSCOPE_FACTORIES", "tests.fusion_example")  # the kernels may call its functions
    model = f"tests.fusion_example:{name}" if name in FUSION else str(tiny_dirs[name])
    run = tmp_path / "run"
    layout = name in LAYOUT_FAMILIES
    for nb in suite.notebooks():
        params = {"model": model, "out_dir": str(run / nb.stem), "figures_dir": str(tmp_path / "fig"),
                  "small": True, "run_dir": str(run), "interactive": False}
        if nb.stem.startswith(("03", "04")):
            params["only_correct"] = False
        if not layout:
            params.update(BREADTH_PARAMS.get(nb.stem[:2], {}))
        if nb.stem.startswith("02"):
            params["compare"] = []  # the bundled pair's comparison runs in the suite test; not per family
        pm.execute_notebook(str(nb), str(tmp_path / nb.name), cwd=str(suite.NOTEBOOKS), progress_bar=False,
                            parameters=params, execution_timeout=CELL_TIMEOUT)
    ext = json.loads((run / "01_extraction" / "summary.json").read_text())
    assert ext["n_samples"] == (24 if layout else 12) and ext["layers"] == list(range(-1, 4))
    ko = json.loads((run / "03_attention_knockout" / "summary.json").read_text())
    assert ko["n_correct"] == (36 if layout else 12) and ko["window"] == 3  # all kept; 4 layers -> k = 3
    tr = json.loads((run / "04_information_tracing" / "summary.json").read_text())
    assert set(tr["peak_layer"]) <= {"resid", "mlp", "attn"} and tr["n_traced"] >= 1


def test_knockout_and_tracing_notebooks_run_on_shapes_omnifusion(tmp_path):
    """The bundled OmniFusion-style model through notebooks 03 and 04 at small parameters: its
    begin/end-of-image markers are traced as a group of their own (``image_boundary``), and a trained
    model answers (samples kept because they are answered correctly)."""
    import pandas as pd
    import papermill as pm

    from microscope.comparison import bundled_pair

    if not bundled_pair()[0]:
        pytest.skip(bundled_pair()[1])
    run = tmp_path / "run"
    for nb in suite.notebooks():
        if not nb.stem.startswith(("03", "04")):
            continue
        params = {"model": "shapes-omnifusion", "out_dir": str(run / nb.stem), "figures_dir": str(tmp_path / "fig"),
                  "small": True, "run_dir": str(run), "interactive": False}
        pm.execute_notebook(str(nb), str(tmp_path / nb.name), cwd=str(suite.NOTEBOOKS), progress_bar=False,
                            parameters=params, execution_timeout=CELL_TIMEOUT)
    ko = json.loads((run / "03_attention_knockout" / "summary.json").read_text())
    assert ko["model"] == "shapes-omnifusion" and ko["n_correct"] >= 30  # 36 small samples, accuracy 0.99
    trace = pd.read_parquet(run / "04_information_tracing" / "trace.parquet")
    marks = trace[trace.role == "image_boundary"]
    assert len(marks) and set(marks.group) == {"image_boundary"}
    assert set(marks.token) == {"<SOI>", "<EOI>"}
