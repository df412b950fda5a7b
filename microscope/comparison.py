"""Controlled comparison of two models' hidden-state geometry, with seed-to-seed variation.

MLLM-Microscope compares LLaVA-NeXT with OmniFusion and reports, for OmniFusion's image tokens,
a higher intrinsic dimension, a lower anisotropy and a geometry more consistent across layers
(:data:`FINDINGS`). Two published models differ in much more than fusion; the bundled
``shapes-llava`` and ``shapes-omnifusion`` differ only in it. This module turns geometry
profiles (:func:`microscope.geometry.profile`) of the two into one verdict per finding:

* a **statistic** per profile: for a finding about levels, the mean over decoder layers
  ``l >= 0`` of the metric on image tokens, ``s = mean_l v_l``; for consistency, the standard
  deviation over those layers, ``s = sd_l v_l``;
* per model (fusion style), the statistic of every training seed ``k``: ``s_k``; the effect is
  ``Δ = mean_k s_k(B) - mean_k s_k(A)`` (B the OmniFusion-style model, A the LLaVA-style one);
* **verdict**: with at least two seeds per style, the effect is *separable* from seed-to-seed
  variation when the two seed ranges do not overlap (every seed of B on the same side of every
  seed of A) and ``|Δ| > 2·se`` with ``se = sqrt(sd_A²/n_A + sd_B²/n_B)`` (between-seed
  standard deviations). Separable in the published direction is ``reproduced``, against it
  ``reversed``; otherwise ``inseparable``. With fewer than two seeds of a style the spread is
  not measured and the verdict is ``inseparable`` (said so in ``note``).

Every trained seed counts: the seed-to-seed variation of a recipe includes how well each seed
learned the task, and keeping only the seeds that meet the accuracy bar would compare selected
subsets (a style that passes less often would be represented by its luckiest seeds). The ledger
of every seed's accuracy (:func:`write_seed_run`) gives the same verdict over the seeds that met
the bar beside it (``verdict_bar``): when the two differ, the finding depends on which seeds
learned the task best, and a reader should know.

Per-seed profiles of the bundled models live in small tidy tables (:func:`read_seed_tables`)
written by ``make seeds`` (:func:`write_seed_table`), so figures draw the between-seed spread
without retraining.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

#: where the committed per-seed geometry tables of the bundled models live
SEED_TABLES = Path(__file__).parent / "zoo" / "seed_profiles"
#: the fixed samples every per-seed profile is measured on (Shapes world, never trained on)
SEED_SAMPLES = {"n": 96, "seed": 11}
SEED_COLUMNS = ["style", "seed", "layer", "modality", "metric", "value", "n"]
#: the ledger of every trained seed, passing or not (:func:`write_seed_run`)
SEED_RUNS = SEED_TABLES / "seed_runs.csv"
SEED_RUN_COLUMNS = ["style", "seed", "overall", "worst_category", "worst_accuracy", "blank_overall",
                    "question_only_prior", "n_eval", "meets_bar", "failures", "train_seconds"]


@dataclass(frozen=True)
class Finding:
    """A published claim about B (OmniFusion-style) against A (LLaVA-style) image tokens."""

    key: str
    claim: str
    metrics: tuple[str, ...]
    #: ``"mean"`` (level over layers) or ``"sd"`` (spread over layers: consistency)
    statistic: str
    #: +1: the claim is B > A; -1: B < A
    direction: int


FINDINGS: tuple[Finding, ...] = (
    Finding("higher_id", "OmniFusion's image tokens have a higher intrinsic dimension",
            ("id_twonn", "id_mle"), "mean", +1),
    Finding("lower_anisotropy", "OmniFusion's image tokens are less anisotropic",
            ("anisotropy_pc1", "anisotropy_cosine"), "mean", -1),
    Finding("consistent_layers", "OmniFusion's image-token geometry is more consistent across layers",
            ("id_twonn", "anisotropy_pc1"), "sd", -1),
)


#: the bundled pair, LLaVA-style first
BUNDLED_PAIR = ("shapes-llava", "shapes-omnifusion")


def bundled_pair() -> tuple[list[str], str]:
    """``(models, note)``: :data:`BUNDLED_PAIR` when both models' weights are installed, else
    ``[]`` and a note naming what is missing and how to make it."""
    from microscope.zoo import BUNDLED

    missing = [m for m in BUNDLED_PAIR if not (BUNDLED[m] / "model.safetensors").is_file()]
    if missing:
        return [], (f"{', '.join(missing)} is not installed ({', '.join(str(BUNDLED[m]) for m in missing)} has no "
                     f"weights): the fusion comparison is skipped; train it with `python -m microscope.zoo train "
                     f"{missing[0]} --out {BUNDLED[missing[0]]} --vision-from shapes-llava`")
    return list(BUNDLED_PAIR), ""


def statistic(profile: pd.DataFrame, metric: str, kind: str, modality: str = "image") -> float:
    """Mean (``kind="mean"``) or standard deviation (``"sd"``, ddof 1) over decoder layers ``>= 0``
    of ``metric`` on ``modality`` tokens of one profile (rows of one model and seed)."""
    d = profile[(profile.metric == metric) & (profile.modality == modality) & (profile.layer >= 0)]
    if d.empty:
        raise ValueError(f"the profile has no {metric} rows for {modality} tokens at layers >= 0")
    v = d.sort_values("layer").value.to_numpy(float)
    return float(v.mean()) if kind == "mean" else float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def _separate(va: np.ndarray, vb: np.ndarray, direction: int, a: str, b: str) -> dict:
    """The verdict of one metric from the per-seed statistics ``va`` (style ``a``) and ``vb``
    (style ``b``): the effect, the between-seed spreads and ``verdict``/``note`` (module docstring)."""
    sd_a = float(va.std(ddof=1)) if len(va) > 1 else float("nan")
    sd_b = float(vb.std(ddof=1)) if len(vb) > 1 else float("nan")
    delta = float(vb.mean() - va.mean()) if len(va) and len(vb) else float("nan")
    se = math.sqrt(sd_a ** 2 / len(va) + sd_b ** 2 / len(vb)) if len(va) > 1 and len(vb) > 1 else float("nan")
    if len(va) < 2 or len(vb) < 2:
        verdict = "inseparable"
        note = f"seed spread not measured ({len(va)} seed(s) of {a}, {len(vb)} of {b}; need >= 2 each)"
    else:
        apart = vb.min() > va.max() or vb.max() < va.min()
        if apart and abs(delta) > 2 * se:
            verdict = "reproduced" if np.sign(delta) == direction else "reversed"
            note = f"seed ranges apart, |Δ| = {abs(delta):.3g} > 2·se = {2 * se:.3g}"
        else:
            verdict = "inseparable"
            note = ("seed ranges overlap" if not apart else f"|Δ| = {abs(delta):.3g} <= 2·se = {2 * se:.3g}")
    return {"delta": delta, "sd_a": sd_a, "sd_b": sd_b, "se": se, "verdict": verdict, "note": note}


def verdicts(per_seed: pd.DataFrame, a: str, b: str, findings: Sequence[Finding] = FINDINGS,
             runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per finding and metric: the statistic per seed of both styles and the verdict.

    ``per_seed``: columns ``style``, ``seed``, ``layer``, ``modality``, ``metric``, ``value`` (a seed
    table, or live profiles with one seed each); ``a``: the LLaVA-style model, ``b``: the
    OmniFusion-style one. Columns: finding, claim, metric, statistic, seeds_a, seeds_b (the
    statistic of every seed, in seed order), mean_a, mean_b, delta, sd_a, sd_b, se, direction,
    verdict, note — over every seed of the table.

    ``runs`` (the seed ledger, :func:`read_seed_runs`) adds the same verdict over the seeds that met
    the accuracy bar only — ``below_bar_a``/``below_bar_b`` (the seeds left out), ``verdict_bar``,
    ``note_bar`` — so a reader sees whether the verdict depends on which seeds learned the task best.
    A seed of the table that the ledger does not list is refused (its accuracy is unknown).
    """
    for s in (a, b):
        if s not in set(per_seed["style"]):
            raise ValueError(f"no profile of {s!r} among {sorted(set(per_seed['style']))}")
    passing: dict[str, set[int]] = {}
    if runs is not None:
        for s in (a, b):
            listed = runs[runs["style"] == s]
            unknown = set(per_seed.loc[per_seed["style"] == s, "seed"]) - set(listed["seed"])
            if unknown:
                raise ValueError(f"the seed ledger has no row for {s} seed(s) {sorted(unknown)}: evaluate them with "
                                 f"`python -m microscope.zoo seeds --seeds ... --styles {s}`, or pass runs=None")
            passing[s] = set(listed.loc[listed["meets_bar"], "seed"])
    rows = []
    for f in findings:
        for m in f.metrics:
            stats: dict[str, dict[int, float]] = {}
            for s in (a, b):
                d = per_seed[per_seed["style"] == s]
                stats[s] = {int(k): statistic(g, m, f.statistic) for k, g in d.groupby("seed")}
            va, vb = np.array(list(stats[a].values())), np.array(list(stats[b].values()))
            row = {"finding": f.key, "claim": f.claim, "metric": m, "statistic": f.statistic,
                   "seeds_a": [round(x, 4) for x in va], "seeds_b": [round(x, 4) for x in vb],
                   "mean_a": float(va.mean()), "mean_b": float(vb.mean()),
                   **_separate(va, vb, f.direction, a, b), "direction": f.direction}
            if runs is not None:
                ka, kb = ([k for k in stats[s] if k in passing[s]] for s in (a, b))
                bar = _separate(np.array([stats[a][k] for k in ka]), np.array([stats[b][k] for k in kb]),
                                f.direction, a, b)
                row["below_bar_a"], row["below_bar_b"] = ([k for k in stats[s] if k not in passing[s]] for s in (a, b))
                row["verdict_bar"], row["note_bar"] = bar["verdict"], bar["note"]
            rows.append(row)
    return pd.DataFrame(rows)


def finding_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """One verdict per finding from :func:`verdicts`: ``reproduced``/``reversed`` when every
    metric of the finding says so, else ``inseparable`` (mixed metrics included); the same for
    ``verdict_bar`` when the table has it (:func:`verdicts` with ``runs``)."""
    out = []
    for key, g in table.groupby("finding", sort=False):
        v = set(g.verdict)
        row = {"finding": key, "claim": g.claim.iloc[0], "verdict": v.pop() if len(v) == 1 else "inseparable",
               "metrics": "; ".join(f"{r.metric}: Δ={r.delta:+.3g} ({r.verdict})" for r in g.itertuples())}
        if "verdict_bar" in g:
            vb = set(g.verdict_bar)
            row["verdict_bar"] = vb.pop() if len(vb) == 1 else "inseparable"
        out.append(row)
    return pd.DataFrame(out)


def seed_profile(handle, style: str, seed: int, samples: Sequence | None = None) -> pd.DataFrame:
    """The per-seed table rows of one trained model: :func:`microscope.geometry.profile` (no
    intervals) of its residual stream on :data:`SEED_SAMPLES`, columns :data:`SEED_COLUMNS`."""
    import tempfile

    from microscope import geometry
    from microscope.data import shapes
    from microscope.extract import extract

    samples = shapes.generate(SEED_SAMPLES["n"], SEED_SAMPLES["seed"]) if samples is None else samples
    with tempfile.TemporaryDirectory() as tmp:
        store = extract(handle, samples, Path(tmp) / "store", batch_size=16, progress=False)
        df = geometry.profile(store, n_splits=0, seed=0, progress=False)
    df["style"], df["seed"] = style, seed
    return df[SEED_COLUMNS]


def write_seed_table(df: pd.DataFrame, folder: str | Path = SEED_TABLES, command: str = "") -> Path:
    """Write one style/seed's rows to ``folder/{style}-seed{seed}.csv`` (a ``# command`` header
    line names what made it); returns the path."""
    styles, seeds = set(df["style"]), set(df["seed"])
    if len(styles) != 1 or len(seeds) != 1:
        raise ValueError(f"one style and seed per table, got styles {styles} and seeds {seeds}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{styles.pop()}-seed{seeds.pop()}.csv"
    with path.open("w") as f:
        f.write(f"# made by: {command}\n" if command else "")
        df[SEED_COLUMNS].to_csv(f, index=False, float_format="%.6g")
    return path


def seed_run(style: str, seed: int, report: dict, failures: Sequence[str],
             train_seconds: float | None = None) -> dict:
    """One ledger row (:data:`SEED_RUN_COLUMNS`) from an accuracy report
    (:func:`microscope.zoo.evaluation.evaluate`) and its bar failures
    (:func:`microscope.zoo.evaluation.bar_failures`)."""
    worst = min(report["per_category"], key=report["per_category"].get)
    return {"style": style, "seed": int(seed), "overall": report["overall"], "worst_category": worst,
            "worst_accuracy": report["per_category"][worst], "blank_overall": report["blank_overall"],
            "question_only_prior": report["question_only_prior"], "n_eval": report["n"],
            "meets_bar": not failures, "failures": "; ".join(failures),
            "train_seconds": float("nan") if train_seconds is None else float(train_seconds)}


def write_seed_run(row: dict, path: str | Path = SEED_RUNS) -> pd.DataFrame:
    """Insert or replace the ``(style, seed)`` row of the seed ledger at ``path``; returns the ledger.

    Every trained seed is recorded with its accuracy, including those below the accuracy bar: the
    pass rate of the recipe is part of the result, and :func:`verdicts` reads the ledger to give
    its verdict over the seeds that met the bar beside the one over all seeds."""
    missing = set(SEED_RUN_COLUMNS) - set(row)
    if missing:
        raise ValueError(f"a seed-run row needs {sorted(missing)}")
    runs = read_seed_runs(path)
    runs = runs[~((runs["style"] == row["style"]) & (runs["seed"] == row["seed"]))]
    runs = pd.concat([runs, pd.DataFrame([row])[SEED_RUN_COLUMNS]], ignore_index=True) if len(runs) else \
        pd.DataFrame([row])[SEED_RUN_COLUMNS]
    runs = runs.sort_values(["style", "seed"], ignore_index=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    runs.to_csv(path, index=False, float_format="%.4g")
    return runs


def read_seed_runs(path: str | Path = SEED_RUNS) -> pd.DataFrame:
    """The seed ledger (columns :data:`SEED_RUN_COLUMNS`; empty when there is none)."""
    if not Path(path).is_file():
        return pd.DataFrame(columns=SEED_RUN_COLUMNS)
    runs = pd.read_csv(path, dtype={"failures": str, "worst_category": str})
    runs["failures"] = runs["failures"].fillna("")
    runs["meets_bar"] = runs["meets_bar"].astype(bool)
    return runs[SEED_RUN_COLUMNS]


def pass_rates(runs: pd.DataFrame) -> pd.DataFrame:
    """Per style: seeds trained, seeds that met the accuracy bar, their fraction, and which
    seeds failed with what."""
    rows = []
    for style, g in runs.groupby("style", sort=True):
        bad = g[~g["meets_bar"]]
        rows.append({"style": style, "trained": len(g), "met_bar": int(g["meets_bar"].sum()),
                     "pass_rate": float(g["meets_bar"].mean()),
                     "failed": "; ".join(f"seed {r.seed}: {r.failures}" for r in bad.itertuples())})
    return pd.DataFrame(rows, columns=["style", "trained", "met_bar", "pass_rate", "failed"])


def read_seed_tables(folder: str | Path = SEED_TABLES, styles: Sequence[str] | None = None) -> pd.DataFrame:
    """All per-seed tables in ``folder`` (columns :data:`SEED_COLUMNS`), optionally of ``styles``
    only; empty (with the columns) when there are none."""
    files = sorted(Path(folder).glob("*-seed*.csv")) if Path(folder).is_dir() else []
    frames = [pd.read_csv(p, comment="#") for p in files]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SEED_COLUMNS)
    return df[df["style"].isin(styles)] if styles is not None else df
