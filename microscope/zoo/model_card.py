"""The model card (``MODEL_CARD.md``) written beside a trained model's weights."""

from __future__ import annotations

import json
from pathlib import Path


def write_model_card(out: str | Path, info: dict, report: dict | None = None) -> Path:
    """Write ``MODEL_CARD.md`` from the training log ``info`` and an optional accuracy report."""
    if info.get("style", "shapes-llava") == "shapes-omnifusion":
        return _write(out, info, report, _omnifusion_head(info))
    return _write(out, info, report, _llava_head(info))


def _llava_head(info: dict) -> list[str]:
    a, r = info["arch"], info["recipe"]
    sec = info["seconds"]
    return [
        "# shapes-llava",
        "",
        "A small `LlavaForConditionalGeneration` trained by mllm-microscope on the Shapes world",
        "(`microscope.data.shapes`): the embedded default model of the suite. It is a real HF",
        "LLaVA (CLIP vision tower, 2-layer GELU MLP projector, Llama decoder), loaded offline with",
        "`AutoProcessor.from_pretrained(dir)` and `LlavaForConditionalGeneration.from_pretrained(dir)`.",
        "",
        "## Config",
        "",
        f"- image {a['image_size']} px, patch {a['patch_size']} px: "
        f"{(a['image_size'] // a['patch_size']) ** 2} image tokens (CLS dropped, "
        "`vision_feature_select_strategy='default'`, `vision_feature_layer=-1`)",
        f"- vision tower: CLIP, {a['vision_layers']} layers, hidden {a['vision_hidden']}, "
        f"{a['vision_heads']} heads, MLP {a['vision_intermediate']}",
        f"- decoder: Llama, {a['text_layers']} layers, hidden {a['text_hidden']}, {a['text_heads']} heads, "
        f"MLP {a['text_intermediate']}, RoPE, RMSNorm, untied lm_head",
        "- tokenizer: word-level (`tokenizers` WordLevel, whitespace/punctuation pre-tokenizer), BOS `<s>`",
        "- prompt: `USER: <image>\\n{question} ASSISTANT:` (LLaVA-1.5); answers are one word then `</s>`",
        "",
        "## Recipe",
        "",
        f"1. Vision pre-training: {r['vision_steps']} steps × {r['vision_batch']} images "
        f"({r['vision_samples']} generated), AdamW lr {r['vision_lr']}. Per patch, the colour and shape "
        "of the object covering most of it, that object's centre and the patch's own column/row are "
        "supervised directly in designated dimensions of the tower's output features (0–6 colour logits, "
        "7–11 shape logits, 12–13 object centre, 14–15 patch position; label smoothing 0.1, regression "
        "targets ×4) so that position reaches the decoder with a magnitude comparable to colour; final "
        f"colour+shape patch accuracy {info['vision_patch_accuracy']:.3f}.",
        f"2. Visual instruction tuning (tower frozen): {r['steps']} steps × {r['batch']} conversations of "
        f"up to {r['turns']} turns about one image (the sample's own question first; then ChooseRel and "
        "CompareAttr where the scene allows, then other categories and the training-only auxiliary "
        "questions `Is the circle on the left or on the right?` and `What shape is the red object?`), "
        f"{r['pool_samples']} generated scenes, curriculum "
        f"max objects {list(r['curriculum'])} over the first {r['curriculum_fraction']:.0%} of steps, "
        f"AdamW lr {r['lr']} (warm-up {r['warmup']}, cosine), clip {r['clip']}, weight decay "
        f"{r['weight_decay']}; loss on answer and `</s>` tokens only"
        + (f", plus {r['projector_readout']} × a projector read-out loss: the projector's first 16 output "
           "dimensions must reproduce the tower's 16 read-out dimensions (MSE / 4), so colour, shape and "
           "above all position reach the decoder at full size." if r.get("projector_readout") else "."),
        f"- seed {r['seed']}; training seeds of the generator are >= 1000, evaluation seeds < 1000.",
        f"- training time: {sec['total'] / 60:.1f} min on {info['threads']} CPU threads "
        f"(vision {sec['vision']:.0f} s, decoder {sec['decoder']:.0f} s), torch {info['torch']}.",
        "",
        "Reproduce: `python -m microscope.zoo train shapes-llava --out DIR`.",
        "",
    ]


def _omnifusion_head(info: dict) -> list[str]:
    a, r = info["arch"], info["recipe"]
    sec = info["seconds"]
    return [
        "# shapes-omnifusion",
        "",
        "shapes-llava's controlled twin with OmniFusion-style fusion, trained by mllm-microscope on the",
        "Shapes world (`microscope.data.shapes`). Same decoder configuration and initialisation seed,",
        "tokenizer (plus the two marker tokens), training scenes, conversations, batches, step budget",
        "and schedule as shapes-llava; only the way the image enters the decoder differs. It is a",
        "`microscope.fusion` model: `microscope.load(\"shapes-omnifusion\")` returns its Handle",
        "(`microscope.zoo.shapes_omnifusion.load_dir` reads this directory).",
        "",
        "## Config",
        "",
        f"- image {a['image_size']} px, patch {a['patch_size']} px: "
        f"{(a['image_size'] // a['patch_size']) ** 2} image tokens, between learned begin/end-of-image vectors",
        f"- encoder 1: shapes-llava's CLIP tower (3 layers, hidden {a['vision_hidden']}; last hidden state, CLS "
        "dropped), trained exactly as shapes-llava's (same seed, same per-patch read-out supervision)",
        "- encoder 2: a CNN (4×4/4, 2×2/2, 2×2/2 convolutions to one 96-d vector per 16-px patch, then a 3×3 "
        "context convolution), trained self-supervised: masked-patch reconstruction, no labels",
        "- adapter: the two encoders' per-patch features concatenated (96 + 96), then Linear(192, 192), GELU, "
        "Linear(192, 192) into the decoder's width",
        "- `<SOI>` and `<EOI>`: their input vectors are learned parameters of the image side (written over "
        "the token embedding), role `image_boundary` in the suite",
        f"- decoder: Llama (`LlamaForCausalLM`), {a['text_layers']} layers, hidden {a['text_hidden']}, "
        f"{a['text_heads']} heads, MLP {a['text_intermediate']}, initialised as shapes-llava's (two extra "
        "vocabulary rows for the markers)",
        "- prompt: `USER: <SOI><image><EOI>\\n{question} ASSISTANT:`; answers are one word then `</s>`",
        "",
        "## Recipe",
        "",
        f"1. Encoders. CLIP tower: shapes-llava's vision pre-training ({r['vision_steps']} steps × "
        f"{r['vision_batch']} images, same seed; patch accuracy {info['vision_patch_accuracy']:.3f}"
        + (f"; its weights taken from the trained `{info['vision_from']}`, whose training log shows the same "
           "vision settings and seed, instead of recomputing the deterministic stage"
           if info.get("vision_from") else "")
        + "). CNN: "
        f"{r['conv_steps']} steps × {r['vision_batch']} of the same images, AdamW lr {r['conv_lr']}; "
        f"{r['conv_mask']:.0%} of the input patches masked, every patch's 4×4 RGB thumbnail reconstructed "
        f"by a linear head (final MSE {info.get('conv_reconstruction_mse', float('nan')):.3f}). Both frozen "
        "afterwards.",
        f"2. Alignment (OmniFusion's first stage): {r['align_steps']} steps × {r['batch']} conversations, "
        "only the adapter and the begin/end-of-image vectors train (decoder frozen), answer loss plus the "
        "adapter read-out loss.",
        f"3. Instruction tuning: exactly shapes-llava's stage 2 — {r['steps']} steps × {r['batch']} "
        f"conversations of up to {r['turns']} turns from the same {r['pool_samples']} generated scenes, the "
        f"same batches (generator seed), curriculum {list(r['curriculum'])}, AdamW lr {r['lr']} (warm-up "
        f"{r['warmup']}, cosine), clip {r['clip']}, weight decay {r['weight_decay']}; the adapter, the "
        "markers and the decoder train, encoders frozen. Loss on answer and `</s>` tokens, plus "
        f"{r['projector_readout']} × the read-out loss of shapes-llava applied to the adapter: its first 16 "
        "output dimensions must reproduce the CLIP tower's 16 read-out dimensions (MSE / 4).",
        f"- seed {r['seed']}; training seeds of the generator are >= 1000, evaluation seeds < 1000.",
        f"- training time: {sec['total'] / 60:.1f} min on {info['threads']} CPU threads "
        f"(encoders {sec['vision']:.0f} s, alignment + instruction tuning {sec['decoder']:.0f} s), "
        f"torch {info['torch']}.",
        "",
        "Reproduce: `python -m microscope.zoo train shapes-omnifusion --out DIR"
        + (f" --vision-from {info['vision_from']}" if info.get("vision_from") else "") + "`, then "
        "`python -m microscope.zoo evaluate shapes-omnifusion --model-dir DIR --n 2000 --seed 7 --card`.",
        "",
    ]


def _write(out: str | Path, info: dict, report: dict | None, lines: list[str]) -> Path:
    out = Path(out)
    r = info["recipe"]
    hist = info["decoder_history"]
    name = info.get("style", "shapes-llava")
    lines = lines + ["## Measured accuracy", ""]
    if report:
        lines += [
            f"On {report['n']} fresh samples (generator seed {report['seed']}), "
            f"`python -m microscope.zoo evaluate {name} --n "
            f"{report['n']} --seed {report['seed']}`:",
            "",
            "| category | accuracy | blank image | question-only prior |",
            "|---|---|---|---|",
        ]
        for c, v in report["per_category"].items():
            lines.append(f"| {c} | {v:.3f} | {report['blank_per_category'][c]:.3f} | "
                         f"{report['question_only_prior_per_category'][c]:.3f} |")
        lines.append(f"| **overall** | **{report['overall']:.3f}** | {report['blank_overall']:.3f} | "
                     f"{report['question_only_prior']:.3f} |")
    else:
        last = hist[-1] if hist else {}
        lines.append("Validation during training (600 samples, generator seed 1099): " +
                     ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k not in ("step", "loss")))
    lines += ["", "## Training curve", "", "```", json.dumps(hist[-6:], indent=None)[:3000], "```", ""]
    if r.get("projector_readout") and name == "shapes-llava":
        lines += [
            "## Why the projector read-out loss",
            "",
            "Without it (the previous shipped model, 0.909 overall), ChooseRel stayed at chance (0.505) and",
            "even the single-object `Is the circle on the left or on the right?` at 0.55, although the frozen",
            "tower's features encoded the object's centre (linear probe R² 0.99). Measured on that model: after",
            "the projector, the centre was still decodable (probe R² 0.976) but lay in a direction holding about",
            "1e-9 of the projector output's variance — too small for the decoder to learn to read. Tying the",
            "projector's first dimensions to the tower's read-out dimensions fixed it: in a 1200-step run from",
            "the same tower, ChooseRel reached 1.000 and the left/right question 0.958 by step 800 (this",
            "recipe reproduces that run step for step). Caveat, measured: a longer run with the same loss",
            "(120,000 scenes, 3000 steps) learned the left/right question (0.99) but not ChooseRel by step",
            "2000 (0.43), when it was stopped. The two-object comparison appears abruptly (between steps 600",
            "and 800 here); more steps do not guarantee it, so retrain with this exact recipe.",
            "",
        ]
    path = out / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path
