"""Speed of a batched causal-tracing map against one forward per (layer, token), in one run.

Both compute the indirect-effect map of the residual stream (every layer × every token at or
after the first corrupted one) for the same samples, corruption and noise draws:

- reference: ROME's layout — for every (layer, token) one forward of the whole prompt for the
  ``N`` corrupted rows with that single state restored;
- ours: ``microscope.tracing.trace`` — every (layer, token, noise) triple a row of batched
  forwards of ``--batch-size`` rows, each computing only the tokens from the first corrupted one
  on (the clean prefix comes from a key/value cache).

Prints both times, the ratio (reference / ours; > 1 means ours is faster) and the largest
difference between the two maps.

    python benchmarks/tracing_map.py [--model shapes-llava] [--n 6] [--noise 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from references import tracing_cells
from references import tracing_reference as reference

import microscope
from microscope import tracing as tr
from microscope.data import load_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-llava")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--noise", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h = microscope.load(args.model)
    samples = load_samples("shapes", args.n, 5, handle=h)  # on the model's image-token grid
    sigma = tr.noise_sigma(h, samples)
    cs = [tr.corrupt(h, s, n_noise=args.noise, sigma=sigma, seed=k) for k, s in enumerate(samples)]
    tr.trace(h, samples[0], sites=["resid"], corrupted=cs[0], batch_size=args.batch_size)  # warm-up

    t = time.perf_counter()
    maps = [tr.trace(h, s, sites=["resid"], corrupted=c, batch_size=args.batch_size) for s, c in zip(samples, cs)]
    ours = time.perf_counter() - t

    t = time.perf_counter()
    ref = reference(cs)
    slow = time.perf_counter() - t
    got = tracing_cells(cs, maps)
    diff, n_cells = max(abs(got[key] - p) for key, p in ref.items()), len(ref)
    print(f"model {args.model}: {len(samples)} samples, {n_cells} (layer, token) cells, N = {args.noise} noise "
          f"samples, {args.threads} threads")
    print(f"reference (one forward per (layer, token)): {slow:8.2f} s  ({n_cells} forwards)")
    forwards = sum(int(np.ceil(len(m[m.position >= int(c.positions.nonzero().min())]) * args.noise
                               / args.batch_size)) for c, m in zip(cs, maps))
    print(f"ours (batched rows):                        {ours:8.2f} s  ({forwards} forwards)")
    print(f"ratio reference / ours:                     {slow / ours:8.1f}x")
    print(f"max |p_ours - p_reference|:                 {diff:.2e}")


if __name__ == "__main__":
    main()
