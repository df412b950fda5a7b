"""The loader's checks, in one place: what :func:`microscope.load` verifies in a checkpoint
directory before ``from_pretrained`` runs, and how every failure is worded.

A checkpoint is accepted in every layout ``from_pretrained`` reads: ``model.safetensors``, or
``model.safetensors.index.json`` with the shards it lists, or the file ``config.json`` names in
``transformers_weights``; pickle weights (``pytorch_model.bin``, sharded or not) only when the
caller opts in, since unpickling can execute code. Each error names the directory, what is
missing or wrong, and the fix — for a user's or a cached model its own fix (re-download,
re-save), never the bundled model's.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from microscope.errors import MicroscopeError, ModelNotFoundError

SAFE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
#: ``dtype`` names :func:`microscope.load` accepts (besides ``"auto"``, ``None`` and a floating torch.dtype)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                  "bfloat16": torch.bfloat16, "float64": torch.float64}
#: files a processor is usually built from (a hint when it cannot be built)
PROCESSOR_FILES = (("tokenizer.json", "tokenizer.model"), ("tokenizer_config.json",),
                   ("preprocessor_config.json", "processor_config.json"))


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint directory, with the fix its errors suggest."""

    path: Path
    #: what to do when its files are missing or corrupt
    fix: str


def hub_cache() -> Path:
    """The HF hub cache directory, from the environment at call time (``HF_HUB_CACHE``, then
    ``HUGGINGFACE_HUB_CACHE``, then ``HF_HOME/hub``, then ``XDG_CACHE_HOME/huggingface/hub``)
    — huggingface_hub reads these once at import, so a later change would otherwise be missed."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"),
                                              "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


#: the fix for a directory the user brought, when its files are missing or corrupt
DIR_FIX = ("re-download or re-copy the checkpoint (e.g. `hf download ORG/NAME --local-dir DIR`), or re-save it "
           "with model.save_pretrained(DIR) and processor.save_pretrained(DIR)")


def hub_fix(hub_id: str) -> str:
    """The fix for a hub id whose cached snapshot is missing or incomplete."""
    return (f"re-download it where there is internet (`hf download {hub_id} --local-dir DIR`), copy DIR here "
            "and call microscope.load(DIR)")


def check_files(ckpt: Checkpoint, allow_pickle: bool = False) -> None:
    """Refuse a directory ``from_pretrained`` would refuse or misread, with one clear message.

    Checks ``config.json``; the weights (single file, index and every shard it lists, the
    ``transformers_weights`` file config.json names; pickle files only with ``allow_pickle``);
    and that each safetensors file is as long as its header says (a truncated download).
    """
    where = f"model directory {ckpt.path}"
    config_file = ckpt.path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{where} has no config.json (every save_pretrained checkpoint has one): "
                                 f"{ckpt.fix}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelNotFoundError(f"{where}: config.json is not readable JSON ({e}): {ckpt.fix}") from e
    explicit = config.get("transformers_weights") if isinstance(config, dict) else None
    if explicit:
        files = _index_shards(ckpt, explicit) if explicit.endswith(".index.json") else [explicit]
    elif (ckpt.path / SAFE).is_file():
        files = [SAFE]
    elif (ckpt.path / SAFE_INDEX).is_file():
        files = _index_shards(ckpt, SAFE_INDEX)
    else:
        pickled = [f for f in (PICKLE, PICKLE_INDEX) if (ckpt.path / f).is_file()]
        if pickled and not allow_pickle:
            raise MicroscopeError(
                f"{where} has pickle weights only ({pickled[0]}), which are not loaded by default: unpickling a "
                "file can execute arbitrary code. If you trust its source, pass allow_pickle=True to "
                "microscope.load; or convert it once to safetensors (load it with transformers, then "
                "model.save_pretrained(DIR)) and load DIR")
        if not pickled:
            raise ModelNotFoundError(f"{where} has no weights: {_found_weights(ckpt.path)}; {ckpt.fix}")
        files = [PICKLE] if pickled[0] == PICKLE else _index_shards(ckpt, PICKLE_INDEX)
    missing = [f for f in files if not (ckpt.path / f).is_file()]
    if missing:
        raise ModelNotFoundError(f"{where} is missing {_listing(missing)}: {ckpt.fix}")
    for f in files:
        if f.endswith(".safetensors"):
            _check_safetensors(ckpt, f)


def _index_shards(ckpt: Checkpoint, index: str) -> list[str]:
    """The shard files ``index`` maps the weights to (the index must exist and be readable)."""
    file = ckpt.path / index
    if not file.is_file():
        raise ModelNotFoundError(f"model directory {ckpt.path} is missing {index}: {ckpt.fix}")
    try:
        weight_map = json.loads(file.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ModelNotFoundError(f"model directory {ckpt.path}: {index} is not a valid index (a JSON object "
                                 f"with a 'weight_map' of parameter → shard file; {type(e).__name__}: {e}): "
                                 f"{ckpt.fix}") from e
    if not shards:
        raise ModelNotFoundError(f"model directory {ckpt.path}: {index} lists no shard files: {ckpt.fix}")
    return shards


def _check_safetensors(ckpt: Checkpoint, name: str) -> None:
    """A safetensors file is an 8-byte header length, a JSON header and the tensor bytes it
    describes: refuse one shorter or longer than its header says (without reading the tensors)."""
    file = ckpt.path / name
    size = file.stat().st_size
    problem = None
    try:
        with file.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little") if size >= 8 else 0
            if size < 8 or n > size - 8:
                problem = "its header is cut off"
            else:
                header = json.loads(fh.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if size != 8 + n + end:
                    problem = f"it has {size:,} bytes where its header describes {8 + n + end:,}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError,
            AttributeError, ValueError) as e:
        problem = f"its header is unreadable ({type(e).__name__}: {e})"
    if problem:
        raise ModelNotFoundError(f"model directory {ckpt.path}: {name} is truncated or corrupt ({problem}; an "
                                 f"interrupted download or copy?): {ckpt.fix}")


def _found_weights(path: Path) -> str:
    """What a directory without loadable weights holds instead, for the error message."""
    expected = f"expected {SAFE}, or {SAFE_INDEX} with the shards it lists"
    other = sorted(p.name for p in path.iterdir()
                   if re.search(r"\.(safetensors|bin|pt|pth|ckpt|gguf)$", p.name))
    if not other:
        return f"{expected}, and there are no weight files at all"
    return (f"{expected}; found only {_listing(other)} (a variant or shard set without its index is not "
            "read by from_pretrained)")


def excerpt(e: BaseException, most: int = 300) -> str:
    """``Type: message`` of an underlying error, on one line and at most ``most`` characters long."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:most]}" + ("…" if len(text) > most else "")


def _listing(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """``dtype`` as ``from_pretrained`` takes it: a floating ``torch.dtype``, ``"auto"`` (the
    checkpoint's own) or ``None`` (the same). Raises ``ValueError`` listing the accepted names."""
    if dtype is None or dtype == "auto":
        return dtype
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    close = difflib.get_close_matches(str(dtype), list(DTYPES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"dtype {dtype!r} is not accepted{hint}: pass one of {', '.join(map(repr, DTYPES))}, "
                     "'auto' (the checkpoint's own), or a floating-point torch.dtype such as torch.float16")


def is_attention_error(e: BaseException) -> bool:
    """Whether ``from_pretrained`` raised ``e`` while checking the requested attention
    implementation (an unknown name, a package that is not installed, no GPU for it)."""
    return any("attn_implementation" in frame.f_code.co_name for frame, _ in traceback.walk_tb(e.__traceback__))


def attention_error(ckpt: Checkpoint, attn_implementation: str, e: Exception) -> MicroscopeError:
    """The error for an attention implementation that is unknown or unavailable here."""
    return MicroscopeError(
        f"attention implementation {attn_implementation!r} is not available for {ckpt.path} "
        f"({excerpt(e)}): load with attn_implementation='sdpa' (the default) or 'eager' "
        "— the ones the suite's interventions are tested with — or install what it needs (flash_attention_2: "
        "`pip install flash-attn` on a CUDA GPU; a hub kernel: `pip install kernels`)")


def processor_error(ckpt: Checkpoint, e: Exception) -> ModelNotFoundError:
    """The error for a processor ``AutoProcessor.from_pretrained`` could not build."""
    absent = [alts[0] + "".join(f" (or {f})" for f in alts[1:]) for alts in PROCESSOR_FILES
              if not any((ckpt.path / f).is_file() for f in alts)]
    hint = f"; missing {', '.join(absent)}" if absent else ""
    return ModelNotFoundError(
        f"model directory {ckpt.path}: its processor (tokenizer and image processor) could not be loaded "
        f"({excerpt(e)}){hint}: {ckpt.fix}")


def weights_error(ckpt: Checkpoint, e: Exception) -> ModelNotFoundError:
    """The error for weights ``from_pretrained`` could not load although the files are there."""
    return ModelNotFoundError(
        f"model directory {ckpt.path}: its weights could not be loaded ({excerpt(e)}); "
        f"the files are corrupt or do not match config.json: {ckpt.fix}")


def chat_template_error(ckpt: Checkpoint) -> ModelNotFoundError:
    """The error for a processor without a chat template (the suite builds every prompt with it)."""
    return ModelNotFoundError(
        f"model directory {ckpt.path} has no chat template (not in chat_template.jinja, chat_template.json "
        "or tokenizer_config.json): the suite builds every prompt with it. Add the "
        "model's conversation template as chat_template.jinja next to config.json")
