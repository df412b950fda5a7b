"""Geometry of hidden states: linearity, intrinsic dimension, anisotropy.

Plain functions on (n, d) arrays or tensors (numpy or torch in, float out), computed in float64
with torch (so they run on a GPU when the input is there):

- :func:`linearity` — how well ``Y`` is a linear map of ``X``: centre the columns of both,
  divide each matrix by its Frobenius norm, ``A = argmin ‖XA − Y‖_F``, score
  ``1 − ‖XA − Y‖²_F``. It is the multivariate R², with chance level ≈ rank(X)/(n − 1) for
  unrelated data (→ 1 when n ≤ d): report :func:`linearity_baseline` beside it.
  ``linearity(h_l, h_{l+1})`` is the residual form; :func:`linearity_without_residual` uses
  ``Y = h_{l+1} − h_l``.
- :func:`intrinsic_dimension` — TwoNN (Facco et al. 2017: μ = r₂/r₁ per point, drop the top 10%
  of μ, fit −log(1 − F(μ)) = d·log μ through the origin) or MLE (Levina–Bickel with
  MacKay–Ghahramani averaging of inverse estimates), on de-duplicated points.
- :func:`anisotropy` — ``kind="pc1"``: λ₁/Σλ of the centred covariance (LLM-Microscope;
  floor 1/d for isotropic data); ``kind="cosine"``: mean pairwise cosine similarity of the
  uncentred vectors over distinct pairs (Ethayarajh 2019). They answer different questions:
  a large common offset drives the cosine to 1 and leaves the PC1 ratio unchanged.

:func:`confidence_interval` gives split-half intervals over groups of rows (samples), and
:func:`profile` runs everything over an activation store into a tidy DataFrame.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

Array = np.ndarray | torch.Tensor


def _checked(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` if it is a 2-D array of finite numbers; else a ``ValueError`` naming the bad rows."""
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n, d) array, got shape {tuple(t.shape)}")
    # a finite sum has no NaN or inf term (either would make it NaN or inf): one read of the data
    # instead of a boolean mask of it; the rows are found only when there is something to name
    if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t.sum())):
        bad = torch.nonzero(~torch.isfinite(t).all(1)).flatten()
        if len(bad):
            raise ValueError(f"{name} has {len(bad)} of {len(t)} rows with NaN or inf values (rows "
                             f"{bad[:5].tolist()}{' ...' if len(bad) > 5 else ''}): drop or fix them first — "
                             "no geometry metric is defined on them")
    return t


def _tensor(x: Array) -> torch.Tensor:
    """``x`` as a tensor, sharing its memory where it can. Torch has no read-only tensors, so a
    read-only numpy array (pandas' ``to_numpy()`` under copy-on-write, a memory map) is copied
    first instead of being wrapped, which torch warns about."""
    if isinstance(x, torch.Tensor):
        return x
    a = np.asarray(x)
    return torch.as_tensor(a if a.flags.writeable else a.copy())


def _t(x: Array, device=None, name: str = "X") -> torch.Tensor:
    t = _checked(_tensor(x), name)
    return t.to(device=device if device is not None else t.device, dtype=torch.float64)


def _keep_float(x: Array, name: str = "X") -> torch.Tensor:
    """A 2-D float32 or float64 tensor (other dtypes become float64); no copy when possible."""
    t = _checked(_tensor(x), name)
    return t if t.dtype in (torch.float32, torch.float64) else t.double()


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its columns centred, divided by its Frobenius norm (a new tensor)."""
    x = x - x.mean(0, keepdim=True)
    nrm = torch.linalg.vector_norm(x)
    return x.div_(nrm) if nrm > 0 else x


# ----------------------------------------------------------------------------- linearity

def _cholesky_ok(g: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor of the symmetric ``g`` when it is numerically positive definite with
    every pivot² above numpy's pseudo-inverse cut-off (``max pivot² · size · eps``); else ``None``."""
    L, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        return None
    piv = torch.diagonal(L) ** 2
    if not torch.isfinite(piv).all() or piv.min() <= piv.max() * len(g) * torch.finfo(torch.float64).eps * 10:
        return None
    return L


def _gram(z: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``ZᵀZ`` of ``Z`` ``(n, m)``, computing each off-diagonal block once.

    The columns are cut into ``blocks`` groups; group ``i``'s row of blocks ``Z_iᵀ[Z_i … Z_k]`` is one
    matrix product and the blocks below the diagonal are its transposes: ``(k + 1)/(2k)`` of a full
    product's ``2·n·m²`` flops (5/8 for 4 groups), with products still large enough to run at the
    BLAS's full rate (torch has no ``syrk``). Small matrices take one product."""
    m = z.shape[1]
    if m < 64 * blocks:
        return z.T @ z
    g = torch.empty(m, m, dtype=z.dtype, device=z.device)
    edge = [m * i // blocks for i in range(blocks + 1)]
    for lo, hi in zip(edge, edge[1:]):
        row = z[:, lo:hi].T @ z[:, lo:]
        g[lo:hi, lo:] = row
        g[hi:, lo:hi] = row[:, hi - lo:].T
    return g


def _explained(x: torch.Tensor, y: torch.Tensor) -> float:
    """‖P_X Y‖²_F, the part of Y in the column space of the centred X.

    Fast paths (Cholesky, no eigen-decomposition), each used only when the Gram matrix is
    numerically positive definite:

    - n − 1 ≤ d: the centred X has rank ≤ n − 1; if ``XXᵀ + (s/n)·11ᵀ`` is positive definite the
      rank is n − 1, range(X) is the whole centred subspace of Rⁿ, and since Y is centred
      ``P_X Y = Y``: the fit is exact.
    - n − 1 > d: ``XᵀX = LLᵀ`` and ``‖P_X Y‖² = ‖L⁻¹XᵀY‖²``.

    Otherwise (rank-deficient): eigh of the smaller Gram, ``‖P_X Y‖² = Σᵢ (vᵢᵀXᵀY)²/λᵢ`` (or
    ``Σᵢ (uᵢᵀY)²`` on the n side), eigenvalues below ``λ_max · max(n, d) · eps`` treated as zero.
    """
    n, d = x.shape
    if n - 1 <= d:
        k = _gram(x.T)
        s = torch.trace(k) / n
        if s > 0 and _cholesky_ok(k + s / n) is not None:  # + (s/n)·11ᵀ fills the constant direction
            return float((y ** 2).sum())
    else:
        g = _gram(x)
        L = _cholesky_ok(g)
        if L is not None:
            return float((torch.linalg.solve_triangular(L, x.T @ y, upper=False) ** 2).sum())
    if n >= d:
        lam, v = torch.linalg.eigh(g if n - 1 > d else _gram(x))
        c2 = (v.T @ (x.T @ y)) ** 2
    else:
        lam, u = torch.linalg.eigh(k)
        c2 = (u.T @ y) ** 2 * lam.unsqueeze(1)
    keep = lam > lam.max().clamp(min=0) * max(n, d) * torch.finfo(torch.float64).eps
    return float((c2[keep].sum(1) / lam[keep]).sum())


def linearity(X: Array, Y: Array) -> float:
    """Linearity score of ``X → Y`` (both (n, d)): ``1 − min_A ‖X̃A − Ỹ‖²_F``.

    ``X̃``, ``Ỹ``: columns centred, matrix divided by its Frobenius norm. Equals 1 when ``Y`` is
    any linear map of ``X`` (plus a constant), and about rank(X)/(n − 1) for unrelated data.
    """
    x, y = _t(X), _t(Y, name="Y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"X and Y need the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 3:
        raise ValueError(f"linearity needs at least 3 points, got {x.shape[0]}")
    x, y = _normalise(x), _normalise(y.to(x.device))
    total = float((y ** 2).sum())
    for name, z in (("X", x), ("Y", y)):
        if not bool((z != 0).any()):
            raise ValueError(f"linearity: every row of {name} is the same vector, so there is nothing to "
                             "explain (or nothing to explain it with); the score is undefined")
    return 1.0 - max(0.0, total - _explained(x, y)) / total


def linearity_without_residual(X: Array, Y: Array) -> float:
    """Linearity of ``X → Y − X``: how linear a layer is once its skip connection is removed."""
    x, y = _t(X), _t(Y, name="Y")
    if x.shape != y.shape:
        raise ValueError(f"linearity without residual needs X and Y of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    return linearity(x, y - x.to(y.device))


def linearity_baseline(X: Array, Y: Array, n_perm: int = 5, seed: int = 0) -> float:
    """Permutation chance level: mean linearity of ``X → Y[perm]`` over ``n_perm`` row shuffles."""
    x, y = _t(X), _t(Y)
    g = torch.Generator().manual_seed(seed)
    vals = [linearity(x, y[torch.randperm(len(y), generator=g).to(y.device)]) for _ in range(n_perm)]
    return float(np.mean(vals))


# ----------------------------------------------------------------------------- intrinsic dimension

def _dedup(x: torch.Tensor) -> torch.Tensor:
    """Distinct rows of ``x``. Duplicates are found from a random projection (equal rows have
    equal keys; candidates are confirmed exactly), so data without them costs one matvec."""
    if len(x) < 2:
        return x
    g = torch.Generator(device="cpu").manual_seed(0)
    key = x @ torch.randn(x.shape[1], generator=g, dtype=x.dtype).to(x.device)
    order = torch.argsort(key)
    ks = key[order]
    same = ks[1:] == ks[:-1]
    if not bool(same.any()):
        return x
    return torch.unique(x, dim=0)


def knn_distances(X: Array, k: int, chunk: int = 1024, margin: int = 4) -> torch.Tensor:
    """Distances to the ``k`` nearest other points, (n, k), ascending, exact in float64.

    Candidates come from chunked float32 matmuls (‖a‖² + ‖b‖² − 2a·b of the centred data, the
    fast path; each block of the symmetric matrix is computed once and serves both its rows
    and its columns); the ``k + margin`` best candidates of every point are then re-measured as
    ‖a − b‖ in float64 from the input values (exact differences for float32 or float64 input)
    and the ``k`` smallest kept.

    The result is certified, not hoped for: a float32 squared distance of centred rows a, b is
    within ``ε = (2d + 16)·2⁻²⁴·(‖a‖² + ‖b‖²)`` of the exact one (the norms' and the dot
    product's summation error γ_d each, the centring and the final additions), whatever the
    BLAS kernel or thread count. Every point left out of a row's candidates had a float32 value
    ≥ the row's last candidate value v_c, so its exact squared distance is ≥ v_c − ε_max. A row
    whose k-th exact distance² is below that bound is proven right; any other row (near ties
    below float32 resolution) is recomputed exactly in float64 against all points.
    """
    xo = _tensor(X)
    if xo.ndim != 2:
        raise ValueError(f"expected a 2-D (n, d) array, got shape {tuple(xo.shape)}")
    if xo.dtype not in (torch.float32, torch.float64):
        xo = xo.double()
    n = len(xo)
    if k >= n:
        raise ValueError(f"k={k} needs more than k points, got {n}")
    x32 = (xo - xo.mean(0, keepdim=True, dtype=torch.float64).to(xo.dtype)).float()
    sq = (x32 ** 2).sum(1)
    c = min(n - 1, k + margin)
    dev = xo.device
    best_v = torch.full((n, c), float("inf"), device=dev)
    best_i = torch.zeros((n, c), dtype=torch.long, device=dev)

    def merge(rows: slice, v: torch.Tensor, idx: torch.Tensor) -> None:
        vv = torch.cat([best_v[rows], v], 1)
        ii = torch.cat([best_i[rows], idx], 1)
        top = vv.topk(c, dim=1, largest=False)
        best_v[rows], best_i[rows] = top.values, ii.gather(1, top.indices)

    starts = list(range(0, n, chunk))
    for a in starts:  # the distance matrix is symmetric: compute each block pair once
        ra = slice(a, min(n, a + chunk))
        for b in starts[starts.index(a):]:
            rb = slice(b, min(n, b + chunk))
            # ‖a‖² + ‖b‖² − 2a·b in one fused GEMM
            blk = torch.addmm(sq[ra, None] + sq[None, rb], x32[ra], x32[rb].T, beta=1.0, alpha=-2.0)
            cc = min(c, blk.shape[1])
            if a == b:
                blk.fill_diagonal_(float("inf"))
            t = blk.topk(cc, dim=1, largest=False)
            merge(ra, t.values, t.indices + b)
            if a != b:
                t = blk.topk(min(c, blk.shape[0]), dim=0, largest=False)
                merge(rb, t.values.T, t.indices.T + a)
    out = torch.empty(n, k, dtype=torch.float64, device=dev)
    for j in range(0, n, 32):  # exact re-measure in small blocks that stay in cache
        r = slice(j, min(n, j + 32))
        exact = (xo[best_i[r]].double() - xo[r, None, :].double()).norm(dim=-1)
        out[r] = exact.topk(k, dim=1, largest=False).values
    if c < n - 1:  # some points were never re-measured: certify each row, recompute the others
        sq64 = sq.double()
        eps = (2 * xo.shape[1] + 16) * 2.0 ** -24 * (sq64 + sq64.max())
        unsure = torch.nonzero(best_v[:, -1].double() - eps <= out[:, -1] ** 2).flatten()
        x64 = xo.double()
        for j in range(0, len(unsure), 256):
            rows = unsure[j:j + 256]
            dist = torch.cdist(x64[rows], x64, compute_mode="donot_use_mm_for_euclid_dist")  # differences: exact
            dist[torch.arange(len(rows), device=dev), rows] = float("inf")
            out[rows] = dist.topk(k, dim=1, largest=False).values
    return out


def twonn(X: Array, discard: float = 0.1) -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017), fit through the origin.

    μᵢ = r₂/r₁; sort μ; F(μ₍ᵢ₎) = i/N; keep the smallest (1 − discard) fraction;
    d = Σ log μ · (−log(1 − F)) / Σ (log μ)².
    """
    x = _dedup(_keep_float(X))
    n = len(x)
    if n < 10:
        raise ValueError(f"TwoNN needs at least 10 distinct points, got {n}")
    r = knn_distances(x, 2)
    mu = torch.sort(r[:, 1] / r[:, 0]).values
    f = torch.arange(1, n + 1, dtype=torch.float64, device=x.device) / n
    m = int(np.floor(n * (1 - discard)))
    xs, ys = torch.log(mu[:m]), -torch.log(1 - f[:m])
    return float((xs * ys).sum() / (xs * xs).sum())


def mle(X: Array, k: int = 20) -> float:
    """Levina–Bickel MLE with MacKay–Ghahramani averaging.

    For each point, ``1/m̂(x) = (1/(k−1)) Σ_{j<k} log(T_k/T_j)``; the estimate is
    ``(mean_x 1/m̂(x))⁻¹``.
    """
    x = _dedup(_keep_float(X))
    if len(x) <= k:
        raise ValueError(f"MLE with k={k} needs more than k distinct points, got {len(x)}")
    t = knn_distances(x, k)
    inv = torch.log(t[:, -1:] / t[:, :-1]).sum(1) / (k - 1)
    return float(1.0 / inv.mean())


def intrinsic_dimension(X: Array, method: str = "twonn", **kw) -> float:
    """Intrinsic dimension by ``method``: ``"twonn"``, ``"mle"``, or a scikit-dimension
    estimator name (``"skdim:TwoNN"``, ``"skdim:MLE"``, ``"skdim:lPCA"``, …)."""
    if method == "twonn":
        return twonn(X, **kw)
    if method == "mle":
        return mle(X, **kw)
    if method.startswith("skdim:"):
        import skdim

        est = getattr(skdim.id, method.split(":", 1)[1], None)
        if est is None:
            raise ValueError(f"scikit-dimension has no estimator {method.split(':', 1)[1]!r}")
        return float(est(**kw).fit(_t(X).cpu().numpy()).dimension_)
    raise ValueError(f"method must be 'twonn', 'mle' or 'skdim:NAME', got {method!r}")


# ----------------------------------------------------------------------------- anisotropy

def pc1_ratio(X: Array, rtol: float = 1e-10, block: int = 16, seed: int = 0) -> float:
    """λ₁/Σλ of the centred covariance, without a full SVD, with λ₁ to relative accuracy ``rtol``.

    Σλ = ‖X − x̄‖²_F in float64. λ₁ is the largest eigenvalue of ``A``, the smaller of the two
    Gram matrices ``X̃ᵀX̃`` / ``X̃X̃ᵀ`` (same non-zero spectrum; X̃ the centred data):

    1. warm start: subspace iteration with ``block`` random vectors in float32, until the float32
       Ritz value stagnates (float32 cannot certify more than ~1e-7) — ``A`` applied through the
       data (``X̃ᵀ(X̃Q)``, 4nmk flops a pass) for as many passes as forming the float32 Gram costs
       (m/2k), then through the Gram (2m²k a pass) if it has not stagnated by then;
    2. float64 Rayleigh–Ritz on the data — ``A`` applied as ``X̃ᵀ(X̃q)`` in float64, never
       formed: Ritz values θ₁ ≥ θ₂ ≥ … of ``QᵀAQ``, Ritz vectors uᵢ and residuals
       ``rᵢ = Auᵢ − θᵢuᵢ``. For a symmetric matrix an eigenvalue lies within ‖r₁‖ of θ₁, and
       within ‖r₁‖²/γ when γ is its distance to the rest of the spectrum (Parlett, *The
       Symmetric Eigenvalue Problem*, §11; γ estimated by θ₁ − θ₂ − ‖r₂‖). The iteration goes on
       in float64 (``Q ← orth(AQ)``) until ``min(‖r₁‖, ‖r₁‖²/γ) ≤ rtol·θ₁``;
    3. if that has not happened within as many float64 iterations as an exact solve costs
       (slowly converging spectra: λ_{block+1} ≈ λ₁), an exact float64 eigen-solver
       (``eigvalsh`` of the float64 Gram) is used instead.

    The result's relative error is therefore ≤ ``rtol`` plus float64 rounding (≈ min(n, d)·2⁻⁵³)
    on every CPU, whatever the eigenvalue gaps: close leading eigenvalues slow step 2 down but
    cannot make it stop early.
    """
    x = _t(X)
    if len(x) < 2:
        raise ValueError(f"the PC1 ratio needs at least 2 points, got {len(x)}")
    x = x - x.mean(0, keepdim=True)
    flat = x.reshape(-1)
    total = float(flat @ flat)
    if total == 0:
        raise ValueError(f"all {len(x)} points are identical: there is no variance, so the PC1 ratio is undefined")
    n, d = x.shape
    m = min(n, d)
    rows = n <= d  # A = X̃X̃ᵀ (n × n) when n ≤ d, else X̃ᵀX̃ (d × d)

    def exact() -> float:
        small = x @ x.T if rows else x.T @ x
        return float(torch.linalg.eigvalsh(small)[-1]) / total

    k = min(block, m)
    if m <= 16 * k:  # an exact solve of a Gram this small costs less than iterating
        return exact()
    x32 = x.float()
    small: torch.Tensor | None = None  # the float32 Gram, formed only if the data passes do not suffice
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.linalg.qr(torch.randn(m, k, generator=g).to(x.device)).Q
    old = 0.0
    implicit = max(1, m // (2 * k))  # data passes (4nmk flops each) costing about one Gram (2nm²)
    for it in range(min(300, m // k)):  # 1. float32 warm start, at most about an exact solve's cost
        if it == implicit:  # slow convergence: form the float32 Gram, each pass then costs 2m²k
            small = x32 @ x32.T if rows else x32.T @ x32
        if small is not None:
            w = small @ q
        else:
            w = x32 @ (x32.T @ q) if rows else x32.T @ (x32 @ q)
        lam = float(torch.linalg.eigvalsh(q.T @ w)[-1])  # Ritz value of the current block, no extra pass
        if abs(lam - old) <= 1e-6 * lam:
            break
        old = lam
        q = torch.linalg.qr(w).Q
    del small, x32
    q = torch.linalg.qr(q.double()).Q
    for _ in range(max(5, m ** 3 // (4 * n * d * k))):  # 2. float64 Rayleigh–Ritz, certified
        w = x @ (x.T @ q) if rows else x.T @ (x @ q)  # A·Q
        h = q.T @ w
        theta, s = torch.linalg.eigh((h + h.T) / 2)
        theta, s = theta.flip(0)[:2], s.flip(1)[:, :2]
        r = w @ s - (q @ s) * theta
        r1, r2 = float(r[:, 0].norm()), float(r[:, 1].norm())
        gap = float(theta[0] - theta[1]) - r2
        if min(r1, r1 * r1 / gap if gap > 0 else r1) <= rtol * float(theta[0]):
            return float(theta[0]) / total
        q = torch.linalg.qr(w).Q
    return exact()  # 3. not converged within the cost of an exact solve


def mean_cosine(X: Array) -> float:
    """Mean cosine similarity over distinct pairs: (‖Σ uᵢ‖² − n) / (n(n − 1)), uᵢ = xᵢ/‖xᵢ‖."""
    x = _t(X)
    n = len(x)
    if n < 2:
        raise ValueError("mean_cosine needs at least 2 vectors")
    norms = x.norm(dim=1, keepdim=True)
    zero = torch.nonzero(norms.flatten() == 0).flatten()
    if len(zero):
        raise ValueError(f"mean_cosine: {len(zero)} of {n} vectors are zero (rows {zero[:5].tolist()}), and a zero "
                         "vector has no direction: drop them first")
    u = x / norms
    s = u.sum(0)
    return float(((s @ s) - (u * u).sum()) / (n * (n - 1)))


def anisotropy(X: Array, kind: str = "pc1") -> float:
    """Anisotropy of a point cloud: ``kind="pc1"`` (:func:`pc1_ratio`) or ``"cosine"`` (:func:`mean_cosine`)."""
    if kind == "pc1":
        return pc1_ratio(X)
    if kind == "cosine":
        return mean_cosine(X)
    raise ValueError(f"kind must be 'pc1' or 'cosine', got {kind!r}")


# ----------------------------------------------------------------------------- uncertainty

def confidence_interval(fn: Callable[..., float], *arrays: Array, groups: Sequence | np.ndarray | None = None,
                        n_splits: int = 20, level: float = 0.95, seed: int = 0,
                        estimate: float | None = None) -> tuple[float, float]:
    """Split-half confidence interval of ``θ̂ = fn(*arrays)`` for its expected value at this n.

    Rows are resampled in ``groups`` (e.g. the sample/image each token comes from: tokens of one
    image are not independent draws, samples are); default: every row its own group. Each of
    ``n_splits`` random splits divides the G groups into two disjoint halves A, B of ⌊G/2⌋ and
    ⌈G/2⌉ groups. The halves are independent samples of size n/2, so for an estimator whose
    variance scales as 1/n (every metric here) ``Var(θ̂_A − θ̂_B) = 2·Var(θ̂_{n/2}) = 4·Var(θ̂_n)``,
    whatever the estimator's bias at n/2 (it cancels in the difference). Hence

        V̂ = mean_j (θ̂_{A_j} − θ̂_{B_j})² / 4,    CI = θ̂ ± t_{S−1}(½ + level/2)·√V̂

    (Student t with S − 1 = ``n_splits`` − 1 degrees of freedom for the estimated variance). The
    interval is centred on the estimate, so it always contains it; it targets E[θ̂_n], the
    estimator's expected value at this sample size — for n-dependent estimators such as
    intrinsic dimension that is not the infinite-sample value. (Percentiles of overlapping
    subsamples are narrower than the sampling spread by √(1 − m/n) and, uncentred, sit beside
    n-dependent estimates.) :func:`interval_coverage` measures the coverage by simulation.
    """
    from scipy import stats

    n = len(arrays[0])
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} rows")
    names = np.unique(groups)
    if len(names) < 4:
        raise ValueError(f"a split-half interval needs at least 4 groups, got {len(names)}")
    if n_splits < 2:
        raise ValueError(f"n_splits must be at least 2, got {n_splits}")
    if estimate is None:
        estimate = fn(*arrays)
    rng = np.random.default_rng(seed)

    def rows(x: Array, idx: np.ndarray) -> Array:
        return x[torch.as_tensor(idx, device=x.device)] if isinstance(x, torch.Tensor) else x[idx]

    diffs = []
    for _ in range(n_splits):
        in_a = np.isin(groups, names[rng.permutation(len(names))[: len(names) // 2]])
        a, b = np.flatnonzero(in_a), np.flatnonzero(~in_a)
        diffs.append(fn(*[rows(x, a) for x in arrays]) - fn(*[rows(x, b) for x in arrays]))
    half = float(stats.t.ppf(0.5 + level / 2, n_splits - 1)) * float(np.sqrt(np.mean(np.square(diffs)) / 4))
    return float(estimate) - half, float(estimate) + half


def interval_coverage(fn: Callable[..., float], draw: Callable[[np.random.Generator, int], tuple], n: int,
                      groups: Sequence | np.ndarray | None = None, draws: int = 200, truth_draws: int = 600,
                      interval: Callable[..., tuple[float, float]] | None = None, n_splits: int = 10,
                      seed: int = 123) -> float:
    """Share of ``draws`` independent data sets ``draw(rng, n)`` whose interval covers E[θ̂_n].

    E[θ̂_n] is estimated as the mean of ``fn`` over ``truth_draws`` further independent data sets
    of the same size (its standard error is the estimator's spread / √truth_draws). ``interval``
    is called as ``interval(fn, *data, groups=groups, n_splits=n_splits, seed=i)`` and defaults
    to :func:`confidence_interval`. Runs on one torch thread: thousands of tiny problems, where
    thread start-up would dominate.
    """
    interval = interval or confidence_interval
    rng = np.random.default_rng(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        truth = np.mean([fn(*draw(rng, n)) for _ in range(truth_draws)])
        hits = 0
        for i in range(draws):
            lo, hi = interval(fn, *draw(rng, n), groups=groups, n_splits=n_splits, seed=i)
            hits += int(lo <= truth <= hi)
    finally:
        torch.set_num_threads(threads)
    return hits / draws


def balanced_indices(groups: Sequence[str], n: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices per group, all of the same size (``n`` or the smallest group's size)."""
    labels = np.asarray(groups)
    names = [g for g in dict.fromkeys(labels.tolist())]
    sizes = {g: int((labels == g).sum()) for g in names}
    m = min(sizes.values()) if n is None else n
    if m > min(sizes.values()):
        raise ValueError(f"n={n} exceeds the smallest group ({sizes})")
    rng = np.random.default_rng(seed)
    return {g: np.sort(rng.choice(np.flatnonzero(labels == g), size=m, replace=False)) for g in names}


# ----------------------------------------------------------------------------- over a store

#: token roles pooled into each modality; ``template`` (BOS, chat-template words) and
#: ``image_boundary`` (two marker tokens per image) are left out
MODALITIES: dict[str, tuple[str, ...]] = {
    "image": ("image",),
    "text": ("question", "constraint", "last"),
}
METRICS = ("linearity", "linearity_wo_residual", "id_twonn", "id_mle", "anisotropy_pc1", "anisotropy_cosine")


def _metric(name: str, x: torch.Tensor, y: torch.Tensor | None) -> tuple[Callable[..., float], tuple]:
    fns: dict[str, tuple[Callable[..., float], tuple]] = {
        "linearity": (linearity, (x, y)),
        "linearity_wo_residual": (linearity_without_residual, (x, y)),
        "id_twonn": (twonn, (x,)),
        "id_mle": (mle, (x,)),
        "anisotropy_pc1": (pc1_ratio, (x,)),
        "anisotropy_cosine": (mean_cosine, (x,)),
    }
    return fns[name]


def _baseline(name: str, x: torch.Tensor, y: torch.Tensor | None, seed: int) -> float:
    if name in ("linearity", "linearity_wo_residual"):
        if y is None:
            raise ValueError(f"internal: the {name} baseline needs the next layer's activations y")
        return linearity_baseline(x, y if name == "linearity" else y - x, n_perm=3, seed=seed)
    if name == "anisotropy_pc1":
        return 1.0 / x.shape[1]  # isotropic floor
    if name == "anisotropy_cosine":
        return 0.0  # isotropic, zero-mean data
    return float("nan")  # intrinsic dimension has no chance level


def profile(store, modalities: dict[str, Sequence[str]] | None = None, metrics: Sequence[str] = METRICS,
            n: int | None = None, layers: Sequence[int] | None = None, n_splits: int = 10, seed: int = 0,
            device: str | None = None, progress: bool = True) -> pd.DataFrame:
    """Geometry of every layer and modality of an activation store, as a tidy DataFrame.

    Columns: model, layer, modality, metric, value, ci_low, ci_high, n, n_samples, baseline.
    ``modalities`` maps a name to the token roles it pools (default :data:`MODALITIES`); every
    modality uses the same number of tokens ``n`` (default: the smallest modality's count),
    drawn once per run with ``seed`` so that image and text scores are comparable. Linearity
    rows at ``layer = l`` measure the map from layer ``l`` to the next stored layer.
    ``baseline``: linearity's permutation chance level, 1/d for the PC1 ratio, 0 for the cosine.
    ``ci_low``/``ci_high``: the 95 % split-half interval of :func:`confidence_interval` over
    ``n_splits`` splits of the *samples* the tokens come from (tokens of one image are not
    independent draws); ``n_samples`` is how many samples the modality's tokens come from.
    ``n_splits=0`` skips the intervals (NaN); so does a half too small for the estimator (with a
    warning naming the metric). A metric undefined on a layer's tokens — every token the same vector
    (Mllama's one ``<|image|>`` embedding per prompt at the embedding layer), fewer distinct points than
    the estimator needs — is NaN there, with a warning giving the reason.
    """
    from microscope.progress import tqdm

    modalities = dict(modalities or MODALITIES)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; metrics are {list(METRICS)}")
    all_layers = list(store.layers)
    layers = all_layers if layers is None else list(layers)
    missing = [lay for lay in layers if lay not in all_layers]
    if missing:
        raise ValueError(f"layers {missing} are not in the store; it holds {all_layers}")
    tokens = store.tokens()
    role_of = {r: m for m, rs in modalities.items() for r in rs}
    group = tokens["role"].map(role_of)
    present = group.dropna()
    idx = balanced_indices(present.to_numpy(), n=n, seed=seed)
    idx = {m: present.index.to_numpy()[i] for m, i in idx.items()}
    samples = {m: tokens["sample_index"].to_numpy()[ix] for m, ix in idx.items()}  # resampling unit
    n_samples = {m: len(np.unique(v)) for m, v in samples.items()}
    warned: set[tuple[str, ...]] = set()  # (metric, modality, what): each said once
    rows = []
    pairs = {lay: all_layers[all_layers.index(lay) + 1] if all_layers.index(lay) + 1 < len(all_layers) else None
             for lay in layers}
    cache: dict[int, torch.Tensor] = {}

    def acts(lay: int) -> torch.Tensor:
        """Layer ``lay``'s activations; only the two layers of the current pair stay in memory."""
        if lay not in cache:
            for old in [k for k in cache if k not in (lay, pairs.get(lay))]:
                del cache[old]
            cache[lay] = store.load(lay)[0].to(device or "cpu", torch.float64)
        return cache[lay]

    for lay in tqdm(layers, desc="geometry", disable=not progress):
        for m, ix in idx.items():
            sel = torch.as_tensor(ix)
            x = acts(lay)[sel]
            nxt = pairs[lay]
            y = acts(nxt)[sel] if nxt is not None else None
            for name in metrics:
                if name.startswith("linearity") and y is None:
                    continue
                fn, args = _metric(name, x, y)
                try:
                    value = fn(*args)
                except ValueError as e:  # undefined here (identical tokens, too few distinct points): NaN, said once
                    value = np.nan
                    if (name, m, "value") not in warned:
                        warned.add((name, m, "value"))
                        warnings.warn(f"geometry.profile: {name} of the {m} tokens is undefined at layer {lay} ({e}); "
                                      "its value is NaN there", stacklevel=2)
                lo, hi = np.nan, np.nan
                if n_splits and not np.isnan(value):
                    try:
                        lo, hi = confidence_interval(fn, *args, groups=samples[m], n_splits=n_splits, seed=seed,
                                                     estimate=value)
                    except ValueError as e:  # a half too small for this estimator: no band, said once
                        if (name, m, "band") not in warned:
                            warned.add((name, m, "band"))
                            warnings.warn(f"geometry.profile: no confidence band for {name} on {m} tokens: half "
                                          f"of the {n_samples[m]} samples is too few ({e}); extract "
                                          "more samples for bands", stacklevel=2)
                rows.append({"model": store.meta["model"], "layer": lay, "modality": m, "metric": name,
                             "value": value, "ci_low": lo, "ci_high": hi, "n": len(ix),
                             "n_samples": n_samples[m],
                             "baseline": np.nan if np.isnan(value) else _baseline(name, x, y, seed)})
    return pd.DataFrame(rows)


def pca_2d(X: Array, seed: int = 0) -> np.ndarray:
    """Coordinates of the centred points on their first two principal axes, (n, 2). Above 4096
    points the axes are fitted on 4096 of them drawn with ``seed`` (the same axes on every run)."""
    x = _t(X)
    x = x - x.mean(0, keepdim=True)
    if len(x) > 4096:
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:4096]
        fit = x[pick.to(x.device)]
    else:
        fit = x
    _, _, v = torch.linalg.svd(fit, full_matrices=False)
    return (x @ v[:2].T).cpu().numpy()


def pca_points(X: Array, tokens: pd.DataFrame, n: int | None = 3000, seed: int = 0) -> pd.DataFrame:
    """:func:`pca_2d` of ``n`` rows of ``X`` drawn at random (all of them when ``n`` is None or at
    least ``len(X)``), with their rows of ``tokens`` (``X[i]`` belongs to ``tokens.iloc[i]``, as
    :meth:`~microscope.store.ActivationStore.load` returns them): the token columns plus ``pc1``,
    ``pc2``, in the rows' original order (the input of :func:`microscope.plotting.pca_scatter`)."""
    if len(tokens) != len(X):
        raise ValueError(f"tokens has {len(tokens)} rows for {len(X)} rows of X")
    rows = (np.arange(len(X)) if n is None or n >= len(X)
            else np.sort(np.random.default_rng(seed).choice(len(X), size=n, replace=False)))
    xy = pca_2d(X[torch.as_tensor(rows, device=X.device)] if isinstance(X, torch.Tensor) else np.asarray(X)[rows],
                seed=seed)
    return tokens.iloc[rows].reset_index(drop=True).assign(pc1=xy[:, 0], pc2=xy[:, 1])
