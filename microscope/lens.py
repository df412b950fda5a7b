"""Logit lens: read the answer off the residual stream of every layer at the last position.

    df = logit_lens(handle, samples)     # prob and rank of the answer token per layer

For layer ``l`` the lens applies the model's own final norm and unembedding to the residual
stream after decoder layer ``l`` at the last prompt position,
``p_l = softmax(W_U · norm(h_l))``, and reports for the answer's first token (and its
capitalised form where the vocabulary has a separate one, :mod:`microscope.answers`) the
probability ``p_l[token]`` and the rank ``#{v : logit_l[v] > logit_l[token]}`` (0 = top).
At the last layer this is exactly the model's output distribution. A sample without a gold
answer (``answer=None``) is read for the model's own greedy answer token instead, one variant
named ``"model"``; a gold answer the vocabulary cannot spell gives no rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from microscope import validate
from microscope.answers import MODEL, VARIANTS, answer_ids, variant_id
from microscope.extract import capture
from microscope.progress import tqdm
from microscope.roles import prepare_samples


def logit_lens(handle, samples: Sequence, layers: Sequence[int] | None = None, batch_size: int = 32,
               variants: Sequence[str] = VARIANTS, progress: bool = True) -> pd.DataFrame:
    """One row per sample × layer × answer variant present in the vocabulary.

    Columns: ``model, sample_id, category, answer, variant, token, layer, prob, rank``.
    ``variant`` is ``lower`` / ``capitalised`` for a gold answer, ``model`` for the model's own
    greedy token when the sample has no gold answer. ``layers`` default to every decoder layer
    (``-1``, the embedding output, may be added).
    A gold answer whose lower-case form the vocabulary cannot spell raises ``ValueError`` naming it
    (as :func:`microscope.knockout.predict` does) instead of being dropped.
    """
    a = handle.adapter
    layers = a.check_layers(list(range(a.n_layers)) if layers is None else layers)
    variants = validate.names(variants, VARIANTS, "variants")
    batch_size = validate.positive_int(batch_size, "batch_size")
    answer_ids(handle.processor, [s.answer.lower() for s in samples if s.answer is not None])  # unspellable: error
    tok = handle.processor.tokenizer
    rows = []
    for i in tqdm(range(0, len(samples), batch_size), desc="logit lens", disable=not progress, mininterval=5):
        chunk = samples[i:i + batch_size]
        batch = prepare_samples(handle, chunk)
        inputs = {k: v.to(handle.device) for k, v in batch.inputs.items()}
        with torch.no_grad(), capture(handle, layers) as acts:
            own = handle.model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()
        last = batch.last_index.to(handle.device)
        ar = torch.arange(len(chunk), device=handle.device)
        targets = [{MODEL: own[j]} if s.answer is None else {v: variant_id(handle.processor, s.answer, v)
                                                              for v in variants} for j, s in enumerate(chunk)]
        for layer in layers:
            with torch.no_grad():
                h = acts[f"resid.{layer}"][ar, last]
                logits = a.logits(h).float()
            probs = logits.softmax(-1)
            for j, s in enumerate(chunk):
                for v, t in targets[j].items():
                    if t is None:
                        continue
                    rows.append({
                        "model": handle.name, "sample_id": s.id, "category": getattr(s, "category", ""),
                        "answer": s.answer, "variant": v, "token": tok.convert_ids_to_tokens(t), "layer": layer,
                        "prob": float(probs[j, t]), "rank": int((logits[j] > logits[j, t]).sum()),
                    })
    return pd.DataFrame(rows, columns=["model", "sample_id", "category", "answer", "variant", "token", "layer",
                                       "prob", "rank"])
