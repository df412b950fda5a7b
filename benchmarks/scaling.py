"""Data-parallel scaling of the suite (microscope.distributed), and the work one sample costs.

1. Throughput: the same analysis on the embedded model with 1, 2, ... worker processes launched
   by ``torchrun`` (gloo, one thread each), timed from a barrier after every rank has loaded the
   model to the merged table (parts written, merged, read back). Prints samples/s per worker
   count and the efficiency ``throughput(N) / (N · throughput(1))`` (1.0: perfect scaling).

       python benchmarks/scaling.py [--task sweep|trace|extract] [--n 48] [--workers 1 2]

   On a GPU machine pass ``--workers 1 2 4 8``: each rank takes ``cuda:LOCAL_RANK``.

2. ``--plan``: the work of one knockout-sweep sample at LLaVA-1.5-7B's geometry (336 px →
   576 image tokens, 32 decoder layers, window 9, the six edges): a model with that geometry but
   tiny widths (token counts do not depend on width) runs the sweep while a hook counts every
   token each decoder forward processes. From it: decoder FLOPs per sample for the real 7B
   (2 · 6.5e9 per token, plus attention over the cache and the CLIP ViT-L/14 tower once) and
   GPU-hours for the paper's GQA sweep (5,500 samples) at a stated sustained GPU throughput.
   ``benchmarks/scale_llava7b.py`` measures the real samples/s on a GPU to replace that assumption.

       python benchmarks/scaling.py --plan [--n 4] [--samples 5500] [--tflops 400]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(task: str, n: int, out: str) -> None:
    """One rank: load, wait for all, time the distributed analysis, rank 0 writes the seconds."""
    import microscope
    from microscope import distributed as dist
    from microscope import knockout as ko
    from microscope import tracing as tr
    from microscope.data import shapes

    w = dist.init()
    h = microscope.load("shapes-llava", **dist.load_kwargs())
    samples = shapes.generate(n, seed=0)
    parts = Path(out) / "parts"
    dist.barrier()
    t, cpu = time.perf_counter(), time.process_time()
    if task == "sweep":
        df = dist.run(ko.sweep, h, samples, parts=parts, part_size=4, only_correct=False, progress=False)
    elif task == "trace":
        df = dist.run(tr.trace_dataset, h, samples, parts=parts, part_size=2, sites=["resid"], n_noise=4,
                      only_correct=False, progress=False)
    else:
        df = dist.extract(h, samples, parts, batch_size=4, progress=False).tokens()
    cpu = time.process_time() - cpu
    dist.barrier()
    secs = time.perf_counter() - t
    (Path(out) / f"result-{w.rank}.json").write_text(json.dumps({"seconds": secs, "cpu": cpu, "rows": len(df)}))


def throughput(task: str, n: int, workers: list[int]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base = None
    print(f"{task} on shapes-llava, {n} samples, one thread per worker ({os.cpu_count()} CPUs here)")
    for k in workers:
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={k}",
                   __file__, "worker", task, str(n), d]  # positional: torchrun parses options itself
            p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"torchrun with {k} worker(s) failed:\n{p.stderr[-3000:]}")
            rs = [json.loads((Path(d) / f"result-{i}.json").read_text()) for i in range(k)]
        rate = n / rs[0]["seconds"]
        base = base or rate
        cpu = ", ".join(f"{r['cpu']:.1f}" for r in rs)
        print(f"  {k} worker(s): {rs[0]['seconds']:7.1f}s  {rate:6.2f} samples/s  speed-up {rate / base:4.2f}  "
              f"efficiency {rate / (k * base):4.2f}  (CPU seconds per rank: {cpu}; {rs[0]['rows']} rows)")


def plan(n: int, n_samples: int, tflops: float) -> None:
    """Tokens per knockout-sweep sample at LLaVA-1.5-7B geometry, and the GQA sweep's GPU-hours."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from microscope import knockout as ko
    from microscope.data import shapes
    from microscope.model import Handle, adapter_for
    from microscope.zoo.shapes_llava import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer()
    size, patch, L = 336, 14, 32
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=size, patch_size=patch, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=L,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=(size // patch) ** 2, projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("sdpa")
    ip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                          chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    h = Handle(name="llava-1.5-7b-geometry", model=model, processor=proc, adapter=adapter_for(model))
    samples = shapes.generate(n, 0, image_size=size, patch_size=patch)
    counts = {"forwards": 0, "tokens": 0, "token_keys": 0, "vision": 0, "base_tokens": 0}

    def count(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if kwargs.get(k) is not None),
                     None)
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        counts["forwards"] += 1
        counts["tokens"] += x.shape[0] * x.shape[1]
        counts["token_keys"] += x.shape[0] * x.shape[1] * (past + x.shape[1])
        if past == 0:
            counts["base_tokens"] += x.shape[0] * x.shape[1]

    hook = h.adapter.layers[0].register_forward_pre_hook(count, with_kwargs=True)
    vhook = model.model.vision_tower.register_forward_pre_hook(lambda *_: counts.__setitem__("vision",
                                                                                           counts["vision"] + 1))
    df = ko.sweep(h, samples, window=ko.knockout_window(L), batch_size=64, only_correct=False, progress=False)
    hook.remove()
    vhook.remove()
    per = {k: v / n for k, v in counts.items()}
    # LLaVA-1.5-7B: Llama-2-7B decoder (6.5e9 non-embedding parameters, 32 layers × 4096), CLIP ViT-L/14-336
    decoder = 2 * 6.5e9 * per["tokens"] + 4 * 32 * 4096 * per["token_keys"] / 2  # QK^T and AV, causal half
    vision_flops = per["vision"] * 2 * 0.30e9 * 577
    flops = decoder + vision_flops
    gpu_s = flops / (tflops * 1e12)
    print(f"knockout sweep at LLaVA-1.5-7B geometry ({n} Shapes samples, {df.edge.nunique()} edges × {L} centres, "
          f"window {ko.knockout_window(L)}, batch 64; prompts of {per['base_tokens']:.0f} tokens):")
    print(f"  per sample: {per['forwards']:.1f} decoder forwards, {per['tokens']:.0f} tokens through the decoder "
          f"({per['tokens'] / (len(df) / n):.1f} per knockout row incl. the base forward), "
          f"{per['vision']:.0f} vision-tower pass(es)")
    print(f"  LLaVA-1.5-7B FLOPs per sample: {flops / 1e12:.1f} TFLOP (decoder {decoder / 1e12:.1f}, vision "
          f"{vision_flops / 1e12:.2f})")
    print(f"  at a sustained {tflops:.0f} TFLOP/s per GPU: {gpu_s:.3f} GPU-s per sample; {n_samples} samples = "
          f"{n_samples * gpu_s / 3600:.2f} GPU-hours")
    t = per["base_tokens"]
    full = (2 * 6.5e9 * t + 4 * 32 * 4096 * t * t / 2 + vision_flops) * len(df) / n
    print(f"  (one full forward per knockout, the published layout: {full / 1e12:.0f} TFLOP per sample, "
          f"{n_samples * full / (tflops * 1e12) / 3600:.1f} GPU-hours)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["sweep", "trace", "extract"], default="sweep")
    ap.add_argument("--n", type=int, default=None, help="samples (default 48; --plan: 4)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--plan", action="store_true", help="work per sample at LLaVA-1.5-7B geometry, GPU-hours")
    ap.add_argument("--samples", type=int, default=5500, help="--plan: samples of the full sweep")
    ap.add_argument("--tflops", type=float, default=400.0, help="--plan: sustained dense TFLOP/s of one GPU")
    if sys.argv[1:2] == ["worker"]:  # one rank, launched by throughput()
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    a = ap.parse_args()
    if a.plan:
        plan(a.n or 4, a.samples, a.tflops)
    else:
        throughput(a.task, a.n or 48, a.workers)


if __name__ == "__main__":
    main()
