"""Model editing: change one block's weights so that visual questions get new answers.

    reqs = editing.requests(samples, "circle")                   # (image, question) -> new answer
    with editing.edit(handle, reqs, layer=2, method="multedit") as e:
        ...                                                      # the model is edited in here
    e.report                                                     # one row per request
    scores = editing.evaluate(handle, e, efficacy=reqs, generalization=gen, specificity=spec)

The edited weight ``W`` (``d_out × d_in``) is the last linear map of a decoder layer's block whose
output is the block's contribution to the residual stream: the MLP's down-projection
(``site="mlp"``) or the attention's output projection (``site="attn"``). Every request ``i`` has a
*key* ``k_i`` — the input of ``W`` at one prompt position ``p_i`` of its prompt (``position``: the
last constraint token, MultEdit's choice, or the last position) — and the methods find a ``Ŵ``
that makes the model answer ``a_i``:

``multedit`` (Basu et al., NeurIPS 2024, "Understanding information storage and transfer in
multi-modal large language models", §MultEdit). First a *target value* per request: a vector
``δ_i`` added to ``W``'s output at ``p_i`` is optimised with Adam to minimise
``−log p(a_i | δ_i) + wd · ‖δ_i‖ / ‖v_i‖²`` (``v_i = W k_i + b`` the unedited output), its norm
clamped to ``clamp · ‖v_i‖`` after every step; the targets are ``v_i + δ_i``. Then the
closed-form least-squares edit with a ridge to the old weights,

    Ŵ = argmin_W' Σ_i ‖W' k_i + b − (v_i + δ_i)‖² + λ ‖W' − W‖_F²
      = W + Δ (KᵀK + λ I_n)⁻¹ Kᵀ,         K = [k_1 … k_n] (d_in × n),  Δ = [δ_1 … δ_n],

with ``λ = ridge · mean_i ‖k_i‖²``. That is the published ``(KKᵀ + λ I_{d_in})⁻¹ (KVᵀ + λWᵀ)``
rewritten by the push-through identity: an ``n × n`` solve instead of inverting a ``d_in × d_in``
matrix (11008² for a 7B model; the same ``Ŵ`` up to round-off — tested, and timed in
``benchmarks/editing.py``).

``rank_one`` (ROME, Meng et al., NeurIPS 2022). The same target values; the update is the
smallest change in the metric of the keys' second-moment matrix ``C = E[k kᵀ]`` (estimated from
the keys at every prompt position of ``covariance`` samples, ridged by ``1e-4 · tr C / d_in``)
that maps every key exactly to its target:

    Ŵ = W + Δ (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹,

for one request ROME's rank-one ``W + δ (C⁻¹k)ᵀ / (kᵀ C⁻¹ k)``; for ``n`` requests rank ``n``.

``finetune`` (constrained fine-tuning, ROME's FT-L baseline). ``W`` itself is optimised with Adam
on ``Σ_i −log p(a_i)`` for ``steps`` steps, the change kept in an L∞ ball: after every step
``Ŵ − W`` is clipped to ``[−epsilon, epsilon]`` element-wise.

An :class:`Edit` holds ``Ŵ − W``; inside its ``with`` block the model carries ``Ŵ``, and on exit
the original weight is copied back bit for bit (even on error). Edits of one model do not nest.
The methods, their published sources and the choices made are on ``docs/model-editing.md``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from microscope import validate
from microscope.answers import gold_id
from microscope.crossattn import CrossInputs
from microscope.errors import MicroscopeError
from microscope.objects import probs
from microscope.prefix import causal_start, clean_cache, next_token_probs, prefix_of
from microscope.prefix import positions as prompt_positions
from microscope.progress import tqdm
from microscope.results import why_empty
from microscope.roles import ROLE_CODE, prepare_samples

METHODS: tuple[str, ...] = ("multedit", "rank_one", "finetune")
SITES: tuple[str, ...] = ("mlp", "attn")
POSITIONS: tuple[str, ...] = ("constraint", "last")
#: optimisation stops early once the mean ``−log p(answer)`` over the requests is below this
#: (ROME's criterion: p(answer) ≈ 0.95)
STOP = 0.05
#: hyper-parameters of each method, with their defaults. MultEdit's reference script optimises
#: the value with Adam at learning rate 0.1 for 10 steps, clamps ‖δ‖ at 1e-4·‖v‖ (float16, one
#: key) and uses an absolute ridge λ = 0.01; here the value step is Adam at 0.3 for up to 100 steps
#: (stopping at :data:`STOP`), ‖δ‖ ≤ 10·‖v‖, and the ridge is relative, ``λ = ridge · mean ‖k_i‖²``,
#: so that it means the same for any model's key norms and for many nearly collinear keys (the
#: concept edit of the test suite: 16 keys of cosine ≈ 0.99). Chosen on shapes-llava, recorded in
#: docs/model-editing.md.
DEFAULTS: dict[str, dict[str, float]] = {
    "multedit": {"steps": 100, "lr": 0.3, "weight_decay": 1e-3, "clamp": 10.0, "ridge": 0.3},
    "rank_one": {"steps": 100, "lr": 0.3, "weight_decay": 1e-3, "clamp": 10.0},
    "finetune": {"steps": 100, "lr": 1e-3, "epsilon": 2e-2},
}


@dataclass(frozen=True)
class Request:
    """One edit: the (image, question) ``sample`` should be answered ``answer``. ``answer=None``
    (:func:`evaluate`'s specificity and neighbour sets) asks for nothing: such a request cannot be
    edited."""

    #: a data-set sample (:class:`microscope.data.shapes.Sample`, :class:`microscope.data.vqa.VQASample`),
    #: read by duck typing
    sample: Any
    answer: str | None


def requests(samples: Sequence, answer: str | Sequence[str]) -> list[Request]:
    """Requests asking every sample for ``answer`` (one string for all, or one per sample)."""
    answers = [answer] * len(samples) if isinstance(answer, str) else list(answer)
    if len(answers) != len(samples):
        raise ValueError(f"answer: give one answer for all samples or one per sample; got {len(answers)} answers "
                         f"for {len(samples)} samples")
    return [Request(s, a) for s, a in zip(samples, answers)]


def weight(handle, layer: int, site: str = "mlp") -> torch.nn.Linear:
    """The linear map whose output is decoder layer ``layer``'s ``site`` contribution: the MLP's
    down-projection or the attention's output projection — found as the last ``nn.Linear`` of the
    block whose output width is the decoder's hidden size."""
    a = handle.adapter
    layer = a.check_layers([layer], allow_embedding=False)[0]
    site = validate.names(site, SITES, "site")[0]
    lay = a.layers[layer]
    block = getattr(lay, "mlp" if site == "mlp" else "self_attn", None)
    if block is None and site == "attn":
        block = getattr(lay, "attn", None)
    hidden = a.embed.weight.shape[1]
    lins = [m for m in (block.modules() if block is not None else ()) if isinstance(m, torch.nn.Linear)
            and m.out_features == hidden]
    if not lins:
        raise MicroscopeError(f"cannot edit layer {layer}'s {site}: {type(lay).__name__} has no {site} block ending in "
                              f"a linear map to the hidden size {hidden}; pick the other site")
    return lins[-1]


def _check(handle, reqs: Sequence[Request]) -> list[int]:
    if not reqs:
        raise ValueError("requests: nothing to edit; give at least one Request(sample, answer)")
    bad = [r for r in reqs if not isinstance(r, Request)]
    if bad:
        raise TypeError(f"requests must be editing.Request objects (see editing.requests), got {type(bad[0]).__name__}")
    ids = []
    for j, r in enumerate(reqs):
        i = gold_id(handle.processor, r.answer)
        if i is None:
            raise ValueError(f"request {j} has answer=None: an edit needs the answer the sample should get")
        ids.append(i)
    return ids


def _positions(handle, batch, position: str) -> torch.Tensor:
    """Key position per row: the last constraint token or the last prompt position."""
    roles = batch.roles
    if position == "last":
        return batch.last_index
    is_c = roles == ROLE_CODE["constraint"]
    missing = [batch.sample_ids[i] if batch.sample_ids else i for i in range(len(roles)) if not is_c[i].any()]
    if missing:
        raise MicroscopeError(f"position='constraint': sample(s) {missing[:5]} have no constraint tokens; give "
                              "their constraint spans or edit at position='last'")
    T = roles.shape[1]
    return (T - 1 - is_c.flip(-1).int().argmax(-1)).long()


@dataclass
class _Run:
    """One request's clean run: processor inputs, key position ``pos``, answer id, the key and
    unedited value at ``pos``, and what a forward of the positions from ``pos`` on needs — the
    decoder inputs from there (``embeds``), the clean key/value cache of the positions before
    (``prefix``; ``None`` when the whole prompt is recomputed) and the prompt's rotary positions."""

    inputs: dict
    pos: int
    answer: int
    key: torch.Tensor
    value: torch.Tensor
    embeds: torch.Tensor
    prefix: list | None
    positions: dict[str, torch.Tensor] | CrossInputs | None
    start: int = 0

    def suffix_probs(self, handle) -> torch.Tensor:
        """Next-token distribution at the last position, recomputing only positions ``>= pos``
        (``< pos`` cannot change: causal attention, and the edit touches position ``pos``)."""
        return next_token_probs(handle, self.embeds, self.prefix, self.positions)[0]

    @property
    def offset(self) -> int:
        """Index of the key position within :attr:`embeds` (which start at :attr:`start`)."""
        return self.pos - self.start


def _runs(handle, lin, reqs, answer_ids, position) -> list[_Run]:
    out = []
    for r, ans in zip(reqs, answer_ids):
        batch = prepare_samples(handle, [r.sample])
        inputs = {k: v.to(handle.device) for k, v in batch.inputs.items()}
        p = int(_positions(handle, batch, position)[0])
        seen: dict = {}

        def hook(_m, args, o, seen=seen, p=p):
            seen["k"], seen["v"] = args[0][0, p].detach(), o[0, p].detach()

        def pre(_m, args, kwargs, seen=seen):
            seen["e"] = (args[0] if args else kwargs["hidden_states"]).detach()
        hooks = [lin.register_forward_hook(hook),
                 handle.adapter.layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
        try:
            with torch.no_grad():
                o = handle.model(**inputs, use_cache=True, **clean_cache(handle), logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
        start = causal_start(handle, inputs, p)  # before a bidirectional block holding p, where there is one
        prefix = prefix_of(o, start, keep=handle.adapter.cross_attention_layers)
        start = start if prefix is not None else 0
        out.append(_Run(inputs, p, ans, seen["k"].double(), seen["v"].double(), seen["e"][:, start:], prefix,
                        prompt_positions(handle, inputs), start))
    return out


def _target_deltas(handle, lin, runs: list[_Run], steps: int, lr: float, weight_decay: float, clamp: float
                   ) -> tuple[torch.Tensor, list[float]]:
    """MultEdit's value optimisation: ``δ_i`` added to ``W``'s output at ``p_i`` minimising
    ``−log p(a_i) + wd · ‖δ_i‖ / ‖v_i‖²``, with ``‖δ_i‖ ≤ clamp · ‖v_i‖`` after each Adam step.
    Each forward recomputes only the positions from ``p_i`` on (:meth:`_Run.suffix_probs`)."""
    deltas = [torch.zeros(r.value.shape, dtype=torch.float32, device=r.value.device, requires_grad=True)
              for r in runs]
    opt = torch.optim.Adam(deltas, lr=lr)
    losses: list[float] = []
    params = list(handle.model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            opt.zero_grad()
            total = 0.0
            for run, d in zip(runs, deltas):
                def add(_m, _args, out, run=run, d=d):
                    out = out.clone()
                    out[0, run.offset] = out[0, run.offset] + d.to(out.dtype)
                    return out
                h = lin.register_forward_hook(add)
                try:
                    nll = -run.suffix_probs(handle)[run.answer].clamp_min(1e-30).log()
                    loss = nll + weight_decay * d.norm() / run.value.float().norm() ** 2
                    loss.backward()
                finally:
                    h.remove()
                total += float(nll.detach())
            losses.append(total / len(runs))
            if losses[-1] < STOP:
                break
            opt.step()
            with torch.no_grad():
                for run, d in zip(runs, deltas):
                    cap = clamp * float(run.value.norm())
                    n = float(d.norm())
                    if n > cap:
                        d.mul_(cap / n)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return torch.stack([d.detach().double() for d in deltas]), losses


def key_covariance(handle, lin, samples: Sequence, batch_size: int = 32) -> torch.Tensor:
    """``C = (1/N) Σ k kᵀ`` over the inputs ``k`` of ``lin`` at every non-padding position of
    ``samples`` (float64, ``d_in × d_in``): ROME's second-moment statistic of the keys."""
    C, N = None, 0
    for i in range(0, len(samples), batch_size):
        batch = prepare_samples(handle, samples[i:i + batch_size])
        keep = batch.roles != ROLE_CODE["pad"]
        seen: dict[str, torch.Tensor] = {}
        h = lin.register_forward_hook(lambda _m, args, _o, seen=seen: seen.__setitem__("k", args[0].detach()))
        try:
            with torch.no_grad():
                handle.model(**{k: v.to(handle.device) for k, v in batch.inputs.items()}, use_cache=False,
                             logits_to_keep=1)
        finally:
            h.remove()
        k = seen["k"][keep.to(seen["k"].device)].double()
        C = k.T @ k if C is None else C + k.T @ k
        N += len(k)
    if C is None:
        raise ValueError("covariance: no samples to estimate the keys' covariance from; pass some")
    return C / N


def multedit_update(keys: torch.Tensor, deltas: torch.Tensor, ridge: float) -> torch.Tensor:
    """``ΔW = Δ (KᵀK + λI)⁻¹ Kᵀ`` for keys ``(n, d_in)`` and value changes ``(n, d_out)``: the
    minimiser of ``Σ‖(W+ΔW) k_i − (W k_i + δ_i)‖² + λ‖ΔW‖²`` (float64)."""
    K, D = keys.double(), deltas.double()
    G = K @ K.T + ridge * torch.eye(len(K), dtype=K.dtype, device=K.device)
    return torch.linalg.solve(G, D).T @ K


def multedit_update_published(keys: torch.Tensor, deltas: torch.Tensor, weight: torch.Tensor, ridge: float
                              ) -> torch.Tensor:
    """The same update the way the reference script computes it, ``(KKᵀ + λI_d)⁻¹(KVᵀ + λWᵀ)``
    with a ``d_in × d_in`` inverse, minus ``W``: for tests and the benchmark only."""
    K, W = keys.double().T, weight.double()
    V = W @ K + deltas.double().T
    left = torch.linalg.inv(K @ K.T + ridge * torch.eye(K.shape[0], dtype=K.dtype))
    return (left @ (K @ V.T + ridge * W.T)).T - W


def rank_one_update(keys: torch.Tensor, deltas: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``ΔW = Δ (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹``: the change of least ``C``-norm with ``(W+ΔW) k_i = W k_i + δ_i``
    for every key (ROME's rank-one update for one key). ``C`` is ridged by ``1e-4 · tr C / d``."""
    K, D = keys.double(), deltas.double()
    d = cov.shape[0]
    C = cov.double() + 1e-4 * torch.trace(cov.double()) / d * torch.eye(d, dtype=torch.float64)
    CiK = torch.linalg.solve(C, K.T)                       # C⁻¹ K : (d_in, n)
    return D.T @ torch.linalg.solve(K @ CiK, CiK.T)        # Δ (Kᵀ C⁻¹ K)⁻¹ (C⁻¹K)ᵀ


def _finetune(handle, lin, reqs: Sequence[Request], answer_ids: list[int], steps: int, lr: float, epsilon: float,
              batch_size: int) -> tuple[torch.Tensor, list]:
    """Adam on ``W`` for the mean ``−log p(a_i)``, ``Ŵ − W`` clipped to ``[−ε, ε]`` after every
    step. ``W`` acts at every position, so each step recomputes whole prompts (batched)."""
    batches = []
    for i in range(0, len(reqs), batch_size):
        b = prepare_samples(handle, [r.sample for r in reqs[i:i + batch_size]])
        batches.append(({k: v.to(handle.device) for k, v in b.inputs.items()},
                        torch.tensor(answer_ids[i:i + batch_size], device=handle.device)))
    w0 = lin.weight.detach().clone()
    w = torch.nn.Parameter(w0.clone())
    opt = torch.optim.Adam([w], lr=lr)
    params = list(handle.model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    orig = lin.weight
    losses: list[float] = []
    try:
        lin.weight = w
        for _ in range(steps):
            opt.zero_grad()
            total = 0.0
            for inputs, ans in batches:
                logits = handle.model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float()
                nll = -logits.log_softmax(-1).gather(1, ans[:, None])[:, 0]
                nll.sum().div(len(reqs)).backward()
                total += float(nll.detach().sum())
            losses.append(total / len(reqs))
            if losses[-1] < STOP:
                break
            opt.step()
            with torch.no_grad():
                w.copy_(w0 + (w - w0).clamp(-epsilon, epsilon))
    finally:
        lin.weight = orig
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return (w.detach() - w0).double(), losses


_OPEN: set[int] = set()


@dataclass
class Edit:
    """A computed weight change ``delta`` of ``module`` (decoder layer ``layer``'s ``site``);
    ``with edit:`` applies it and restores the original weight bit for bit on exit.
    ``report``: one row per request (see :func:`edit`); ``losses``: the optimisation's mean
    ``−log p(answer)`` per step (before that step's update; the optimisation stops early
    below :data:`STOP`)."""

    handle: object
    module: torch.nn.Linear
    delta: torch.Tensor
    method: str
    layer: int
    site: str
    position: str
    params: dict
    report: pd.DataFrame = field(default_factory=pd.DataFrame)
    losses: list = field(default_factory=list)
    seconds: float = 0.0
    _saved: torch.Tensor | None = None

    def __enter__(self) -> Edit:
        key = id(self.module)
        if key in _OPEN:
            raise MicroscopeError(f"layer {self.layer}'s {self.site} is already edited: edits of one module do not "
                                  "nest; leave the open edit's with-block first")
        self._saved = self.module.weight.detach().clone()
        with torch.no_grad():
            self.module.weight.add_(self.delta.to(self.module.weight.dtype).to(self.module.weight.device))
        _OPEN.add(key)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            raise MicroscopeError("internal: an Edit left without being entered (use it as `with edit:`)")
        with torch.no_grad():
            self.module.weight.copy_(self._saved)
        self._saved = None
        _OPEN.discard(id(self.module))

    @property
    def norm(self) -> float:
        """Frobenius norm of the change relative to the weight's, ``‖ΔW‖ / ‖W‖``."""
        return float(self.delta.norm() / self.module.weight.detach().double().norm())


def edit(handle, reqs: Sequence[Request], layer: int, method: str = "multedit", site: str = "mlp",
         position: str = "constraint", covariance: Sequence | None = None, batch_size: int = 32,
         **params) -> Edit:
    """Compute the edit of decoder layer ``layer``'s ``site`` (``mlp`` / ``attn``) that makes each
    request's sample answer its ``answer``, by ``method`` (:data:`METHODS`; hyper-parameters
    ``params`` override :data:`DEFAULTS`; ``rank_one`` needs ``covariance`` samples). Keys are read
    at ``position`` (:data:`POSITIONS`). Use the returned :class:`Edit` as a context manager.

    ``report``: one row per request: ``sample_id, category, question, answer, answer_token, method,
    layer, site, position, key_position, p_before, p_after, success`` (``success``: the greedy first
    token after the edit is the answer's first token)."""
    method = validate.names(method, METHODS, "method")[0]
    position = validate.names(position, POSITIONS, "position")[0]
    site = validate.names(site, SITES, "site")[0]
    unknown = set(params) - set(DEFAULTS[method])
    if unknown:
        raise ValueError(f"{method} takes the hyper-parameters {sorted(DEFAULTS[method])}, not {sorted(unknown)}")
    hp = {**DEFAULTS[method], **params}
    for k, v in hp.items():
        if not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0):
            raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")
    if method == "rank_one" and not covariance:
        raise ValueError("method='rank_one' needs covariance=<samples> to estimate the keys' second moment C")
    ids = _check(handle, reqs)
    lin = weight(handle, layer, site)
    start = time.perf_counter()
    batch_size = validate.positive_int(batch_size, "batch_size")
    runs = _runs(handle, lin, list(reqs), ids, position)
    keys = torch.stack([r.key for r in runs])
    if method == "finetune":
        delta, losses = _finetune(handle, lin, list(reqs), ids, int(hp["steps"]), hp["lr"], hp["epsilon"], batch_size)
    else:
        deltas, losses = _target_deltas(handle, lin, runs, int(hp["steps"]), hp["lr"], hp["weight_decay"],
                                        hp["clamp"])
        if method == "multedit":
            delta = multedit_update(keys, deltas, hp["ridge"] * float((keys ** 2).sum(-1).mean()))
        else:
            # rank_one: covariance is non-empty (checked above)
            delta = rank_one_update(keys, deltas, key_covariance(handle, lin, list(covariance or ()), batch_size))
    e = Edit(handle, lin, delta.to(torch.float64), method, int(layer), site, position, hp, losses=losses,
             seconds=time.perf_counter() - start)
    before = probs(handle, [r.sample for r in reqs], batch_size)
    with e:
        after = probs(handle, [r.sample for r in reqs], batch_size)
    tok = handle.processor.tokenizer
    pos = [r.pos for r in runs]
    e.report = pd.DataFrame({
        "sample_id": [r.sample.id for r in reqs],
        "category": [getattr(r.sample, "category", "") for r in reqs],
        "question": [r.sample.question for r in reqs],
        "answer": [r.answer for r in reqs],
        "answer_token": tok.convert_ids_to_tokens(ids),
        "method": method, "layer": int(layer), "site": site, "position": position,
        "key_position": pos,
        "p_before": before[torch.arange(len(ids)), ids].numpy(),
        "p_after": after[torch.arange(len(ids)), ids].numpy(),
        "success": (after.argmax(-1) == torch.tensor(ids)).numpy(),
    })
    return e


SCORE_COLUMNS = ["set", "sample_id", "category", "answer", "target", "pred_before", "pred_after", "success",
                 "p_target_before", "p_target_after", "kl"]


def evaluate(handle, e: Edit, efficacy: Sequence[Request], generalization: Sequence[Request] = (),
             specificity: Sequence = (), neighbours: Sequence = (), batch_size: int = 64, progress: bool = False,
             unedited: dict | None = None) -> pd.DataFrame:
    """The three numbers model editing reports, one row per (set, sample) (:data:`SCORE_COLUMNS`):

    - ``efficacy`` / ``generalization`` requests: ``success`` when the edited model's greedy first
      token is the request's answer (the edited questions; the same fact asked of other images
      and with other questions);
    - ``specificity`` samples (unrelated questions) and ``neighbours`` (questions about neighbouring
      concepts, e.g. the other shapes): ``success`` when the edited model's greedy
      answer equals the unedited model's; ``kl`` is ``KL(p_before ‖ p_after)`` of the next-token
      distributions (nats), and ``answer`` the gold answer, for accuracy before and after.

    ``unedited``: a dict that keeps the unedited model's distributions per set across calls (the
    same sets judged for several edits, as :func:`by_layer` does), so they are computed once.

    Summarise with :func:`summary`."""
    rows = []
    sets = [("efficacy", list(efficacy)), ("generalization", list(generalization)),
            ("specificity", [Request(s, None) for s in specificity]),
            ("neighbours", [Request(s, None) for s in neighbours])]
    tok = handle.processor.tokenizer
    for name, reqs in tqdm(sets, desc="evaluate edit", disable=not progress):
        if not reqs:
            continue
        samples = [r.sample for r in reqs]
        key = (name, tuple(s.id for s in samples))
        before = unedited.get(key) if unedited is not None else None
        if before is None:
            before = probs(handle, samples, batch_size)
            if unedited is not None:
                unedited[key] = before
        with e:
            after = probs(handle, samples, batch_size)
        pb, pa = before.argmax(-1), after.argmax(-1)
        if name in ("specificity", "neighbours"):
            target = pb
            success = pa == pb
        else:
            target = torch.tensor([gold_id(handle.processor, r.answer) for r in reqs])
            success = pa == target
        kl = (before * (before.clamp_min(1e-30).log() - after.clamp_min(1e-30).log())).sum(-1)
        idx = torch.arange(len(reqs))
        rows.append(pd.DataFrame({
            "set": name, "sample_id": [s.id for s in samples],
            "category": [getattr(s, "category", "") for s in samples],
            "answer": [getattr(s, "answer", None) for s in samples],
            "target": tok.convert_ids_to_tokens(target.tolist()),
            "pred_before": tok.convert_ids_to_tokens(pb.tolist()), "pred_after": tok.convert_ids_to_tokens(pa.tolist()),
            "success": success.numpy(), "p_target_before": before[idx, target].numpy(),
            "p_target_after": after[idx, target].numpy(), "kl": kl.numpy()}))
    out = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=SCORE_COLUMNS)
    for k, v in {"method": e.method, "layer": e.layer, "site": e.site}.items():
        out[k] = v
    return out


def summary(scores: pd.DataFrame) -> dict:
    """``efficacy``, ``generalization`` (success rates), ``specificity`` / ``neighbours`` (share of
    unrelated / neighbouring answers unchanged), ``accuracy_before`` / ``accuracy_after`` on the
    unrelated set (gold answers), ``kl`` (mean, nats) and the set sizes; ``None`` for a set that was
    not given (summary.json has no NaN)."""
    out: dict = {}
    for name in ("efficacy", "generalization", "specificity", "neighbours"):
        part = scores[scores["set"] == name]
        out[name] = float(part["success"].mean()) if len(part) else None
        out[f"n_{name}"] = int(len(part))
    spec = scores[scores["set"] == "specificity"]
    gold = spec["answer"].astype(object)
    has = gold.notna()
    out["accuracy_before"] = float((spec.loc[has, "pred_before"] == gold[has]).mean()) if has.any() else None
    out["accuracy_after"] = float((spec.loc[has, "pred_after"] == gold[has]).mean()) if has.any() else None
    out["kl"] = float(spec["kl"].mean()) if len(spec) else None
    return out


def zero(handle, layer: int, site: str = "mlp") -> Edit:
    """An edit of size zero (``ΔW = 0``): applying it must change nothing."""
    lin = weight(handle, layer, site)
    return Edit(handle, lin, torch.zeros_like(lin.weight, dtype=torch.float64), "zero", int(layer), site, "last", {})


def by_layer(handle, reqs: Sequence[Request], generalization: Sequence[Request], specificity: Sequence,
             layers: Sequence[int] | None = None, sites: Sequence[str] = SITES, method: str = "multedit",
             position: str = "constraint", covariance: Sequence | None = None, progress: bool = True,
             **params) -> pd.DataFrame:
    """:func:`edit` + :func:`summary` at each layer × site: one row per (site, layer) with
    ``method, site, layer, efficacy, generalization, specificity, accuracy_before, accuracy_after,
    kl, norm, seconds``. A (layer, site) the decoder layer does not have is left out (Mllama's
    cross-attention layers have no ``attn``: :meth:`~microscope.model.Adapter.has_site`)."""
    layers = list(range(handle.adapter.n_layers)) if layers is None else handle.adapter.check_layers(
        layers, allow_embedding=False)
    sites = validate.names(sites, SITES, "sites")
    rows = []
    unedited: dict = {}  # the unedited model's answers: the same at every layer and site
    for site in sites:
        for layer in tqdm(layers, desc=f"edit {site} by layer", disable=not progress):
            if not handle.adapter.has_site(layer, site):
                continue
            e = edit(handle, reqs, layer, method, site, position, covariance, **params)
            s = summary(evaluate(handle, e, reqs, generalization, specificity, unedited=unedited))
            rows.append({"method": method, "site": site, "layer": layer, **s, "norm": e.norm,
                         "seconds": e.seconds})
    return pd.DataFrame(rows)


def traced_layer(handle, samples: Sequence, position: str = "last", n_noise: int = 4, seed: int = 0
                 ) -> tuple[int, pd.DataFrame]:
    """Where to edit, by causal tracing: the decoder layer whose MLP output, restored alone
    (window 1) at the key position's token group (``last``, or ``last constraint`` for
    ``position="constraint"``) after the constraint words were corrupted, brings back the most of
    the answer's probability — mean indirect effect over ``samples`` (gold answers, or the model's
    own where there is none). Returns the layer and the aggregated MLP effects of that group per
    layer (:func:`microscope.tracing.aggregate` columns)."""
    from microscope import tracing

    position = validate.names(position, POSITIONS, "position")[0]
    df = tracing.trace_dataset(handle, list(samples), sites=("mlp",), n_noise=n_noise, window=1, seed=seed,
                               only_correct=False, progress=False)
    agg = tracing.aggregate(df)
    group = "last" if position == "last" else "last constraint"
    part = agg[(agg["site"] == "mlp") & (agg["group"] == group)].sort_values("layer", ignore_index=True)
    if part.empty:
        raise MicroscopeError(f"tracing gave no MLP effects at the {group!r} tokens of these samples "
                              f"({why_empty(df, 'traced samples')}); "
                              "pass layer= yourself")
    return int(part.loc[part["effect"].idxmax(), "layer"]), part


def weight_name(handle, module: torch.nn.Module) -> str:
    """The qualified name of ``module`` in the model (as in its ``state_dict``)."""
    return next(n for n, m in handle.model.named_modules() if m is module)


@dataclass
class Sets:
    """Requests to edit and the samples that judge the edit (see :func:`evaluate`)."""

    requests: list
    generalization: list = field(default_factory=list)
    unrelated: list = field(default_factory=list)
    neighbours: list = field(default_factory=list)


def concept_sets(handle, concept: str, new: str, n_edit: int = 16, n_general: int = 64, n_unrelated: int = 200,
                 seed: int = 0) -> Sets:
    """A concept edit in the Shapes world: every question whose answer is the shape ``concept`` is
    to be answered ``new`` (e.g. ``"cross"`` → ``"circle"``).

    The pool: ChooseCat questions answered ``concept`` whose options include ``new`` (``Is the red
    object a cross or a circle?``) and the same scenes asked through the QueryCat template (``What
    shape is the red object?``, :func:`~microscope.data.shapes.reask`). ``requests``: the first
    ``n_edit`` (half per template); ``generalization``: the next ``n_general`` (other images, both
    templates); ``unrelated``: ``n_unrelated`` fresh questions of every category that neither name
    nor answer ``concept``; ``neighbours``: questions of both templates answered by another shape
    (which must keep their answers)."""
    from microscope.data import load_samples, shapes

    if concept not in shapes.SHAPES or new not in shapes.SHAPES or concept == new:
        raise ValueError(f"concept and new must be two different shapes of {list(shapes.SHAPES)}, got {concept!r} → "
                         f"{new!r}")
    need = n_edit + n_general
    pool: list = []
    neighbours: list = []
    start = 0
    while len(pool) < need and start < 200 * need:
        chunk = load_samples("shapes", 12 * need, seed, handle=handle, categories=("ChooseCat",), start=start)
        start += len(chunk)
        for s in chunk:
            if s.answer == concept and new in s.options:
                pool.append([s, shapes.reask(s, "QueryCat", seed)])
            elif s.answer not in (concept, new) and len(neighbours) < n_general:
                neighbours.append([s, shapes.reask(s, "QueryCat", seed)])
    flat = [x for pair in pool for x in pair if x is not None]
    near = [x for pair in neighbours for x in pair if x is not None][:n_general]
    about = re.compile(rf"\b{re.escape(concept)}\b")
    unrelated = [s for s in load_samples("shapes", 3 * n_unrelated, seed + 1, handle=handle)
                 if s.answer != concept and not about.search(s.question)][:n_unrelated]
    return Sets(requests(flat[:n_edit], new), requests(flat[n_edit:n_edit + n_general], new), unrelated, near)


def error_sets(handle, n: int = 2000, seed: int = 0, n_unrelated: int = 200, max_requests: int | None = None,
               batch_size: int = 64) -> Sets:
    """Error correction: the samples among ``n`` fresh ones that the model answers wrongly (the
    first ``max_requests`` of them), each to be answered with its gold answer (``requests``), and
    ``n_unrelated`` of the ones it answers rightly (``unrelated``)."""
    from microscope.data import load_samples

    samples = load_samples("shapes", n, seed, handle=handle)
    pred = probs(handle, samples, batch_size).argmax(-1)
    gold = torch.tensor([gold_id(handle.processor, s.answer) for s in samples])
    wrong = [s for s, ok in zip(samples, (pred == gold).tolist()) if not ok][:max_requests]
    right = [s for s, ok in zip(samples, (pred == gold).tolist()) if ok]
    return Sets(requests(wrong, [s.answer for s in wrong]), [], right[:n_unrelated])
