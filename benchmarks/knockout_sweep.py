"""Speed of the batched knockout sweep against one forward per window centre, in one run.

Both compute, for the same samples, edges and window, the probability of the answer with the
edge blocked in each window of layers:

- reference: the published layout — for every (sample, edge, window centre) one full forward of
  the model (vision tower included) with that window's plan;
- ours: ``microscope.knockout.sweep`` — one plain forward per sample, then every (edge, centre)
  pair as a row of batched ``inputs_embeds`` forwards with per-row layer masks.

Prints both times, the ratio (reference / ours; > 1 means ours is faster) and the largest
difference between the two sets of probabilities.

    python benchmarks/knockout_sweep.py [--model shapes-llava] [--n 40] [--window 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from references import knockout_reference as reference

import microscope
from microscope import knockout as ko
from microscope.data import load_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-llava")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h = microscope.load(args.model)
    samples = load_samples("shapes", args.n, 3, handle=h)  # on the model's image-token grid
    window = args.window or ko.knockout_window(h.adapter.n_layers)
    edges = list(ko.SWEEP_EDGES)
    correct = ko.predict(h, samples, progress=False).correct.tolist()
    samples = [s for s, ok in zip(samples, correct) if ok]
    ko.sweep(h, samples[:2], edges=edges, window=window, progress=False)  # warm-up
    reference(h, samples[:2], edges, window)

    t = time.perf_counter()
    df = ko.sweep(h, samples, edges=edges, window=window, only_correct=False, progress=False)
    ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = reference(h, samples, edges, window)
    slow = time.perf_counter() - t
    diff = max(abs(r.p_blocked - ref[(r.sample_id, r.edge, r.layer)]) for r in df.itertuples())
    print(f"model {args.model}: {len(samples)} correct samples × {len(edges)} edges × {h.adapter.n_layers} "
          f"centres (window {window}) = {len(df)} knockouts, {args.threads} threads")
    print(f"reference (one forward per window centre): {slow:8.2f} s")
    print(f"ours (batched sweep):                      {ours:8.2f} s")
    print(f"ratio reference / ours:                    {slow / ours:8.1f}x")
    print(f"max |p_ours - p_reference|:                {diff:.2e}")


if __name__ == "__main__":
    main()
