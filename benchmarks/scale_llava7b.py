"""Throughput and peak memory at real scale: a randomly initialised LLaVA-1.5-7B (no weights needed).

Builds ``LlavaForConditionalGeneration`` from the LLaVA-1.5-7B configuration (CLIP ViT-L/14 at
336 px → 576 image tokens, 32-layer 4096-wide Llama decoder) with random weights in float16 on
the GPU, and a processor with the real image size and chat template (word-level tokenizer: the
weights are random, so only shapes and timings matter). Then, on Shapes-world questions:

1. extraction of the residual stream at every layer into an activation store;
2. one knockout sweep (six edges × 32 window centres per sample, batched);
3. one causal-tracing map of one sample (resid, L × T × N restorations, batched);

and prints tokens/s, samples/s, wall time and peak GPU memory of each.

    python benchmarks/scale_llava7b.py [--n 8] [--device cuda] [--tiny]

``--tiny`` shrinks every width and depth (same code paths, seconds on a CPU) — a smoke test.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from microscope import knockout as ko
from microscope import tracing as tr
from microscope.data import shapes
from microscope.extract import extract
from microscope.model import Handle, adapter_for
from microscope.zoo.shapes_llava import CHAT_TEMPLATE, build_tokenizer


def llava15_7b(tok, tiny: bool) -> tuple[LlavaConfig, int, int]:
    size, patch = (336, 14) if not tiny else (56, 14)
    vision = CLIPVisionConfig(hidden_size=1024 if not tiny else 32, intermediate_size=4096 if not tiny else 64,
                              num_hidden_layers=24 if not tiny else 2, num_attention_heads=16 if not tiny else 2,
                              image_size=size, patch_size=patch, projection_dim=768 if not tiny else 32)
    text = LlamaConfig(vocab_size=32064 if not tiny else len(tok), hidden_size=4096 if not tiny else 64,
                       intermediate_size=11008 if not tiny else 128, num_hidden_layers=32 if not tiny else 4,
                       num_attention_heads=32 if not tiny else 4, num_key_value_heads=32 if not tiny else 4,
                       max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=(size // patch) ** 2, projector_hidden_act="gelu")
    return cfg, size, patch


def peak(device) -> str:
    if torch.device(device).type != "cuda":
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"


def reset(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="samples for extraction and the knockout sweep")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--noise", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    dtype = torch.float16 if torch.device(a.device).type == "cuda" else torch.float32
    tok = build_tokenizer()
    cfg, size, patch = llava15_7b(tok, a.tiny)
    t = time.time()
    with torch.device(a.device):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters ({dtype}) on {a.device} in "
          f"{time.time() - t:.0f}s")
    ip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                          chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    model.set_attn_implementation("sdpa")  # what microscope.load uses; knockout wraps it
    h = Handle(name="llava-1.5-7b-random", model=model, processor=proc, adapter=adapter_for(model))
    samples = shapes.generate(a.n, 0, image_size=size, patch_size=patch)
    L = h.adapter.n_layers

    reset(a.device)
    t = time.time()
    with tempfile.TemporaryDirectory() as d:
        store = extract(h, samples, d, batch_size=4, progress=False)
        n_tok = len(store.tokens())
    dt = time.time() - t
    print(f"extraction: {a.n} samples, {L + 1} layers, {n_tok} tokens in {dt:.1f}s = {n_tok / dt:.0f} tokens/s, "
          f"peak {peak(a.device)}")

    reset(a.device)
    t = time.time()
    df = ko.sweep(h, samples, window=ko.knockout_window(L), batch_size=a.batch_size, only_correct=False, progress=False)
    dt = time.time() - t
    print(f"knockout sweep: {a.n} samples × {df.edge.nunique()} edges × {L} centres = {len(df)} knockouts in "
          f"{dt:.1f}s = {a.n / dt:.2f} samples/s, peak {peak(a.device)}")

    reset(a.device)
    t = time.time()
    m = tr.trace(h, samples[0], sites=["resid"], n_noise=a.noise, sigma=1.0, batch_size=a.batch_size)
    dt = time.time() - t
    print(f"tracing map: 1 sample, {m.layer.nunique()} layers × {m.position.nunique()} tokens × N={a.noise} in "
          f"{dt:.1f}s, peak {peak(a.device)}")


if __name__ == "__main__":
    main()
