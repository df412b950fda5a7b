"""Writing a notebook's results: tidy tables as parquet and headline numbers as summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

#: the reasons analyses give in ``df.attrs["skipped"]`` for samples left out, one wording each
WRONG = "answered wrongly (only_correct=True)"
UNSPELLABLE = "have a gold answer the vocabulary cannot spell"


def ci_half_width(sd: pd.Series, n: pd.Series, z: float = 1.96) -> pd.Series:
    """Half the width of the 95 % normal confidence interval of a mean over ``n`` samples,
    ``z · sd / √n`` (``z = 1.96``); a group of one sample (``sd`` NaN) gets 0. The one CI formula
    of the per-group tables: tracing's aggregate, attribution's summary, the plotted bands."""
    return z * sd.fillna(0) / np.sqrt(n.clip(lower=1))


def normal_ci(mean: pd.Series, sd: pd.Series, n: pd.Series) -> tuple[pd.Series, pd.Series]:
    """``(mean - half, mean + half)`` with ``half`` = :func:`ci_half_width`."""
    half = ci_half_width(sd, n)
    return mean - half, mean + half


def _plain(v):
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def save_table(df: pd.DataFrame, out_dir: str | Path, name: str) -> Path:
    """Write ``df`` to ``out_dir/name.parquet``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.parquet"
    df.to_parquet(path, index=False)
    return path


def write_summary(out_dir: str | Path, **numbers) -> Path:
    """Merge ``numbers`` into ``out_dir/summary.json`` (created if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update(_plain(numbers))
    path.write_text(json.dumps(old, indent=1))
    return path


#: ``DataFrame.attrs`` keys: why an analysis table has no rows, and how many samples it skipped per reason
WHY_EMPTY, SKIPPED = "why_empty", "skipped"


def explain(df: pd.DataFrame, skipped: dict[str, int], total: int, what: str) -> pd.DataFrame:
    """Record in ``df.attrs`` the samples an analysis skipped (``{reason: count}``) and, if ``df``
    has no rows, why: ``"no <what>: 6 of 6 samples answered wrongly (only_correct=True)"``."""
    df.attrs[SKIPPED] = {k: int(v) for k, v in skipped.items() if v}
    if df.empty:
        parts = [f"{n} of {total} samples {reason}" for reason, n in skipped.items() if n]
        df.attrs[WHY_EMPTY] = f"no {what}: " + ("; ".join(parts) if parts else
                                                 "no samples were given" if total == 0 else "nothing to measure")
    return df


def why_empty(df: pd.DataFrame, what: str = "rows") -> str:
    """Why ``df`` has no rows, as recorded by the analysis that made it (:func:`explain`), else a
    generic sentence."""
    return df.attrs.get(WHY_EMPTY) or f"no {what}: the table is empty"


def mean_or_none(values) -> float | None:
    """Mean of the non-missing ``values`` (booleans count as 0/1), ``None`` when there are none
    (for summary.json, which has no NaN)."""
    s = pd.Series(values, dtype="Float64") if not isinstance(values, pd.Series) else values.astype("Float64")
    s = s.dropna()
    return float(s.mean()) if len(s) else None
