"""Run the notebook suite headlessly with papermill.

    python -m microscope.suite --out runs/latest --figures figures [--model shapes-llava] [--small]
                               [-p window 3 -p categories '["ChooseAttr"]'] [--allow-factory]

Executes every ``notebooks/NN_*.ipynb`` in order, writes the executed copies and each
notebook's tables under ``--out/<notebook>/``, figures (PDF + PNG) under ``--figures``, and
``--out/summary.json`` gathering each notebook's headline numbers with its run time.

Every parameter is checked against the notebooks' parameter cells (:func:`check_parameters`)
before any notebook starts: an unknown name or a value of the wrong type is refused, naming the
accepted parameters.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from microscope import validate
from microscope.errors import MicroscopeError

if TYPE_CHECKING:
    from traitlets.config import Config

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
#: parameters whose default is ``None``: what else they accept (others with a ``None`` default: anything)
OPTIONAL = {"layers": "layers", "window": int, "n_tokens": int, "edges": list, "categories": list,
            "store_dir": str, "compare_store_dir": str, "parts_dir": str, "compare": list}
#: names IPython puts in a kernel's namespace (not parameters)
_KERNEL_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


class NotebookParameterError(MicroscopeError, ValueError):
    """A papermill parameter the notebook does not declare, or of the wrong type."""


def declared_parameters(notebook: str | Path) -> dict[str, object]:
    """The parameters a notebook declares in its ``parameters`` cell, with their defaults
    (papermill's ``inspect_notebook``; a default that is not a literal is ``...``)."""
    import papermill as pm

    out = {}
    for name, p in pm.inspect_notebook(str(notebook)).items():
        try:
            out[name] = ast.literal_eval(p["default"])
        except (ValueError, SyntaxError):
            out[name] = ...
    return out


def _kind(default, name: str):
    """What a parameter accepts: the type of its default (``OPTIONAL`` for ``None`` defaults)."""
    if default is None:
        return OPTIONAL.get(name)
    if default is ...:
        return None
    return type(default)


def _coerce(nb: str, name: str, value, default):
    """``value`` checked (and normalised) against what parameter ``name`` accepts."""
    kind = _kind(default, name)
    if kind is None or (value is None and default is None):
        return value

    def bad(what: str):
        return NotebookParameterError(f"{nb}: parameter {name}={value!r} ({type(value).__name__}) must be {what} "
                                      f"(default {default!r})")

    if kind is bool:
        if not isinstance(value, bool):
            raise bad("True or False")
        return value
    if kind is int:
        if not validate.is_int(value):
            raise bad("a whole number" + (" or None" if default is None else ""))
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not (validate.is_int(value) or isinstance(value, float)):
            raise bad("a number")
        return float(value)
    if kind is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise bad("a string" + (" or None" if default is None else ""))
        return value
    if kind is dict:
        if isinstance(value, str):
            parsed = validate._literal(value)
            if isinstance(parsed, dict):
                return parsed
        if not isinstance(value, Mapping):
            raise bad("a mapping, e.g. -y '" + name + ": {key: value}'")
        return dict(value)
    if kind in (list, tuple):
        try:
            items = validate.as_list(value, name)
        except ValueError as e:
            raise NotebookParameterError(f"{nb}: {e}") from e
        return items
    if kind == "layers":
        try:
            items = validate.as_list(value, name)
        except ValueError as e:
            raise NotebookParameterError(f"{nb}: {e}") from e
        if not all(validate.is_int(x) for x in items):
            raise bad("a list of layer indices (whole numbers, -1 for the embedding output) or None, e.g. "
                      "-y 'layers: [0, 3]'")
        return [int(x) for x in items]
    if not isinstance(value, kind):
        raise bad(f"a {kind.__name__}")
    return value


def check_parameters(notebook: str | Path, parameters: Mapping[str, object],
                     declared: Mapping[str, object] | None = None) -> dict[str, object]:
    """``parameters`` checked against what ``notebook`` declares, before it runs.

    Raises :class:`NotebookParameterError` naming an unknown parameter (with the closest declared
    name and the full list) or a value of the wrong type for its default (``int`` for an integer
    default, ``True``/``False`` for a boolean, a list for a list, ...; ``None`` defaults accept
    what :data:`OPTIONAL` says). Returns the parameters normalised: numpy integers as ``int``, a
    list given as a string (papermill's ``-p layers '[0, 3]'``) parsed, one string where a list is
    expected as a list of one.
    """
    nb = Path(notebook).name
    declared = declared_parameters(notebook) if declared is None else declared
    unknown = [k for k in parameters if k not in declared]
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, declared, 1)) else repr(k)
                 for k in unknown]
        raise NotebookParameterError(f"{nb}: unknown parameter(s) {', '.join(hints)}; it accepts "
                                     f"{', '.join(declared)}")
    return {k: _coerce(nb, k, v, declared[k]) for k, v in parameters.items()}


def check_kernel_parameters(notebook: str | Path, namespace: Mapping[str, object]) -> None:
    """The same check from inside a running notebook: ``namespace`` is its ``globals()`` right
    after the parameter cells (papermill's injected cell included). Names that are neither
    declared parameters, modules, IPython's own nor private (``_x``) are unknown parameters.
    A headless run (``interactive=False``) then gets text progress bars (:func:`microscope.progress.headless`):
    no widget is created in it."""
    import types

    declared = declared_parameters(notebook)
    given = {k: v for k, v in namespace.items()
             if not k.startswith("_") and k not in _KERNEL_NAMES and not isinstance(v, types.ModuleType)}
    checked = check_parameters(notebook, given, declared)
    if checked.get("interactive", True) is False:
        from microscope import progress

        progress.headless()


@contextlib.contextmanager
def _factories(model: str, allow_factory: bool) -> Iterator[None]:
    """Allow the kernels to call ``model``'s factory (``$MICROSCOPE_FACTORIES``) while they run."""
    from microscope.model import FACTORIES_ENV, is_factory_spec

    if not (allow_factory and is_factory_spec(model)):
        yield
        return
    old = os.environ.get(FACTORIES_ENV)
    os.environ[FACTORIES_ENV] = ",".join(filter(None, [old, model.split(":")[0]]))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FACTORIES_ENV, None)
        else:
            os.environ[FACTORIES_ENV] = old


def notebooks(folder: Path = NOTEBOOKS) -> list[Path]:
    """The suite's notebooks, in order (``NN_name.ipynb``)."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def headless(declared) -> dict:
    """``{"interactive": False}`` for a notebook that declares it: its explore panels then draw once
    with their defaults instead of building ipywidgets, whose comm messages can leave a headless
    kernel client waiting forever (jupyter/nbclient#312, nteract/papermill#723)."""
    return {"interactive": False} if "interactive" in declared else {}


@contextlib.contextmanager
def headless_kernels() -> Iterator[Config]:
    """Kernel-manager configuration for headless runs, handed to papermill as ``config=`` (it passes
    it on to nbclient's kernel manager): kernels listen on local IPC sockets (Unix domain sockets
    in a fresh folder only the current user can enter, removed afterwards) instead of TCP ports on
    localhost, on which ipykernel warns that all traffic goes unencrypted. The socket path is
    absolute: jupyter_client's default for IPC is relative to the working directory, which papermill
    sets to the notebooks' folder. A ZeroMQ without the IPC transport (Windows) keeps TCP."""
    import tempfile

    import zmq
    from traitlets.config import Config

    if not zmq.has("ipc"):
        yield Config()
        return
    with tempfile.TemporaryDirectory(prefix="microscope-kernels-") as d:  # mode 0700
        yield Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(d, "kernel")}})


def run(out: str | Path, figures: str | Path, model: str = "shapes-llava", small: bool = False,
        only: list[str] | None = None, folder: Path = NOTEBOOKS, kernel: str = "python3",
        parameters: Mapping[str, object] | None = None, allow_factory: bool = False) -> dict:
    """Execute the notebooks; returns the merged summary (also written to ``out/summary.json``).

    ``parameters``: more papermill parameters, each passed to the notebooks that declare it; a
    name no selected notebook declares, or a value of the wrong type, is refused before any
    notebook runs (:func:`check_parameters`). ``allow_factory``: ``model`` may be a
    ``"module:function"`` factory (:func:`microscope.load`'s ``allow_factory``), allowed for the kernels
    through ``$MICROSCOPE_FACTORIES``.
    """
    import papermill as pm

    books = notebooks(folder)
    if only:
        books = [b for b in books if any(b.stem.startswith(o) for o in only)]
    if not books:
        raise FileNotFoundError(f"no notebooks matching NN_*.ipynb in {folder}")
    out, figures = Path(out).resolve(), Path(figures).resolve()
    extra = dict(parameters or {})
    declared = {nb: declared_parameters(nb) for nb in books}
    unknown = [k for k in extra if not any(k in d for d in declared.values())]
    if unknown:
        names = sorted({k for d in declared.values() for k in d})
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, names, 1)) else repr(k)
                 for k in unknown]
        raise NotebookParameterError(f"unknown parameter(s) {', '.join(hints)}: no notebook of "
                                     f"{[b.name for b in books]} declares them; they accept {', '.join(names)}")
    plans = {}
    for nb in books:
        params = {"model": model, "out_dir": str(out / nb.stem), "figures_dir": str(figures), "small": small,
                  "run_dir": str(out), **headless(declared[nb]),
                  **{k: v for k, v in extra.items() if k in declared[nb]}}
        plans[nb] = check_parameters(nb, params, declared[nb])
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"model": model, "small": small, "notebooks": {}}
    t_all = time.time()
    with headless_kernels() as kernel_config:
        for nb in books:
            nb_out = out / nb.stem
            nb_out.mkdir(parents=True, exist_ok=True)
            t = time.time()
            print(f"[suite] {nb.name} ...", flush=True)
            with _factories(model, allow_factory):
                pm.execute_notebook(str(nb), str(out / nb.name), kernel_name=kernel, cwd=str(folder),
                                    progress_bar=False, parameters=plans[nb], config=kernel_config)
            secs = time.time() - t
            s_path = nb_out / "summary.json"
            entry = json.loads(s_path.read_text()) if s_path.is_file() else {}
            entry["seconds"] = round(secs, 1)
            summary["notebooks"][nb.stem] = entry
            print(f"[suite] {nb.name} done in {secs:.0f}s", flush=True)
    summary["seconds"] = round(time.time() - t_all, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[suite] {len(books)} notebooks in {summary['seconds']:.0f}s -> {out}/summary.json", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microscope.suite", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/latest", help="run folder (executed notebooks, tables)")
    ap.add_argument("--figures", default="figures", help="figure folder (PDF + PNG)")
    ap.add_argument("--model", default="shapes-llava", help="bundled name, local directory or cached id")
    ap.add_argument("--small", action="store_true", help="small/fast parameters (as in the tests)")
    ap.add_argument("--only", nargs="*", help="run only notebooks whose name starts with these")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="a notebook parameter (a Python literal, else a string), checked before anything runs")
    ap.add_argument("--allow-factory", action="store_true",
                    help="let --model be a 'module:function' factory (imports and calls it)")
    args = ap.parse_args(argv)
    params = {}
    for name, value in args.parameter:
        parsed = validate._literal(value)
        params[name] = value if parsed is None and value.strip() != "None" else parsed
    try:
        run(args.out, args.figures, args.model, args.small, args.only, parameters=params,
            allow_factory=args.allow_factory)
    except NotebookParameterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
