"""Writing a notebook's results: tidy tables as parquet and headline numbers as summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


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
