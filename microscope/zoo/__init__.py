"""Bundled models trained on the Shapes world: ``shapes-llava`` (a LLaVA) and
``shapes-omnifusion`` (the same decoder, data and steps with OmniFusion-style fusion: two image
encoders, an adapter and learned begin/end-of-image vectors; a :mod:`microscope.fusion` model).

``model_dir(name)`` is where a bundled model's ``save_pretrained`` files live;
:func:`microscope.load` loads it (with the same ``from_pretrained`` calls as a hub checkpoint,
offline, with one clear error when the directory is missing or its files are incomplete or
corrupt). This package imports nothing of :mod:`microscope.model`, which imports it.
"""

from __future__ import annotations

from pathlib import Path

from microscope.errors import ModelNotFoundError

WEIGHTS = Path(__file__).parent / "weights"
BUNDLED: dict[str, Path] = {"shapes-llava": WEIGHTS / "shapes-llava",
                            "shapes-omnifusion": WEIGHTS / "shapes-omnifusion"}
#: readers of microscope fusion directories (``config.json`` key ``"microscope_fusion"``), by that key's
#: value, as ``"module:function"`` — ``function(path, fix, name=, attn_implementation=)`` returns a Handle.
#: :func:`microscope.load` imports the reader by name, like a model factory: the fusion modules import
#: :mod:`microscope.model` (for ``Handle``), which must not import them.
FUSION_READERS: dict[str, str] = {"omnifusion": "microscope.zoo.shapes_omnifusion:load_dir"}
FUSION_KEY = "microscope_fusion"
#: the files every bundled model ships (user checkpoints are checked by :mod:`microscope.checkpoint`)
REQUIRED_FILES = ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json")
#: the fix for a bundled model whose files are missing or corrupt
REBUILD = "re-create it with `python -m microscope.zoo train shapes-llava --out DIR` or reinstall the package"


def rebuild(name: str) -> str:
    """The fix for bundled model ``name`` whose files are missing or corrupt."""
    return REBUILD.replace("shapes-llava", name)


def model_dir(name_or_dir: str | Path) -> Path:
    """Directory of a bundled model name, or ``name_or_dir`` itself if it is a directory.

    A bundled model must have all of :data:`REQUIRED_FILES`; a directory of the user's is
    returned as it is (:func:`microscope.load` checks its files as ``from_pretrained`` reads them).
    Raises :class:`ModelNotFoundError` naming the path when it does not exist or, for a bundled
    model, lacks a required file.
    """
    key = str(name_or_dir)
    path = BUNDLED.get(key, Path(name_or_dir)).expanduser()
    if not path.is_dir():
        known = ", ".join(BUNDLED)
        raise ModelNotFoundError(
            f"model directory {path} does not exist: pass a bundled name ({known}) or a "
            "directory written by save_pretrained"
        )
    if key not in BUNDLED:
        return path
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise ModelNotFoundError(f"bundled model {key} in {path} is incomplete (missing {', '.join(missing)}): "
                                 f"{rebuild(key)}")
    return path
