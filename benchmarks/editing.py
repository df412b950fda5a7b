"""Time and memory of one edit per method, against the published MultEdit computation, in one run.

Part 1, on a model (default shapes-llava): one concept edit (``--n`` requests, "cross" →
"circle" in the Shapes world) per method of ``microscope.editing`` at ``--layer``; prints the
seconds, the peak resident memory growth and the three numbers of each. The reference for
MultEdit is the published procedure on the same requests: the value step recomputing the whole
prompt on every Adam step (the reference script's forward), then the closed form with a
``d_in × d_in`` inverse. Ratios are reference / ours (> 1: ours is faster).

Part 2, the closed form alone at the size of LLaVA-1.5-7B's MLP (``d_in`` 11008, ``d_out``
4096, ``--keys`` keys): the published ``(KKᵀ + λI)⁻¹(KVᵀ + λWᵀ)`` against the push-through
``W + Δ(KᵀK + λI)⁻¹Kᵀ`` (an ``n × n`` solve), with their largest difference.

    python benchmarks/editing.py [--model shapes-llava] [--n 16] [--layer 1] [--keys 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import microscope
from microscope import editing as ed


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _published_value_step(h, lin, runs, steps, lr, wd, clamp):
    """The reference script's value step: Adam on δ, every step a forward of the whole prompt."""
    deltas = [torch.zeros(r.value.shape, requires_grad=True) for r in runs]
    opt = torch.optim.Adam(deltas, lr=lr)
    for p in h.model.parameters():
        p.requires_grad_(False)
    for _ in range(steps):
        opt.zero_grad()
        for r, d in zip(runs, deltas):
            def add(_m, _a, out, r=r, d=d):
                out = out.clone()
                out[0, r.pos] = out[0, r.pos] + d
                return out
            hk = lin.register_forward_hook(add)
            try:
                logits = h.model(**r.inputs, use_cache=False, logits_to_keep=1).logits[0, -1].float()
                (-(logits.log_softmax(-1)[r.answer]) + wd * d.norm() / r.value.float().norm() ** 2).backward()
            finally:
                hk.remove()
        opt.step()
        with torch.no_grad():
            for r, d in zip(runs, deltas):
                cap = clamp * float(r.value.norm())
                if float(d.norm()) > cap:
                    d.mul_(cap / float(d.norm()))
    return torch.stack([d.detach().double() for d in deltas])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-llava")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--keys", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h = microscope.load(args.model)
    sets = ed.concept_sets(h, "cross", "circle", n_edit=args.n, n_general=args.n, n_unrelated=4 * args.n, seed=5)
    cov = sets.unrelated
    print(f"{args.model}, layer {args.layer}, {len(sets.requests)} requests, {args.threads} threads")
    times = {}
    for m in ed.METHODS:
        r0, t0 = _rss_mb(), time.perf_counter()
        e = ed.edit(h, sets.requests, args.layer, m, position="last", covariance=cov, steps=40)
        times[m] = time.perf_counter() - t0
        s = ed.summary(ed.evaluate(h, e, sets.requests, sets.generalization, sets.unrelated))
        print(f"  {m:9s} {times[m]:6.2f} s  peak RSS +{_rss_mb() - r0:6.1f} MB  steps {len(e.losses):3d}  "
              f"efficacy {s['efficacy']:.3f}  generalization {s['generalization']:.3f}  "
              f"specificity {s['specificity']:.3f}")
    # the published procedure for MultEdit on the same requests, as many steps as ours took
    lin = ed.weight(h, args.layer)
    runs = ed._runs(h, lin, sets.requests, ed._check(h, sets.requests), "last")
    hp = ed.DEFAULTS["multedit"]
    t0 = time.perf_counter()
    ours_d, losses = ed._target_deltas(h, lin, runs, 40, hp["lr"], hp["weight_decay"], hp["clamp"])
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_d = _published_value_step(h, lin, runs, len(losses) - (losses[-1] < ed.STOP), hp["lr"], hp["weight_decay"],
                                  hp["clamp"])
    t_ref = time.perf_counter() - t0
    keys = torch.stack([r.key for r in runs])
    lam = hp["ridge"] * float((keys ** 2).sum(-1).mean())
    t0 = time.perf_counter()
    ref = ed.multedit_update_published(keys, ref_d, lin.weight.detach(), lam)
    t_ref_cf = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = ed.multedit_update(keys, ours_d, lam)
    t_ours_cf = time.perf_counter() - t0
    print(f"MultEdit value step ({len(losses)} steps): published {t_ref:.2f} s, ours {t_ours:.2f} s, "
          f"ratio {t_ref / t_ours:.1f}x; max |Δδ| {float((ours_d - ref_d).abs().max()):.2e}")
    print(f"MultEdit closed form (d_in {keys.shape[1]}): published {t_ref_cf * 1e3:.1f} ms, "
          f"ours {t_ours_cf * 1e3:.2f} ms, "
          f"ratio {t_ref_cf / t_ours_cf:.1f}x; max |ΔW difference| {float((ours - ref).abs().max()):.2e}")
    # part 2: the closed form at LLaVA-1.5-7B's MLP size
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n = 11008, 4096, args.keys
    K = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    D = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 0.02
    lam = 0.1 * float((K ** 2).sum(-1).mean())
    r0, t0 = _rss_mb(), time.perf_counter()
    ref = ed.multedit_update_published(K, D, W, lam)
    t_ref, m_ref = time.perf_counter() - t0, _rss_mb() - r0
    r0, t0 = _rss_mb(), time.perf_counter()
    ours = ed.multedit_update(K, D, lam)
    t_ours, m_ours = time.perf_counter() - t0, _rss_mb() - r0
    print(f"closed form at 7B MLP size ({n} keys, d_in {d_in}): published {t_ref:.2f} s (+{m_ref:.0f} MB), "
          f"ours {t_ours:.3f} s (+{m_ours:.0f} MB), ratio {t_ref / t_ours:.0f}x; "
          f"max difference {float((ours - ref).abs().max()):.1e}")


if __name__ == "__main__":
    main()
