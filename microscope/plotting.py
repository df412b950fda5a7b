"""Figures: plain functions from tidy DataFrames to matplotlib figures; they never compute.

``use_style()`` applies the suite's style file; ``save(fig, name, out)`` writes PDF (fonttype 42)
and PNG. Role colours are fixed across every figure (:data:`ROLE_COLORS`).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from microscope.results import ci_half_width

STYLE = Path(__file__).parent / "style" / "microscope.mplstyle"
#: Okabe-Ito colours per token role
ROLE_COLORS = {
    "image": "#0072B2", "question": "#E69F00", "constraint": "#D55E00", "template": "#999999",
    "last": "#009E73", "pad": "#FFFFFF", "image_boundary": "#56B4E9",
}


def use_style() -> None:
    """Apply the suite's matplotlib style."""
    plt.style.use(str(STYLE))


def save(fig, name: str, out: str | Path) -> list[Path]:
    """Save ``fig`` as ``out/name.pdf`` and ``out/name.png``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.pdf", out / f"{name}.png"]
    for p in paths:
        # no creation date: the same figure gives the same bytes (clean diffs of figures/)
        fig.savefig(p, metadata={"CreationDate": None} if p.suffix == ".pdf" else None)
    return paths


def empty_panel(ax, df: pd.DataFrame, what: str):
    """Write on ``ax`` why there is nothing to draw (the table's ``attrs["why_empty"]``, set by the
    analysis that made it, e.g. "no traced samples: 6 of 6 samples answered wrongly
    (only_correct=True)"), so a figure of zero rows says why instead of failing; returns the figure."""
    from microscope.results import why_empty

    ax.text(0.5, 0.5, textwrap.fill(why_empty(df, what), 48), ha="center", va="center", transform=ax.transAxes,
            fontsize=8, color="0.3")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax.figure


def _mean_ci(g: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    s = g.groupby(x)[y].agg(["mean", "std", "count"]).reset_index()
    s["half"] = ci_half_width(s["std"], s["count"])
    return s


def line_by_layer(df: pd.DataFrame, y: str = "value", hue: str = "role", ax=None, title: str = "",
                  ylabel: str | None = None):
    """Mean of ``y`` per layer and ``hue`` with a 95% CI band (normal approx. over rows)."""
    if ax is None:
        _, ax = plt.subplots()
    for key, g in df.groupby(hue, sort=False):
        s = _mean_ci(g, "layer", y)
        color = ROLE_COLORS.get(key) if hue == "role" else None
        ax.plot(s["layer"], s["mean"], label=str(key), color=color, marker="o", ms=3)
        ax.fill_between(s["layer"], s["mean"] - s.half, s["mean"] + s.half, alpha=0.2, color=color, lw=0)
    ax.set_xlabel("layer (-1 = embedding output)")
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    ax.legend()
    return ax.figure


#: how :func:`image_with_patches` marks highlighted patches: ``truth`` shades them (the ground
#: truth, e.g. patches the referred object covers), ``predicted`` hatches them (a method's top-k)
HIGHLIGHT_STYLES: dict[str, dict[str, Any]] = {
    "truth": {"color": "#D55E00", "alpha": 0.25, "lw": 0},
    "predicted": {"fill": False, "hatch": "////", "ec": "#0072B2", "lw": 0.8},
}


def image_with_patches(sample, ax=None, highlight: tuple[int, ...] = (), highlight_label: str | None = None,
                       style: str = "truth", legend: bool = True):
    """A Shapes-world image with its patch grid, object boxes and highlighted patches; the strip
    past the last whole patch (``image_size`` not a multiple of ``patch_size``), which the model
    never sees, is greyed out.

    What is drawn, and said in a legend below the image (``legend=False``: none): the box of each
    object the question refers to (solid black; two for a two-object question), the box of every
    other object (dashed grey), and the ``highlight`` patches in ``style`` (:data:`HIGHLIGHT_STYLES`:
    ``"truth"`` shaded orange, ``"predicted"`` hatched blue) under ``highlight_label`` (default:
    "highlighted patches")."""
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D
    from matplotlib.patches import Polygon, Rectangle

    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    size = sample.image_size
    ax.imshow(sample.image, extent=(0, size, size, 0))
    g, p, seen = sample.grid, sample.patch_size, sample.visible_size
    for i in range(1, g + (seen < size)):
        ax.axhline(i * p, color="k", lw=0.4, alpha=0.4)
        ax.axvline(i * p, color="k", lw=0.4, alpha=0.4)
    if seen < size:
        ax.add_patch(Polygon([(seen, 0), (size, 0), (size, size), (0, size), (0, seen), (seen, seen)],
                             color="0.3", alpha=0.35, lw=0))
    look = HIGHLIGHT_STYLES[style]
    for idx in highlight:
        r, c = divmod(idx, g)
        ax.add_patch(Rectangle((c * p, r * p), p, p, **look))
    for j, o in enumerate(sample.objects):
        x0, y0, x1, y1 = o.box
        ref = j in sample.referred
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                               ec="k" if ref else "0.5", lw=1.6 if ref else 0.8, ls="-" if ref else "--"))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.set_title(f"{sample.question}\nanswer: {sample.answer}", fontsize=9)
    if legend:
        n_ref = len(sample.referred)
        label = ("box: object the question refers to" if n_ref == 1
                 else f"boxes: the {n_ref} objects the question refers to" if n_ref else
                 "box: referred object (none in this question)")
        handles: list[Artist] = [Line2D([], [], color="k", lw=1.6, label=label)]
        if len(sample.objects) > n_ref:
            handles.append(Line2D([], [], color="0.5", lw=0.8, ls="--", label="dashed box: other object"))
        if len(highlight):
            handles.append(Rectangle((0, 0), 1, 1, **look, label=highlight_label or "highlighted patches"))
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=7, frameon=False,
                  handlelength=1.6)
    return ax.figure


def tokens_by_role(tokens: list[str], roles: list[str], ax=None, collapse_image: bool = True):
    """The prompt as coloured token boxes, one colour per role (image runs collapsed)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 1.4))
    items: list[tuple[str, str, int]] = []
    for t, r in zip(tokens, roles):
        if r == "pad":
            continue
        if collapse_image and r == "image" and items and items[-1][1] == "image":
            items[-1] = (items[-1][0], "image", items[-1][2] + 1)
            continue
        items.append((t, r, 1))
    x = 0.0
    for t, r, n in items:
        label = f"<image>×{n}" if r == "image" else t.replace("\n", "\\n")
        w = 0.12 + 0.075 * len(label)
        ax.add_patch(plt.Rectangle((x, 0), w, 1, color=ROLE_COLORS[r], alpha=0.85, lw=0))
        ax.text(x + w / 2, 0.5, label, ha="center", va="center", fontsize=8,
                color="white" if r in ("image", "constraint", "last") else "black")
        x += w + 0.04
    ax.set_xlim(0, x)
    ax.set_ylim(-0.9, 1.1)
    ax.axis("off")
    for k, (r, c) in enumerate((r, c) for r, c in ROLE_COLORS.items() if r != "pad"):
        ax.add_patch(plt.Rectangle((k * x / 5.5, -0.8), 0.15, 0.4, color=c, lw=0))
        ax.text(k * x / 5.5 + 0.2, -0.6, r, va="center", fontsize=8)
    return ax.figure


METRIC_LABELS = {
    "linearity": "linearity", "linearity_wo_residual": "linearity w/o residual",
    "id_twonn": "intrinsic dim. (TwoNN)", "id_mle": "intrinsic dim. (MLE)",
    "anisotropy_pc1": "anisotropy (PC1 ratio)", "anisotropy_cosine": "anisotropy (mean cosine)",
}
MODALITY_COLORS = {"image": ROLE_COLORS["image"], "text": ROLE_COLORS["question"]}


def geometry_legend_handles(ax) -> list:
    """The legend of a geometry panel: the value lines drawn on ``ax`` (modality colour, model line
    style), then what the band and the dotted line mean (proxies; nothing is added to ``ax``)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [ln for ln in ax.lines if not ln.get_label().startswith("_")]
    return handles + [Patch(color="0.5", alpha=0.25, lw=0, label="band: 95% split-half CI over samples"),
                      Line2D([], [], color="0.3", lw=1, ls=(0, (1, 2)),
                             label="dotted: baseline (linearity: permutation chance; PC1: 1/d; cosine: 0)")]


def metric_by_layer(df: pd.DataFrame, metric: str, ax=None, hue: str = "modality", style: str = "model",
                    legend: bool | None = None):
    """One metric across layers: a line per modality (colour) and model (line style), the
    split-half CI as a band and the baseline as a dotted line of the same colour; with ``legend``
    (default: when the figure is made here) a legend that says so."""
    if legend is None:
        legend = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3))
    d = df[df.metric == metric]
    styles = ["-", "--", ":", "-."]
    for j, (mname, dm) in enumerate(d.groupby(style, sort=False)):
        for key, g in dm.groupby(hue, sort=False):
            g = g.sort_values("layer")
            c = MODALITY_COLORS.get(key, ROLE_COLORS.get(key))
            lab = f"{key}" if d[style].nunique() == 1 else f"{key} · {Path(str(mname)).name}"
            ax.plot(g.layer, g.value, ls=styles[j % 4], color=c, marker="o", ms=3, label=lab)
            if g.ci_low.notna().any():
                ax.fill_between(g.layer, g.ci_low, g.ci_high, color=c, alpha=0.2, lw=0)
            if g.baseline.notna().any():
                ax.plot(g.layer, g.baseline, ls=(0, (1, 2)), color=c, lw=1, alpha=0.8)
    ax.set_title(METRIC_LABELS.get(metric, metric))
    ax.set_xlabel("layer")
    if legend:
        ax.legend(handles=geometry_legend_handles(ax), fontsize=7)
    return ax.figure


def small_multiples(n: int, width: float = 3.6, height: float = 2.9, cols: int = 3, sharey: bool = False):
    """A figure with ``n`` panels in rows of ``cols`` (spare panels hidden); returns (fig, axes list)."""
    cols = min(cols, max(1, n))
    rows = (max(1, n) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, sharey=sharey)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat


def geometry_panel(df: pd.DataFrame, metrics: list[str] | None = None):
    """Small multiples: one panel per metric, modalities as colours, models as line styles."""
    metrics = metrics or [m for m in METRIC_LABELS if m in set(df.metric)]
    fig, axes = small_multiples(len(metrics), width=3.6)
    for ax, m in zip(axes, metrics):
        metric_by_layer(df, m, ax=ax, legend=False)
    handles = geometry_legend_handles(axes[0])
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def pca_scatter(df: pd.DataFrame, ax=None, title: str = ""):
    """2-D PCA view (columns pc1, pc2, role), coloured by role."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 4))
    for role, g in df.groupby("role"):
        ax.scatter(g.pc1, g.pc2, s=5, alpha=0.6, color=ROLE_COLORS.get(role), label=role, lw=0)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(markerscale=3, fontsize=8)
    if title:
        ax.set_title(title)
    return ax.figure


#: colours per knockout edge (Okabe-Ito, plus grey): no two edges share a hue, since the
#: explore panel can draw all of them on one axis
EDGE_COLORS = {
    "image↛question": "#0072B2", "image↛last": "#CC79A7", "question↛last": "#E69F00", "last↛last": "#009E73",
    "related-image↛question": "#D55E00", "other-image↛question": "#7F7F7F", "image↛text": "#000000",
}
#: and a marker per edge, so lines stay apart in grey-scale print
EDGE_MARKERS = {
    "image↛question": "o", "image↛last": "s", "question↛last": "^", "last↛last": "D",
    "related-image↛question": "v", "other-image↛question": "P", "image↛text": "X",
}


def knockout_curves(df: pd.DataFrame, edges: list[str] | None = None, ax=None, title: str = "",
                    legend: bool | None = None):
    """Mean % change of p(answer) per window centre, one line per edge (colour and marker of
    :data:`EDGE_COLORS` / :data:`EDGE_MARKERS`), 95% CI bands (normal approximation over samples),
    zero drawn in; with ``legend`` (default: when the figure is made here) a legend naming every
    edge drawn and the band; a table without rows says why."""
    if legend is None:
        legend = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3))
    if df.empty:
        if title:
            ax.set_title(title)
        return empty_panel(ax, df, "knockout rows")
    edges = edges or list(dict.fromkeys(df.edge))
    for e in edges:
        g = df[df.edge == e]
        if g.empty:
            continue
        s = _mean_ci(g, "layer", "change")
        c = EDGE_COLORS.get(e)
        ax.plot(s.layer, s["mean"], color=c, marker=EDGE_MARKERS.get(e, "o"), ms=3.5, label=e)
        ax.fill_between(s.layer, s["mean"] - s.half, s["mean"] + s.half, color=c, alpha=0.2, lw=0)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xlabel(f"window centre layer (k = {int(df.window.iloc[0])})" if len(df) else "layer")
    ax.set_ylabel("change of p(answer), %")
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(handles=knockout_legend_handles(ax), fontsize=7)
    return ax.figure


def knockout_legend_handles(ax) -> list:
    """The edges drawn on ``ax`` and a proxy saying what the bands are (nothing added to ``ax``)."""
    from matplotlib.patches import Patch

    lines = [ln for ln in ax.lines if not ln.get_label().startswith("_")]
    return lines + [Patch(color="0.5", alpha=0.25, lw=0, label="band: 95% CI over samples")]


def knockout_by_category(df: pd.DataFrame, edges: list[str] | None = None, categories: list[str] | None = None):
    """Small multiples: one :func:`knockout_curves` panel per question category (one panel saying
    why, for a table without rows)."""
    categories = categories or list(dict.fromkeys(df.category))
    if df.empty or not categories:
        fig, axes = small_multiples(1, width=3.8)
        empty_panel(axes[0], df, "knockout rows")
        return fig
    fig, axes = small_multiples(len(categories), width=3.8, sharey=True)
    for ax, cat in zip(axes, categories):
        d = df[df.category == cat]
        knockout_curves(d, edges, ax=ax, title=f"{cat} (n = {d.sample_id.nunique()})", legend=False)
    axes[0].legend(handles=knockout_legend_handles(axes[0]), fontsize=7)
    fig.tight_layout()
    return fig


def logit_lens_curve(df: pd.DataFrame, ax=None, title: str = "logit lens at the last position"):
    """Mean probability of the answer token per layer, one line per variant (lower-case /
    capitalised; ``model``: the model's own answer for samples without a gold one), with 95% CI
    bands; a table without rows says why."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3))
    if df.empty:
        ax.set_title(title)
        return empty_panel(ax, df, "logit-lens rows")
    colors = {"lower": "#0072B2", "capitalised": "#D55E00", "model": "#009E73"}
    for v, g in df.groupby("variant", sort=False):
        s = _mean_ci(g, "layer", "prob")
        ax.plot(s.layer, s["mean"], marker="o", ms=3, color=colors.get(v), label=LENS_LABELS.get(v, f"answer ({v})"))
        ax.fill_between(s.layer, s["mean"] - s.half, s["mean"] + s.half, color=colors.get(v), alpha=0.2, lw=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("p(answer token)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    from matplotlib.patches import Patch

    lines = [ln for ln in ax.lines if not ln.get_label().startswith("_")]
    ax.legend(handles=lines + [Patch(color="0.5", alpha=0.25, lw=0, label="band: 95% CI over samples")],
              fontsize=7)
    return ax.figure


#: legend labels of the logit-lens variants (``lens.logit_lens``'s ``variant`` column)
LENS_LABELS = {
    "lower": "gold answer, lower-case (the token generated)",
    "capitalised": "gold answer, capitalised (e.g. ▁Red)",
    "model": "model's own greedy answer (no gold answer)",
}


SITE_LABELS = {"resid": "residual state", "mlp": "MLP output", "attn": "attention output"}
GROUP_COLORS = {
    "first constraint": "#F0B27A", "middle constraint": "#E69F00", "last constraint": "#D55E00",
    "other question": "#CC79A7", "related image": "#0072B2", "other image": "#56B4E9", "template": "#999999",
    "last": "#009E73", "image_boundary": "#6A3D9A",
}


#: the smallest colour-scale half-width of :func:`trace_heatmap`: a corruption that lowers p(answer)
#: by less than this is drawn on ±this, so its noise stays pale instead of filling the scale
TRACE_MIN_SCALE = 0.1


def corrupted_mask(d: pd.DataFrame) -> pd.Series:
    """Which rows of a trace table (:func:`microscope.tracing.trace`) sit at a corrupted position,
    from its ``target`` and each row's role / group (the rule :func:`microscope.tracing.corrupt`
    uses): ``constraint`` → constraint tokens, ``image`` → every image token, ``related-image`` /
    ``other-image`` → the image tokens of that group."""
    target = d["target"].astype(str)
    return (((target == "constraint") & (d.role == "constraint")) | ((target == "image") & (d.role == "image"))
            | ((target == "related-image") & (d.group == "related image"))
            | ((target == "other-image") & (d.group == "other image")))


def trace_columns(d: pd.DataFrame, collapse_image: bool = True) -> tuple[list[int], list[int]]:
    """The columns :func:`trace_heatmap` draws for one site's rows ``d`` of a trace table:
    ``(kept, collapsed)``, the positions drawn, in order, and the image positions whose effect is
    0 at every layer (before the first corrupted token) that, with ``collapse_image`` and more than
    one of them, share one column, the first of them (empty otherwise)."""
    m = d.pivot_table(index="layer", columns="position", values="effect")
    role = d.drop_duplicates("position").set_index("position").role
    keep = list(m.columns)
    if not collapse_image:
        return keep, []
    zero_img = [p for p in keep if role[p] == "image" and (m[p].abs() < 1e-12).all()]
    if len(zero_img) <= 1:
        return keep, []
    return [p for p in keep if p not in zero_img[1:]], zero_img


def trace_heatmap(df: pd.DataFrame, site: str = "resid", ax=None, collapse_image: bool = True,
                  vmax: float | None = None):
    """One sample's indirect effects as a layer × token heatmap, tokens labelled and coloured by
    role, the corrupted tokens marked with ``*`` and a bar under their columns. Image tokens before
    the first corrupted token have effect 0 by causality; with ``collapse_image`` a run of them is
    drawn as one column. A table without rows of ``site`` says why.

    The colour scale follows ROME (Meng et al. 2022): white is the corrupted probability (effect 0)
    and full red is the clean one — the scale is ±(p clean − p corrupted), never the map's own
    maximum, so a corruption that moves nothing gives a pale map rather than noise stretched to full
    colour; it is at least ±:data:`TRACE_MIN_SCALE`, and ``vmax`` fixes it instead. The colour bar
    reads in both units: indirect effect (right) and, on the left, where p corrupted (white) and
    p clean sit on it."""
    d = df[df.site == site]
    if d.empty:
        if ax is None:
            _, ax = plt.subplots(figsize=(4, 2))
        return empty_panel(ax, df, f"{site} rows")
    m = d.pivot_table(index="layer", columns="position", values="effect")
    info = d.assign(corrupted=corrupted_mask(d)).drop_duplicates("position").set_index("position").loc[m.columns]
    keep, zero_img = trace_columns(d, collapse_image)
    m = m[keep]
    info = info.loc[keep]
    labels = []
    for p in keep:
        if len(zero_img) > 1 and p == zero_img[0]:
            labels.append(f"<image>×{len(zero_img)} (0)")
        else:
            labels.append(str(info.loc[p, "token"]).replace("\n", "\\n") + ("*" if info.loc[p, "corrupted"] else ""))
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.32 * len(keep) + 1.5), 0.35 * len(m) + 1.6))
    s = d.iloc[0]
    lost = float(s.p_clean - s.p_corrupted)
    v = vmax or max(TRACE_MIN_SCALE, abs(lost))
    im = ax.imshow(m.values, aspect="auto", cmap="RdBu_r", vmin=-v, vmax=v, origin="lower")
    for j, p in enumerate(keep):  # a bar under each corrupted column
        if info.loc[p, "corrupted"]:
            ax.add_patch(plt.Rectangle((j - 0.5, -0.5), 1, -0.25, color="k", clip_on=False, lw=0))
    ax.set_yticks(range(len(m)))
    ax.set_yticklabels([str(x) for x in m.index])
    ax.set_xticks(range(len(keep)))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    for tick, p in zip(ax.get_xticklabels(), keep):
        tick.set_color(ROLE_COLORS.get(info.loc[p, "role"], "black"))
    ax.set_ylabel("layer")
    ax.grid(False)
    n_cor = int(info.corrupted.sum())
    ax.set_title(f"{SITE_LABELS.get(site, site)} · p clean {s.p_clean:.2f} → corrupted {s.p_corrupted:.2f}"
                 + (f" · {n_cor} corrupted token{'s' * (n_cor > 1)} (*)" if n_cor else ""), fontsize=9)
    bar = ax.figure.colorbar(im, ax=ax, shrink=0.8, pad=0.2)
    bar.set_label(f"indirect effect (scale ±{v:.2g})", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    # left of the bar: where p corrupted (white) and p clean sit on it, ROME's reading
    pc, pclean = float(s.p_corrupted), float(s.p_clean)
    left = bar.ax.secondary_yaxis("left", functions=(lambda x: x + pc, lambda y: y - pc))
    if abs(lost) < 0.05 * v:  # the corruption moves nothing: one tick
        left.set_yticks([pc], [f"p corr. ≈\np clean {pc:.2f}"])
    else:
        left.set_yticks([pc, pclean], [f"p corr. {pc:.2f}", f"p clean {pclean:.2f}"])
    left.tick_params(labelsize=6)
    return ax.figure


def trace_curves(agg: pd.DataFrame, groups: list[str] | None = None, total: float | None = None,
                 title: str = ""):
    """Dataset-level indirect effect per layer, one panel per site, one line per token group, with
    the 95% CI band (the table of :func:`microscope.tracing.aggregate`); 0 (no effect) and, if
    given, ``total`` (mean ``p_clean − p_corrupted``: everything restored) drawn in; ``title``
    (e.g. which samples were traced) above the panels; a table without rows says why."""
    sites = [k for k in SITE_LABELS if k in set(agg.site)]
    if not sites:
        fig, ax = plt.subplots(figsize=(4, 3))
        empty_panel(ax, agg, "traced samples")
        return fig
    groups = groups or [g for g in GROUP_COLORS if g in set(agg.group)]
    fig, axes = plt.subplots(1, len(sites), figsize=(3.9 * len(sites), 3.0), squeeze=False, sharey=True)
    for ax, k in zip(axes.flat, sites):
        for gname in groups:
            g = agg[(agg.site == k) & (agg.group == gname)].sort_values("layer")
            if g.empty:
                continue
            c = GROUP_COLORS.get(gname)
            ax.plot(g.layer, g.effect, marker="o", ms=3, color=c, label=gname)
            ax.fill_between(g.layer, g.ci_low, g.ci_high, color=c, alpha=0.2, lw=0)
        ax.axhline(0, color="0.3", lw=0.8)
        if total is not None:
            ax.axhline(total, color="0.3", lw=0.8, ls="--", label="p clean − p corrupted")
        ax.set_title(SITE_LABELS[k])
        ax.set_xlabel("layer (-1 = decoder input)" if k == "resid" else "layer (window centre)")
    axes.flat[0].set_ylabel("mean indirect effect")
    axes.flat[-1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


METHOD_COLORS = {
    "attention → constraint": "#CC79A7", "attention → last": "#E69F00", "restoration": "#56B4E9",
    "group restoration": "#0072B2", "integrated gradients": "#009E73", "objectness": "0.55",
    "objectness (oracle)": "0.75",
}
SCORE_LABELS = {"precision@k": "precision@k", "top-1": "top-1", "roc_auc": "ROC-AUC",
                "referred_vs_distractor": "referred vs distractor"}


def attribution_scores(summ: pd.DataFrame, metrics: list[str] | None = None, title: str = ""):
    """One panel per score: a bar per method (mean with its 95% CI), the best question-blind
    objectness baseline as a dashed line and chance as a dotted line (the table of
    :func:`microscope.groundtruth.summarize` with ``by=("method", "metric")``)."""
    metrics = metrics or [m for m in SCORE_LABELS if m in set(summ.metric)]
    fig, axes = small_multiples(len(metrics), width=3.3, height=3.1, cols=len(metrics), sharey=True)
    for ax, m in zip(axes, metrics):
        d = summ[summ.metric == m]
        x = np.arange(len(d))
        colors = [METHOD_COLORS.get(k, "#D55E00") for k in d.method]
        ax.bar(x, d.value, color=colors, yerr=[d.value - d.ci_low, d.ci_high - d.value], capsize=2, lw=0)
        ax.axhline(float(d.objectness.iloc[0]), color="0.2", ls="--", lw=1, label="objectness (question-blind)")
        ax.axhline(float(d.chance.iloc[0]), color="0.2", ls=":", lw=1, label="chance")
        ax.set_xticks(x)
        ax.set_xticklabels(d.method, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{SCORE_LABELS.get(m, m)} (n = {int(d.n_samples.max())})", fontsize=9)
        ax.set_ylim(0, 1.05)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="upper right", ncol=2, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def object_accuracy(acc: pd.DataFrame, title: str = "object-level tests: referred objects ranked first"):
    """Accuracy per category, one bar per (space, test), with each category's chance level as a
    black tick (the table of :func:`microscope.objects.object_accuracy`)."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    cats = list(dict.fromkeys(acc.category))
    keys = list(dict.fromkeys(zip(acc.space, acc.test)))
    w = 0.8 / max(1, len(keys))
    palette = {"occlude": "#56B4E9", "restore": "#E69F00", "variable": "#009E73"}
    for i, (space, test) in enumerate(keys):
        g = acc[(acc.space == space) & (acc.test == test)].set_index("category").reindex(cats)
        ax.bar(np.arange(len(cats)) + i * w, g.accuracy, w, color=palette.get(test, "0.5"),
               hatch="//" if space == "embeddings" else None, ec="white", lw=0, label=f"{test} · {space}")
    ch = acc.groupby("category").chance.mean().reindex(cats)
    n = acc.groupby("category").n_samples.max().reindex(cats)
    for j, c in enumerate(ch):
        ax.plot([j - w / 2, j + 0.8 - w / 2], [c, c], color="k", lw=1.5, label="chance" if j == 0 else None)
    ax.axhline(0.95, color="0.4", ls="--", lw=0.8)
    ax.set_xticks(np.arange(len(cats)) + 0.4 - w / 2)
    ax.set_xticklabels([f"{c}\n(n = {int(k)})" for c, k in zip(cats, n)], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of samples")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    fig.tight_layout()
    return fig


def corruption_effects(effects: pd.DataFrame, drop: float = 0.1, title: str = "how much each corruption corrupts",
                       only_correct: bool = True):
    """Per corruption, the distribution of p(answer) over correctly answered samples (all with
    ``only_correct=False``): clean (grey, the baseline) and corrupted (a box with every sample as
    a dot), annotated with the share of samples whose p drops by more than ``drop`` and the
    share whose answer flips (the table of :func:`microscope.tracing.corruption_effects`)."""
    d = effects[effects.correct] if only_correct else effects
    labels = list(dict.fromkeys(d.corruption))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(labels)), 3.4))
    rng = np.random.default_rng(0)
    for i, lab in enumerate(labels):
        g = d[d.corruption == lab]
        ax.boxplot([g.p_clean], positions=[i - 0.2], widths=0.25, showfliers=False,
                   boxprops={"color": "0.6"}, medianprops={"color": "0.6"}, whiskerprops={"color": "0.6"},
                   capprops={"color": "0.6"})
        ax.boxplot([g.p_corrupted], positions=[i + 0.15], widths=0.3, showfliers=False)
        ax.scatter(i + 0.15 + rng.uniform(-0.1, 0.1, len(g)), g.p_corrupted, s=5, alpha=0.5, color="#D55E00", lw=0)
        ax.text(i, 1.06, f"drop>{drop:g}: {(g['drop'] > drop).mean():.0%}\nflip: {g.flipped.mean():.0%}",
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(-0.03, 1.25)
    ax.set_ylabel("p(answer): clean (grey) · corrupted")
    ax.set_title(f"{title} (n = {d.sample_id.nunique()} samples)", fontsize=10)
    fig.tight_layout()
    return fig


#: the three numbers of model editing (and the neighbours' share kept), in reading order
EDIT_SCORES = ("efficacy", "generalization", "specificity", "neighbours")
EDIT_COLORS = {"efficacy": "#0072B2", "generalization": "#009E73", "specificity": "#E69F00", "neighbours": "#CC79A7"}


def edit_scores(summ: pd.DataFrame, by: str = "method", title: str = "model editing: the three numbers",
                bars: dict[str, float] | None = None):
    """Grouped bars: one group per value of ``by`` (rows of ``summ``, from
    :func:`microscope.editing.summary`), one bar per score of :data:`EDIT_SCORES` present; ``bars``
    draws a dotted target line per score (e.g. ``{"efficacy": 0.95}``), labelled in the legend."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    if summ.empty:
        empty_panel(ax, summ, "edits")
        return fig
    scores = [s for s in EDIT_SCORES if s in summ and summ[s].notna().any()]
    x = np.arange(len(summ))
    w = 0.8 / max(1, len(scores))
    for i, s in enumerate(scores):
        ax.bar(x + (i - (len(scores) - 1) / 2) * w, summ[s], w, label=s, color=EDIT_COLORS[s])
        if bars and s in bars:
            ax.axhline(bars[s], color=EDIT_COLORS[s], ls=":", lw=1, label=f"{s} target {bars[s]:g}")
    ax.set_xticks(x, [str(v) for v in summ[by]])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of questions")
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    fig.tight_layout()
    return fig


def edit_by_layer(by_layer: pd.DataFrame, traced: pd.DataFrame | None = None,
                  title: str = "where edits work, beside where tracing finds the information"):
    """Left: efficacy, generalization and specificity of an edit at each layer (solid: MLP
    down-projection, dashed: attention output projection; rows of
    :func:`microscope.editing.by_layer`). Right: the MLP indirect effect of causal tracing at the
    edited token per layer, mean with 95% CI (``traced``, from
    :func:`microscope.editing.traced_layer`)."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9.6, 3.4))
    if by_layer.empty:
        empty_panel(ax, by_layer, "edits")
    for site, ls in (("mlp", "-"), ("attn", "--")):
        part = by_layer[by_layer.site == site].sort_values("layer")
        for s in ("efficacy", "generalization", "specificity"):
            if len(part):
                ax.plot(part.layer, part[s], ls=ls, marker="o", ms=3, color=EDIT_COLORS[s], label=f"{s} ({site})")
    ax.set_xlabel("edited layer")
    ax.set_ylabel("share of questions")
    ax.set_ylim(-0.02, 1.05)
    ax.legend(fontsize="x-small", ncol=2)
    ax.set_title("edit success")
    if traced is None or traced.empty:
        empty_panel(bx, pd.DataFrame() if traced is None else traced, "traced samples")
    else:
        t = traced.sort_values("layer")
        bx.plot(t.layer, t.effect, marker="o", ms=3, color="#D55E00", label="MLP indirect effect")
        bx.fill_between(t.layer, t.ci_low, t.ci_high, color="#D55E00", alpha=0.2, label="95% CI")
        bx.axhline(0, color="#999999", lw=0.8)
        bx.set_xlabel("restored layer (MLP, window 1)")
        bx.set_ylabel("p(restored) − p(corrupted)")
        bx.legend(fontsize="x-small")
        bx.set_title("causal tracing at the edited token")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


#: colours of the compared models, in ``compare`` order (Okabe-Ito blue, vermillion, green, purple)
COMPARE_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7")
MODALITY_STYLES = {"image": "-", "text": "--"}


def compare_metric(df: pd.DataFrame, metric: str, seeds: pd.DataFrame | None = None, ax=None,
                   models: list[str] | None = None):
    """Overlay of one geometry metric across layers for several models (a figure of its own).

    ``df``: profiles (:func:`microscope.geometry.profile`) with a ``model`` column; each model has
    a colour, each modality a line style (image solid, text dashed), the 95 % split-half CI over
    samples as a band and the baseline as a dotted line. ``seeds``: per-seed profile tables
    (:func:`microscope.comparison.read_seed_tables`) whose ``style`` equals a model's name; each
    training seed is drawn as a thin line of the model's colour — the between-seed spread."""
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 3.6))
    d = df[df.metric == metric]
    models = models or list(dict.fromkeys(d.model))
    seeded = False
    for j, name in enumerate(models):
        c = COMPARE_COLORS[j % len(COMPARE_COLORS)]
        for mod, ls in MODALITY_STYLES.items():
            g = d[(d.model == name) & (d.modality == mod)].sort_values("layer")
            if g.empty:
                continue
            ax.plot(g.layer, g.value, ls=ls, color=c, marker="o" if mod == "image" else "s", ms=3.5, lw=1.8, zorder=3)
            if g.ci_low.notna().any():
                ax.fill_between(g.layer, g.ci_low, g.ci_high, color=c, alpha=0.18, lw=0)
            if g.baseline.notna().any() and j == 0:
                ax.plot(g.layer, g.baseline, ls=(0, (1, 2)), color="0.35", lw=1)
            if seeds is not None and len(seeds):
                s = seeds[(seeds["style"] == Path(str(name)).name) & (seeds.modality == mod) & (seeds.metric == metric)]
                for _, gs in s.groupby("seed"):
                    gs = gs.sort_values("layer")
                    ax.plot(gs.layer, gs.value, ls=ls, color=c, lw=0.8, alpha=0.55, zorder=2)
                    seeded = True
    ax.set_title(METRIC_LABELS.get(metric, metric))
    ax.set_xlabel("layer (−1: embedding output)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    handles: list[Artist] = [Line2D([], [], color=COMPARE_COLORS[j % len(COMPARE_COLORS)], lw=2,
                                    label=Path(str(m)).name)
               for j, m in enumerate(models)]
    handles += [Line2D([], [], color="0.2", ls=ls, label=f"{mod} tokens") for mod, ls in MODALITY_STYLES.items()]
    handles += [Patch(color="0.5", alpha=0.25, lw=0, label="band: 95% split-half CI over samples")]
    if seeded:
        handles += [Line2D([], [], color="0.2", lw=0.8, alpha=0.6, label="thin: one training seed each")]
    if d.baseline.notna().any():
        handles += [Line2D([], [], color="0.35", lw=1, ls=(0, (1, 2)), label="dotted: baseline")]
    ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.85)
    ax.figure.tight_layout()
    return ax.figure
