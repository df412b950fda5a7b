"""Validators for the arguments of the public functions, applied at the boundary.

Each returns the value in the form the suite computes with (plain ``int``/``float``/``list``) or
raises ``ValueError`` (``TypeError`` for a value of the wrong kind altogether) naming the
argument, the bad value and what is accepted::

    layers([0, np.int64(3)], n_layers=6)   -> [0, 3]          numpy integers are integers
    layers("[0, 3]", n_layers=6)           -> [0, 3]          papermill's ``-p layers '[0, 3]'``
    layers("0,3", n_layers=6)              -> [0, 3]          a tuple literal
    layers("0 to 3", n_layers=6)           -> ValueError      (names the string and the fix)
    positions([-1], n_tokens=42)           -> ValueError      (0..41; use 41 for the last)
    window(2.7)                            -> ValueError      (a positive whole number of layers)
    scale(float("nan"))                    -> ValueError      (finite and >= 0)
    names("resid", ["resid", "mlp"], "sites") -> ["resid"]    one name is a list of one

Strings are never iterated character by character: a string where a list is expected is either a
Python/JSON list literal (parsed) or one item.
"""

from __future__ import annotations

import ast
import math
import numbers
from collections.abc import Iterable, Sequence


def _literal(value: str):
    """``value`` parsed as a Python literal, or ``None`` when it is not one."""
    try:
        return ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def is_int(value) -> bool:
    """An integer in the sense of :class:`numbers.Integral` (numpy and torch 0-d integers
    included), not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    item = getattr(value, "item", None)  # torch / numpy 0-d integer tensors
    if item is not None and getattr(value, "ndim", None) == 0:
        v = item()
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)
    return False


def positive_int(value, name: str) -> int:
    """``value`` as an ``int`` ``>= 1`` (batch sizes, noise samples, windows)."""
    if not is_int(value):
        raise ValueError(f"{name} must be a positive whole number, got {value!r} ({type(value).__name__})")
    v = int(value)
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def window(value, name: str = "window", n_layers: int | None = None) -> int:
    """A window of layers: a whole number ``>= 1`` (at most ``n_layers`` when given)."""
    if not is_int(value):
        raise ValueError(f"{name} must be a positive whole number of layers, got {value!r} "
                         f"({type(value).__name__}); e.g. {name}=3")
    v = int(value)
    if v < 1:
        raise ValueError(f"{name} must be >= 1 layer, got {v}")
    if n_layers is not None and v > n_layers:
        raise ValueError(f"{name}={v} is wider than the model's {n_layers} decoder layers; use 1..{n_layers}")
    return v


def scale(value, name: str = "scale") -> float:
    """A non-negative finite real number (a noise scale in units of sigma)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number >= 0, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite and >= 0, got {v}: NaN or infinite noise makes every effect "
                         "NaN")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def as_list(value, name: str) -> list:
    """``value`` as a list: a list/tuple/other iterable as is; a string that is a list literal
    (``'[0, 3]'``, as papermill's ``-p`` passes it) parsed — a bracketed list of bare names or paths
    (``'[runs/a, runs/b]'``) as those strings; any other string or scalar as one item."""
    if isinstance(value, str):
        s = value.strip()
        if s and s[0] in "[(":
            parsed = _literal(s)
            if parsed is None and s[-1:] == "]" and s[0] == "[":  # [DIR_A, DIR_B]: bare names or paths
                items = [x.strip().strip("'\"") for x in s[1:-1].split(",")]
                if all(items):
                    parsed = items
            if not isinstance(parsed, (list, tuple)):
                raise ValueError(f"{name}={value!r} looks like a list but is not a valid list literal; "
                                 f"write it as e.g. {name}=[0, 3] (papermill: -y '{name}: [0, 3]')")
            return list(parsed)
        return [value]
    if isinstance(value, dict):
        raise ValueError(f"{name} must be a list, got a dict {value!r}")
    if isinstance(value, Iterable) and not (getattr(value, "ndim", None) == 0):
        return list(value)
    return [value]


def layers(value, n_layers: int, allow_embedding: bool = True, name: str = "layers",
           allow_empty: bool = False) -> list[int]:
    """Layer indices: ``0..n_layers-1`` are decoder layers, ``-1`` the embedding output (when
    ``allow_embedding``). Accepts numpy/torch integers, one integer, and a list literal string."""
    if isinstance(value, str):
        parsed = _literal(value)
        if not (is_int(parsed) or (isinstance(parsed, (list, tuple)) and all(is_int(x) for x in parsed))):
            raise ValueError(f"{name}={value!r} is a string, not layer indices; pass a list of whole numbers, "
                             f"e.g. {name}=[0, 3] (papermill: -y '{name}: [0, 3]')")
        value = parsed
    items = as_list(value, name)
    lo = -1 if allow_embedding else 0
    rng = f"0..{n_layers - 1}" + (", and -1 for the embedding output" if allow_embedding else "")
    out = []
    for lay in items:
        if not is_int(lay):
            raise ValueError(f"layer {lay!r} in {name} is not a whole number: this model has {n_layers} decoder "
                             f"layers ({rng})")
        if not lo <= int(lay) < n_layers:
            raise ValueError(f"layer {int(lay)} is out of range: this model has {n_layers} decoder layers ({rng})")
        out.append(int(lay))
    if not out and not allow_empty:
        raise ValueError(f"{name} is empty: give at least one layer ({rng}), or None for all")
    return out


def positions(value, n_tokens: int, name: str = "positions", allow_empty: bool = False) -> list[int]:
    """Token positions ``0..n_tokens-1`` of the prompt (no negative indexing: ``-1`` is refused
    rather than silently meaning nothing); an empty list only with ``allow_empty``."""
    items = as_list(value, name)
    out = []
    for p in items:
        if not is_int(p):
            raise ValueError(f"position {p!r} in {name} is not a whole number; positions are 0..{n_tokens - 1}")
        if not 0 <= int(p) < n_tokens:
            hint = f"; use {n_tokens + int(p)} for {int(p)} from the end" if -n_tokens <= int(p) < 0 else ""
            raise ValueError(f"position {int(p)} in {name} is out of range: the prompt has {n_tokens} tokens, "
                             f"positions 0..{n_tokens - 1}{hint}")
        out.append(int(p))
    if not out and not allow_empty:
        raise ValueError(f"{name} is empty: give at least one position (0..{n_tokens - 1}), or None for all")
    return out


def names(value, allowed: Sequence[str], name: str) -> list[str]:
    """Names from ``allowed``: a list, or one name as a string (never split into characters)."""
    items = as_list(value, name)
    if not items:
        raise ValueError(f"{name} is empty: give at least one of {list(allowed)}")
    bad = [x for x in items if not isinstance(x, str) or x not in allowed]
    if bad:
        raise ValueError(f"unknown {name} {bad}: {name} are {list(allowed)}")
    return [str(x) for x in items]


def strings(value, name: str) -> list[str]:
    """A list of strings (edges, words): one string is a list of one."""
    items = as_list(value, name)
    bad = [x for x in items if not isinstance(x, str)]
    if bad:
        raise ValueError(f"{name} must be strings, got {bad}")
    return items
