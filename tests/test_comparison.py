"""The controlled fusion comparison: statistics, verdicts, seed tables, the `compare` parameter."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from microscope import comparison as C
from microscope import suite
from microscope.geometry import METRICS
from microscope.validate import as_list


def fake_profile(style: str, seed: int, id_level: float, pc1: list[float], rng) -> pd.DataFrame:
    """A per-seed table: image/text rows of every metric at layers -1..5."""
    rows = []
    for lay in range(-1, 6):
        for role in ("image", "text"):
            for m in C.FINDINGS[0].metrics + C.FINDINGS[1].metrics:
                v = id_level + rng.normal(0, 0.01) if m.startswith("id_") else pc1[lay + 1] if m == "anisotropy_pc1" \
                    else 0.3
                rows.append({"style": style, "seed": seed, "layer": lay, "modality": role, "metric": m, "value": v,
                             "n": 100})
    return pd.DataFrame(rows)


def test_statistic_is_mean_or_sd_over_decoder_layers():
    rng = np.random.default_rng(0)
    p = fake_profile("a", 0, 5.0, [9.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], rng)
    assert C.statistic(p, "anisotropy_pc1", "mean") == pytest.approx(0.35)  # layer -1 (9.0) left out
    assert C.statistic(p, "anisotropy_pc1", "sd") == pytest.approx(np.std([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], ddof=1))
    with pytest.raises(ValueError, match="no linearity rows"):
        C.statistic(p, "linearity", "mean")


def test_verdicts_reproduced_reversed_inseparable():
    rng = np.random.default_rng(1)
    steep = [0.2, 0.1, 0.3, 0.5, 0.7, 0.9, 0.2]
    seeds = pd.concat(
        [fake_profile("llava", k, 5.0 + 0.1 * k, steep, rng) for k in range(3)]
        + [fake_profile("omni", k, 8.0 + 0.1 * k, [0.3 + 0.01 * k] + [0.5 + 0.01 * k] * 6, rng) for k in range(3)])
    t = C.verdicts(seeds, "llava", "omni").set_index(["finding", "metric"])
    # ID: omni higher by ~3 with a seed spread of ~0.1: reproduced
    assert t.loc[("higher_id", "id_twonn"), "verdict"] == "reproduced"
    assert t.loc[("higher_id", "id_twonn"), "delta"] == pytest.approx(3.0, abs=0.05)
    # PC1: omni's mean 0.51 > llava's 0.45, published says lower: reversed
    assert t.loc[("lower_anisotropy", "anisotropy_pc1"), "verdict"] == "reversed"
    # cosine identical in both (0.3): inseparable
    assert t.loc[("lower_anisotropy", "anisotropy_cosine"), "verdict"] == "inseparable"
    # PC1 flat across layers for omni, steep for llava: more consistent, reproduced
    assert t.loc[("consistent_layers", "anisotropy_pc1"), "verdict"] == "reproduced"
    f = C.finding_verdicts(C.verdicts(seeds, "llava", "omni")).set_index("finding").verdict
    assert f["higher_id"] == "reproduced" and f["lower_anisotropy"] == "inseparable"  # mixed metrics
    # overlapping seed ranges: inseparable however large the mean difference
    overlap = pd.concat([fake_profile("llava", k, [5.0, 9.0][k], steep, rng) for k in range(2)]
                        + [fake_profile("omni", k, [6.0, 10.0][k], steep, rng) for k in range(2)])
    row = C.verdicts(overlap, "llava", "omni").set_index(["finding", "metric"]).loc[("higher_id", "id_twonn")]
    assert row.verdict == "inseparable" and "overlap" in row.note
    # one seed per style: the spread is not measured, never a verdict of direction
    one = seeds[seeds.seed == 0]
    t1 = C.verdicts(one, "llava", "omni")
    assert set(t1.verdict) == {"inseparable"} and t1.note.str.contains("seed spread not measured").all()
    with pytest.raises(ValueError, match="no profile of 'bunny'"):
        C.verdicts(seeds, "llava", "bunny")


def ledger(passing: dict[str, list[bool]]) -> pd.DataFrame:
    """A seed ledger: per style, whether seed k met the bar."""
    report = {"n": 2000, "overall": 0.99, "per_category": {"ChooseRel": 0.98}, "blank_overall": 0.42,
              "question_only_prior": 0.43}
    rows = [C.seed_run(s, k, report if ok else {**report, "overall": 0.9}, [] if ok else ["overall 0.900 < 0.95"])
            for s, oks in passing.items() for k, ok in enumerate(oks)]
    return pd.DataFrame(rows)[C.SEED_RUN_COLUMNS]


def test_verdicts_over_every_seed_and_over_the_seeds_that_met_the_bar():
    """Every seed enters the verdict; with the ledger, the verdict over the seeds that met the bar
    stands beside it. Here llava's seed 2 (below the bar) is the one that overlaps omni: over all
    seeds the ID finding is inseparable, over the passing seeds it is reproduced."""
    rng = np.random.default_rng(2)
    flat = [0.3] * 7
    seeds = pd.concat([fake_profile("llava", k, [5.0, 5.1, 8.05][k], flat, rng) for k in range(3)]
                      + [fake_profile("omni", k, [8.0, 8.1, 8.2][k], flat, rng) for k in range(3)])
    runs = ledger({"llava": [True, True, False], "omni": [True, True, True]})
    t = C.verdicts(seeds, "llava", "omni", runs=runs).set_index(["finding", "metric"])
    row = t.loc[("higher_id", "id_twonn")]
    assert row.seeds_a == pytest.approx([5.0, 5.1, 8.05], abs=0.03) and len(row.seeds_b) == 3
    assert row.verdict == "inseparable" and "overlap" in row.note
    assert row.verdict_bar == "reproduced" and (row.below_bar_a, row.below_bar_b) == ([2], [])
    # the all-seed columns are those of the call without a ledger
    plain = C.verdicts(seeds, "llava", "omni").set_index(["finding", "metric"])
    assert plain.verdict.equals(t.verdict) and np.allclose(plain.delta, t.delta)
    assert "verdict_bar" not in plain and "verdict_bar" not in C.finding_verdicts(plain.reset_index())
    f = C.finding_verdicts(t.reset_index()).set_index("finding")
    assert f.loc["higher_id", ["verdict", "verdict_bar"]].tolist() == ["inseparable", "reproduced"]
    # fewer than two passing seeds of a style: the bar verdict says its spread is not measured
    one = C.verdicts(seeds, "llava", "omni", runs=ledger({"llava": [True, False, False], "omni": [True] * 3}))
    assert set(one.verdict_bar) == {"inseparable"} and one.note_bar.str.contains("1 seed").all()
    # a table seed the ledger does not know is refused: its accuracy is unknown
    with pytest.raises(ValueError, match="no row for llava seed"):
        C.verdicts(seeds, "llava", "omni", runs=runs[~((runs["style"] == "llava") & (runs["seed"] == 2))])


def test_seed_tables_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    a = fake_profile("llava", 1, 5.0, [0.2] * 7, rng)
    path = C.write_seed_table(a, tmp_path, command="make seeds")
    assert path.name == "llava-seed1.csv" and path.read_text().startswith("# made by: make seeds\n")
    C.write_seed_table(fake_profile("omni", 1, 5.0, [0.2] * 7, rng), tmp_path)
    back = C.read_seed_tables(tmp_path, styles=["llava"])
    assert len(back) == len(a) and np.allclose(back.value.to_numpy(), a.value.to_numpy(), rtol=1e-5)
    assert len(C.read_seed_tables(tmp_path)) == 2 * len(a)
    assert C.read_seed_tables(tmp_path / "none").empty
    with pytest.raises(ValueError, match="one style and seed per table"):
        C.write_seed_table(pd.concat([a, a.assign(seed=2)]), tmp_path)


def test_committed_seed_tables_cover_every_shipped_style_at_every_layer():
    from microscope.zoo import BUNDLED

    seeds = C.read_seed_tables()
    shipped = {name for name, path in BUNDLED.items() if (path / "model.safetensors").is_file()}
    assert "shapes-llava" in shipped
    assert {(s, 0) for s in shipped} <= set(zip(seeds["style"], seeds["seed"]))  # seed 0: the shipped weights
    for (style, seed), g in seeds.groupby(["style", "seed"]):
        assert set(g.layer) == set(range(-1, 6)), (style, seed)
        assert set(g.metric) == set(METRICS), (style, seed)
        assert set(g.modality) == {"image", "text"}


def test_compare_parameter_takes_a_list_of_models():
    nb = suite.NOTEBOOKS / "02_geometry.ipynb"
    declared = suite.declared_parameters(nb)
    assert declared["compare"] is None  # the bundled pair when installed
    assert suite.check_parameters(nb, {"compare": None}, declared)["compare"] is None
    got = suite.check_parameters(nb, {"compare": "[runs/a, /data/b]"}, declared)
    assert got["compare"] == ["runs/a", "/data/b"]
    assert suite.check_parameters(nb, {"compare": '["x", "y"]'}, declared)["compare"] == ["x", "y"]
    assert suite.check_parameters(nb, {"compare": "[]"}, declared)["compare"] == []
    with pytest.raises(suite.NotebookParameterError, match="compare"):
        suite.check_parameters(nb, {"compare": {"a": 1}}, declared)
    with pytest.raises(ValueError, match="not a valid list literal"):  # unbalanced: not split into names
        as_list("[a, b", "compare")


def test_notebook_compares_any_two_model_directories(tmp_path):
    """Notebook 02 with ``compare`` = two directories (a LLaVA and a saved OmniFusion-style model
    with random weights): overlay figures and verdicts, from the live profiles alone."""
    import json

    import papermill as pm

    from microscope.zoo import model_dir
    from microscope.zoo import shapes_omnifusion as omni
    from tests.test_omnifusion import random_omnifusion

    other = omni.save(random_omnifusion(seed=3), tmp_path / "omni_random")
    run, fig = tmp_path / "run", tmp_path / "fig"
    pm.execute_notebook(str(suite.NOTEBOOKS / "02_geometry.ipynb"), str(tmp_path / "02.ipynb"),
                        cwd=str(suite.NOTEBOOKS), progress_bar=False, execution_timeout=600,
                        parameters={"model": "shapes-llava", "out_dir": str(run), "figures_dir": str(fig),
                                    "small": True, "run_dir": str(run), "interactive": False,
                                    "compare": f"[{model_dir('shapes-llava')}, {other}]"})
    summary = json.loads((run / "summary.json").read_text())
    assert summary["compare"] == [str(model_dir("shapes-llava")), str(other)]
    assert set(summary["findings"]) == {"higher_id", "lower_anisotropy", "consistent_layers"}
    table = pd.read_parquet(run / "compare_verdicts.parquet")
    # no seed tables for "omni_random": one live profile per model, so nothing is separable
    assert set(table.verdict) == {"inseparable"} and table.note.str.contains("not measured").all()
    prof = pd.read_parquet(run / "compare_geometry.parquet")
    assert set(prof.model) == set(summary["compare"]) and prof.ci_low.notna().any()
    assert {f"02_compare_{m}.png" for m in METRICS} <= {p.name for p in fig.iterdir()}


def test_seed_ledger_replaces_a_rerun_seed_and_counts_pass_rates(tmp_path):
    path = tmp_path / "seed_runs.csv"
    report = {"n": 2000, "overall": 0.99, "per_category": {"ChooseRel": 0.98, "QueryAttr": 1.0},
              "blank_overall": 0.42, "question_only_prior": 0.43}
    C.write_seed_run(C.seed_run("llava", 0, report, []), path)
    C.write_seed_run(C.seed_run("llava", 1, {**report, "per_category": {"ChooseRel": 0.42, "QueryAttr": 1.0}},
                                ["ChooseRel 0.420 < 0.9"], 2218.0), path)
    C.write_seed_run(C.seed_run("omni", 0, report, []), path)
    runs = C.read_seed_runs(path)
    assert list(runs.columns) == C.SEED_RUN_COLUMNS and len(runs) == 3
    assert runs.set_index(["style", "seed"]).loc[("llava", 1), "worst_category"] == "ChooseRel"
    rates = C.pass_rates(runs).set_index("style")
    assert rates.loc["llava", ["trained", "met_bar", "pass_rate"]].tolist() == [2, 1, 0.5]
    assert rates.loc["llava", "failed"] == "seed 1: ChooseRel 0.420 < 0.9"
    assert rates.loc["omni", "pass_rate"] == 1.0 and rates.loc["omni", "failed"] == ""
    # a rerun of a seed replaces its row instead of adding one
    C.write_seed_run(C.seed_run("llava", 1, report, [], 2000.0), path)
    runs = C.read_seed_runs(path)
    assert len(runs) == 3 and C.pass_rates(runs).set_index("style").loc["llava", "met_bar"] == 2
    assert C.read_seed_runs(tmp_path / "none.csv").empty
    with pytest.raises(ValueError, match="needs"):
        C.write_seed_run({"style": "llava", "seed": 2}, path)


def test_committed_ledger_backs_every_committed_seed_table():
    """Every committed per-seed table belongs to a seed the ledger evaluated on 2000 fresh samples
    (passing the bar or not), and the ledger's pass/fail agrees with the bar's conditions."""
    from microscope.zoo.evaluation import BAR

    runs = C.read_seed_runs().set_index(["style", "seed"])
    tables = set(zip(*[C.read_seed_tables()[c] for c in ("style", "seed")]))
    assert tables, "no committed seed tables"
    for key in tables:
        assert key in runs.index, f"{key} has a geometry table but no ledger row"
        assert runs.loc[key, "n_eval"] == 2000, key
    for key, r in runs.iterrows():
        passes = (r["overall"] >= BAR["overall"] and r["worst_accuracy"] >= BAR["category"]
                  and r["blank_overall"] <= r["question_only_prior"] + BAR["blank_above_prior"])
        assert bool(r["meets_bar"]) == passes and (r["failures"] == "") == passes, key
    # the committed verdicts can be read with the ledger (every table seed is in it), for both styles
    assert sorted({s for s, _ in tables}) == ["shapes-llava", "shapes-omnifusion"]
    v = C.verdicts(C.read_seed_tables(), "shapes-llava", "shapes-omnifusion", runs=runs.reset_index())
    assert v.note_bar.notna().all()
