"""Training recipe of ``shapes-llava``, in stages as LLaVA is trained.

1. **Vision pre-training.** The CLIP tower alone learns per-patch labels — colour and shape
   of the object covering most of each patch (or background), that object's centre, and the
   patch's own column and row — written directly into designated dimensions of its output
   features, the hidden state LLaVA feeds its projector (``hidden_states[vision_feature_layer]``
   without CLS); see :func:`train_vision` for why not through free linear heads.
2. **Visual instruction tuning.** The tower is frozen (as in LLaVA-1.5); its features for a
   pool of generated samples are computed once, and the projector and the Llama decoder learn
   the LLaVA-1.5 conversation ``USER: <image>\\n{question} ASSISTANT: {answer}</s>`` with
   cross-entropy on the answer and ``</s>`` tokens only, in multi-turn conversations of up to
   ``turns`` questions about one image (the first is the sample's own; the others may include
   the training-only auxiliary questions ``Is the circle on the left or on the right?`` and
   ``What shape is the red object?``, which exercise retrieving an object's position and
   retrieving by colour, the two steps ChooseRel and ChooseCat build on). A curriculum raises the number of
   objects per scene from 2 to 5; AdamW with linear warm-up, cosine decay and gradient clipping.

Everything is deterministic for a seed (``torch.use_deterministic_algorithms``, one thread
pool, seeded generators). The training samples come from seeds ``>= 1000``; evaluation uses
seeds below that.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from microscope.data import shapes
from microscope.progress import tqdm
from microscope.zoo.shapes_llava import ARCH, build_model, build_processor, prompt

TRAIN_SEED_BASE = 1000
#: feature dimensions of the vision tower's output that stage 1 supervises directly
READOUT: dict[str, slice] = {"color": slice(0, 7), "shape": slice(7, 12), "center": slice(12, 14),
                             "patch": slice(14, 16)}
#: regression targets in [-1, 1] are scaled to this size, comparable to the logits
POS_SCALE = 4.0


@dataclass
class Recipe:
    """Hyper-parameters of the two training stages."""

    seed: int = 0
    vision_samples: int = 12_000
    vision_steps: int = 800
    vision_batch: int = 64
    vision_lr: float = 2e-3
    pool_samples: int = 24_000
    steps: int = 1200
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 150
    weight_decay: float = 0.01
    clip: float = 1.0
    curriculum: tuple[int, ...] = (2, 3, 4, 5)
    curriculum_fraction: float = 0.4
    turns: int = 4
    aux_questions: bool = True
    #: weight of the projector read-out loss: the projector's first dimensions must reproduce the
    #: vision tower's supervised read-out dimensions (colour, shape, object centre, patch
    #: position), so they reach the decoder with their full size (0 disables)
    projector_readout: float = 1.0
    eval_every: int = 200
    eval_samples: int = 400
    threads: int = 2
    #: shapes-omnifusion only: steps of OmniFusion's alignment stage (adapter and begin/end-of-image
    #: vectors, decoder frozen) before instruction tuning
    align_steps: int = 100
    #: shapes-omnifusion only: self-supervised pre-training of the convolutional encoder
    conv_steps: int = 150
    conv_lr: float = 2e-3
    conv_mask: float = 0.25
    #: a trained shapes-llava (bundled name or directory) whose CLIP tower is taken instead of
    #: running :func:`train_vision` again; it must come from this recipe's vision fields and seed
    #: (the stage is deterministic, so the tower is the one it would compute). Empty: train it.
    vision_from: str = ""


# ----------------------------------------------------------------------------- helpers

def pixel_values(processor, images: list) -> torch.Tensor:
    """Pixel tensor of a list of PIL images, through the processor's own image processor."""
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def patch_labels(samples: list[shapes.Sample], min_fraction: float = 0.15
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch colour class, shape class and object centre of the object covering most of
    each patch.

    Class 0 is background (no object covers ``min_fraction`` of the patch); colour ``c`` is
    ``1 + index in COLORS``, shape ``s`` is ``1 + index in SHAPES``. The centre is the object's
    box centre scaled to [-1, 1] (x, y); it is NaN on background patches.
    """
    colors, shape_names = list(shapes.COLORS), list(shapes.SHAPES)
    g = samples[0].grid
    col = torch.zeros(len(samples), g * g, dtype=torch.long)
    shp = torch.zeros_like(col)
    ctr = torch.full((len(samples), g * g, 2), float("nan"))
    for i, s in enumerate(samples):
        best = np.zeros(g * g)
        for o in s.objects:
            cx, cy = o.center
            for p, f in zip(o.patches, o.patch_fraction):
                if f >= min_fraction and f > best[p]:
                    best[p] = f
                    col[i, p] = 1 + colors.index(o.color)
                    shp[i, p] = 1 + shape_names.index(o.shape)
                    ctr[i, p, 0] = 2 * cx / s.image_size - 1
                    ctr[i, p, 1] = 2 * cy / s.image_size - 1
    return col, shp, ctr


def vision_features(model, pix: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """What LLaVA feeds its projector: ``hidden_states[vision_feature_layer][:, 1:]``."""
    layer = model.config.vision_feature_layer
    out = []
    with torch.no_grad():
        for i in range(0, len(pix), batch):
            hs = model.model.vision_tower(pix[i:i + batch], output_hidden_states=True).hidden_states
            out.append(hs[layer][:, 1:])
    return torch.cat(out)


def llava_prompt(question: str) -> str:
    """shapes-llava's prompt text with the image placeholder expanded to one token per patch."""
    return prompt(question).replace("<image>", "<image>" * n_image_tokens())


def encode_text(processor, questions: list[str], answers: list[str] | None, length: int,
                expand: Callable[[str], str] = llava_prompt) -> torch.Tensor:
    """Left-padded ids of ``expand(question) + ' answer</s>'`` (the prompt, image expanded)."""
    tok = processor.tokenizer
    ids = torch.full((len(questions), length), tok.pad_token_id, dtype=torch.long)
    for i, q in enumerate(questions):
        row = tok(expand(q))["input_ids"]
        if answers is not None:
            row = row + tok(answers[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(row) > length:
            raise ValueError(f"sequence of {len(row)} tokens exceeds length={length}")
        ids[i, length - len(row):] = torch.tensor(row)
    return ids


def n_image_tokens() -> int:
    """Image tokens per image: one per patch (the CLS feature is dropped)."""
    return (ARCH["image_size"] // ARCH["patch_size"]) ** 2


def encode_conversation(processor, turns: list[tuple[str, str, str]], length: int,
                        expand: Callable[[str], str] = llava_prompt) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels of a LLaVA-1.5 multi-turn conversation about one image.

    ``USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>...``; labels are the ids
    of the answer words and their ``</s>``, -100 elsewhere (LLaVA's masking).
    """
    tok = processor.tokenizer
    ids: list[int] = []
    labels: list[int] = []
    for k, (q, a, _) in enumerate(turns):
        text = expand(q) if k == 0 else f"USER: {q} ASSISTANT:"
        piece = tok(text, add_special_tokens=k == 0)["input_ids"]
        ans = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids += piece + ans
        labels += [-100] * len(piece) + ans
    if len(ids) > length:
        ids, labels = ids[:length], labels[:length]
    pad = length - len(ids)
    return (torch.tensor(ids + [tok.pad_token_id] * pad),
            torch.tensor(labels + [-100] * pad))


def decoder_logits(model, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Logits of the LLaVA decoder given token ids and cached vision features.

    The same computation as ``LlavaForConditionalGeneration.forward``: the projector's output
    replaces the embeddings at the image-token positions, then the Llama decoder and lm_head.
    """
    emb = model.get_input_embeddings()(ids)
    img = model.model.multi_modal_projector(feats).to(emb.dtype)
    mask = ids == model.config.image_token_id
    emb = emb.masked_scatter(mask.unsqueeze(-1), img.reshape(-1, img.shape[-1]))
    attn = (ids != model.config.text_config.pad_token_id).long()
    hidden = model.model.language_model(inputs_embeds=emb, attention_mask=attn).last_hidden_state
    return model.lm_head(hidden)


def readout_loss(project: Callable[[torch.Tensor], torch.Tensor], feats: torch.Tensor) -> torch.Tensor:
    """MSE between ``project(feats)``'s first ``k`` dimensions and the features' read-out
    dimensions (:data:`READOUT`, ``k`` of them, the CLIP tower's), divided by ``POS_SCALE``."""
    k = max(sl.stop for sl in READOUT.values())
    return F.mse_loss(project(feats)[..., :k], feats[..., :k]) / POS_SCALE


def projector_readout_loss(model, feats: torch.Tensor) -> torch.Tensor:
    """:func:`readout_loss` of LLaVA's projector.

    Without it the projector, trained only through the answers, kept the object's position in
    a direction holding ~1e-9 of its output variance (measured on the model of this recipe's
    predecessor): decodable by a probe (R² 0.98) but too small for the decoder to learn to use.
    """
    return readout_loss(model.model.multi_modal_projector, feats)


@dataclass
class Fusion:
    """A fusion style as the instruction-tuning stages see it: everything but the fusion is shared.

    ``features(pix)``: the frozen encoders' per-patch features (cached once per pool);
    ``project(feats)``: the trainable projector/adapter; ``logits(ids, feats)``: the decoder's
    logits with the projected features at the image positions; ``expand(question)``: the prompt
    text, image placeholder expanded; ``params``: what instruction tuning trains;
    ``align_params``: what an alignment stage before it trains (the adapter and marker vectors,
    decoder frozen; empty: no such stage); ``mode(train)``: train/eval mode (encoders stay in eval).
    """

    processor: Any                      # a transformers LlavaProcessor or a FusionProcessor, by duck typing
    pixels: Callable[[list], torch.Tensor]
    features: Callable[[torch.Tensor], torch.Tensor]
    project: Callable[[torch.Tensor], torch.Tensor]
    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    expand: Callable[[str], str]
    params: list
    align_params: list
    mode: Callable[[bool], None]


def llava_fusion(model, processor) -> Fusion:
    """shapes-llava's fusion: the projector's output replaces the ``<image>`` embeddings."""
    def mode(train: bool) -> None:
        model.train(train)
        model.model.vision_tower.eval()

    return Fusion(processor=processor, pixels=lambda ims: pixel_values(processor, ims),
                  features=lambda pix: vision_features(model, pix), project=model.model.multi_modal_projector,
                  logits=lambda ids, f: decoder_logits(model, ids, f), expand=llava_prompt,
                  params=[p for n, p in model.named_parameters() if "vision_tower" not in n], align_params=[],
                  mode=mode)


def omnifusion_fusion(h) -> Fusion:
    """shapes-omnifusion's fusion (:mod:`microscope.zoo.shapes_omnifusion`): the adapter's output
    at the ``<image>`` positions, the learned begin/end vectors at ``<SOI>``/``<EOI>`` — the same
    computation as :meth:`microscope.fusion.FusionModel.embed`, from cached features."""
    from microscope.zoo import shapes_omnifusion as omni

    fm, enc = h.model, h.model.encode_images
    dec = fm.decoder
    pad = h.processor.tokenizer.pad_token_id

    def features(pix: torch.Tensor, batch: int = 512) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([enc.features(pix[i:i + batch]) for i in range(0, len(pix), batch)])

    def logits(ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        emb = dec.get_input_embeddings()(ids)
        img = enc.adapt(feats).to(emb.dtype)
        emb = emb.masked_scatter(fm.image_mask(ids).unsqueeze(-1), img.reshape(-1, img.shape[-1]))
        emb = enc.post_embed(fm, ids, emb)
        hidden = dec.model(inputs_embeds=emb, attention_mask=(ids != pad).long()).last_hidden_state
        return dec.lm_head(hidden)

    def mode(train: bool) -> None:
        fm.train(train)
        enc.tower.eval()
        enc.conv.eval()

    frozen = ("encode_images.tower.", "encode_images.conv.")
    return Fusion(processor=h.processor, pixels=h.processor.preprocess, features=features, project=enc.adapt,
                  logits=logits, expand=lambda q: omni.expand(q, n_image_tokens()),
                  params=[p for n, p in fm.named_parameters() if not n.startswith(frozen)],
                  align_params=list(enc.adapter.parameters()) + [enc.begin, enc.end], mode=mode)


# ----------------------------------------------------------------------------- stages

def train_vision(model, processor, r: Recipe, log: Callable[[str], None]) -> dict:
    """Stage 1: per-patch supervision of the vision tower on designated feature dimensions.

    The features LLaVA feeds its projector carry the supervised quantities in fixed dimensions
    (:data:`READOUT`): colour and shape logits (label smoothing keeps them a few units large),
    the covering object's centre and the patch's own column/row, both regressed at scale
    ``POS_SCALE``. A free linear head could read a quantity from a direction holding a tiny share
    of the feature variance (measured: object position in 0.2% of it), which the decoder then
    barely sees; fixed dimensions give every supervised quantity a comparable magnitude.
    """
    vt = model.model.vision_tower
    g = torch.Generator().manual_seed(r.seed)
    grid = ARCH["image_size"] // ARCH["patch_size"]
    cols = torch.arange(grid * grid) % grid
    rows = torch.arange(grid * grid) // grid
    patch_pos = torch.stack([2 * cols / (grid - 1) - 1, 2 * rows / (grid - 1) - 1], -1).float()
    samples = shapes.generate(r.vision_samples, TRAIN_SEED_BASE + r.seed)
    pix = pixel_values(processor, [s.image for s in samples])
    col, shp, ctr = patch_labels(samples)
    params = list(vt.parameters())
    opt = torch.optim.AdamW(params, lr=r.vision_lr, weight_decay=r.weight_decay)
    sched = _schedule(opt, r.vision_steps, warmup=min(50, r.vision_steps // 5 + 1))
    layer = model.config.vision_feature_layer
    R = READOUT
    vt.train()
    acc = float("nan")
    for step in tqdm(range(r.vision_steps), desc="vision", mininterval=10):
        idx = torch.randint(len(samples), (r.vision_batch,), generator=g)
        h = vt(pix[idx], output_hidden_states=True).hidden_states[layer][:, 1:]
        lc, ls = h[..., R["color"]], h[..., R["shape"]]
        on = ~torch.isnan(ctr[idx][..., 0])
        loss = F.cross_entropy(lc.flatten(0, 1), col[idx].flatten(), label_smoothing=0.1) + \
            F.cross_entropy(ls.flatten(0, 1), shp[idx].flatten(), label_smoothing=0.1) + \
            F.mse_loss(h[..., R["center"]][on], POS_SCALE * ctr[idx][on]) / POS_SCALE + \
            F.mse_loss(h[..., R["patch"]], POS_SCALE * patch_pos.expand(len(idx), -1, -1)) / POS_SCALE
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, r.clip)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == r.vision_steps - 1:
            acc = ((lc.argmax(-1) == col[idx]) & (ls.argmax(-1) == shp[idx])).float().mean().item()
            err = (h[..., R["center"]][on] / POS_SCALE - ctr[idx][on]).abs().mean().item()
            log(f"vision step {step} loss {loss.item():.4f} patch-acc {acc:.3f} centre-err {err:.3f}")
    vt.eval()
    for p in vt.parameters():
        p.requires_grad_(False)
    return {"vision_patch_accuracy": acc}


def take_vision(model, r: Recipe, log: Callable[[str], None]) -> dict:
    """Stage 1 by copy: the CLIP tower of the trained shapes-llava ``r.vision_from``, checked to
    come from the same vision recipe fields and seed as ``r``."""
    from safetensors.torch import load_file

    from microscope.zoo import model_dir

    src = model_dir(r.vision_from)
    info = json.loads((src / "training_log.json").read_text())
    keys = ("seed", "vision_samples", "vision_steps", "vision_batch", "vision_lr", "weight_decay", "clip")
    diff = {k: (info["recipe"].get(k), getattr(r, k)) for k in keys if info["recipe"].get(k) != getattr(r, k)}
    if diff:
        raise ValueError(f"vision_from={r.vision_from!r} was trained with other vision settings {diff} "
                         "(theirs, this recipe's): its tower is not this recipe's; train it instead (vision_from='')")
    state = {k.split("vision_tower.", 1)[1]: v for k, v in load_file(str(src / "model.safetensors")).items()
             if "vision_tower." in k}  # saved as "vision_tower.*" or "model.vision_tower.*"
    model.model.vision_tower.load_state_dict(state)
    model.model.vision_tower.eval()
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    log(f"vision tower taken from {src} (same vision recipe and seed {r.seed})")
    return {"vision_patch_accuracy": info["vision_patch_accuracy"], "vision_from": str(r.vision_from)}


def _schedule(opt, steps: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _pool(fusion: Fusion, n: int, seed: int, max_objects: int, length: int, turns: int = 1,
          aux: bool = False, chunk: int = 4096) -> dict[str, torch.Tensor]:
    """Cached encoder features, token ids, labels and categories of ``n`` generated samples."""
    processor = fusion.processor
    feats, ids, labels, cats = [], [], [], []
    rng = np.random.default_rng([seed, 31])
    for start in range(0, n, chunk):
        ss = shapes.generate(min(chunk, n - start), seed, max_objects=max_objects, start=start)
        feats.append(fusion.features(fusion.pixels([s.image for s in ss])))
        if turns == 1:
            x = encode_text(processor, [s.question for s in ss], [s.answer for s in ss], length, fusion.expand)
            y = torch.full_like(x, -100)
            y[:, -2:] = x[:, -2:]
        else:
            enc = [encode_conversation(processor, shapes.conversation(s, turns, rng, aux=aux), length,
                                       fusion.expand) for s in ss]
            x = torch.stack([e[0] for e in enc])
            y = torch.stack([e[1] for e in enc])
        ids.append(x)
        labels.append(y)
        cats.append(torch.tensor([shapes.CATEGORIES.index(s.category) for s in ss]))
    return {"feats": torch.cat(feats), "ids": torch.cat(ids), "labels": torch.cat(labels),
            "cats": torch.cat(cats)}


def _aux_pool(fusion: Fusion, n: int, seed: int, length: int) -> dict[str, torch.Tensor]:
    """Single-turn validation pool of the training-only auxiliary questions."""
    ss = shapes.generate(n, seed)
    rng = np.random.default_rng([seed, 17])
    cats = list(shapes.CATEGORIES) + list(shapes.AUX_CATEGORIES)
    keep, qs, ans, cat_ids = [], [], [], []
    for i, s in enumerate(ss):
        cat = shapes.AUX_CATEGORIES[i % len(shapes.AUX_CATEGORIES)]
        answers = shapes.AUX_ANSWERS[cat]
        a = answers[int(rng.integers(len(answers)))]
        asked = shapes.ask(s.objects, cat, a, rng)
        if asked is not None:
            keep.append(i)
            qs.append(asked[0])
            ans.append(a)
            cat_ids.append(cats.index(cat))
    feats = fusion.features(fusion.pixels([ss[i].image for i in keep]))
    ids = encode_text(fusion.processor, qs, ans, length, fusion.expand)
    return {"feats": feats, "ids": ids, "labels": ids, "cats": torch.tensor(cat_ids)}


def seq_length(fusion: Fusion) -> int:
    """Fixed padded length of a training sequence (longest question + answer + </s>)."""
    longest = "Is the triangle right of or left of the triangle?"
    return len(encode_text(fusion.processor, [longest], ["triangle"], ARCH["max_positions"], fusion.expand)[0].ne(
        fusion.processor.tokenizer.pad_token_id).nonzero()) + 2


def evaluate_pool(fusion: Fusion, pool: dict[str, torch.Tensor], batch: int = 256) -> dict[str, float]:
    """Answer accuracy (argmax at the answer position) per category on a feature pool."""
    fusion.mode(False)
    correct = []
    with torch.no_grad():
        for i in range(0, len(pool["ids"]), batch):
            ids = pool["ids"][i:i + batch]
            logits = fusion.logits(ids[:, :-2], pool["feats"][i:i + batch])
            correct.append(logits[:, -1].argmax(-1) == ids[:, -2])
    c = torch.cat(correct)
    cats = list(shapes.CATEGORIES) + list(shapes.AUX_CATEGORIES)
    out = {cat: c[pool["cats"] == k].float().mean().item() for k, cat in enumerate(cats)
           if (pool["cats"] == k).any()}
    out["overall"] = c.float().mean().item()
    return out


def _optimizer(params: list, r: Recipe, steps: int, warmup: int):
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r.lr, betas=(0.9, 0.98))
    return opt, _schedule(opt, steps, warmup)


def _step(fusion: Fusion, pool: dict, idx: torch.Tensor, r: Recipe, params: list, opt, sched) -> torch.Tensor:
    """One optimiser step on the batch ``idx`` of ``pool``: answer cross-entropy + read-out loss."""
    ids, labels = pool["ids"][idx], pool["labels"][idx]
    # trim the columns that are padding in every row of this batch
    used = int((labels != -100).any(0).nonzero().max()) + 1
    logits = fusion.logits(ids[:, :used - 1], pool["feats"][idx])
    loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:used].flatten(), ignore_index=-100)
    if r.projector_readout:
        loss = loss + r.projector_readout * readout_loss(fusion.project, pool["feats"][idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, r.clip)
    opt.step()
    sched.step()
    return loss


def train_decoder(fusion: Fusion, r: Recipe, log: Callable[[str], None], checkpoint: Path | None = None,
                  checkpoint_every: int = 100) -> dict:
    """Instruction tuning with the frozen encoders' cached features.

    When ``fusion.align_params`` is not empty, an alignment stage of ``r.align_steps`` steps
    first trains only those (the adapter and the marker vectors; decoder frozen, batches from
    their own generator), as OmniFusion's first stage; then ``r.steps`` steps train
    ``fusion.params`` with the batches, curriculum and schedule of every style.

    With ``checkpoint`` (a file), the state after every ``checkpoint_every`` instruction steps —
    the trained parameters, the optimiser and schedule, the batch generator and the history — is
    written there (atomically), and a run that finds it resumes after its step instead of starting
    over: an interrupted run continues to the weights the uninterrupted run gives (bit-identical
    on the same machine: the frozen encoders are recomputed by the deterministic earlier stages).
    The file is removed when training finishes. A checkpoint of another recipe is refused.
    """
    length = seq_length(fusion)
    n_img = n_image_tokens() + (len(fusion.processor.tokenizer(fusion.expand("x"))["input_ids"])
                                - len(fusion.processor.tokenizer(llava_prompt("x"))["input_ids"]))
    conv_length = n_img + 3 + r.turns * (length - n_img)
    n_stage = len(r.curriculum)
    per = r.pool_samples // n_stage
    pools = []
    for k, mo in enumerate(r.curriculum):
        t = time.time()
        pools.append(_pool(fusion, per, TRAIN_SEED_BASE + 100 + 10 * r.seed + k, mo,
                           conv_length if r.turns > 1 else length, r.turns, r.aux_questions))
        log(f"pool max_objects={mo}: {per} samples in {time.time() - t:.0f}s")
    val = _pool(fusion, r.eval_samples, TRAIN_SEED_BASE + 99, 5, length)
    aux_val = _aux_pool(fusion, r.eval_samples, TRAIN_SEED_BASE + 98, length) if r.aux_questions else None

    def evaluate(step: int, loss: torch.Tensor, lr: float, stage: str) -> dict:
        acc = evaluate_pool(fusion, val)
        if aux_val is not None:
            aux_acc = evaluate_pool(fusion, aux_val)
            acc.update({c: aux_acc[c] for c in aux_acc if c in shapes.AUX_CATEGORIES})
        fusion.mode(True)
        log(f"{stage} step {step} loss {loss.item():.4f} lr {lr:.2e} "
            + " ".join(f"{c}={v:.3f}" for c, v in acc.items()))
        return {"step": step, "loss": loss.item(), **acc}

    state = None
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, weights_only=False)
        # the thread count changes only the order of float sums, not the recipe: a run may resume on other cores
        diff = sorted(k for k in asdict(r) if k != "threads" and state["recipe"].get(k) != asdict(r)[k])
        if diff:
            raise ValueError(f"{checkpoint} is a checkpoint of another recipe (differs in {diff}): train with "
                             "that recipe to resume it, or delete the file to start over")
        log(f"resuming from {checkpoint} after instruction step {state['step']}")
    align_history = [] if state is None else state["align_history"]
    if fusion.align_params and r.align_steps and state is None:
        for p in fusion.params:
            p.requires_grad_(False)
        for p in fusion.align_params:
            p.requires_grad_(True)
        opt, sched = _optimizer(fusion.align_params, r, r.align_steps, min(r.warmup, r.align_steps // 4 + 1))
        g = torch.Generator().manual_seed(r.seed + 2)
        fusion.mode(True)
        for step in tqdm(range(r.align_steps), desc="align", mininterval=10):
            pool = pools[int(torch.randint(n_stage, (1,), generator=g))]
            idx = torch.randint(len(pool["ids"]), (r.batch,), generator=g)
            loss = _step(fusion, pool, idx, r, fusion.align_params, opt, sched)
            if step == r.align_steps - 1:
                align_history.append(evaluate(step, loss, sched.get_last_lr()[0], "align"))
        for p in fusion.params:
            p.requires_grad_(True)
    params = fusion.params
    opt, sched = _optimizer(params, r, r.steps, r.warmup)
    g = torch.Generator().manual_seed(r.seed + 1)
    ramp = int(r.curriculum_fraction * r.steps)
    history: list[dict] = []
    start = 0
    if state is not None:
        with torch.no_grad():
            for p, v in zip(params, state["params"], strict=True):
                p.copy_(v)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["generator"])
        history, start = state["history"], state["step"] + 1
    fusion.mode(True)
    for step in tqdm(range(start, r.steps), desc="vqa", mininterval=10, initial=start, total=r.steps):
        # curriculum: stage k is unlocked at step k * ramp / (n_stage - 1); draw uniformly
        # from the unlocked pools, so simpler scenes stay in the mix
        unlocked = 1 + min(n_stage - 1, (step * (n_stage - 1)) // max(1, ramp))
        k = int(torch.randint(unlocked, (1,), generator=g))
        pool = pools[k]
        idx = torch.randint(len(pool["ids"]), (r.batch,), generator=g)
        loss = _step(fusion, pool, idx, r, params, opt, sched)
        if step % r.eval_every == 0 or step == r.steps - 1:
            history.append(evaluate(step, loss, sched.get_last_lr()[0], "vqa"))
        if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step < r.steps - 1:
            tmp = Path(checkpoint).with_suffix(".tmp")
            torch.save({"recipe": asdict(r), "step": step, "params": [p.detach().clone() for p in params],
                        "opt": opt.state_dict(), "sched": sched.state_dict(), "generator": g.get_state(),
                        "history": history, "align_history": align_history}, tmp)
            tmp.replace(checkpoint)
    fusion.mode(False)
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    return {"history": history, "align_history": align_history, "val": history[-1],
            "resumed_after_step": None if state is None else state["step"]}


#: the bundled models this recipe trains, by the fusion between their encoders and the decoder
STYLES = ("shapes-llava", "shapes-omnifusion")


def train_conv(conv, pix: torch.Tensor, r: Recipe, log: Callable[[str], None]) -> dict:
    """Self-supervised pre-training of OmniFusion's second encoder (no labels): masked-patch
    reconstruction. A fraction ``r.conv_mask`` of the 16-px input patches is replaced by 0 (the
    normalised mean colour); a linear head must reproduce every patch's 4×4 average-pooled RGB
    thumbnail (48 numbers) from its feature vector, MSE. Masked patches can only be filled in from
    their neighbours, through the encoder's 3×3 context convolution."""
    g = torch.Generator().manual_seed(r.seed + 3)
    grid = ARCH["image_size"] // ARCH["patch_size"]
    p = ARCH["patch_size"]
    width = conv.net[-1].out_channels
    head = torch.nn.Linear(width, 48)
    params = list(conv.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=r.conv_lr, weight_decay=r.weight_decay)
    sched = _schedule(opt, r.conv_steps, warmup=min(50, r.conv_steps // 5 + 1))
    conv.train()
    loss = torch.tensor(float("nan"))
    for step in tqdm(range(r.conv_steps), desc="conv", mininterval=10):
        idx = torch.randint(len(pix), (r.vision_batch,), generator=g)
        x = pix[idx]
        target = F.avg_pool2d(x, 4).unfold(2, 4, 4).unfold(3, 4, 4)  # (B, 3, 6, 6, 4, 4)
        target = target.permute(0, 2, 3, 1, 4, 5).reshape(len(idx), grid * grid, 48)
        keep = (torch.rand(len(idx), 1, grid, grid, generator=g) >= r.conv_mask).float()
        masked = x * keep.repeat_interleave(p, 2).repeat_interleave(p, 3)
        loss = F.mse_loss(head(conv(masked)), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, r.clip)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == r.conv_steps - 1:
            log(f"conv step {step} reconstruction mse {loss.item():.4f}")
    conv.eval()
    for q in conv.parameters():
        q.requires_grad_(False)
    return {"conv_reconstruction_mse": loss.item()}


def train(out: str | Path, recipe: Recipe | None = None, log: Callable[[str], None] = print,
          style: str = "shapes-llava", checkpoint_every: int = 100) -> dict:
    """Train a bundled model from scratch and save model + processor + training log to ``out``.

    Both styles start from the same ``build_model(seed)`` (the same CLIP tower and decoder
    initialisation) and the same CLIP pre-training (:func:`train_vision`); shapes-omnifusion then
    pre-trains its convolutional encoder (:func:`train_conv`), moves the decoder into a
    ``LlamaForCausalLM`` and builds its adapter; instruction tuning sees the same scenes,
    conversations, batches and schedule (:func:`train_decoder`). Instruction tuning checkpoints to
    ``out/checkpoint.pt`` every ``checkpoint_every`` steps; running ``train`` again on the same
    ``out`` with the same recipe resumes there (the earlier, short stages run again).
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; the recipe trains {list(STYLES)}")
    r = recipe or Recipe()
    torch.set_num_threads(r.threads)
    torch.manual_seed(r.seed)
    torch.use_deterministic_algorithms(True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    processor = build_processor()
    model = build_model(processor, seed=r.seed)
    v = take_vision(model, r, log) if r.vision_from else train_vision(model, processor, r, log)
    extra: dict = {}
    if style == "shapes-llava":
        fusion = llava_fusion(model, processor)
    else:
        from microscope.zoo import shapes_omnifusion as omni

        t = time.time()
        torch.manual_seed(r.seed + 3)
        conv = omni.ConvEncoder(**omni.CONV)
        extra = train_conv(conv, pixel_values(processor, [s.image for s in shapes.generate(
            r.vision_samples, TRAIN_SEED_BASE + r.seed)]), r, log)
        extra["seconds_conv"] = time.time() - t
        tok = omni.build_tokenizer()
        decoder = omni.decoder_from_llava(model, tok, r.seed + 5)
        # cast: a list of tokens gives a list of ids (transformers annotates the result int | list[int])
        begin, end = cast(list[int], tok.convert_tokens_to_ids([omni.BEGIN_IMAGE, omni.END_IMAGE]))
        feature_layer = model.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise ValueError(f"shapes-omnifusion reads one CLIP layer; shapes-llava's vision_feature_layer is "
                             f"{feature_layer!r}")
        torch.manual_seed(r.seed + 4)
        encoder = omni.OmniEncoder(model.model.vision_tower, conv, decoder.config.hidden_size, begin, end,
                                   feature_layer)
        h = omni.handle(decoder, encoder, tok, ARCH["image_size"], ARCH["patch_size"])
        fusion = omnifusion_fusion(h)
    t1 = time.time()
    d = train_decoder(fusion, r, log, out / "checkpoint.pt", checkpoint_every)
    t2 = time.time()
    if style == "shapes-llava":
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    else:
        omni.save(h, out)
    info = {
        "style": style, "recipe": asdict(r), "arch": ARCH, **v, **extra, "decoder_history": d["history"],
        "align_history": d["align_history"], "resumed_after_step": d["resumed_after_step"],
        "seconds": {"vision": t1 - t0, "decoder": t2 - t1, "total": t2 - t0},
        "threads": r.threads, "torch": torch.__version__,
    }
    (out / "training_log.json").write_text(json.dumps(info, indent=1))
    log(f"trained in {t2 - t0:.0f}s; saved to {out}")
    return info

