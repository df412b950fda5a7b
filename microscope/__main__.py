"""``python -m microscope run NOTEBOOK --nproc N``: one notebook, its analyses split over N processes.

    python -m microscope run notebooks/03_attention_knockout.ipynb --nproc 4 --out runs/ko \\
        -p model /data/llava-1.5-7b-hf -p n_samples 5500
    # several nodes: the same command on each, with --nnodes 2 --node-rank R --master-addr HOST

Launches ``torchrun`` with N processes (one per GPU, or per CPU group); each executes the notebook
with papermill (:func:`microscope.distributed.run_notebook`). The analyses the notebook routes
through :mod:`microscope.distributed` split their samples over the processes, write their parts
under ``OUT/parts`` (resumable: rerun the same command after a failure and only the missing parts
are computed) and continue on the merged results; rank 0's executed notebook, tables and figures
are the results (``OUT/NOTEBOOK``, ``OUT/*.parquet``, ``--figures``). ``--nproc 1`` runs the notebook
in this process's papermill, still resumable through ``OUT/parts``. Parameters are checked against
the notebook's parameters cell before anything starts; the notebook must declare ``parts_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from microscope import suite, validate


def plan(notebook: str | Path, out: str | Path, figures: str | Path, model: str | None, small: bool,
         parameters: dict) -> dict:
    """The notebook's papermill parameters for a distributed run, checked against its parameters cell."""
    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"no notebook {notebook}: pass a path such as notebooks/03_attention_knockout.ipynb")
    declared = suite.declared_parameters(notebook)
    if "parts_dir" not in declared:
        raise suite.NotebookParameterError(
            f"{notebook.name} declares no parts_dir parameter, so none of its analyses is split over processes: "
            "run it with --nproc 1 through python -m microscope.suite, or route its analyses through "
            "microscope.distributed.run(fn, handle, samples, parts=parts_dir, ...)")
    out = Path(out).resolve()
    params = {"out_dir": str(out), "figures_dir": str(Path(figures).resolve()), "small": small,
              "parts_dir": str(out / "parts"), **suite.headless(declared),
              **({"model": model} if model is not None else {}), **parameters}
    if "run_dir" in declared and "run_dir" not in parameters:
        params["run_dir"] = str(out.parent)
    return suite.check_parameters(notebook, params, declared)


def launch(notebook: str | Path, out: str | Path, params: dict, nproc: int, nnodes: int = 1, node_rank: int = 0,
           master_addr: str | None = None, master_port: int = 29500) -> int:
    """Run ``torchrun`` (``nproc`` processes per node) executing ``notebook`` on every rank; returns
    its exit status."""
    worker = ["-m", "microscope.distributed", "notebook", str(Path(notebook).resolve()), str(Path(out).resolve()),
              json.dumps(params)]
    if nnodes == 1:
        rdzv = ["--standalone"]
    else:
        if not master_addr:
            raise ValueError("--nnodes > 1 needs --master-addr (the host of node 0, reachable from every node)")
        rdzv = [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={master_addr}",
                f"--master-port={master_port}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, f"--nproc-per-node={nproc}", *worker]
    print("[microscope] " + " ".join(cmd[:-1]) + " '<parameters>'", flush=True)
    return subprocess.call(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microscope", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="execute a notebook with its analyses split over processes")
    r.add_argument("notebook")
    r.add_argument("--nproc", type=int, default=1, help="processes per node (one per GPU, or per CPU group)")
    r.add_argument("--out", default=None, help="output folder (default runs/latest/<notebook>)")
    r.add_argument("--figures", default="figures", help="figure folder (PDF + PNG)")
    r.add_argument("--model", default=None, help="bundled name, local directory or cached id")
    r.add_argument("--small", action="store_true", help="small/fast parameters (as in the tests)")
    r.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a notebook parameter (a Python literal, else a string)")
    r.add_argument("--nnodes", type=int, default=1, help="nodes (run the same command on each)")
    r.add_argument("--node-rank", type=int, default=0)
    r.add_argument("--master-addr", default=None, help="host of node 0 (several nodes)")
    r.add_argument("--master-port", type=int, default=29500)
    a = ap.parse_args(argv)
    if a.nproc < 1 or a.nnodes < 1:
        ap.error(f"--nproc and --nnodes must be at least 1, got {a.nproc} and {a.nnodes}")
    params = {}
    for name, value in a.parameter:
        parsed = validate._literal(value)
        params[name] = value if parsed is None and value.strip() != "None" else parsed
    out = Path(a.out or Path("runs/latest") / Path(a.notebook).stem)
    try:
        checked = plan(a.notebook, out, a.figures, a.model, a.small, params)
    except (suite.NotebookParameterError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.nproc == 1 and a.nnodes == 1:
        from microscope.distributed import run_notebook

        print(f"[microscope] {run_notebook(a.notebook, out, checked)}", flush=True)
        return 0
    status = launch(a.notebook, out, checked, a.nproc, a.nnodes, a.node_rank, a.master_addr, a.master_port)
    if status == 0:
        print(f"[microscope] {out.resolve() / Path(a.notebook).name}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
