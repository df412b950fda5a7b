"""Run the notebook suite headlessly with papermill.

    python -m microscope.suite --out runs/latest --figures figures [--model shapes-llava] [--small]

Executes every ``notebooks/NN_*.ipynb`` in order, writes the executed copies and each
notebook's tables under ``--out/<notebook>/``, figures (PDF + PNG) under ``--figures``, and
``--out/summary.json`` gathering each notebook's headline numbers with its run time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def notebooks(folder: Path = NOTEBOOKS) -> list[Path]:
    """The suite's notebooks, in order (``NN_name.ipynb``)."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def run(out: str | Path, figures: str | Path, model: str = "shapes-llava", small: bool = False,
        only: list[str] | None = None, folder: Path = NOTEBOOKS, kernel: str = "python3") -> dict:
    """Execute the notebooks; returns the merged summary (also written to ``out/summary.json``)."""
    import papermill as pm

    out, figures = Path(out).resolve(), Path(figures).resolve()
    out.mkdir(parents=True, exist_ok=True)
    books = notebooks(folder)
    if only:
        books = [b for b in books if any(b.stem.startswith(o) for o in only)]
    if not books:
        raise FileNotFoundError(f"no notebooks matching NN_*.ipynb in {folder}")
    summary: dict = {"model": model, "small": small, "notebooks": {}}
    t_all = time.time()
    for nb in books:
        nb_out = out / nb.stem
        nb_out.mkdir(parents=True, exist_ok=True)
        t = time.time()
        print(f"[suite] {nb.name} ...", flush=True)
        pm.execute_notebook(
            str(nb), str(out / nb.name), kernel_name=kernel, cwd=str(folder), progress_bar=False,
            parameters={"model": model, "out_dir": str(nb_out), "figures_dir": str(figures),
                        "small": small, "run_dir": str(out)},
        )
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
    args = ap.parse_args(argv)
    run(args.out, args.figures, args.model, args.small, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
