"""Explorers: the notebooks' interactive panels over the suite's tidy tables and the activation store.

Each explorer is a *view function* — a selection (layer, roles, token, edge, …) in, the slice of a
cached table out (tested in ``tests/test_widgets.py``) — and a drawing of that slice with the
functions of :mod:`microscope.plotting`, behind ipywidgets controls. Controls are declared as
plain specs (:func:`slider`, :func:`dropdown`, :func:`multi`, :func:`button`); only
:meth:`Explorer.show` with ``interactive=True`` turns them into widgets. With
``interactive=False`` (papermill, :mod:`microscope.suite`) it draws the figure once with the
defaults and builds no widget at all: widget comm messages can leave a headless kernel client
waiting (jupyter/nbclient#312).

Linked views share one control: the layer picked on a geometry profile is the layer of the token
cloud beside it (notebook 02), the knockout edge and window centre picked on the curves are the
per-sample distribution beside them (notebook 03), the (site, layer, token) cell picked on a
tracing map is the restored probability and the image overlay beside it (notebook 04). A
selection that changes a model run (another knockout window, another corruption, an edit) is
computed once, with a progress bar, and kept in the explorer's cache; every other change only
re-slices tables.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from microscope.geometry import MODALITIES
from microscope.plotting import (
    ROLE_COLORS,
    image_with_patches,
    knockout_curves,
    line_by_layer,
    metric_by_layer,
    pca_scatter,
    trace_columns,
    trace_heatmap,
)

# --------------------------------------------------------------------------------------------- controls


@dataclass
class Control:
    """A control, not yet a widget: ``kind`` is ``slider`` (integers ``lo``..``hi``), ``dropdown``
    (one of ``options``), ``multi`` (a tuple of ``options``) or ``button`` (``value`` ignored);
    ``options`` may be ``(label, value)`` pairs."""

    kind: str
    value: Any
    description: str
    options: Sequence = ()
    lo: int = 0
    hi: int = 0


def slider(value: int, lo: int, hi: int, description: str) -> Control:
    """An integer slider over ``lo..hi`` (inclusive)."""
    if not lo <= value <= hi:
        raise ValueError(f"slider {description!r}: value {value} is outside {lo}..{hi}; pass a value in the range")
    return Control("slider", int(value), description, lo=int(lo), hi=int(hi))


def dropdown(options: Sequence, value, description: str) -> Control:
    """One of ``options`` (values, or ``(label, value)`` pairs)."""
    values = [o[1] if isinstance(o, tuple) else o for o in options]
    if value not in values:
        raise ValueError(f"dropdown {description!r}: {value!r} is not one of {values}; pass one of them")
    return Control("dropdown", value, description, options=list(options))


def multi(options: Sequence, value: Sequence, description: str) -> Control:
    """Any subset of ``options``."""
    bad = [v for v in value if v not in options]
    if bad:
        raise ValueError(f"multi-select {description!r}: {bad} not among {list(options)}; pass a subset of them")
    return Control("multi", tuple(value), description, options=list(options))


def button(description: str) -> Control:
    """A button: with one, the figure is redrawn when it is pressed, not on every change (each
    draw is a model run)."""
    return Control("button", None, description)


def _widget(c: Control):
    import ipywidgets as w

    style = {"description_width": "initial"}
    if c.kind == "slider":
        return w.IntSlider(value=c.value, min=c.lo, max=c.hi, description=c.description, style=style,
                           continuous_update=False)
    if c.kind == "dropdown":
        return w.Dropdown(options=c.options, value=c.value, description=c.description, style=style)
    if c.kind == "multi":
        return w.SelectMultiple(options=c.options, value=c.value, description=c.description, style=style,
                                rows=min(6, len(c.options)))
    if c.kind == "button":
        return w.Button(description=c.description, button_style="primary")
    raise ValueError(f"unknown control kind {c.kind!r}")


# --------------------------------------------------------------------------------------------- explorer


def png(fig):
    """``fig`` as a PNG image for ``display`` (at the screen resolution ``figure.dpi``, cropped to
    its artists), whatever matplotlib backend the kernel runs."""
    import io

    from IPython.display import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=plt.rcParams["figure.dpi"], bbox_inches="tight")
    return Image(data=buf.getvalue(), format="png")


@dataclass
class Explorer:
    """Controls and a draw function ``draw(explorer, **values) -> Figure``.

    :meth:`show` displays them (``interactive``) or the figure for the defaults only; every change
    of a control redraws into one output area (with a :func:`button`, only a press does).
    :meth:`cached` computes a model run once per key, behind a progress bar."""

    draw: Callable[..., Any]
    controls: dict[str, Control]
    title: str = ""
    #: controls whose options follow the others: ``linked[name](explorer, values) -> options``
    #: (e.g. the tokens of the chosen sample); a value no longer offered becomes the last option
    linked: dict[str, Callable[..., list]] = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    computed: int = 0  # model runs done (cache misses)
    _status: Any = None
    _bar: Any = None
    _busy: bool = False

    def values(self) -> dict[str, Any]:
        """The controls' current values (their defaults before :meth:`show`)."""
        return {k: c.value for k, c in self.controls.items() if c.kind != "button"}

    def figure(self, **changes):
        """The figure for the current values updated with ``changes`` (also stored as current)."""
        for k, v in changes.items():
            if k not in self.controls:
                raise ValueError(f"no control {k!r}; the explorer has {list(self.controls)}")
            self.controls[k].value = v
        self._link()
        return self.draw(self, **self.values())

    def _link(self) -> None:
        for name, options in self.linked.items():
            c = self.controls[name]
            c.options = list(options(self, self.values()))
            values = [o[1] if isinstance(o, tuple) else o for o in c.options]
            if c.value not in values:
                c.value = values[-1]

    def cached(self, key: Hashable, compute: Callable[[], Any], label: str = "computing"):
        """``compute()`` once per ``key`` (a model run), then the kept result; while it runs a
        progress bar says ``label`` (and any tqdm bar of ``compute`` shows under it)."""
        if key in self.cache:
            return self.cache[key]
        if self._bar is not None:
            self._bar.layout.visibility = "visible"
            self._bar.description, self._bar.value = label, 0
            with self._status:
                self.cache[key] = compute()
            self._bar.value = 1
            self._bar.layout.visibility = "hidden"
            self._status.clear_output()
        else:
            self.cache[key] = compute()
        self.computed += 1
        return self.cache[key]

    def show(self, interactive: bool = True):
        """Display the explorer: its widgets and figure, or (``interactive=False``) the figure for
        the defaults, with no widget built. Returns the container widget, or the figure."""
        from IPython.display import display

        if not interactive:
            fig = self.figure()
            display(png(fig))
            plt.close(fig)
            return fig
        import ipywidgets as w

        widgets = {k: _widget(c) for k, c in self.controls.items()}
        out = w.Output()
        self._status = w.Output()
        self._bar = w.FloatProgress(value=0, min=0, max=1, bar_style="info", layout={"visibility": "hidden"})
        manual = any(c.kind == "button" for c in self.controls.values())

        def redraw(*_):
            if self._busy:  # a linked control's options being set
                return
            self._busy = True
            try:
                for k, wd in widgets.items():
                    if self.controls[k].kind != "button":
                        self.controls[k].value = tuple(wd.value) if self.controls[k].kind == "multi" else wd.value
                self._link()
                for k in self.linked:
                    if tuple(widgets[k].options) != tuple(self.controls[k].options):
                        widgets[k].options = self.controls[k].options
                    widgets[k].value = self.controls[k].value
                with out:
                    out.clear_output(wait=True)
                    fig = self.draw(self, **self.values())
                    display(png(fig))
                    plt.close(fig)
            finally:
                self._busy = False

        for k, wd in widgets.items():
            if self.controls[k].kind == "button":
                wd.on_click(redraw)
            elif not manual:
                wd.observe(redraw, names="value")
        rows = [w.HBox(list(widgets.values())[i:i + 3]) for i in range(0, len(widgets), 3)]
        head = [w.HTML(f"<b>{self.title}</b>")] if self.title else []
        box = w.VBox(head + rows + [w.HBox([self._bar]), self._status, out])
        display(box)
        redraw()
        return box


# --------------------------------------------------------------------------------------------- 00: samples


def sample_explorer(load: Callable[[int], Any], n: int, index: int = 0, min_coverage: float = 0.15) -> Explorer:
    """A Shapes-world sample (``load(i)``, ``0 <= i < n``) with the patches a referred object
    covers at least the chosen share of (in percent)."""

    def draw(ex, sample, coverage):
        s = load(sample)
        return image_with_patches(s, highlight=s.referred_patches(min_coverage=coverage / 100),
                                  highlight_label=f"patches a referred object covers ≥ {coverage}%")

    return Explorer(draw, {"sample": slider(index, 0, n - 1, "sample"),
                           "coverage": slider(round(100 * min_coverage), 5, 95, "min. coverage %")})


# --------------------------------------------------------------------------------------------- 01: norms


def token_norms(norms: pd.DataFrame, tokens: pd.DataFrame) -> pd.DataFrame:
    """``norms`` (rows ``layer, role, sample_index, value``, one block per layer, each in the
    store's token order) with each row's ``position`` from ``tokens`` (the store's token table)."""
    sizes = norms.groupby("layer", sort=False).size()
    if (sizes != len(tokens)).any():
        raise ValueError(f"norms has {sizes.to_dict()} rows per layer for {len(tokens)} tokens; pass the token "
                         "table of the store the norms were computed from")
    return norms.assign(position=np.tile(tokens.position.to_numpy(), len(sizes)))


def norm_view(norms: pd.DataFrame, roles: Sequence[str], layer: int, sample_index: int, position: int
              ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The slice of a :func:`token_norms` table for one selection: ``(by_role, token, strip)``,
    the rows of ``roles`` (every layer), the chosen token's norm per layer, and the chosen sample's
    tokens at ``layer`` (``position, role, value``, in position order)."""
    by_role = norms[norms.role.isin(list(roles))]
    one = norms[norms.sample_index == sample_index]
    token = one[one.position == position][["layer", "value"]].sort_values("layer", ignore_index=True)
    strip = one[one.layer == layer][["position", "role", "value"]].sort_values("position", ignore_index=True)
    return by_role, token, strip


def norms_explorer(norms: pd.DataFrame, tokens: pd.DataFrame, roles: Sequence[str] = ("image", "question", "last"),
                   layer: int | None = None) -> Explorer:
    """Residual-stream norm by layer for the chosen roles, with the chosen token's own curve and,
    beside it, every token of its sample at the chosen layer (the token outlined)."""
    norms = token_norms(norms, tokens)
    layers = sorted(norms.layer.unique())
    layer = layers[-1] if layer is None else layer
    first = norms[norms.sample_index == norms.sample_index.min()]
    positions = sorted(first.position.unique())
    role_at = first.drop_duplicates("position").set_index("position").role
    last = next((p for p in reversed(positions) if role_at[p] == "last"), positions[-1])

    def draw(ex, roles, layer, sample, position):
        by_role, token, strip = norm_view(norms, roles, layer, sample, position)
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1, 1.4]})
        line_by_layer(by_role, ax=a, title="norm by role", ylabel="‖h‖₂")
        if len(token):
            a.plot(token.layer, token.value, "k--", lw=1, label=f"token {position}")
            a.legend(fontsize=7)
        a.axvline(layer, color="0.4", lw=0.8, ls=":")
        colors = [ROLE_COLORS.get(r, "0.5") for r in strip.role]
        b.bar(strip.position, strip.value, color=colors, width=0.9,
              edgecolor=["k" if p == position else "none" for p in strip.position], linewidth=1.5)
        b.set_xlabel("position")
        b.set_ylabel("‖h‖₂")
        b.set_title(f"sample {sample}, layer {layer}: every token (outlined: {position})", fontsize=9)
        fig.tight_layout()
        return fig

    samples = sorted(norms.sample_index.unique())
    return Explorer(draw, {
        "roles": multi(sorted(norms.role.unique()), [r for r in roles if r in set(norms.role)], "roles"),
        "layer": slider(layer, layers[0], layers[-1], "layer"),
        "sample": dropdown([int(s) for s in samples], int(samples[0]), "sample"),
        "position": dropdown([(f"{p} · {role_at[p]}", int(p)) for p in positions], int(last), "token"),
    })


# --------------------------------------------------------------------------------------------- 02: geometry

#: the store roles of each modality of :func:`microscope.geometry.profile` (its own table: the
#: token cloud beside a profile holds the tokens that profile measured)
MODALITY_ROLES = MODALITIES


def geometry_view(df: pd.DataFrame, metric: str, modalities: Sequence[str], layer: int
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(profile, at_layer)``: the rows of ``metric`` for ``modalities`` (every layer), and those
    at ``layer`` (the point picked on the profile)."""
    if metric not in set(df.metric):
        raise ValueError(f"no metric {metric!r} in the geometry table; it has {sorted(set(df.metric))}")
    d = df[(df.metric == metric) & df.modality.isin(list(modalities))]
    return d, d[d.layer == layer].reset_index(drop=True)


def pca_view(points: pd.DataFrame, modalities: Sequence[str]) -> pd.DataFrame:
    """The rows of a PCA table (:func:`microscope.geometry.pca_points`) whose role belongs to one
    of ``modalities`` (:data:`MODALITY_ROLES`)."""
    roles = {r for m in modalities for r in MODALITY_ROLES.get(m, (m,))}
    return points[points.role.isin(roles)].reset_index(drop=True)


def geometry_explorer(df: pd.DataFrame, points: Callable[[int], pd.DataFrame], metric: str = "linearity",
                      layer: int | None = None) -> Explorer:
    """The geometry profile of a metric, the picked layer marked, beside that layer's token cloud
    (``points(layer)``: its PCA table, computed once per layer) coloured by role."""
    layers = sorted(int(x) for x in df.layer.unique())
    layer = layers[len(layers) // 2] if layer is None else layer

    def draw(ex, metric, modalities, layer):
        prof, at = geometry_view(df, metric, modalities, layer)
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
        metric_by_layer(prof, metric, ax=a, legend=True)
        a.axvline(layer, color="0.4", lw=0.8, ls=":")
        a.scatter(at.layer, at.value, s=60, facecolor="none", edgecolor="k", zorder=5)
        pts = ex.cached(("pca", layer), lambda: points(layer), f"PCA of layer {layer}")
        pca_scatter(pca_view(pts, modalities), ax=b, title=f"layer {layer}: tokens by role")
        fig.tight_layout()
        return fig

    mods = [m for m in ("image", "text") if m in set(df.modality)] or sorted(set(df.modality))
    return Explorer(draw, {"metric": dropdown(sorted(df.metric.unique()), metric, "metric"),
                           "modalities": multi(mods, mods, "modality"),
                           "layer": slider(layer, layers[0], layers[-1], "layer")})


# --------------------------------------------------------------------------------------------- 03: knockout


def knockout_view(df: pd.DataFrame, category: str, edges: Sequence[str], edge: str, layer: int
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(curves, per_sample)``: the rows of ``edges`` (of ``category``, or every category for
    ``"all"``), and one row per sample of the picked ``edge`` at window centre ``layer``
    (``sample_id, category, p_base, p_blocked, change``)."""
    d = df if category == "all" else df[df.category == category]
    curves = d[d.edge.isin(list(edges))]
    at = d[(d.edge == edge) & (d.layer == layer)]
    return curves, at[["sample_id", "category", "p_base", "p_blocked", "change"]].reset_index(drop=True)


def knockout_explorer(df: pd.DataFrame, sweep: Callable[[int], pd.DataFrame], edges: Sequence[str], window: int,
                      n_layers: int, chosen: Sequence[str] | None = None) -> Explorer:
    """Knockout curves for the chosen edges, the picked (edge, window centre) marked, beside the
    distribution over samples of that point. Another window ``k`` is a new sweep (``sweep(k)``,
    once per ``k``); ``df`` is the sweep at ``window``."""
    edges = list(edges)
    chosen = [e for e in (chosen or edges) if e in edges]
    cats = ["all"] + sorted(df.category.unique())

    def draw(ex, category, chosen, edge, layer, k):
        d = df if k == window else ex.cached(("sweep", k), lambda: sweep(k), f"sweep, window {k}")
        curves, at = knockout_view(d, category, chosen, edge, layer)
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.5, 1]})
        knockout_curves(curves, list(chosen), ax=a, title=category, legend=True)
        a.axvline(layer, color="0.4", lw=0.8, ls=":")
        if len(at):
            a.scatter([layer], [at.change.mean()], s=70, facecolor="none", edgecolor="k", zorder=5)
            lo, hi = float(at.change.min()), float(at.change.max())
            flat = hi - lo < 1e-6 * max(1.0, abs(lo))  # equal values (up to rounding): one bin around them
            b.hist(at.change, bins=min(20, max(5, len(at) // 2)), color="0.6",
                   range=(lo - 1, hi + 1) if flat else None)
            b.axvline(at.change.mean(), color="k", lw=1, label=f"mean {at.change.mean():.1f}% (n = {len(at)})")
            b.axvline(0, color="0.3", lw=0.8, ls=":")
            b.legend(fontsize=7)
        else:
            b.text(0.5, 0.5, "no samples at this point", ha="center", va="center", transform=b.transAxes)
        b.set_xlabel("change of p(answer), % (one sample each)")
        b.set_ylabel("samples")
        b.set_title(f"{edge}, window centre {layer}", fontsize=9)
        fig.tight_layout()
        return fig

    layers = sorted(int(x) for x in df.layer.unique()) or [0]
    return Explorer(draw, {
        "category": dropdown(cats, "all", "category"),
        "chosen": multi(edges, chosen, "edges"),
        "edge": dropdown(edges, chosen[0] if chosen else edges[0], "picked edge"),
        "layer": slider(layers[len(layers) // 2], 0, n_layers - 1, "window centre"),
        "k": slider(window, 1, n_layers, "window k"),
    })


# --------------------------------------------------------------------------------------------- 04: tracing


def trace_cell(df: pd.DataFrame, site: str, layer: int, position: int) -> dict[str, Any]:
    """One cell of a sample's trace table (:func:`microscope.tracing.trace`): ``token, role,
    p_clean, p_corrupted, p_restored, effect`` at (``site``, ``layer``, ``position``)."""
    r = df[(df.site == site) & (df.layer == layer) & (df.position == position)]
    if len(r) != 1:
        raise ValueError(f"the trace has {len(r)} rows at site {site!r}, layer {layer}, position {position}; pick "
                         f"a site of {sorted(set(df.site))}, a layer and a position of the sample")
    r = r.iloc[0]
    return {k: (r[k] if k in ("token", "role") else float(r[k]))
            for k in ("token", "role", "p_clean", "p_corrupted", "p_restored", "effect")}


def patch_effects(df: pd.DataFrame, site: str, layer: int, grid: int) -> np.ndarray | None:
    """The indirect effects of restoring each image token at (``site``, ``layer``) on the image's
    ``grid × grid`` patch grid (image tokens in position order are patches in raster order, one
    token per patch); ``None`` when the sample's image tokens are not one per patch."""
    d = df[(df.site == site) & (df.layer == layer) & (df.role == "image")].sort_values("position")
    if len(d) != grid * grid:
        return None
    return d.effect.to_numpy(dtype=float).reshape(grid, grid)


def heatmap_cell(df: pd.DataFrame, site: str, layer: int, position: int,
                 collapse_image: bool = True) -> tuple[int, int]:
    """``(column, row)`` of (``layer``, ``position``) on :func:`microscope.plotting.trace_heatmap`'s
    map of ``site`` (a collapsed image token is in its run's one column)."""
    d = df[df.site == site]
    keep, zero = trace_columns(d, collapse_image)
    col = keep.index(zero[0] if position in zero else position)
    return col, sorted(d.layer.unique()).index(layer)


def trace_explorer(traces: dict, trace: Callable[[str, str], pd.DataFrame], load: Callable[[str], Any],
                   sample_ids: Sequence[str], sample_id: str, corruption: str = "noise",
                   corruptions: Sequence[str] = ("noise", "replace")) -> Explorer:
    """A sample's tracing map for one site, the picked (layer, token) cell marked, beside the
    sample's image with the effects of restoring each image token at that site and layer laid over
    its patches, and the picked cell's restored probability. ``traces[(corruption, sample_id)]``
    holds the traces already run; another is ``trace(sample_id, corruption)`` (a model run, once)."""
    ex_traces = dict(traces)

    def get(ex, sid, cor):
        if (cor, sid) in ex_traces:
            return ex_traces[(cor, sid)]
        return ex.cached((cor, sid), lambda: trace(sid, cor), f"tracing {sid} ({cor})")

    if not ex_traces:
        raise ValueError("no trace to explore; pass at least one traced sample in traces")
    base = ex_traces.get((corruption, sample_id), next(iter(ex_traces.values())))
    sites = sorted(base.site.unique(), key=["resid", "mlp", "attn"].index)
    L = int(base.layer.max()) + 1

    def tokens(ex, values):  # the token menu of the chosen sample
        d = base if ex is None else get(ex, values["sample"], values["corruption"])
        pos = d.drop_duplicates("position").sort_values("position")
        return [(f"{int(r.position)} · {r.token} ({r.role})", int(r.position)) for r in pos.itertuples()]

    menu = tokens(None, {})

    def draw(ex, sample, corruption, site, layer, position):
        d = get(ex, sample, corruption)
        layer = max(layer, int(d[d.site == site].layer.min()))  # mlp/attn start at layer 0
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.8, 1]})
        trace_heatmap(d, site, ax=a)
        if position in set(d.position):
            col, row = heatmap_cell(d, site, layer, position)
            a.add_patch(plt.Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, ec="k", lw=2))
            cell = trace_cell(d, site, layer, position)
            s = load(sample)
            drawable = all(hasattr(s, a) for a in ("grid", "patch_size", "objects", "image_size"))  # Shapes world
            if drawable:
                image_with_patches(s, ax=b, legend=False)
            else:  # no patch grid to draw on (e.g. a GQA image): the numbers only
                b.axis("off")
            eff = patch_effects(d, site, layer, s.grid) if drawable else None
            if eff is not None:
                p, g = s.patch_size, s.grid
                v = max(1e-6, float(np.abs(eff).max()))
                b.imshow(eff, extent=(0, g * p, g * p, 0), cmap="RdBu_r", vmin=-v, vmax=v, alpha=0.55)
            b.set_title(f"{getattr(s, 'question', sample)}\nrestore {site} at layer {layer}, token {cell['token']!r}:\n"
                        f"p {cell['p_corrupted']:.3f} → {cell['p_restored']:.3f} (clean {cell['p_clean']:.3f})"
                        + ("" if eff is None else "\noverlay: effect of each image token here"), fontsize=8)
        else:
            b.text(0.5, 0.5, f"position {position} is not a token of this sample", ha="center", transform=b.transAxes)
        fig.tight_layout()
        return fig

    return Explorer(draw, {
        "sample": dropdown(list(sample_ids), sample_id, "sample"),
        "corruption": dropdown(list(corruptions), corruption, "corruption"),
        "site": dropdown(sites, sites[0], "site"),
        "layer": slider(0, -1, L - 1, "layer"),
        "position": dropdown(menu, menu[-1][1], "token"),
    }, linked={"position": tokens})


# --------------------------------------------------------------------------------------------- 05: editing


def edit_explorer(run: Callable[[str, str, int], Mapping[str, float]], methods: Sequence[str],
                  sites: Sequence[str], method: str, site: str, layer: int, n_layers: int,
                  plot: Callable[[pd.DataFrame], Any]) -> Explorer:
    """An edit per (method, site, layer) — ``run(method, site, layer)`` returns its scores (a model
    run, once per selection, on a button press) — drawn by ``plot`` beside every edit run so far."""

    def draw(ex, method, site, layer):
        ex.cached((method, site, layer), lambda: dict(run(method, site, layer)), f"editing {method} · {site} · {layer}")
        rows = [{"method": f"{m} · {s} · layer {lay}", **v} for (m, s, lay), v in ex.cache.items()]
        return plot(pd.DataFrame(rows))

    return Explorer(draw, {"method": dropdown(list(methods), method, "method"),
                           "site": dropdown(list(sites), site, "site"),
                           "layer": slider(layer, 0, n_layers - 1, "layer"),
                           "run": button("edit")})
