"""Figures: plain functions from tidy DataFrames to matplotlib figures; they never compute.

``use_style()`` applies the suite's style file; ``save(fig, name, out)`` writes PDF (fonttype 42)
and PNG. Role colours are fixed across every figure (:data:`ROLE_COLORS`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg") if matplotlib.get_backend().lower() == "agg" else None
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

STYLE = Path(__file__).parent / "style" / "microscope.mplstyle"
#: Okabe-Ito colours per token role
ROLE_COLORS = {
    "image": "#0072B2", "question": "#E69F00", "constraint": "#D55E00", "template": "#999999",
    "last": "#009E73", "pad": "#FFFFFF",
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
        fig.savefig(p)
    return paths


def line_by_layer(df: pd.DataFrame, y: str = "value", hue: str = "role", ax=None, title: str = "",
                  ylabel: str | None = None):
    """Mean of ``y`` per layer and ``hue`` with a 95% CI band (normal approx. over rows)."""
    if ax is None:
        _, ax = plt.subplots()
    for key, g in df.groupby(hue, sort=False):
        s = g.groupby("layer")[y].agg(["mean", "std", "count"]).reset_index()
        half = 1.96 * s["std"].fillna(0) / np.sqrt(s["count"].clip(lower=1))
        color = ROLE_COLORS.get(key) if hue == "role" else None
        ax.plot(s["layer"], s["mean"], label=str(key), color=color, marker="o", ms=3)
        ax.fill_between(s["layer"], s["mean"] - half, s["mean"] + half, alpha=0.2, color=color, lw=0)
    ax.set_xlabel("layer (-1 = embedding output)")
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    ax.legend()
    return ax.figure


def image_with_patches(sample, ax=None, highlight: tuple[int, ...] = ()):
    """A Shapes-world image with its patch grid, object boxes and highlighted patches."""
    from matplotlib.patches import Rectangle

    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(sample.image, extent=(0, sample.image_size, sample.image_size, 0))
    g, p = sample.grid, sample.patch_size
    for i in range(1, g):
        ax.axhline(i * p, color="k", lw=0.4, alpha=0.4)
        ax.axvline(i * p, color="k", lw=0.4, alpha=0.4)
    for idx in highlight:
        r, c = divmod(idx, g)
        ax.add_patch(Rectangle((c * p, r * p), p, p, color=ROLE_COLORS["constraint"], alpha=0.25, lw=0))
    for j, o in enumerate(sample.objects):
        x0, y0, x1, y1 = o.box
        ref = j in sample.referred
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                               ec="k" if ref else "0.5", lw=1.6 if ref else 0.8, ls="-" if ref else "--"))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.set_title(f"{sample.question}\nanswer: {sample.answer}", fontsize=9)
    return ax.figure


def tokens_by_role(tokens: list[str], roles: list[str], ax=None, collapse_image: bool = True):
    """The prompt as coloured token boxes, one colour per role (image runs collapsed)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 1.4))
    items = []
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
