"""Ground truth for visual-token attribution, and scores that can fail an attribution.

    truth = patch_truth(samples, min_coverage=0.15)          # per sample × patch: coverage, owner, truth
    table = truth.merge(scores, on=["sample_id", "patch"])   # one column per attribution method
    per = score_samples(table, methods)                      # per sample × method × metric
    summ = summarize(per)                                    # mean, 95% CI, objectness baseline, chance

**Patch truth.** A patch ``j`` of the ``g × g`` grid belongs to the answer when the referred
object(s) cover at least ``min_coverage`` of its area: ``c_j = |referred pixels in j| / p²`` (the
Shapes world knows every object's pixels; :meth:`~microscope.data.shapes.Sample.patch_coverage`),
``truth_j = [c_j ≥ θ]`` (θ = 0.15 by default: a patch holding a sliver of an object is background
to the vision tower). With ``truth="coverage"`` the weight of patch ``j`` is ``c_j`` itself. Each
patch also has an **owner**: the object covering most of it, if that object covers ≥ θ (else
background, ``-1``). Real data sets know only referred boxes: their referred patches get
``c_j = 1`` and there are no other objects.

**Scores** (per sample, then averaged; ``s`` the method's patch scores, ``w`` the truth weights):

- ``precision@k``: of the ``k = |{j : truth_j}|`` top-scoring patches, the truth they hold,
  ``Σ_{j∈top-k(s)} w_j / Σ_{j∈top-k(w)} w_j`` (with binary truth: the share that are truth).
  Tied scores at the cut share the remaining places (the expectation over orders of the ties),
  so a constant score scores chance, not the first patches' truth.
- ``top-1``: the same with ``k = 1``: is the best-scoring patch truth?
- ``ROC-AUC``: ``Σ_{i,j} (w_i − w_j)⁺ H(s_i − s_j) / Σ_{i,j} (w_i − w_j)⁺`` with ``H`` the step
  function (``H(0) = ½``): with binary truth, the probability that a truth patch outscores a
  background one.
- ``referred-vs-distractor``: the same AUC among **object patches only** — patches owned by a
  referred object against patches owned by another object (samples with no other object are
  left out). A question-blind score (where objects are) scores ½ here by construction, so
  this is the score that separates attribution from objectness.

**Chance** is each score's expectation under a random order of the patches: ``k·mean(w) /
Σ_{top-k(w)} w`` for precision@k (``|truth| / n`` with binary truth), ``mean(w) / max(w)`` for
top-1, ½ for both AUCs. **Baselines**: every score is reported next to the same score of the
question-blind **objectness** methods (:func:`microscope.attribution.objectness_scores`: where
the tower sees anything, and the oracle ``coverage by any object``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from microscope.results import normal_ci

METRICS = ("precision@k", "top-1", "roc_auc", "referred_vs_distractor")
#: question-blind baseline methods, scored like any other
OBJECTNESS = ("objectness", "objectness (oracle)")
TRUTH_COLUMNS = ["sample_id", "category", "patch", "coverage", "owner", "owner_referred", "truth", "n_referred",
                 "objectness (oracle)"]


def _owners(per: np.ndarray, min_coverage: float) -> np.ndarray:
    """Per patch, the object covering most of it (rows of ``per``: each object's coverage) if that
    covers ≥ ``min_coverage`` of the patch, else -1."""
    return np.where(per.max(0) >= max(min_coverage, 1e-12), per.argmax(0), -1)


def object_owners(sample, min_coverage: float = 0.15) -> np.ndarray:
    """Per patch of a Shapes sample, the index of the object covering most of it if it covers
    ≥ ``min_coverage`` of the patch, else -1 (:func:`patch_truth`'s ``owner``)."""
    return _owners(np.stack([sample.patch_coverage([i]) for i in range(len(sample.objects))]), min_coverage)


def patch_truth(samples: Sequence, min_coverage: float = 0.15, n_patches: int | None = None) -> pd.DataFrame:
    """Per sample × patch: ``coverage`` (of the patch's area, by the referred objects), ``owner``
    (index of the object covering most of the patch if it covers ≥ ``min_coverage``, else -1),
    ``owner_referred``, ``truth`` (``coverage ≥ min_coverage``, and > 0), ``n_referred`` and
    ``objectness (oracle)`` (coverage by any object). Samples without objects (real data) give
    their referred patches coverage 1 and owner 0; ``n_patches`` is then the grid's size."""
    if not 0.0 <= min_coverage <= 1.0:
        raise ValueError(f"min_coverage must be a fraction in [0, 1], got {min_coverage!r}")
    rows = []
    for s in samples:
        objs = getattr(s, "objects", None)
        if objs is not None and hasattr(s, "patch_coverage"):
            per = np.stack([s.patch_coverage([i]) for i in range(len(objs))]) if objs else \
                np.zeros((1, s.grid * s.grid))
            cov = s.patch_coverage()
            owner = _owners(per, min_coverage)
            referred = set(s.referred)
            any_cov = per.sum(0)
            n_ref = len(referred)
        else:
            grid = getattr(s, "grid", None)
            n = n_patches or (grid[0] * grid[1] if isinstance(grid, tuple) else (grid or 0) ** 2)
            if not n:
                raise ValueError(f"sample {s.id!r} has no patch grid: pass n_patches or give samples a grid")
            cov = np.zeros(n)
            cov[list(s.referred_patches())] = 1.0
            owner = np.where(cov > 0, 0, -1)
            referred, any_cov, n_ref = {0}, cov, int(cov.any())
        for j in range(len(cov)):
            rows.append({"sample_id": s.id, "category": getattr(s, "category", ""), "patch": j,
                         "coverage": float(cov[j]), "owner": int(owner[j]),
                         "owner_referred": bool(owner[j] >= 0 and int(owner[j]) in referred),
                         "truth": bool(cov[j] > 0 and cov[j] >= min_coverage), "n_referred": n_ref,
                         "objectness (oracle)": float(any_cov[j])})
    return pd.DataFrame(rows, columns=TRUTH_COLUMNS)


def precision_at_k(score: np.ndarray, weight: np.ndarray, k: int) -> float:
    """``Σ_{top-k(score)} w / Σ_{top-k(w)} w``, ties at the cut sharing the remaining places."""
    s, w = np.asarray(score, dtype=float), np.asarray(weight, dtype=float)
    if not 1 <= k <= len(s):
        raise ValueError(f"k must lie in 1..{len(s)}, got {k}")
    best = np.sort(w)[::-1][:k].sum()
    if best <= 0:
        return float("nan")
    cut = np.sort(s)[::-1][k - 1]
    above, tie = s > cut, s == cut
    got = w[above].sum() + (k - above.sum()) * w[tie].mean()
    return float(got / best)


def auc(score: np.ndarray, weight: np.ndarray) -> float:
    """``Σ_{i,j} (w_i − w_j)⁺ H(s_i − s_j) / Σ_{i,j} (w_i − w_j)⁺``, ``H(0) = ½`` (the ROC-AUC
    for binary weights); NaN when all weights are equal."""
    s, w = np.asarray(score, dtype=float), np.asarray(weight, dtype=float)
    dw = np.clip(w[:, None] - w[None, :], 0, None)
    tot = dw.sum()
    if tot <= 0:
        return float("nan")
    ds = s[:, None] - s[None, :]
    h = (ds > 0) + 0.5 * (ds == 0)
    return float((dw * h).sum() / tot)


def _sample_scores(g: pd.DataFrame, method: str, truth: str) -> dict[str, tuple[float, float]]:
    """(value, chance) of each metric for one sample's rows."""
    s = g[method].to_numpy(dtype=float)
    w = g.truth.to_numpy(dtype=float) if truth == "binary" else np.clip(g.coverage.to_numpy(dtype=float), 0, 1)
    k = int(g.truth.sum())
    out: dict[str, tuple[float, float]] = {}
    if k == 0 or not (w > 0).any():
        return out
    best = np.sort(w)[::-1][:k].sum()
    out["precision@k"] = (precision_at_k(s, w, k), k * w.mean() / best)
    out["top-1"] = (precision_at_k(s, w, 1), w.mean() / w.max())
    out["roc_auc"] = (auc(s, w), 0.5)
    own = g.owner.to_numpy()
    obj = own >= 0
    ref = g.owner_referred.to_numpy(dtype=bool)
    if (obj & ref).any() and (obj & ~ref).any():
        out["referred_vs_distractor"] = (auc(s[obj], ref[obj].astype(float)), 0.5)
    return out


def score_samples(table: pd.DataFrame, methods: Sequence[str], truth: str = "binary") -> pd.DataFrame:
    """Every metric of every method on every sample of ``table`` (:func:`patch_truth` columns plus
    one score column per method; one row per sample × patch). ``truth``: ``"binary"`` (patches
    covered ≥ the threshold) or ``"coverage"`` (weights ``c_j``). Samples without truth patches
    are left out. Columns: ``sample_id, category, n_referred, method, metric, value, chance``."""
    if truth not in ("binary", "coverage"):
        raise ValueError(f"truth must be 'binary' or 'coverage', got {truth!r}")
    missing = [m for m in methods if m not in table.columns]
    if missing:
        raise ValueError(f"no score column for method(s) {missing}; columns are {list(table.columns)}")
    rows = []
    for sid, g in table.groupby("sample_id", sort=False):
        g = g.sort_values("patch")
        for m in methods:
            if g[m].isna().all():
                continue
            for metric, (v, ch) in _sample_scores(g, m, truth).items():
                rows.append({"sample_id": sid, "category": g.category.iloc[0], "n_referred": int(g.n_referred.iloc[0]),
                             "method": m, "metric": metric, "value": v, "chance": ch})
    return pd.DataFrame(rows, columns=["sample_id", "category", "n_referred", "method", "metric", "value", "chance"])


def summarize(per: pd.DataFrame, by: Sequence[str] = ("method", "metric"),
              baselines: Sequence[str] = OBJECTNESS) -> pd.DataFrame:
    """Mean of each score per group of ``by``, with a 95% normal CI over samples, the number of
    samples, the chance level, and ``objectness``: the best question-blind baseline's mean score
    (over ``baselines`` present) on the same samples. Columns: ``*by, value, ci_low, ci_high,
    n_samples, chance, objectness, over_objectness``."""
    keys = list(by)
    g = per.groupby(keys, sort=False)
    out = g.agg(value=("value", "mean"), sd=("value", "std"), n_samples=("value", "size"),
                chance=("chance", "mean")).reset_index()
    out["ci_low"], out["ci_high"] = normal_ci(out.value, out.sd, out.n_samples)
    base_keys = [k for k in keys if k != "method"]
    base = per[per.method.isin(list(baselines))]
    if not len(base):
        out["objectness"] = np.nan
    elif base_keys:
        best = (base.groupby([*base_keys, "method"], sort=False).value.mean().groupby(level=base_keys).max()
                .rename("objectness").reset_index())
        out = out.merge(best, on=base_keys, how="left")
    else:
        out["objectness"] = base.groupby("method").value.mean().max()
    out["over_objectness"] = out.value - out.objectness
    return out[[*keys, "value", "ci_low", "ci_high", "n_samples", "chance", "objectness", "over_objectness"]]


def shuffled(table: pd.DataFrame, method: str, seed: int = 0, name: str | None = None) -> pd.DataFrame:
    """``table`` with a column ``name`` (default ``"<method> (shuffled)"``): ``method``'s scores
    permuted at random among each sample's patches — a deliberately wrong attribution with the
    same score distribution, which every metric must put at chance."""
    rng = np.random.default_rng(seed)
    out = table.copy()
    col = out[method].to_numpy().copy()
    for idx in out.groupby("sample_id", sort=False).indices.values():
        col[idx] = col[idx][rng.permutation(len(idx))]
    out[name or f"{method} (shuffled)"] = col
    return out
