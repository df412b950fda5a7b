"""Known-answer tests of the geometry metrics, and the store profile."""

from __future__ import annotations

import re

import numpy as np
import pytest
import skdim
import torch

from microscope import geometry as G
from microscope.data import shapes
from microscope.extract import extract


def linear_manifold(n: int, k: int, D: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, k)) @ rng.standard_normal((k, D))


def sphere(n: int, k: int, D: int, seed: int) -> np.ndarray:
    """The unit k-sphere (curved, intrinsic dimension k), randomly rotated into R^D."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, k + 1))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    q, _ = np.linalg.qr(rng.standard_normal((D, k + 1)))
    return z @ q.T


@pytest.mark.parametrize("k", [2, 5, 10])
@pytest.mark.parametrize("make", [linear_manifold, sphere])
def test_intrinsic_dimension_known_answers(k, make):
    X = make(4000, k, 96, seed=k)
    ours = G.intrinsic_dimension(X, "twonn")
    assert abs(ours - k) <= 0.10 * k, ours
    ref = skdim.id.TwoNN(discard_fraction=0.1).fit(X).dimension_
    assert abs(ours - ref) <= 0.05 * ref, (ours, ref)
    ml = G.intrinsic_dimension(X, "mle")
    assert abs(ml - k) <= 0.10 * k, ml


def test_id_deduplicates_and_rejects_tiny_inputs():
    X = linear_manifold(1000, 3, 64, seed=0)
    assert G.twonn(np.vstack([X, X[:300]])) == pytest.approx(G.twonn(X))  # duplicates would give r1 = 0
    with pytest.raises(ValueError, match="at least 10 distinct points"):
        G.twonn(X[:5])
    with pytest.raises(ValueError, match="method"):
        G.intrinsic_dimension(X, "pca")


def test_linearity_known_answers():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 32))
    W = rng.standard_normal((32, 32))
    assert G.linearity(X, X @ W) == pytest.approx(1.0, abs=1e-6)
    assert G.linearity(X, X @ W + 5.0) == pytest.approx(1.0, abs=1e-6)  # constants are centred away
    assert G.linearity_without_residual(X, X + X @ W) == pytest.approx(1.0, abs=1e-6)
    # independent noise: at its chance level rank(X)/(n-1), and so is the permutation baseline
    Xn, Yn = rng.standard_normal((4000, 32)), rng.standard_normal((4000, 32))
    chance = 32 / 3999
    assert G.linearity(Xn, Yn) == pytest.approx(chance, rel=0.35)
    assert G.linearity_baseline(Xn, Yn, n_perm=3) == pytest.approx(chance, rel=0.35)
    # n <= d: any Y is "linear" -- the reason a baseline is always reported
    assert G.linearity(rng.standard_normal((20, 64)), rng.standard_normal((20, 64))) == pytest.approx(1.0, abs=1e-9)
    # a non-linear map scores well below 1 but above chance
    Z = np.tanh(3 * X @ W / np.sqrt(32))
    assert chance < G.linearity(X, Z) < 0.9
    # agrees with numpy's least squares
    Yp = X @ W + 0.5 * rng.standard_normal((600, 32))
    xs, ys = X - X.mean(0), Yp - Yp.mean(0)
    xs, ys = xs / np.linalg.norm(xs), ys / np.linalg.norm(ys)
    A = np.linalg.lstsq(xs, ys, rcond=None)[0]
    assert G.linearity(X, Yp) == pytest.approx(1 - np.linalg.norm(xs @ A - ys) ** 2, abs=1e-10)
    with pytest.raises(ValueError, match="same number of rows"):
        G.linearity(X, X[:10])


def test_anisotropy_known_answers():
    rng = np.random.default_rng(1)
    v = rng.standard_normal(48)
    rank1 = rng.standard_normal((500, 1)) * v
    assert G.anisotropy(rank1, "pc1") == pytest.approx(1.0, abs=1e-9)
    iso = rng.standard_normal((20000, 32))
    assert G.anisotropy(iso, "pc1") == pytest.approx(1 / 32, rel=0.15)
    assert abs(G.anisotropy(iso, "cosine")) < 0.01
    shifted = iso + 100.0
    assert G.anisotropy(shifted, "cosine") > 0.99
    assert G.anisotropy(shifted, "pc1") == pytest.approx(G.anisotropy(iso, "pc1"), rel=1e-6)
    # the power iteration equals a full SVD
    X = rng.standard_normal((700, 300)) * np.linspace(0.1, 3, 300)
    s = np.linalg.svd(X - X.mean(0), compute_uv=False)
    assert G.pc1_ratio(X) == pytest.approx(s[0] ** 2 / (s ** 2).sum(), rel=1e-8)
    Xw = rng.standard_normal((80, 500)) * np.linspace(0.1, 3, 500)  # n < d branch
    s = np.linalg.svd(Xw - Xw.mean(0), compute_uv=False)
    assert G.pc1_ratio(Xw) == pytest.approx(s[0] ** 2 / (s ** 2).sum(), rel=1e-8)
    # cosine = brute-force mean over distinct pairs
    Y = rng.standard_normal((50, 8)) + 0.5
    U = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    C = U @ U.T
    assert G.mean_cosine(Y) == pytest.approx((C.sum() - np.trace(C)) / (50 * 49), abs=1e-12)
    with pytest.raises(ValueError, match="kind"):
        G.anisotropy(Y, "pc2")


def test_torch_and_numpy_inputs_agree():
    X = linear_manifold(500, 4, 32, seed=3)
    assert G.twonn(torch.tensor(X, dtype=torch.float32)) == pytest.approx(G.twonn(X.astype(np.float32)))
    assert G.pc1_ratio(torch.tensor(X)) == pytest.approx(G.pc1_ratio(X))


def test_balanced_sampling():
    idx = G.balanced_indices(["a"] * 10 + ["b"] * 4 + ["a"] * 5)
    assert {k: len(v) for k, v in idx.items()} == {"a": 4, "b": 4}
    with pytest.raises(ValueError, match="exceeds the smallest group"):
        G.balanced_indices(["a", "b"], n=3)


def test_confidence_interval_contains_estimate_and_rejects_bad_input():
    X = linear_manifold(1500, 5, 64, seed=4)
    est = G.twonn(X)
    lo, hi = G.confidence_interval(G.twonn, X, n_splits=10)
    assert lo < est < hi and hi - lo < 0.2 * est
    assert (hi + lo) / 2 == pytest.approx(est, rel=1e-12)  # centred on the estimate
    with pytest.raises(ValueError, match="groups has 3 entries"):
        G.confidence_interval(G.twonn, X, groups=[0, 1, 2])
    with pytest.raises(ValueError, match="at least 4 groups"):
        G.confidence_interval(G.twonn, X, groups=np.arange(len(X)) % 3)


def _sphere3(rng, n):
    z = rng.standard_normal((n, 4))
    return (z / np.linalg.norm(z, axis=1, keepdims=True) @ np.linalg.qr(rng.standard_normal((12, 4)))[0].T,)


def _pair(rng, n):
    x = rng.standard_normal((n, 6))
    return x, x @ (0.4 * np.ones((6, 6))) + rng.standard_normal((n, 6))


COVERAGE = {  # metric: (estimator, data of n rows drawn from one known distribution)
    "id_twonn": (G.twonn, _sphere3),
    "id_mle": (lambda x: G.mle(x, k=10), _sphere3),
    "anisotropy_pc1": (G.pc1_ratio, lambda rng, n: (rng.standard_normal((n, 8)) * np.r_[2.5, np.linspace(0.5, 1, 7)],)),
    "anisotropy_cosine": (G.mean_cosine, lambda rng, n: (rng.standard_normal((n, 8)) + 0.4,)),
    "linearity": (G.linearity, _pair),
    "linearity_wo_residual": (G.linearity_without_residual, _pair),
}


@pytest.mark.slow
@pytest.mark.parametrize("metric", list(COVERAGE))
def test_interval_coverage_by_simulation(metric):
    """The nominal 95 % interval covers the estimator's expected value at this n (the mean over
    600 further draws: s.e. 4 % of the estimator's spread) in 90–99 % of 200 draws (binomial
    s.e. 1.5 %: a correct method falls outside with probability ≪ 1 %).
    ``benchmarks/interval_coverage.py`` prints these numbers beside those of percentile intervals."""
    fn, draw = COVERAGE[metric]
    cov = G.interval_coverage(fn, draw, n=200)
    assert 0.90 <= cov <= 0.99, (metric, cov)


@pytest.mark.slow
def test_interval_resamples_whole_samples():
    """Tokens of one sample share a sample effect: resampling whole samples covers, resampling
    tokens as if independent does not (its interval is too narrow)."""
    n_groups, per = 40, 6
    groups = np.repeat(np.arange(n_groups), per)

    def draw(rng, n):
        return (rng.standard_normal((n_groups, 8)).repeat(per, 0) * 0.8 + rng.standard_normal((n, 8)) + 0.3,)

    by_sample = G.interval_coverage(G.mean_cosine, draw, n=n_groups * per, groups=groups)
    by_token = G.interval_coverage(G.mean_cosine, draw, n=n_groups * per)
    assert 0.90 <= by_sample <= 0.99 and by_token < 0.85, (by_sample, by_token)


def test_profile_of_a_store(handles, tmp_path):
    h = handles["llava15"]
    store = extract(h, shapes.generate(40, seed=1), tmp_path / "s", batch_size=20, progress=False)
    df = G.profile(store, n_splits=3, progress=False)
    assert set(df.columns) == {"model", "layer", "modality", "metric", "value", "ci_low", "ci_high", "n", "n_samples",
                               "baseline"}
    assert (df.ci_low <= df.value).all() and (df.value <= df.ci_high).all()  # bands contain their estimates
    assert (df.n_samples == 40).all()
    assert set(df.modality) == {"image", "text"} and set(df.metric) == set(G.METRICS)
    assert df.groupby("modality").n.first().nunique() == 1  # the same n for every modality
    lin = df[df.metric == "linearity"]
    assert sorted(lin.layer.unique()) == store.layers[:-1]
    assert (lin.value >= lin.baseline - 1e-9).all()
    pc1 = df[df.metric == "anisotropy_pc1"]
    assert (pc1.value >= pc1.baseline).all() and (pc1.value <= 1).all()
    with pytest.raises(ValueError, match="unknown metric"):
        G.profile(store, metrics=["curvature"])


def test_panel_overlays_two_models():
    import matplotlib

    matplotlib.use("Agg")
    from microscope.plotting import geometry_panel, metric_by_layer

    rows = []
    for model in ("a", "b"):
        for role in ("image", "text"):
            for layer in range(3):
                for metric in ("linearity", "id_twonn"):
                    rows.append({"model": model, "layer": layer, "modality": role, "metric": metric,
                                 "value": layer + 1.0,
                                 "ci_low": layer + 0.5, "ci_high": layer + 1.5, "n": 10,
                                 "baseline": 0.1 if metric == "linearity" else float("nan")})
    df = __import__("pandas").DataFrame(rows)
    fig = metric_by_layer(df, "linearity")
    ax = fig.axes[0]
    labelled = [ln for ln in ax.lines if not ln.get_label().startswith("_")]
    assert len(labelled) == 4 and len(ax.lines) == 8  # 2 models x 2 modalities, each with its baseline
    styles = {ln.get_linestyle() for ln in ax.lines if ln.get_marker() == "o"}
    assert styles == {"-", "--"}  # one line style per model
    assert len(geometry_panel(df).axes) == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nearest_neighbours_equal_brute_force(dtype):
    rng = np.random.default_rng(4)
    X = (rng.standard_normal((1300, 6)) @ rng.standard_normal((6, 80)) + 0.05 * rng.standard_normal((1300, 80)))
    X[:, 3] += 500.0  # a large common offset in one dimension, as in LLM hidden states
    X = X.astype(dtype)
    from scipy.spatial.distance import cdist

    D = cdist(X.astype(np.float64), X.astype(np.float64))
    np.fill_diagonal(D, np.inf)
    ref = np.sort(D, axis=1)[:, :5]
    for chunk in (256, 500, 4096):  # several blocks, uneven last block, one block
        got = G.knn_distances(X, 5, chunk=chunk).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)


def test_linearity_fast_paths_agree_with_least_squares():
    rng = np.random.default_rng(6)

    def lstsq_score(X, Y):
        xs, ys = X - X.mean(0), Y - Y.mean(0)
        xs, ys = xs / np.linalg.norm(xs), ys / np.linalg.norm(ys)
        A = np.linalg.lstsq(xs, ys, rcond=None)[0]
        return 1 - np.linalg.norm(xs @ A - ys) ** 2

    # n - 1 <= d with full rank: the centred fit is exact
    X, Y = rng.standard_normal((60, 64)), rng.standard_normal((60, 16))
    assert G.linearity(X, Y) == 1.0
    # n <= d but rank-deficient (rank 10): falls back to the eigen-decomposition
    Xr = rng.standard_normal((60, 10)) @ rng.standard_normal((10, 64))
    assert G.linearity(Xr, Y) == pytest.approx(lstsq_score(Xr, Y), abs=1e-9)
    assert G.linearity(Xr, Y) < 0.5
    # n > d, full column rank: Cholesky path
    X2, Y2 = rng.standard_normal((500, 40)), rng.standard_normal((500, 40))
    assert G.linearity(X2, Y2) == pytest.approx(lstsq_score(X2, Y2), abs=1e-10)
    # n > d with collinear columns: Cholesky refused, eigen path
    X3 = np.hstack([X2, X2[:, :5] * 2.0])
    assert G.linearity(X3, Y2) == pytest.approx(lstsq_score(X3, Y2), abs=1e-9)
    # wide enough for the Gram matrix in blocks (300 columns), on the Cholesky and the eigen paths
    X4, Y4 = rng.standard_normal((700, 300)), rng.standard_normal((700, 300))
    assert G.linearity(X4, Y4) == pytest.approx(lstsq_score(X4, Y4), abs=1e-10)
    X5 = rng.standard_normal((700, 20)) @ rng.standard_normal((20, 300))
    assert G.linearity(X5, Y4) == pytest.approx(lstsq_score(X5, Y4), abs=1e-9)


@pytest.mark.parametrize("shape", [(513, 300), (40, 257), (300, 1030), (90, 60)])
def test_gram_in_blocks_is_the_full_product(shape):
    """Each entry of a float64 ``ZᵀZ`` computed any way is within ``γ_n (|Z|ᵀ|Z|)_ij`` of the exact
    one (``γ_n = n·u/(1 − n·u)``, u = 2⁻⁵³, whatever the BLAS's summation order), so two ways
    differ by at most twice that."""
    z = torch.tensor(np.random.default_rng(shape[1]).standard_normal(shape))
    g, ref = G._gram(z), z.T @ z
    u = 2.0 ** -53
    bound = 2 * (shape[0] * u / (1 - shape[0] * u)) * (z.abs().T @ z.abs())
    assert ((g - ref).abs() <= bound).all()


def with_spectrum(n: int, d: int, lam: np.ndarray, seed: int) -> np.ndarray:
    """(n, d) data whose centred Gram matrix has exactly the eigenvalues ``lam`` (then zeros):
    ``U diag(√λ) Vᵀ`` with U's columns orthonormal and orthogonal to 1, V's orthonormal."""
    rng = np.random.default_rng(seed)
    r = len(lam)
    a = rng.standard_normal((n, r))
    u = np.linalg.qr(a - a.mean(0))[0]
    v = np.linalg.qr(rng.standard_normal((d, r)))[0]
    return (u * np.sqrt(lam)) @ v.T + 7.0  # an offset that centring removes


def svd_pc1(X: np.ndarray) -> float:
    x = X.astype(np.float64)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    return float(s[0] ** 2 / (s ** 2).sum())


def _decay(r: int, head: list[float]) -> np.ndarray:
    return np.concatenate([head, 0.5 * np.linspace(1.0, 0.01, r - len(head))])


PC1_CASES = {  # name: (n, d, eigenvalues of the centred Gram)
    "gap 1e-3, tall": (900, 300, _decay(280, [1.0, 1 - 1e-3])),
    "gap 1e-6, tall": (900, 300, _decay(280, [1.0, 1 - 1e-6])),
    "gap 1e-6, wide": (300, 900, _decay(280, [1.0, 1 - 1e-6])),
    "cluster of 20 within 1e-6": (600, 400, _decay(350, list(1 - 1e-6 * np.linspace(0, 1, 20)))),
    "small (exact path)": (200, 100, _decay(90, [1.0, 1 - 1e-6])),
    "slow decay (linspace scales)": (700, 300, np.linspace(0.1, 3, 300)[::-1] ** 2),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", list(PC1_CASES))
def test_pc1_ratio_certified_accuracy(case, dtype, threads):
    """The documented bound: |λ̂₁ − λ₁| ≤ rtol·λ₁, plus float64 rounding of the reference and of
    Σλ (≤ 64·min(n, d)·2⁻⁵³ relative, far above what either sum actually loses) — on any CPU,
    thread count and eigenvalue gap. Float32 input is compared with the float64 SVD of the
    float32 values themselves (the cast moves the spectrum by ~1e-7, which is not our error)."""
    n, d, lam = PC1_CASES[case]
    X = with_spectrum(n, d, lam, seed=len(case)).astype(dtype)
    ref = svd_pc1(X)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rtol in (1e-10, 1e-6):
            got = G.pc1_ratio(X, rtol=rtol)
            bound = rtol + 64 * min(n, d) * np.finfo(np.float64).eps
            assert abs(got - ref) <= bound * ref, (case, rtol, got, ref, abs(got - ref) / ref)
            if dtype == np.float64:  # the construction's own answer, exact up to its rounding
                assert abs(got - lam.max() / lam.sum()) <= bound * ref
    finally:
        torch.set_num_threads(old)


def test_nearest_neighbours_certified_under_float32_ties():
    """Neighbour distances that differ below float32 resolution (1e-9 relative, on points far
    from the centre): float32 cannot rank them, so the candidates may be the wrong ones; the
    certificate must catch every such row and recompute it exactly."""
    rng = np.random.default_rng(8)
    d, m = 32, 40
    centre = np.zeros(d)
    centre[0] = 1e4  # far from the data's centre: float32 resolution there is ~1e-3 of the radius
    u = rng.standard_normal((m, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    ring = centre + u * (1.0 + 1e-9 * rng.permutation(m)[:, None])  # 40 neighbours, radii 1 + j·1e-9
    far = rng.standard_normal((300, d)) * 1e4
    X = np.vstack([centre, ring, far])
    from scipy.spatial.distance import cdist

    D = cdist(X, X)
    np.fill_diagonal(D, np.inf)
    ref = np.sort(D, axis=1)[:, :3]
    got = G.knn_distances(X, 3).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-14, atol=0)


def _with_nan(x):
    x = x.copy()
    x[3, 1] = np.nan
    x[7, 0] = np.inf
    return x


_X = np.random.default_rng(0).standard_normal((60, 8))
BAD_GEOMETRY = {  # case: (call, exception type, words the message must hold)
    "twonn NaN rows": (lambda: G.twonn(_with_nan(_X)), ValueError, "2 of 60 rows with NaN or inf"),
    "mle NaN rows": (lambda: G.mle(_with_nan(_X)), ValueError, "2 of 60 rows with NaN or inf"),
    "pc1 NaN rows": (lambda: G.pc1_ratio(_with_nan(_X)), ValueError, "2 of 60 rows with NaN or inf"),
    "cosine NaN rows": (lambda: G.mean_cosine(_with_nan(_X)), ValueError, "2 of 60 rows with NaN or inf"),
    "linearity NaN in X": (lambda: G.linearity(_with_nan(_X), _X), ValueError, "X has 2 of 60 rows"),
    "linearity inf in Y": (lambda: G.linearity(_X, _with_nan(_X)), ValueError, "Y has 2 of 60 rows"),
    "torch float32 NaN": (lambda: G.twonn(torch.tensor(_with_nan(_X), dtype=torch.float32)), ValueError, "NaN or inf"),
    "pc1 of one point": (lambda: G.pc1_ratio(_X[:1]), ValueError, "at least 2 points"),
    "pc1 of identical points": (lambda: G.pc1_ratio(np.ones((20, 8))), ValueError, "identical"),
    "linearity onto a constant": (lambda: G.linearity(_X, np.ones((60, 8))), ValueError, "every row of Y is the same"),
    "linearity from a constant": (lambda: G.linearity(np.ones((60, 8)), _X), ValueError, "every row of X is the same"),
    "linearity w/o residual, shapes": (lambda: G.linearity_without_residual(_X, _X[:, :4]), ValueError, "one shape"),
    "cosine of a zero vector": (lambda: G.mean_cosine(np.vstack([_X, np.zeros((1, 8))])), ValueError,
                                "1 of 61 vectors are zero"),
    "1-D input": (lambda: G.twonn(_X[0]), ValueError, "2-D (n, d)"),
    "3-D input": (lambda: G.pc1_ratio(_X[None]), ValueError, "2-D (n, d)"),
    "TwoNN on 5 points": (lambda: G.twonn(_X[:5]), ValueError, "at least 10 distinct points"),
    "interval with 3 groups": (lambda: G.confidence_interval(G.pc1_ratio, _X, groups=np.arange(60) % 3),
                               ValueError, "at least 4 groups"),
    "interval with 1 split": (lambda: G.confidence_interval(G.pc1_ratio, _X, n_splits=1), ValueError,
                              "n_splits must be at least 2"),
}


@pytest.mark.parametrize("case", list(BAD_GEOMETRY))
def test_geometry_refuses_bad_input(case):
    call, exc, words = BAD_GEOMETRY[case]
    with pytest.raises(exc, match=re.escape(words)):
        call()


def test_profile_without_enough_samples_for_a_band_says_so(handles, tmp_path):
    h = handles["llava15"]
    store = extract(h, shapes.generate(6, seed=2), tmp_path / "s", batch_size=6, progress=False)
    with pytest.warns(UserWarning, match="no confidence band for id_mle"):
        df = G.profile(store, metrics=["id_mle", "anisotropy_pc1"], n_splits=3, progress=False)
    mle = df[df.metric == "id_mle"]
    assert mle.value.notna().all() and mle.ci_low.isna().any()  # no band where a half has <= k points
    pc1 = df[df.metric == "anisotropy_pc1"]
    assert (pc1.ci_low <= pc1.value).all() and (pc1.value <= pc1.ci_high).all()


def test_profile_gives_nan_with_the_reason_where_a_metric_is_undefined(handles, tmp_path):
    """Mllama's prompt holds one ``<|image|>`` token per image, whose embedding-layer state is the same
    learned vector in every sample: there the image tokens' metrics are undefined, NaN with a warning
    saying why; every other layer and modality is measured as usual."""
    store = extract(handles["mllama"], shapes.generate(12, seed=1), tmp_path / "s", batch_size=12, progress=False)
    with pytest.warns(UserWarning, match=r"anisotropy_pc1 of the image tokens is undefined at layer -1 \(all 12"):
        df = G.profile(store, metrics=["linearity", "anisotropy_pc1", "anisotropy_cosine"], n_splits=3,
                       progress=False)
    at = df.set_index(["layer", "modality", "metric"]).value
    assert np.isnan(at[(-1, "image", "linearity")]) and np.isnan(at[(-1, "image", "anisotropy_pc1")])
    assert at[(-1, "image", "anisotropy_cosine")] > 0.999  # identical vectors: cosine 1, still defined
    assert df[(df.layer != -1) | (df.modality != "image")].value.notna().all()


def test_pca_2d_is_the_same_on_every_run_above_its_fitting_sample():
    """Above 4096 points the axes are fitted on a seeded draw: two runs give the same points,
    and on data whose variance lies in two known directions they are those directions."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 16, generator=g) * 0.01
    x[:, 3] += 10 * torch.randn(5000, generator=g)
    x[:, 7] += 5 * torch.randn(5000, generator=g)
    a, b = G.pca_2d(x), G.pca_2d(x)
    assert np.array_equal(a, b)
    xc = (x - x.mean(0)).numpy()
    # PC1 ≈ ±column 3, PC2 ≈ ±column 7 (variances 100 and 25 against 1e-4 for the rest)
    assert abs(np.corrcoef(a[:, 0], xc[:, 3])[0, 1]) > 0.999
    assert abs(np.corrcoef(a[:, 1], xc[:, 7])[0, 1]) > 0.999


def test_split_half_interval_known_answer_and_its_level():
    """CI = θ̂ ± t_{S−1}(½ + level/2)·√(mean_j (θ̂_A − θ̂_B)²/4), recomputed here from the same splits."""
    from scipy import stats

    x = np.arange(12, dtype=float) ** 2
    groups = np.repeat(np.arange(6), 2)  # 6 groups of 2 rows
    mean = lambda a: float(a.mean())  # noqa: E731
    rng = np.random.default_rng(3)
    d = []
    for _ in range(5):
        a = np.isin(groups, rng.permutation(6)[:3])
        d.append(x[a].mean() - x[~a].mean())
    for level in (0.95, 0.5):
        half = stats.t.ppf(0.5 + level / 2, 4) * np.sqrt(np.mean(np.square(d)) / 4)
        lo, hi = G.confidence_interval(mean, x, groups=groups, n_splits=5, level=level, seed=3)
        assert (lo, hi) == pytest.approx((x.mean() - half, x.mean() + half), rel=1e-12)
    lo, hi = G.confidence_interval(mean, x, groups=groups, n_splits=5, seed=3, estimate=100.0)
    assert (lo + hi) / 2 == pytest.approx(100.0)  # centred on the estimate given
    w = [np.subtract(*G.confidence_interval(mean, x, n_splits=4, level=lv)[::-1]) for lv in (0.9, 0.99)]
    assert w[1] / w[0] == pytest.approx(stats.t.ppf(0.995, 3) / stats.t.ppf(0.95, 3))  # rows as groups


def test_cholesky_fast_path_cut_off_is_ten_times_size_times_eps():
    eps = torch.finfo(torch.float64).eps
    for scale, ok in ((10.5, True), (9.5, False)):  # cut-off: max pivot² · size (2) · eps · 10
        g = torch.diag(torch.tensor([1.0, scale * 2 * eps], dtype=torch.float64))
        assert (G._cholesky_ok(g) is not None) is ok, scale
    L = G._cholesky_ok(torch.tensor([[4.0, 2.0], [2.0, 5.0]], dtype=torch.float64))
    assert L.tolist() == [[2.0, 0.0], [1.0, 2.0]]
    assert G._cholesky_ok(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)) is None  # indefinite
    assert G._cholesky_ok(torch.tensor([[float("inf")]], dtype=torch.float64)) is None


def test_interval_coverage_counts_the_draws_whose_interval_holds_the_mean_estimate():
    """Known answer with a recording interval: E[θ̂_n] is the mean of fn over truth_draws data sets drawn
    first; draw i's interval is called with its data, groups, n_splits and seed=i; an interval ending
    exactly at the truth covers it; torch's thread count is restored."""
    sizes, calls = [], []

    def draw(rng, n):
        sizes.append(n)
        return (np.full(n, float(len(sizes))),)  # data set k holds the number k: fn = mean gives k

    def interval(fn, x, groups=None, n_splits=None, seed=None):
        calls.append((len(x), groups, n_splits, seed))
        truth = 5.5  # the mean of 1..10, the truth_draws data sets
        return (truth, truth + 1) if seed % 4 == 0 else (truth - 1, truth) if seed % 4 == 1 else (truth + 1, 9e9)

    threads = torch.get_num_threads()
    cov = G.interval_coverage(lambda x: float(x.mean()), draw, n=3, groups="g", draws=8, truth_draws=10,
                              interval=interval, n_splits=7)
    assert cov == 0.5  # seeds 0, 1, 4, 5 of 0..7
    assert sizes == [3] * 18 and calls == [(3, "g", 7, i) for i in range(8)]
    assert torch.get_num_threads() == threads


def test_scikit_dimension_estimators_by_name():
    X = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) @ torch.randn(
        2, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # a plane in R^6
    d = G.intrinsic_dimension(X, "skdim:lPCA")
    assert d == skdim.id.lPCA().fit(X.numpy()).dimension_ == 2
    with pytest.raises(ValueError, match="scikit-dimension has no estimator 'Nope'"):
        G.intrinsic_dimension(X, "skdim:Nope")
    with pytest.raises(ValueError, match="method must be 'twonn', 'mle' or 'skdim:NAME', got 'pca'"):
        G.intrinsic_dimension(X, "pca")


def test_pc1_ratio_of_two_points_is_one_and_of_one_point_refused():
    assert G.pc1_ratio(np.array([[0.0, 0.0, 1.0], [1.0, 2.0, 0.0]])) == pytest.approx(1.0)  # one direction
    with pytest.raises(ValueError, match="the PC1 ratio needs at least 2 points, got 1"):
        G.pc1_ratio(np.ones((1, 3)))


def test_finite_values_whose_sum_overflows_are_not_refused():
    """The finiteness check reads the sum first; a sum that overflows on finite values (1.5e308 ·
    3 > float64's max) must fall back to checking the values, not refuse them."""
    big = torch.full((3, 2), 1.5e308, dtype=torch.float64)
    assert torch.isinf(big.sum()) and G._checked(big, "X") is big
    big[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"1 of 3 rows with NaN or inf values \(rows \[1\]\)"):
        G._checked(big, "X")
