"""Peak memory of extraction is independent of the number of samples.

Runs ``microscope.extract`` on the embedded model for two data-set sizes, each in a fresh
process, and prints each run's peak resident set size (``ru_maxrss``) and their ratio. The
store streams one batch at a time to disk, so the ratio should stay near 1 while the data grows
``--factor`` times.

    python benchmarks/extract_memory.py [--n 64] [--factor 8] [--model shapes-llava]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys, time
import microscope
from microscope.data import load_samples
from microscope.extract import extract
model, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
h = microscope.load(model)
samples = load_samples("shapes", n, 0, handle=h)
t = time.time()
extract(h, samples, out, batch_size=16, progress=False)
print(json.dumps({"n": n, "seconds": time.time() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(model: str, n: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run([sys.executable, "-c", CHILD, model, str(n), d], capture_output=True, text=True,
                             check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-llava")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--factor", type=int, default=8)
    a = ap.parse_args()
    small, large = run(a.model, a.n), run(a.model, a.n * a.factor)
    for r in (small, large):
        print(f"n={r['n']:6d}  peak RSS {r['peak_rss_mb']:8.1f} MB  extraction {r['seconds']:.1f}s")
    print(f"data x{a.factor}: peak RSS ratio {large['peak_rss_mb'] / small['peak_rss_mb']:.3f} "
          f"(1.0 = independent of the number of samples)")


if __name__ == "__main__":
    main()
