"""One rank's share of a distributed run on the embedded model, launched by tests/test_distributed.py:

    torchrun --nproc_per_node N tests/distributed_job.py OUT [KILL]

Extraction, a knockout sweep and a causal-tracing data set over :data:`SAMPLES`, through
:mod:`microscope.distributed` into ``OUT/store``, ``OUT/sweep`` and ``OUT/trace``. Each part a
rank writes is logged to ``OUT/log-<rank>.txt``; ``KILL`` = ``STAGE:RANK`` makes that rank SIGKILL
itself right after writing its first part of that stage (``extract``, ``sweep`` or ``trace``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import microscope
from microscope import distributed as dist
from microscope import knockout as ko
from microscope import tracing as tr
from microscope.data import shapes

#: the workload (the test computes the same in one process)
N_SAMPLES, SEED = 6, 4
EXTRACT = {"layers": [-1, 2, 5], "sites": ["resid", "mlp"], "batch_size": 2}
SWEEP = {"edges": ["image↛last", "question↛last"], "part_size": 2}
TRACE = {"sites": ["resid"], "n_noise": 2, "seed": 3, "part_size": 2}


def samples():
    return shapes.generate(N_SAMPLES, seed=SEED)


def main() -> None:
    out = Path(sys.argv[1])
    stage_kill, _, rank_kill = (sys.argv[2] if len(sys.argv) > 2 else "::").partition(":")
    w = dist.init()
    log = out / f"log-{w.rank}.txt"
    out.mkdir(parents=True, exist_ok=True)

    def hook(stage):
        def done(j):
            with open(log, "a") as f:
                f.write(f"{stage} {j}\n")
            if stage == stage_kill and str(w.rank) == rank_kill:
                os.kill(os.getpid(), signal.SIGKILL)
        return done

    h = microscope.load("shapes-llava", **dist.load_kwargs())
    s = samples()
    dist.extract(h, s, out / "store", progress=False, on_shard=hook("extract"), **EXTRACT)
    dist.run(ko.sweep, h, s, parts=out / "sweep", progress=False, on_part=hook("sweep"), **SWEEP)
    dist.run(tr.trace_dataset, h, s, parts=out / "trace", progress=False, on_part=hook("trace"), **TRACE)


if __name__ == "__main__":
    main()
