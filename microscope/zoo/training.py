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


def encode_text(processor, questions: list[str], answers: list[str] | None, length: int
                ) -> torch.Tensor:
    """Left-padded ids of ``prompt(question) + ' answer</s>'`` with the image expanded."""
    tok = processor.tokenizer
    ids = torch.full((len(questions), length), tok.pad_token_id, dtype=torch.long)
    for i, q in enumerate(questions):
        row = tok(prompt(q).replace("<image>", "<image>" * n_image_tokens()))["input_ids"]
        if answers is not None:
            row = row + tok(answers[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(row) > length:
            raise ValueError(f"sequence of {len(row)} tokens exceeds length={length}")
        ids[i, length - len(row):] = torch.tensor(row)
    return ids


def n_image_tokens() -> int:
    """Image tokens per image: one per patch (the CLS feature is dropped)."""
    return (ARCH["image_size"] // ARCH["patch_size"]) ** 2


def encode_conversation(processor, turns: list[tuple[str, str, str]], length: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels of a LLaVA-1.5 multi-turn conversation about one image.

    ``USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>...``; labels are the ids
    of the answer words and their ``</s>``, -100 elsewhere (LLaVA's masking).
    """
    tok = processor.tokenizer
    ids: list[int] = []
    labels: list[int] = []
    for k, (q, a, _) in enumerate(turns):
        text = prompt(q).replace("<image>", "<image>" * n_image_tokens()) if k == 0 else \
            f"USER: {q} ASSISTANT:"
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


def projector_readout_loss(model, feats: torch.Tensor) -> torch.Tensor:
    """MSE between the projector output's first ``k`` dimensions and the vision features'
    read-out dimensions (:data:`READOUT`, ``k`` of them), divided by ``POS_SCALE``.

    Without it the projector, trained only through the answers, kept the object's position in
    a direction holding ~1e-9 of its output variance (measured on the model of this recipe's
    predecessor): decodable by a probe (R² 0.98) but too small for the decoder to learn to use.
    """
    k = max(sl.stop for sl in READOUT.values())
    out = model.model.multi_modal_projector(feats)
    return F.mse_loss(out[..., :k], feats[..., :k]) / POS_SCALE


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


def _schedule(opt, steps: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _pool(model, processor, n: int, seed: int, max_objects: int, length: int, turns: int = 1,
          aux: bool = False, chunk: int = 4096) -> dict[str, torch.Tensor]:
    """Cached vision features, token ids, labels and categories of ``n`` generated samples."""
    feats, ids, labels, cats = [], [], [], []
    rng = np.random.default_rng([seed, 31])
    for start in range(0, n, chunk):
        ss = shapes.generate(min(chunk, n - start), seed, max_objects=max_objects, start=start)
        feats.append(vision_features(model, pixel_values(processor, [s.image for s in ss])))
        if turns == 1:
            x = encode_text(processor, [s.question for s in ss], [s.answer for s in ss], length)
            y = torch.full_like(x, -100)
            y[:, -2:] = x[:, -2:]
        else:
            enc = [encode_conversation(processor, shapes.conversation(s, turns, rng, aux=aux), length)
                   for s in ss]
            x = torch.stack([e[0] for e in enc])
            y = torch.stack([e[1] for e in enc])
        ids.append(x)
        labels.append(y)
        cats.append(torch.tensor([shapes.CATEGORIES.index(s.category) for s in ss]))
    return {"feats": torch.cat(feats), "ids": torch.cat(ids), "labels": torch.cat(labels),
            "cats": torch.cat(cats)}


def _aux_pool(model, processor, n: int, seed: int, length: int) -> dict[str, torch.Tensor]:
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
    feats = vision_features(model, pixel_values(processor, [ss[i].image for i in keep]))
    ids = encode_text(processor, qs, ans, length)
    return {"feats": feats, "ids": ids, "labels": ids, "cats": torch.tensor(cat_ids)}


def seq_length(processor) -> int:
    """Fixed padded length of a training sequence (longest question + answer + </s>)."""
    longest = "Is the triangle right of or left of the triangle?"
    return len(encode_text(processor, [longest], ["triangle"], ARCH["max_positions"])[0].ne(
        processor.tokenizer.pad_token_id).nonzero()) + 2


def evaluate_pool(model, pool: dict[str, torch.Tensor], batch: int = 256) -> dict[str, float]:
    """Answer accuracy (argmax at the answer position) per category on a feature pool."""
    model.eval()
    correct = []
    with torch.no_grad():
        for i in range(0, len(pool["ids"]), batch):
            ids = pool["ids"][i:i + batch]
            logits = decoder_logits(model, ids[:, :-2], pool["feats"][i:i + batch])
            correct.append(logits[:, -1].argmax(-1) == ids[:, -2])
    c = torch.cat(correct)
    cats = list(shapes.CATEGORIES) + list(shapes.AUX_CATEGORIES)
    out = {cat: c[pool["cats"] == k].float().mean().item() for k, cat in enumerate(cats)
           if (pool["cats"] == k).any()}
    out["overall"] = c.float().mean().item()
    return out


def train_decoder(model, processor, r: Recipe, log: Callable[[str], None]) -> dict:
    """Stage 2: projector + decoder on VQA with the frozen tower's cached features."""
    length = seq_length(processor)
    conv_length = n_image_tokens() + 3 + r.turns * (length - n_image_tokens())
    n_stage = len(r.curriculum)
    per = r.pool_samples // n_stage
    pools = []
    for k, mo in enumerate(r.curriculum):
        t = time.time()
        pools.append(_pool(model, processor, per, TRAIN_SEED_BASE + 100 + 10 * r.seed + k, mo,
                           conv_length if r.turns > 1 else length, r.turns, r.aux_questions))
        log(f"pool max_objects={mo}: {per} samples in {time.time() - t:.0f}s")
    val = _pool(model, processor, r.eval_samples, TRAIN_SEED_BASE + 99, 5, length)
    aux_val = _aux_pool(model, processor, r.eval_samples, TRAIN_SEED_BASE + 98, length) \
        if r.aux_questions else None
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r.lr,
                            betas=(0.9, 0.98))
    sched = _schedule(opt, r.steps, r.warmup)
    g = torch.Generator().manual_seed(r.seed + 1)
    ramp = int(r.curriculum_fraction * r.steps)
    history = []
    model.train()
    model.model.vision_tower.eval()
    for step in tqdm(range(r.steps), desc="vqa", mininterval=10):
        # curriculum: stage k is unlocked at step k * ramp / (n_stage - 1); draw uniformly
        # from the unlocked pools, so simpler scenes stay in the mix
        unlocked = 1 + min(n_stage - 1, (step * (n_stage - 1)) // max(1, ramp))
        k = int(torch.randint(unlocked, (1,), generator=g))
        pool = pools[k]
        idx = torch.randint(len(pool["ids"]), (r.batch,), generator=g)
        ids, labels = pool["ids"][idx], pool["labels"][idx]
        # trim the columns that are padding in every row of this batch
        used = int((labels != -100).any(0).nonzero().max()) + 1
        logits = decoder_logits(model, ids[:, :used - 1], pool["feats"][idx])
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:used].flatten(), ignore_index=-100)
        if r.projector_readout:
            loss = loss + r.projector_readout * projector_readout_loss(model, pool["feats"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, r.clip)
        opt.step()
        sched.step()
        if step % r.eval_every == 0 or step == r.steps - 1:
            acc = evaluate_pool(model, val)
            if aux_val is not None:
                aux_acc = evaluate_pool(model, aux_val)
                acc.update({c: aux_acc[c] for c in aux_acc if c in shapes.AUX_CATEGORIES})
            model.train()
            model.model.vision_tower.eval()
            history.append({"step": step, "loss": loss.item(), **acc})
            log(f"vqa step {step} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                + " ".join(f"{c}={v:.3f}" for c, v in acc.items()))
    model.eval()
    return {"history": history, "val": history[-1]}


def train(out: str | Path, recipe: Recipe | None = None, log: Callable[[str], None] = print
          ) -> dict:
    """Train shapes-llava from scratch and save model + processor + training log to ``out``."""
    r = recipe or Recipe()
    torch.set_num_threads(r.threads)
    torch.manual_seed(r.seed)
    torch.use_deterministic_algorithms(True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    processor = build_processor()
    model = build_model(processor, seed=r.seed)
    v = train_vision(model, processor, r, log)
    t1 = time.time()
    d = train_decoder(model, processor, r, log)
    t2 = time.time()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    info = {
        "recipe": asdict(r), "arch": ARCH, **v, "decoder_history": d["history"],
        "seconds": {"vision": t1 - t0, "decoder": t2 - t1, "total": t2 - t0},
        "threads": r.threads, "torch": torch.__version__,
    }
    (out / "training_log.json").write_text(json.dumps(info, indent=1))
    log(f"trained in {t2 - t0:.0f}s; saved to {out}")
    return info
