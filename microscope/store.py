"""Activation store: sharded safetensors plus a parquet token table, resumable, lazy, self-verifying.

Layout of a store directory::

    meta.json                      identity (model, config, weights, processor, layers, sites, roles,
                                   dtype, sample ids and per-sample content hashes, batch size) and
                                   its digest ``identity``
    shard-00000.safetensors        "{site}.{layer}" -> (tokens_in_shard, hidden)
    shard-00000.parquet            one row per stored token: sample_index, sample_id, position, role
    shard-00000.json               the shard's record: the store identity it belongs to, its row
                                   count, and each file's size and SHA-256
    ...

Each file is written to a temporary name and ``os.replace``-d; the record is written last, after
the checksums of the two data files, so a shard is complete exactly when its record exists *and*
its files match it. ``verify()`` (and ``python -m microscope.store verify DIR``) checks every
shard against its record and every record against ``meta.json``; resuming recomputes any shard
that fails (named in a warning), never adopts it; ``load``/``tokens`` verify each shard's
checksums once per store object and refuse an incomplete or damaged store, naming the shards.
``load(layer, roles)`` reads one tensor per shard with ``safe_open`` (nothing else is read).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from microscope.errors import MicroscopeError
from microscope.roles import role_codes

META = "meta.json"
#: version of the layout above (stores without it predate the shard records)
FORMAT = 2
#: meta keys that must agree for a run to resume into an existing store; ``identity`` is their digest
IDENTITY_KEYS = ("model", "config_hash", "weights_hash", "processor_hash", "layers", "sites", "roles", "dtype",
                 "sample_ids", "sample_hashes", "batch_size")
#: what each identity key means, for messages
_WHAT = {"model": "model name", "config_hash": "model config", "weights_hash": "model weights (same config, "
         "other parameter values or dtype)", "processor_hash": "processor (image settings, vocabulary or chat "
         "template)", "layers": "layers", "sites": "sites", "roles": "roles", "dtype": "dtype",
         "sample_ids": "sample ids", "sample_hashes": "data set content", "batch_size": "batch_size"}


class StoreMismatchError(MicroscopeError, ValueError):
    """Resuming into a store written by another model, weights, processor, layer list or data set."""


class StoreIntegrityError(MicroscopeError, ValueError):
    """A store whose files do not match their records: missing, truncated, damaged or foreign shards,
    or an edited or swapped ``meta.json``."""


def identity_digest(meta: dict) -> str:
    """SHA-256 (first 32 hex digits) of the identity keys of ``meta``."""
    blob = json.dumps({k: meta.get(k) for k in IDENTITY_KEYS}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


class ActivationStore:
    """A directory of activation shards (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = self.path / META
        if not meta.is_file():
            raise FileNotFoundError(f"{self.path} is not an activation store (no {META}); run "
                                    f"microscope.extract.extract(handle, samples, {str(self.path)!r}) first")
        try:
            self.meta = json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreIntegrityError(f"{meta} is not readable JSON ({e}): the store's metadata is damaged; "
                                      "delete the directory and extract again") from e
        self._verified: dict[int, tuple] = {}
        if self.meta.get("format") != FORMAT:
            warnings.warn(f"{self.path} was written before stores recorded checksums (format "
                          f"{self.meta.get('format', 1)}): its shards cannot be verified; extract again into a "
                          "new directory to get a verifiable store", stacklevel=2)

    @property
    def legacy(self) -> bool:
        """A store written before shard records (nothing to verify against)."""
        return self.meta.get("format") != FORMAT

    # ------------------------------------------------------------------ writing
    @classmethod
    def create_or_resume(cls, path: str | Path, meta: dict) -> ActivationStore:
        """Open ``path`` for writing: a new store, or an existing one with the same identity.

        Refused (:class:`StoreMismatchError`, naming each difference): a store of another run, a
        store written before shard records, and a directory holding shard files but no ``meta.json``
        (its shards cannot be attributed to any run)."""
        path = Path(path)
        meta = {**meta, "format": FORMAT, "identity": identity_digest(meta)}
        path.mkdir(parents=True, exist_ok=True)
        f = path / META
        old = read_meta(f, "pass another out_dir, or delete the directory to start over")
        if old is not None:
            if old.get("format") != FORMAT:
                raise StoreMismatchError(
                    f"{path} was written by an older microscope without shard checksums; it cannot be resumed "
                    "safely and nothing was overwritten: pass another out_dir, or delete the directory to start "
                    "over")
            diff = _differences(old, meta)
            if diff:
                raise StoreMismatchError(
                    f"{path} holds activations of another run ({'; '.join(diff)}); nothing was overwritten: pass "
                    "another out_dir, or delete the directory to start over")
        else:
            stray = sorted(p.name for p in path.glob("shard-*"))
            if stray:
                raise StoreMismatchError(
                    f"{path} holds shard files ({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''}) but no "
                    f"{META}: they cannot be attributed to this run and are not adopted; nothing was overwritten: "
                    "pass another out_dir, or delete the directory to start over")
            _atomic_write(f, json.dumps(meta, indent=1).encode())
        return cls(path)

    def shard_path(self, k: int, ext: str) -> Path:
        """Path of shard ``k``'s file with extension ``ext`` (``safetensors``, ``parquet``, ``json``)."""
        return self.path / f"shard-{k:05d}.{ext}"

    def write_shard(self, k: int, tensors: dict[str, torch.Tensor], tokens: pd.DataFrame) -> None:
        """Write shard ``k`` atomically: the table and tensors to temporary names, their checksums,
        both renamed into place, then the record (the record marks completion)."""
        self.shard_path(k, "json").unlink(missing_ok=True)  # a stale record never vouches for new files
        tmp_t = self.shard_path(k, "parquet.tmp")
        tokens.to_parquet(tmp_t, index=False)
        tmp_s = self.shard_path(k, "safetensors.tmp")
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp_s))
        files = {ext: {"bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
                 for ext, tmp in (("safetensors", tmp_s), ("parquet", tmp_t))}
        os.replace(tmp_t, self.shard_path(k, "parquet"))
        os.replace(tmp_s, self.shard_path(k, "safetensors"))
        record = {"shard": k, "identity": self.meta["identity"], "rows": len(tokens), "files": files}
        _atomic_write(self.shard_path(k, "json"), json.dumps(record, indent=1).encode())
        self._verified[k] = self._file_state(k)  # just checksummed: a later load need not hash it again

    def _file_state(self, k: int) -> tuple:
        """Sizes and modification times of shard ``k``'s data files and record: the key under which
        a successful checksum is remembered (any rewrite changes it)."""
        return tuple((st.st_size, st.st_mtime_ns) for st in
                     (self.shard_path(k, ext).stat() for ext in ("safetensors", "parquet", "json")))

    # ------------------------------------------------------------------ verifying
    def shard_problem(self, k: int, deep: bool = True) -> str | None:
        """What is wrong with shard ``k`` (``None``: it matches its record). ``deep`` also compares
        the files' SHA-256 with the record (otherwise sizes and row counts only)."""
        name = f"shard-{k:05d}"
        rec_path = self.shard_path(k, "json")
        files = {ext: self.shard_path(k, ext) for ext in ("safetensors", "parquet")}
        if k in self._verified and all(p.is_file() for p in (*files.values(), rec_path)) \
                and self._verified[k] == self._file_state(k):  # checksummed before, unchanged since
            return None
        if not rec_path.is_file():
            present = [p.name for p in files.values() if p.is_file()]
            if present:
                return (f"{name}: files {present} have no record {rec_path.name} (an interrupted write, or files "
                        "copied in from elsewhere)")
            return f"{name}: missing ({rec_path.name} and its data files are absent)"
        try:
            rec = json.loads(rec_path.read_text())
            rows, recorded = int(rec["rows"]), rec["files"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            return f"{name}: its record {rec_path.name} is damaged ({type(e).__name__}: {e})"
        if rec.get("identity") != self.meta.get("identity"):
            return (f"{name}: recorded for store identity {rec.get('identity')}, but {META} has "
                    f"{self.meta.get('identity')}: {META} was replaced or the shard comes from another store")
        for ext, p in files.items():
            if not p.is_file():
                return f"{name}: {p.name} is missing"
            size, want = p.stat().st_size, int(recorded[ext]["bytes"])
            if size != want:
                return f"{name}: {p.name} has {size} bytes, {want} recorded ({'truncated' if size < want else 'grown'})"
        key = self._file_state(k)
        try:
            n_table = pq.read_metadata(files["parquet"]).num_rows
        except Exception as e:
            return f"{name}: {files['parquet'].name} is not a readable parquet file ({e})"
        if n_table != rows:
            return f"{name}: {files['parquet'].name} has {n_table} rows, {rows} recorded"
        if deep:
            for ext, p in files.items():
                if file_sha256(p) != recorded[ext]["sha256"]:
                    return f"{name}: {p.name} does not match its recorded SHA-256 (the file is damaged)"
            self._verified[k] = key
        return None

    def problems(self) -> list[str]:
        """Everything wrong with the store, one line per problem (empty: it verifies)."""
        if self.legacy:
            return [f"{self.path}: written before stores recorded checksums (no shard records to verify "
                    "against); extract again into a new directory"]
        out = []
        if identity_digest(self.meta) != self.meta.get("identity"):
            out.append(f"{META}: its identity fields do not hash to its recorded identity {self.meta.get('identity')}"
                       " (the file was edited or damaged)")
        out += [p for k in range(int(self.meta["n_shards"])) if (p := self.shard_problem(k)) is not None]
        extra = sorted(k for k in self._on_disk() if k >= int(self.meta["n_shards"]))
        out += [f"shard-{k:05d}: not part of this store ({self.meta['n_shards']} shards)" for k in extra]
        return out

    def verify(self) -> ActivationStore:
        """Check every shard's size, row count and SHA-256 against its record, and every record
        against ``meta.json``. Returns the store; raises :class:`StoreIntegrityError` listing each
        problem by shard file."""
        bad = self.problems()
        if bad:
            raise StoreIntegrityError(f"{self.path} failed verification ({len(bad)} problem(s)):\n  "
                                      + "\n  ".join(bad) + "\nrerun the same extract(...) call to recompute "
                                      "damaged or missing shards (a replaced meta.json cannot be repaired: "
                                      "delete the directory and extract again)")
        return self

    # ------------------------------------------------------------------ reading
    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    def _on_disk(self) -> list[int]:
        return sorted(int(p.name[6:11]) for p in self.path.glob("shard-[0-9][0-9][0-9][0-9][0-9].*")
                      if not p.name.endswith(".tmp"))

    @property
    def shards(self) -> list[int]:
        """Shards whose record and files are present with the recorded sizes (not checksummed)."""
        if self.legacy:
            return sorted(int(p.stem.split("-")[1]) for p in self.path.glob("shard-*.safetensors"))
        return [k for k in range(int(self.meta["n_shards"])) if self.shard_problem(k, deep=False) is None]

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.meta["n_shards"]

    def _checked_shards(self) -> tuple[int, ...]:
        """All shards, verified (checksums once per file state); raises naming every bad one."""
        if self.legacy:
            return tuple(self.shards)
        bad = self.problems()
        if bad:
            raise StoreIntegrityError(f"{self.path} cannot be read ({len(bad)} problem(s)):\n  " + "\n  ".join(bad)
                                      + "\nrerun the same extract(...) call to finish or repair it")
        return tuple(range(int(self.meta["n_shards"])))

    def _table(self) -> pd.DataFrame:
        """All shards' token tables, read once per set of shards (not per ``load``)."""
        shards = self._checked_shards()
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
        """Token table of every shard (optionally only ``roles``), in storage order.

        Raises :class:`StoreIntegrityError` naming missing or damaged shards."""
        df = self._table().copy()
        if roles is not None:
            role_codes(roles)  # validates names
            df = df[df["role"].isin([roles] if isinstance(roles, str) else list(roles))]
        return df.reset_index(drop=True)

    def load(self, layer: int, roles: str | Sequence[str] | None = None, site: str = "resid"
             ) -> tuple[torch.Tensor, pd.DataFrame]:
        """``(X, tokens)``: activations of one layer and site for the tokens of ``roles``.

        ``X[i]`` belongs to ``tokens.iloc[i]``. Only that layer's tensor is read from each shard.
        Every shard is verified first (checksums once per store object); a missing or damaged one
        raises :class:`StoreIntegrityError` naming it.
        """
        from microscope.validate import is_int

        tokens = self.tokens(roles)  # verifies every shard first
        if not is_int(layer) or int(layer) not in self.meta["layers"]:
            raise ValueError(f"layer {layer!r} is not in this store; it holds layers {self.meta['layers']}")
        layer = int(layer)
        if site not in self.meta["sites"]:
            raise ValueError(f"site {site!r} is not in this store; it holds {self.meta['sites']}")
        xs = []
        for k, rows in tokens.groupby("shard", sort=True)["row"]:
            path = self.shard_path(int(k), "safetensors")
            try:
                with safe_open(str(path), framework="pt") as f:
                    xs.append(f.get_tensor(f"{site}.{layer}")[torch.as_tensor(rows.to_numpy().copy())])
            except Exception as e:
                raise StoreIntegrityError(f"{path} could not be read ({type(e).__name__}: {e}); run "
                                          f"python -m microscope.store verify {self.path}") from e
        d = self.meta["hidden_size"]
        x = torch.cat(xs) if xs else torch.empty(0, d)
        return x, tokens

    def __repr__(self) -> str:
        m = self.meta
        return (f"ActivationStore({self.path}, model={m['model']}, layers={len(m['layers'])}, "
                f"sites={m['sites']}, shards={len(self.shards)}/{m['n_shards']})")


def _differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two stores' identities."""
    out = []
    for k in IDENTITY_KEYS:
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k == "sample_hashes" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            ids = new.get("sample_ids") or [None] * len(b)
            out.append(f"{_WHAT[k]}: sample {i} ({ids[i]!r}) has other content (question, answer, constraints or "
                       "image) than the stored one, although the ids match (e.g. other generate options such as "
                       "categories or max_objects, or other files)")
        else:
            out.append(f"{_WHAT.get(k, k)}: store has {short(a)}, this run {short(b)}")
    return out


def read_meta(f: Path, fix: str) -> dict | None:
    """The JSON record ``f`` of a directory being resumed, ``None`` when there is none yet; a record
    that is not readable JSON is refused (:class:`StoreMismatchError`) with ``fix``, nothing overwritten."""
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreMismatchError(f"{f} is not readable JSON ({e}); nothing was overwritten: {fix}") from e


def short(v) -> str:
    """``v`` as JSON (``repr`` for what JSON cannot hold), cut to 60 characters for a message."""
    s = json.dumps(v, default=repr)
    return s if len(s) < 60 else s[:57] + "..."


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m microscope.store verify DIR [DIR ...]``: exit status 0 when every store verifies."""
    ap = argparse.ArgumentParser(prog="python -m microscope.store", description="Activation store tools.")
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check every shard's size, rows and SHA-256 against its record")
    v.add_argument("dirs", nargs="+", help="store directories")
    args = ap.parse_args(argv)
    status = 0
    for d in args.dirs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                store = ActivationStore(d)
            bad = store.problems()
        except (FileNotFoundError, StoreIntegrityError) as e:
            print(f"FAILED {d}: {e}")
            status = 1
            continue
        if bad:
            print(f"FAILED {d}: {len(bad)} problem(s)")
            for b in bad:
                print(f"  {b}")
            status = 1
        else:
            print(f"ok {d}: {store.meta['n_shards']} shards verified (sizes, rows, SHA-256)")
    return status


if __name__ == "__main__":
    sys.exit(main())
