"""Bundled models: ``shapes-llava``, a LLaVA trained on the Shapes world.

``model_dir(name)`` is where a bundled model's ``save_pretrained`` files live;
``load_pretrained(name_or_dir)`` loads model and processor with the same
``from_pretrained`` calls as a hub checkpoint, offline, with one clear error when the
directory is missing or its files are incomplete or corrupt.
"""

from __future__ import annotations

from pathlib import Path

from microscope.errors import ModelNotFoundError

WEIGHTS = Path(__file__).parent / "weights"
BUNDLED: dict[str, Path] = {"shapes-llava": WEIGHTS / "shapes-llava"}
REQUIRED_FILES = ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json")
#: a sharded checkpoint's weights: its index stands in for ``model.safetensors``
SHARD_INDEX = "model.safetensors.index.json"


def model_dir(name_or_dir: str | Path) -> Path:
    """Directory of a bundled model name, or ``name_or_dir`` itself if it is a directory.

    Raises :class:`ModelNotFoundError` naming the path when it does not exist or lacks one of
    :data:`REQUIRED_FILES` (a sharded checkpoint's :data:`SHARD_INDEX` stands in for its weights).
    """
    key = str(name_or_dir)
    path = BUNDLED.get(key, Path(name_or_dir)).expanduser()
    if not path.is_dir():
        known = ", ".join(BUNDLED)
        raise ModelNotFoundError(
            f"model directory {path} does not exist: pass a bundled name ({known}) or a "
            "directory written by save_pretrained"
        )
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()
               and not (f == "model.safetensors" and (path / SHARD_INDEX).is_file())]
    if missing:
        raise ModelNotFoundError(
            f"model directory {path} is incomplete (missing {', '.join(missing)}): re-create it "
            "with `python -m microscope.zoo train shapes-llava --out DIR` or reinstall the package"
        )
    return path


def load_pretrained(name_or_dir: str | Path = "shapes-llava", device: str | None = None):
    """``(model, processor)`` of a bundled model or a local LLaVA directory, offline, in eval mode.

    A thin wrapper of :func:`microscope.load` (the suite's one loader) for code that wants the
    two HF objects only.
    """
    from microscope.model import load

    h = load(str(name_or_dir), device=device)
    return h.model, h.processor
