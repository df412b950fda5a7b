"""The loaders and analyses on files in the published layouts (tests/data, README there: excerpts
where the license allows, project rows in the published schema for VQA-Constraints): the knockout
paper's GQA CSVs, GQA val questions, ScienceQA, with stand-in images drawn at the published
names (and sizes, where the files record them)."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from microscope.data import gqa, load_samples, scienceqa, vqa_constraints
from microscope.data.vqa import DatasetWarning, head_noun, locate

DATA = Path(__file__).parent / "data"
VQAC = [DATA / "vqa_constraints" / f for f in ("okvqa.csv", "multimodal_movies.csv", "multimodal_known.csv")]
KNOCKOUT = sorted((DATA / "gqa_knockout").glob("*.csv"))
GQA_VAL = DATA / "gqa" / "val_balanced_questions_sample.json"
#: the sizes of the GQA sample's images (as the GazeVLM repository ships them)
GQA_SIZES = {"1159529": (800, 533), "2351608": (375, 500), "2370134": (500, 375), "2371269": (500, 375)}


def _draw(path: Path, w: int, h: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Stand-in images for every excerpt, in one folder per data set."""
    root = tmp_path_factory.mktemp("real_images")
    k = 0
    vqac = root / "vqa_constraints"
    for f in VQAC:
        for row in csv.DictReader(f.open(encoding="utf-8")):
            p = vqac / row["image_url"]
            if p.suffix != ".jpg":  # Known / Movies: "./A photo of X", no extension; stored as X.jpg
                p = p.with_name(p.name + ".jpg")
            _draw(p, 64 + 8 * (k % 5), 48 + 8 * (k % 3), k)  # no size is published: made up
            k += 1
    ko = root / "gqa_knockout"
    for f in KNOCKOUT:
        for row in csv.DictReader(f.open(encoding="utf-8")):  # drawn at a quarter of the published size
            _draw(ko / f"{row['img_id']}.jpg", int(row["image_w"]) // 4, int(row["image_h"]) // 4, k)
            k += 1
    val = root / "gqa"
    for i, (w, h) in GQA_SIZES.items():
        _draw(val / f"{i}.jpg", w, h, k)
        k += 1
    _draw(root / "scienceqa" / "train" / "1" / "image.png", 96, 64, k)
    return {"vqa_constraints": vqac, "gqa_knockout": ko, "gqa": val, "scienceqa": root / "scienceqa"}


def _scene_graphs(path: Path, image_ids: list[str]) -> Path:
    """A scene-graph file in GQA's documented layout for ``image_ids`` only, with stand-in boxes
    for every object the sample questions annotate."""
    qs = json.loads(GQA_VAL.read_text())
    graphs = {}
    for i in image_ids:
        w, h = GQA_SIZES[i]
        objs = {}
        for q in qs.values():
            if q["imageId"] == i:
                for j, o in enumerate((q["annotations"]["question"] or {}).values()):
                    objs[o] = {"name": f"object {o}", "x": 10 + 40 * j, "y": 20, "w": 30, "h": 40,
                               "attributes": [], "relations": []}
        graphs[i] = {"width": w, "height": h, "objects": objs}
    path.write_text(json.dumps(graphs))
    return path


# ------------------------------------------------------------------------------- loaders


def test_vqa_constraints_reads_the_published_csvs_as_they_are(images):
    """The three published schemas (header, column order, unnamed index, main_entity / image_url,
    no answer column, extension-less image paths, a quoted field with a comma), with rows written
    for the project, 4 okvqa rows of which do not contain their entity verbatim."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)  # nothing is skipped in the first rows
        s = vqa_constraints.load(VQAC, images=images["vqa_constraints"])
    assert len(s) == 8 + 3 + 6 and not s.skipped
    assert {x.category for x in s} == {"okvqa", "multimodal_movies", "multimodal_known"}
    assert all(x.answer is None for x in s)  # the published analysis traces the model's own answer
    by_id = {x.id: x for x in s}
    for x in s:  # every constraint is a span of its question
        (c,) = x.constraints
        assert x.question[c.start:c.end] == c.word
    not_verbatim = {x.id: (x.meta["entity"], x.constraints[0].word) for x in s
                    if x.meta["constraint_rule"] != "verbatim"}
    assert not_verbatim == {"okvqa-1": ("this plant", "plant"), "okvqa-3": ("bike on the ground", "bike"),
                            "okvqa-5": ("the suit", "suit"), "okvqa-7": ("this hat", "hat")}
    assert {d["id"] for d in s.notes} == set(not_verbatim)
    m = by_id["multimodal_movies-0"]
    assert m.question == "Name a film made by this director?" and m.meta["director"] == "Akira Kurosawa"
    assert m.constraints[0].word == "this director"
    assert m.image_path.name == "A photo of Akira Kurosawa.jpg" and m.image.size == (88, 64)  # drawn 9th
    k = by_id["multimodal_known-3"]  # "./A photo of Wikipedia.org": the whole name gets the extension
    assert k.meta["subject"] == "Wikipedia.org" and k.image_path.name == "A photo of Wikipedia.org.jpg"
    assert by_id["multimodal_known-5"].constraints[0].word == "This instrument,"  # quoted field with a comma
    assert by_id["okvqa-0"].image_path == images["vqa_constraints"] / "val2014" / "COCO_val2014_000000000139.jpg"
    assert len(vqa_constraints.load(VQAC, images=images["vqa_constraints"], n=10, seed=3)) == 10


def test_vqa_constraints_skips_one_bad_row_with_its_reason_not_the_file(tmp_path, images):
    rows = VQAC[0].read_text(encoding="utf-8").splitlines()
    rows.insert(3, "999,What is in the box?,these,./val2014/x.jpg")  # a pronoun that is not in the question
    rows.insert(5, "998,,this,./val2014/y.jpg")
    (tmp_path / "okvqa.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.warns(DatasetWarning, match=r"skipped 2 of 10 rows \(1 constraint not located; 1 no question"):
        s = vqa_constraints.load(tmp_path / "okvqa.csv", images=images["vqa_constraints"])
    assert len(s) == 8
    assert s.skipped[0] == {"source": str(tmp_path / "okvqa.csv"), "row": 4, "reason": "constraint not located: "
                            "constraint 'these' is not in the question and has no content word to look for"}
    rep = s.report()
    assert list(rep.columns) == ["source", "row", "id", "action", "reason"]
    assert (rep.action == "skipped").sum() == 2 and (rep.action == "kept").sum() == 4
    with pytest.raises(ValueError, match="gave no samples:\nskipped 1 row"):  # nothing usable: the reason is named
        (tmp_path / "none.csv").write_text(",question,main_entity,image_url\n0,What is it?,these,./x.jpg\n")
        with pytest.warns(DatasetWarning):
            load_samples("vqa_constraints", csvs=[tmp_path / "none.csv"])


def test_locate_finds_constraints_by_the_stated_rules():
    q = "What type of hat is this gentleman wearing?"
    assert locate(q, "hat") == ((13, 16), "verbatim")  # the word, not "hat" inside "What"
    assert locate("Are there either any refrigerators or bags?", "refrigerator") == ((21, 34), "inflection")
    assert locate("Is the cat black?", "the Cats") == ((3, 10), "inflection")
    assert locate(q, "this hat") == ((13, 16), "head noun")
    assert locate("Name the type of plant this is?", "this plant")[1] == "head noun"
    assert head_noun("bike on the ground") == "bike" and head_noun("this type of blanket") == "type"
    assert head_noun("these") is None
    assert locate("What is it?", "the dog") == (None, "constraint 'the dog' is not in the question, nor is its "
                                                "head noun 'dog'")


def test_gqa_knockout_paper_csvs_by_detailed_type(images):
    """The six published per-category CSVs (first rows) load unmodified; each file's questions
    land in its category by detailed type; central object / object1-2 give boxes and constraints."""
    s = gqa.load(KNOCKOUT, images["gqa_knockout"])
    assert len(s) == 30 and not s.skipped
    by_file = {}
    for x in s:
        by_file.setdefault(Path(x.meta["source"]).stem.rsplit("_", 1)[1], set()).add(x.category)
    assert by_file == {c: {c} for c in gqa.CATEGORIES}
    x = {y.id: y for y in s}
    jar = x["171031170"]  # "Is the jar full or empty?", central object jar at (253, 291) size 60 x 105
    assert (jar.answer, jar.category, jar.meta["types"]["detailed"]) == ("empty", "ChooseAttr", "chooseAttr")
    assert [c.word for c in jar.constraints] == ["jar"] and jar.boxes == ((253, 291, 313, 396),)
    assert (jar.meta["width"], jar.meta["height"]) == (375, 500)
    grass = x["12824169"]  # LogicalObj, object2 "mud" has no box ("-")
    assert [c.word for c in grass.constraints] == ["grass", "mud"] and len(grass.boxes) == 1
    fridge = x["1928517"]  # "refrigerators" in the question for object "refrigerator"
    assert [c.word for c in fridge.constraints] == ["refrigerators", "bags"]
    rel = x["13515212"]  # ChooseRel: both objects, both boxes, in question order
    assert [c.word for c in rel.constraints] == ["surfer", "surfboard"] and len(rel.boxes) == 2
    assert x["00556075"].constraints[0].word == "this"  # objThisChoose: the central object is "this"
    assert {y.category for y in gqa.load(KNOCKOUT, images["gqa_knockout"], grouping="broad")} == set(gqa.CATEGORIES)


def test_gqa_detailed_types_are_narrower_than_the_broad_grouping(tmp_path, images):
    """The issue's example: "Do you see either a white refrigerator or dishwasher there?" is
    existAttrOrC, LogicalObj only under the broad grouping; the val sample's twoSameMaterial is
    CompareAttr only under the broad grouping (the paper's CompareAttr is twoCommon)."""
    qs = json.loads(GQA_VAL.read_text())
    qs["x1"] = {"question": "Do you see either a white refrigerator or dishwasher there?", "answer": "no",
                "imageId": "2370134", "types": {"detailed": "existAttrOrC", "semantic": "obj",
                                                "structural": "logical"},
                "annotations": {"question": {}}}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    detailed = {x.id: x.category for x in gqa.load(tmp_path / "q.json", images["gqa"], categories=None)}
    broad = {x.id: x.category for x in gqa.load(tmp_path / "q.json", images["gqa"], categories=None,
                                                grouping="broad")}
    assert (detailed["x1"], broad["x1"]) == ("existAttrOrC", "LogicalObj")
    assert (detailed["00155957"], broad["00155957"]) == ("twoSameMaterial", "CompareAttr")
    assert gqa.load(tmp_path / "q.json", images["gqa"], categories=["LogicalObj"], grouping="broad")[0].id == "x1"
    with pytest.raises(ValueError, match="gave no samples"):  # none of the sample is one of the paper's six
        load_samples("gqa", questions=tmp_path / "q.json", images=images["gqa"])


def test_gqa_questions_without_a_scene_graph_are_kept_without_boxes(tmp_path, images):
    """GQA publishes scene graphs for train and val only: a testdev-like question (its image is
    not in the scene-graph file) is kept for every edge that needs no boxes, and counted."""
    graphs = _scene_graphs(tmp_path / "val_sceneGraphs.json", ["2371269", "2370134"])
    with pytest.warns(DatasetWarning, match="2 of 5 questions have no scene graph"):
        s = gqa.load(GQA_VAL, images["gqa"], scene_graphs=graphs, categories=None)
    assert len(s) == 5
    with_graph = {x.id for x in s if x.meta["scene_graph"]}
    assert with_graph == {"00137872", "00137901", "00155957"}
    assert all(x.boxes for x in s if x.id in with_graph) and not any(x.boxes for x in s if x.id not in with_graph)
    assert {d["id"] for d in s.notes} == {"00126851", "00148535"}
    assert s[1].meta["width"] == 500 and [c.word for c in s[1].constraints] == ["device", "traffic signal"]
    with pytest.warns(DatasetWarning, match="5 of 5 questions have no scene graph"):
        assert len(gqa.load(GQA_VAL, images["gqa"], scene_graphs=_scene_graphs(tmp_path / "none.json", []),
                            categories=None)) == 5


def test_scienceqa_published_layout_and_pid_splits(tmp_path, images):
    s = scienceqa.load(DATA / "scienceqa" / "problems.json", images["scienceqa"])
    assert [(x.id, x.answer, x.category, x.options) for x in s] == [("1", "A", "Geography", ("A", "B", "C", "D"))]
    assert s[0].question.splitlines()[:2] == ["Which of these states is farthest north?", "A. West Virginia"]
    assert s[0].image.size == (96, 64)
    splits = DATA / "scienceqa" / "pid_splits.json"
    assert len(scienceqa.load(DATA / "scienceqa" / "problems.json", images["scienceqa"], splits=["trainval"],
                              pid_splits=splits)) == 1
    assert not scienceqa.load(DATA / "scienceqa" / "problems.json", images["scienceqa"], splits=["test"],
                              pid_splits=splits)
    with pytest.raises(ValueError, match="no split \\['dev'\\]"):
        scienceqa.load(DATA / "scienceqa" / "problems.json", images["scienceqa"], splits=["dev"], pid_splits=splits)


# ------------------------------------------------------------------------------- analyses


@pytest.fixture(scope="module")
def own_answer_samples(images, handles):
    h = handles["llava15"]
    return h, load_samples("vqa_constraints", n=3, seed=1, handle=h, csvs=VQAC, images=images["vqa_constraints"])


def test_every_analysis_measures_the_models_own_answer_without_gold(own_answer_samples):
    """answer=None: sweep, predict, trace, restoration and the logit lens all measure the model's
    greedy first token, record it, and keep every sample under only_correct (with a warning)."""
    from microscope import attribution as at
    from microscope import knockout as ko
    from microscope import tracing as tr
    from microscope.lens import logit_lens

    h, s = own_answer_samples
    plain = ko.predict(h, s, progress=False)
    assert plain.correct.isna().all() and plain.matches_answer.all()
    assert (plain.answer_source == "model").all() and (plain.answer_token == plain.prediction).all()
    blind = ko.predict(h, s, "image↛text", progress=False)
    assert (blind.answer_token == plain.prediction).all()  # the target stays the clean answer under knockout
    assert (blind.matches_answer == (blind.prediction == plain.prediction)).all()
    with pytest.warns(UserWarning, match="no meaning for the 3 sample"):
        df = ko.sweep(h, s, edges=["image↛last", "question↛last"], progress=False)
    assert df.sample_id.nunique() == 3 and (df.answer_source == "model").all()
    assert dict(zip(df.sample_id, df.answer_token)) == dict(zip(plain.sample_id, plain.prediction))
    p_top = plain.set_index("sample_id").p_answer
    assert np.allclose(df.groupby("sample_id").p_base.first(), p_top.loc[sorted(p_top.index)], atol=1e-5)
    with pytest.warns(UserWarning, match="no meaning"):
        t = tr.trace_dataset(h, s[:2], sites=["resid"], n_noise=2, progress=False)
    assert t.sample_id.nunique() == 2 and (t.answer_source == "model").all()
    own = dict(zip(plain.sample_id, plain.prediction))
    assert dict(zip(t.sample_id, t.answer_token)) == {x.id: own[x.id] for x in s[:2]}
    with pytest.warns(UserWarning, match="no meaning"):
        r = at.restoration_scores(h, s[:1], n_noise=2, progress=False)
    assert len(r) == 16 and (r.answer_source == "model").all()
    lens = logit_lens(h, s, progress=False)
    assert set(lens.variant) == {"model"} and lens.answer.isna().all()
    last = lens[lens.layer == h.adapter.n_layers - 1].set_index("sample_id")
    assert (last["rank"] == 0).all()  # the model's own answer is its top token at the last layer


def test_empty_results_say_why_instead_of_failing(own_answer_samples):
    """No sample survives only_correct: every aggregate is empty with its columns and says why,
    every plot draws the reason (notebook 04's KeyError: 'kind' — now 'site' — in tracing.aggregate)."""
    import matplotlib

    matplotlib.use("Agg")
    from microscope import knockout as ko
    from microscope import plotting
    from microscope import tracing as tr
    from microscope.answers import gold_id
    from microscope.results import why_empty

    h, s = own_answer_samples
    pred = h.processor.tokenizer.convert_tokens_to_ids(ko.predict(h, s, progress=False).prediction.tolist())
    wrong = [type(x)(**{**x.__dict__, "answer": next(w for w in ("red", "blue") if gold_id(h.processor, w) != p)})
             for x, p in zip(s, pred)]
    df = tr.trace_dataset(h, wrong, sites=["resid"], n_noise=2, progress=False)
    assert df.empty and "site" in df.columns
    assert why_empty(df) == "no traced samples: 3 of 3 samples answered wrongly (only_correct=True)"
    with pytest.warns(UserWarning, match="nothing to aggregate: no traced samples: 3 of 3"):
        agg = tr.aggregate(df)
    assert agg.empty and list(agg.columns) == ["site", "layer", "group", "effect", "ci_low", "ci_high", "n_samples"]
    assert tr.peak_layers(agg) == {}
    sw = ko.sweep(h, wrong, edges=["image↛last"], progress=False)
    assert sw.empty and ko.largest_drops(sw) == {}
    assert sw.attrs["skipped"] == {"answered wrongly (only_correct=True)": 3}
    for fig in (plotting.trace_curves(agg), plotting.knockout_by_category(sw), plotting.knockout_curves(sw),
                plotting.trace_heatmap(df, "resid"), plotting.logit_lens_curve(pd.DataFrame(columns=["variant"]))):
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert any(t.startswith("no ") for t in texts), texts
    drawn = " ".join(t.get_text() for t in plotting.trace_curves(agg).axes[0].texts).replace("\n", " ")
    assert drawn == "no traced samples: 3 of 3 samples answered wrongly (only_correct=True)"
    nothing = tr.trace_dataset(h, s[:2], target="related-image", n_noise=2, progress=False)
    assert why_empty(nothing).startswith("no traced samples: 2 of 2 samples have no related-image tokens")


# ------------------------------------------------------------------------------- notebooks

NOTEBOOK_DATA = {
    "vqa_constraints": lambda im, tmp: {"csvs": [str(p) for p in VQAC], "images": str(im["vqa_constraints"])},
    # the knockout paper's CSVs together with testdev-like JSON questions (no scene graph for any image),
    # of the types whose answers every vocabulary spells (yes / no / left / right)
    "gqa": lambda im, tmp: {"questions": [str(p) for p in KNOCKOUT] + [str(GQA_VAL)], "images": str(im["gqa"]),
                            "scene_graphs": str(_scene_graphs(tmp / "graphs.json", [])),
                            "categories": ["ChooseRel", "LogicalObj", "existRelS", "existRelSRC", "twoSameMaterial"]},
    "scienceqa": lambda im, tmp: {"problems": str(DATA / "scienceqa" / "problems.json"),
                                  "images": str(im["scienceqa"]),
                                  "pid_splits": str(DATA / "scienceqa" / "pid_splits.json")},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NOTEBOOK_DATA))
def test_notebooks_03_and_04_run_on_each_real_data_set(name, images, tiny_dirs, tmp_path):
    """Notebooks 03 and 04 end to end on each real excerpt with a tiny checkpoint: VQA-Constraints
    on the model's own answers (only_correct on: all kept); GQA on gold answers (only_correct off,
    since the random-weight model is at chance), related-image edges on the CSVs' boxes and skipped
    for the questions without a scene graph; ScienceQA with only_correct on, where nothing is kept
    and the output and summary say why."""
    import papermill as pm

    from microscope import suite

    if name == "gqa":  # one images folder for the CSVs' and the JSON's images
        for p in images["gqa_knockout"].iterdir():
            shutil.copy(p, images["gqa"] / p.name)
    args = NOTEBOOK_DATA[name](images, tmp_path)
    only_correct = name != "gqa"
    out = {}
    for nb, extra in (("03_attention_knockout", {"n_samples": 4, "lens_samples": 4}),
                      ("04_information_tracing", {"n_samples": 2, "n_noise": 1, "n_attribution": 1,
                                                  "attribution_noise": 1})):
        o = tmp_path / nb
        ran = pm.execute_notebook(
            str(suite.NOTEBOOKS / f"{nb}.ipynb"), str(tmp_path / f"{nb}.ipynb"), cwd=str(suite.NOTEBOOKS),
            progress_bar=False, execution_timeout=600, parameters={"model": str(tiny_dirs["llava15"]), "dataset": name,
                                            "dataset_args": args, "out_dir": str(o), "small": True,
                                            "only_correct": only_correct,
                                            "figures_dir": str(tmp_path / "fig"), "run_dir": str(tmp_path),
                                            "interactive": False, **extra})
        text = "\n".join("".join(x.get("text", "")) for c in ran.cells for x in c.get("outputs", []))
        out[nb] = (json.loads((o / "summary.json").read_text()), text)
    (ko, ko_text), (tr, tr_text) = out["03_attention_knockout"], out["04_information_tracing"]
    assert ko["n_samples"] == 4 if name != "scienceqa" else ko["n_samples"] == 1
    if name == "vqa_constraints":  # no gold answer: every sample is measured on its own answer
        assert ko["n_gold"] == 0 and ko["base_accuracy"] is None and ko["n_correct"] == 4
        assert 0 <= ko["own_answer_kept_image_blocked"] <= 1 and "have no usable gold answer" in ko_text
        assert tr["n_traced"] == tr["n_model_answers"] == 2 and tr["why_empty"] is None
    for summary, text, key in ((ko, ko_text, "n_correct"), (tr, tr_text, "n_traced")):
        if summary[key] == 0:  # nothing kept: the output and the summary say why
            assert summary["why_empty"].startswith("no ") and summary["why_empty"] in text
        else:
            assert summary["why_empty"] is None
    if name == "gqa":  # every sample kept; the JSON questions (no scene graph) have no related-image rows
        assert ko["n_correct"] == 4 and tr["n_traced"] == 2 and ko["n_gold"] == 4
        with pytest.warns(DatasetWarning):
            drawn = gqa.load(**{k: v for k, v in args.items()}, n=4, seed=1)
        no_graph = 1  # of the 4 drawn, question 00155957's image is not in the scene-graph file
        assert sum(not x.boxes for x in drawn) == no_graph
        assert ko["skipped"].get("have no referred patches for related-image↛question", 0) == no_graph
        assert f"{no_graph} of 4 questions have no scene graph" in ko_text
        df = pd.read_parquet(tmp_path / "03_attention_knockout" / "knockout.parquet")
        assert df[df.edge == "related-image↛question"].sample_id.nunique() == 4 - no_graph
    if name == "scienceqa":  # no constraint words to corrupt: said, not a crash
        assert tr["n_traced"] == 0 and "sample was corrupted with" in tr["why_empty"]  # no constraint tokens
    figs = {p.name for p in (tmp_path / "fig").iterdir()}
    assert {"03_knockout_by_category.png", "04_tracing_by_layer.png", "04_tracing_example.png"} <= figs
