"""Activation store: sharded safetensors plus a parquet token table, resumable and lazy.

Layout of a store directory::

    meta.json                      model id, config hash, layers, sites, roles, dtype, sample ids
    shard-00000.safetensors        "{site}.{layer}" -> (tokens_in_shard, hidden)
    shard-00000.parquet            one row per stored token: sample_index, sample_id, position, role
    ...

A shard is complete when its ``.safetensors`` file exists: the parquet table is written first,
each file to a temporary name then ``os.replace``-d, so a killed writer leaves no partial shard.
``load(layer, roles)`` reads one tensor per shard with ``safe_open`` (nothing else is read).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from microscope.errors import MicroscopeError
from microscope.roles import role_codes

META = "meta.json"
#: meta keys that must agree for a run to resume into an existing store
IDENTITY_KEYS = ("model", "config_hash", "layers", "sites", "roles", "dtype", "sample_ids", "batch_size")


class StoreMismatchError(MicroscopeError, ValueError):
    """Resuming into a store written by another model, config, layer list or data set."""


class ActivationStore:
    """A directory of activation shards (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = self.path / META
        if not meta.is_file():
            raise FileNotFoundError(f"{self.path} is not an activation store (no {META}); run "
                                    "microscope.extract(...) with out_dir={self.path!s} first")
        self.meta = json.loads(meta.read_text())

    # ------------------------------------------------------------------ writing
    @classmethod
    def create_or_resume(cls, path: str | Path, meta: dict) -> ActivationStore:
        """Open ``path`` for writing: a new store, or an existing one with the same identity."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        f = path / META
        if f.is_file():
            old = json.loads(f.read_text())
            diff = [k for k in IDENTITY_KEYS if old.get(k) != meta.get(k)]
            if diff:
                show = ", ".join(f"{k}: store has {_short(old.get(k))}, this run {_short(meta.get(k))}"
                                 for k in diff)
                raise StoreMismatchError(
                    f"{path} holds activations of another run ({show}); nothing was overwritten: pass "
                    "another out_dir, or delete the directory to start over")
        else:
            _atomic_write(f, json.dumps(meta, indent=1).encode())
        return cls(path)

    def shard_path(self, k: int, ext: str) -> Path:
        return self.path / f"shard-{k:05d}.{ext}"

    def has_shard(self, k: int) -> bool:
        return self.shard_path(k, "safetensors").is_file() and self.shard_path(k, "parquet").is_file()

    def write_shard(self, k: int, tensors: dict[str, torch.Tensor], tokens: pd.DataFrame) -> None:
        """Write shard ``k`` atomically (table first, tensors last: the tensors mark completion)."""
        tmp = self.shard_path(k, "parquet.tmp")
        tokens.to_parquet(tmp, index=False)
        os.replace(tmp, self.shard_path(k, "parquet"))
        tmp = self.shard_path(k, "safetensors.tmp")
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp))
        os.replace(tmp, self.shard_path(k, "safetensors"))

    # ------------------------------------------------------------------ reading
    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def shards(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.path.glob("shard-*.safetensors"))

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.meta["n_shards"]

    def _table(self) -> pd.DataFrame:
        """All complete shards' token tables, read once per set of shards (not per ``load``)."""
        shards = tuple(self.shards)
        if getattr(self, "_cached", (None,))[0] != shards:
            frames = []
            for k in shards:
                t = pd.read_parquet(self.shard_path(k, "parquet"))
                t["shard"] = k
                t["row"] = range(len(t))
                frames.append(t)
            df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
                columns=["sample_index", "sample_id", "position", "role", "shard", "row"])
            self._cached = (shards, df)
        return self._cached[1]

    def tokens(self, roles: str | Sequence[str] | None = None) -> pd.DataFrame:
        """Token table of every complete shard (optionally only ``roles``), in storage order."""
        df = self._table().copy()
        if roles is not None:
            role_codes(roles)  # validates names
            df = df[df["role"].isin([roles] if isinstance(roles, str) else list(roles))]
        return df.reset_index(drop=True)

    def load(self, layer: int, roles: str | Sequence[str] | None = None, site: str = "resid"
             ) -> tuple[torch.Tensor, pd.DataFrame]:
        """``(X, tokens)``: activations of one layer and site for the tokens of ``roles``.

        ``X[i]`` belongs to ``tokens.iloc[i]``. Only that layer's tensor is read from each shard.
        """
        if layer not in self.meta["layers"]:
            raise ValueError(f"layer {layer} is not in this store; it holds layers {self.meta['layers']}")
        if site not in self.meta["sites"]:
            raise ValueError(f"site {site!r} is not in this store; it holds {self.meta['sites']}")
        tokens = self.tokens(roles)
        xs = []
        for k, rows in tokens.groupby("shard", sort=True)["row"]:
            with safe_open(str(self.shard_path(int(k), "safetensors")), framework="pt") as f:
                xs.append(f.get_tensor(f"{site}.{layer}")[torch.as_tensor(rows.to_numpy().copy())])
        d = self.meta["hidden_size"]
        x = torch.cat(xs) if xs else torch.empty(0, d)
        return x, tokens

    def __repr__(self) -> str:
        m = self.meta
        return (f"ActivationStore({self.path}, model={m['model']}, layers={len(m['layers'])}, "
                f"sites={m['sites']}, shards={len(self.shards)}/{m['n_shards']})")


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) < 60 else s[:57] + "..."


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
