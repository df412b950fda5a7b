"""Coverage of the geometry confidence bands, measured by simulation, in one run.

For every metric of ``microscope.geometry`` and the known distributions the tests use
(``tests/test_geometry.py`` ``COVERAGE``), the share of independent data sets whose nominal 95 %
interval covers the estimator's expected value at that n (:func:`geometry.interval_coverage`):

- ours: the split-half interval of :func:`geometry.confidence_interval`;
- reference: the percentile interval of 20 subsamples of 80 % of the rows (the former method,
  and a common choice in published code).

    python benchmarks/interval_coverage.py [--n 200] [--draws 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from microscope import geometry as G

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: its tests package
from tests.test_geometry import COVERAGE  # noqa: E402  (the distributions the tests assert coverage on)


def percentile_interval(fn, *arrays, groups=None, n_splits=20, seed=0, level=0.95, frac=0.8):
    """Percentiles of ``fn`` over ``n_splits`` row subsamples of ``frac·n`` without replacement."""
    n = len(arrays[0])
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_splits):
        idx = np.sort(rng.choice(n, size=int(frac * n), replace=False))
        vals.append(fn(*[a[idx] for a in arrays]))
    return float(np.quantile(vals, (1 - level) / 2)), float(np.quantile(vals, (1 + level) / 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--draws", type=int, default=200)
    a = ap.parse_args()
    print(f"nominal 95 % intervals, n={a.n}, {a.draws} draws per metric")
    print(f"{'metric':24s} {'split-half':>10s} {'percentile':>10s}")
    for name, (fn, draw) in COVERAGE.items():
        ours = G.interval_coverage(fn, draw, a.n, draws=a.draws)
        ref = G.interval_coverage(fn, draw, a.n, draws=a.draws, interval=percentile_interval, n_splits=20)
        print(f"{name:24s} {ours:10.3f} {ref:10.3f}", flush=True)


if __name__ == "__main__":
    main()
