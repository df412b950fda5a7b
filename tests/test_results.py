"""The one CI formula of the per-group tables (:func:`microscope.results.ci_half_width`)."""

import math

import pandas as pd
import pytest

from microscope.results import ci_half_width, normal_ci


def test_ci_half_width_is_z_sd_over_root_n():
    half = ci_half_width(pd.Series([2.0, float("nan"), 3.0]), pd.Series([4, 1, 9]))
    assert half.tolist() == pytest.approx([1.96, 0.0, 1.96], abs=1e-12)  # NaN sd (one sample): width 0
    low, high = normal_ci(pd.Series([1.0]), pd.Series([2.0]), pd.Series([16]))
    assert (low.iloc[0], high.iloc[0]) == pytest.approx((1 - 0.98, 1 + 0.98))
    assert not math.isnan(ci_half_width(pd.Series([float("nan")]), pd.Series([0])).iloc[0])
