"""The paper's figures, by name, as pure functions of tables -> (Plotly figure, how to read it).

* ``map`` (Figs. 3/14): the unified embedding at three or more epochs side by side on
  shared axes; interpretable neurons solid and coloured by layer or by category (a
  toggle), the rest faint (or hidden by a toggle); anchors as labelled stars; the
  trajectories of a few interpretable, confident neurons that move the most or approach
  an anchor the most, plus any neuron the user names.
* ``categories`` (Figs. 4/14): stacked bars of interpretable neurons per category and layer.
* ``retention`` (Fig. 5b): retention curves, overall and among confident labels.
* ``compare`` (Figs. 6/16): categories per layer of two runs side by side.

:data:`FIGURES` names them; ``conceptmon plot --figure NAME`` writes each as interactive
HTML and, through kaleido (which drives a local Chrome/Chromium, offline), as PNG/SVG.

Every figure follows the same rules, checked by the tests on the figure JSON: every
trace has a name that appears in the legend (directly or through its legend group),
every axis has a title, counts have integer ticks, legends are horizontal below the
plot (they wrap instead of scrolling), and a one-line "how to read this" comes with it.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import stats
from .errors import ConceptmonError

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
CATEGORY_COLORS = {"color": "#d62728", "texture": "#9467bd", "material": "#8c564b", "object": "#1f77b4",
                   "part": "#2ca02c", "scene": "#ff7f0e", "other": "#7f7f7f"}
FAINT_COLOR = "#c8c8c8"
ANCHOR_COLOR = "#111111"
MAP_PANELS = 4
"""At most this many epochs side by side on the map (first, last, evenly spaced between)."""
CATEGORY_PANELS = 4
RETENTION_CURVES = 6
N_MOVING, N_APPROACHING = 3, 2
"""Trajectories drawn automatically: the neurons that move the most, then those approaching an anchor most."""
MIN_MOVE = 0.02
"""A trajectory drawn for moving must cover at least this share of the map's diagonal."""
STATIC_FORMATS = ("png", "svg")
FORMATS = ("html", *STATIC_FORMATS)
LEGEND_BELOW = dict(orientation="h", x=0, xanchor="left", y=-0.12, yanchor="top")


class FigureError(ConceptmonError):
    """A figure asked for with options the results cannot satisfy."""


@dataclass
class Chart:
    """A figure and the one line under it that says how to read it."""

    figure: go.Figure
    how_to_read: str


def esc(value) -> str:
    return html.escape(str(value), quote=True)


# ----------------------------------------------------------------------------- axis and legend rules


def count_axis(title: str, max_count: float) -> dict:
    """A y axis for counts: integer ticks (dtick 1 for small counts, never 0.2 steps), from 0."""
    axis = dict(title=dict(text=title), tickformat="d", rangemode="tozero")
    if not np.isfinite(max_count) or max_count <= 10:
        axis["dtick"] = 1
    return axis


def share_axis(title: str) -> dict:
    return dict(title=dict(text=title), tickformat=".0%", range=[0, 1.02])


def epoch_axis(epochs: list[int], title: str = "epoch") -> dict:
    """Epochs are integers: ticks on them (all of them when few)."""
    axis = dict(title=dict(text=title), tickformat="d")
    if len(epochs) <= 12:
        axis.update(tickmode="array", tickvals=list(epochs))
    return axis


def layer_colors(layers) -> dict[str, str]:
    return {layer: PALETTE[i % len(PALETTE)] for i, layer in enumerate(layers)}


def category_colors(categories) -> dict[str, str]:
    return {c: CATEGORY_COLORS.get(c, PALETTE[i % len(PALETTE)]) for i, c in enumerate(categories)}


def grid(n: int, columns: int = 3) -> tuple[int, int]:
    cols = max(1, min(n, columns))
    return -(-n // cols), cols


def pick_epochs(available: list[int], wanted: list[int] | None, limit: int, what: str) -> list[int]:
    """``wanted`` when given (checked), else at most ``limit`` evenly spaced epochs incl. first and last."""
    if wanted:
        missing = sorted(set(wanted) - set(available))
        if missing:
            raise FigureError(f"--epochs: {what} has no epochs {missing}; available: {stats.format_epochs(available)}")
        return sorted(set(wanted))
    return stats.spread_epochs(available, limit)


# ----------------------------------------------------------------------------- map


def choose_trajectories(
    neurons: pd.DataFrame, first: pd.DataFrame, epochs: list[int], *, distances: pd.DataFrame | None = None,
    given: list[tuple[str, int]] | None = None, n_moving: int = N_MOVING, n_approaching: int = N_APPROACHING,
) -> list[tuple[str, int, str]]:
    """Neurons to draw with their trajectory: (layer, neuron, why).

    Automatic picks are *eligible* neurons only: on the map at every one of ``epochs`` and,
    at the last one, interpretable and (when the run has label confidences) confident --
    never a noise neuron, but a neuron may become interpretable during training, which is
    what the map is for. Among them: the ``n_moving`` with the longest path on the map,
    counting only steps that end at a confident label and start at a confident label or
    at no interpretable label yet (a move to or from an uncertain label may be noise; a
    move from "nothing yet" to a confident concept is the neuron learning), then the
    ``n_approaching`` whose distance to some anchor shrinks the most from the first to
    the last epoch.
    ``given`` neurons (the user's ``--neurons``) are always added first.
    """
    picks = [(str(l), int(n), "chosen") for l, n in (given or [])]
    taken = {(l, n) for l, n, _ in picks}
    keys = ["epoch", "layer", "neuron"]
    shown = neurons[neurons["epoch"].isin(epochs)].merge(first[[*keys, "interpretable", "state"]],
                                                        on=keys, how="left", suffixes=("_map", ""))
    known = bool((first["state"] != stats.UNKNOWN).any())
    shown["interpretable"] = shown["interpretable"].fillna(False).astype(bool)
    shown["confident"] = (shown["state"] == stats.CONFIDENT) if known else True
    shown = shown.sort_values(["layer", "neuron", "epoch"], kind="stable")
    per_neuron = shown.groupby(["layer", "neuron"], sort=True).agg(
        n=("epoch", "nunique"), interpretable_last=("interpretable", "last"), confident_last=("confident", "last"))
    eligible = per_neuron[(per_neuron["n"] == len(epochs)) & per_neuron["interpretable_last"].astype(bool)
                          & per_neuron["confident_last"].astype(bool)].index
    if not len(eligible) or len(epochs) < 2:
        return picks
    path = shown.set_index(["layer", "neuron"]).loc[eligible].reset_index()
    grouped = path.groupby(["layer", "neuron"], sort=False)
    step = np.hypot(grouped["x"].diff(), grouped["y"].diff()).fillna(0.0)
    # a step counts when it ends at a confident label and starts at one, or at no interpretable label yet
    before_ok = (grouped["confident"].shift(1).fillna(False).astype(bool)
                 | ~grouped["interpretable"].shift(1).fillna(True).astype(bool))
    confident_step = path["confident"].astype(bool) & before_ok
    moved = path.assign(step=step.where(confident_step, 0.0)).groupby(["layer", "neuron"], sort=True)["step"].sum()
    extent = float(np.hypot(np.ptp(shown["x"].to_numpy(float)), np.ptp(shown["y"].to_numpy(float))))
    moved = moved[moved > MIN_MOVE * extent].sort_values(ascending=False, kind="stable")  # not a jitter
    for (layer, neuron), _ in moved.items():
        if sum(why == "moves most" for *_, why in picks) >= n_moving:
            break
        if (layer, neuron) not in taken:
            picks.append((str(layer), int(neuron), "moves most"))
            taken.add((layer, neuron))
    if distances is not None and len(distances):
        ends = distances[distances["epoch"].isin([epochs[0], epochs[-1]])]
        wide = ends.pivot_table(index=["layer", "neuron", "anchor"], columns="epoch", values="distance")
        if epochs[0] in wide.columns and epochs[-1] in wide.columns:
            gain = (wide[epochs[0]] - wide[epochs[-1]]).groupby(["layer", "neuron"]).max()
            gain = gain[gain.index.isin(eligible) & (gain > 0)].sort_values(ascending=False, kind="stable")
            added = 0
            for (layer, neuron), _ in gain.items():
                if added >= n_approaching:
                    break
                if (layer, neuron) not in taken:
                    picks.append((str(layer), int(neuron), "approaches an anchor"))
                    taken.add((layer, neuron))
                    added += 1
    return picks


def map_extent(*frames: pd.DataFrame) -> float:
    """The larger side of the box holding every point of ``frames`` (x, y columns)."""
    xs = np.concatenate([f["x"].to_numpy(float) for f in frames if len(f)] or [np.zeros(1)])
    ys = np.concatenate([f["y"].to_numpy(float) for f in frames if len(f)] or [np.zeros(1)])
    return max(float(np.ptp(xs)), float(np.ptp(ys)), 1e-9)


def label_positions(points: pd.DataFrame, extent: float | None = None, near: float = 0.08) -> list[str]:
    """A text position per point so that labels of nearby points do not collide: above by
    default; a point whose neighbour (within ``near`` of the map's ``extent``) already
    took a position takes the next one (below, right, left)."""
    xy = points[["x", "y"]].to_numpy(float)
    if len(xy) < 2:
        return ["top center"] * len(xy)
    extent = extent or max(float(np.ptp(xy[:, 0])), float(np.ptp(xy[:, 1])), 1e-9)
    order = np.lexsort((xy[:, 0], -xy[:, 1]))  # top to bottom, then left to right
    spots = ("top center", "bottom center", "middle right", "middle left")
    chosen: dict[int, str] = {}
    placed: list[tuple[np.ndarray, str]] = []
    for i in order:
        taken = {spot for point, spot in placed if np.abs(point - xy[i]).max() < near * extent}
        chosen[i] = next((spot for spot in spots if spot not in taken), spots[0])
        placed.append((xy[i], chosen[i]))
    return [chosen[i] for i in range(len(xy))]


def neuron_hover(frame: pd.DataFrame) -> np.ndarray:
    """'layer4 · neuron 7 · epoch 5<br>red (color) 0.123, confidence 0.95' per row."""
    conf = frame["confidence"].map(lambda v: "" if pd.isna(v) else f", confidence {v:.2f}")
    flag = np.where(frame["interpretable"].fillna(False).astype(bool), "", " (not interpretable)")
    text = (frame["layer"].map(esc) + " · neuron " + frame["neuron"].astype(str) + " · epoch "
            + frame["epoch"].astype(str) + flag + "<br>" + frame["concept"].map(esc) + " ("
            + frame["category"].map(esc) + ") " + frame["score"].map(lambda v: f"{v:.3f}") + conf)
    return text.to_numpy(dtype=object)


def map_figure(
    neurons: pd.DataFrame, first: pd.DataFrame, anchors: pd.DataFrame | None, epochs: list[int], *,
    trajectories: list[tuple[str, int, str]] = (), anchor_source: str | None = None, method: str = "umap",
    title: str = "Neurons in the unified embedding",
) -> Chart:
    """Fig. 3/14: one panel per epoch of ``epochs`` on shared axes (see the module docstring).

    ``neurons``: EMBED_NEURONS rows (x, y); ``first``: :func:`stats.top1` of the run
    (category, interpretable flag and confidence per neuron); ``anchors``: concept, x, y.
    """
    keys = ["epoch", "layer", "neuron"]
    df = neurons[neurons["epoch"].isin(epochs)][[*keys, "x", "y"]].merge(
        first[[*keys, "concept", "category", "score", "interpretable", "confidence", "state"]], on=keys, how="left")
    df["interpretable"] = df["interpretable"].fillna(False).astype(bool)
    df["hover"] = neuron_hover(df)
    layers = list(dict.fromkeys(first["layer"]))
    layers = [l for l in layers if l in set(df["layer"])]
    categories = sorted(c for c in pd.unique(df.loc[df["interpretable"], "category"]) if isinstance(c, str))
    colors_l, colors_c = layer_colors(layers), category_colors(categories)
    n = len(epochs)
    fig = make_subplots(rows=1, cols=n, subplot_titles=[f"epoch {e}" for e in epochs], shared_yaxes=True,
                        horizontal_spacing=0.015)
    faint_idx, layer_idx, category_idx = [], [], []
    anchors = anchors if anchors is not None else pd.DataFrame(columns=["concept", "x", "y"])
    automatic = anchor_source == "automatic"
    anchor_name = "anchors (automatic: most frequent concepts)" if automatic else "anchors"
    paths = {(l, i): df[(df["layer"] == l) & (df["neuron"] == i)].sort_values("epoch") for l, i, _ in trajectories}
    traj_colors = {key: PALETTE[(k + 3) % len(PALETTE)] for k, key in enumerate(paths)}

    in_legend: set[str] = set()

    def add(trace, col, bucket=None):
        # Plotly leaves empty traces out of the legend: a group's entry goes on its first non-empty panel.
        group = trace.legendgroup
        trace.showlegend = bool(len(trace.x)) and group not in in_legend
        if trace.showlegend:
            in_legend.add(group)
        fig.add_trace(trace, row=1, col=col)
        if bucket is not None:
            bucket.append(len(fig.data) - 1)

    for j, epoch in enumerate(epochs):
        col, first_panel = j + 1, j == 0
        at = df[df["epoch"] == epoch]
        faint = at[~at["interpretable"]]
        add(go.Scatter(x=faint["x"], y=faint["y"], mode="markers", name="not interpretable",
                         legendgroup="faint", showlegend=first_panel, legendrank=1,
                         marker=dict(color=FAINT_COLOR, size=4, opacity=0.45), text=faint["hover"],
                         hovertemplate="%{text}<extra></extra>"), col, faint_idx)
        solid = at[at["interpretable"]]
        for layer in layers:
            part = solid[solid["layer"] == layer]
            add(go.Scatter(x=part["x"], y=part["y"], mode="markers", name=layer, legendgroup=f"layer:{layer}",
                             showlegend=first_panel, legendrank=10 + layers.index(layer), marker=dict(color=colors_l[layer], size=6, opacity=0.85),
                             text=part["hover"], hovertemplate="%{text}<extra></extra>"), col, layer_idx)
        for category in categories:
            part = solid[solid["category"] == category]
            add(go.Scatter(x=part["x"], y=part["y"], mode="markers", name=category, legendgroup=f"cat:{category}",
                             showlegend=first_panel, visible=False, legendrank=100 + categories.index(category),
                             marker=dict(color=colors_c[category], size=6, opacity=0.85),
                             text=part["hover"], hovertemplate="%{text}<extra></extra>"), col, category_idx)
        if len(anchors):
            add(go.Scatter(x=anchors["x"], y=anchors["y"], mode="markers+text", name=anchor_name,
                           legendgroup="anchors", showlegend=first_panel, legendrank=500,
                           text=[esc(a) for a in anchors["concept"]],
                           textposition=label_positions(anchors, map_extent(neurons, anchors)),
                           textfont=dict(size=12, color=ANCHOR_COLOR), cliponaxis=False,
                           marker=dict(symbol="star", size=16, color="#ffd400", line=dict(color=ANCHOR_COLOR, width=1)),
                           hovertemplate="anchor %{text}<extra></extra>"), col)
        for (layer, neuron), path in paths.items():
            upto = path[path["epoch"] <= epoch]
            if upto.empty:
                continue
            color = traj_colors[(layer, neuron)]
            sizes = [7] * (len(upto) - 1) + [13]  # the neuron's place at this panel's epoch stands out
            add(go.Scatter(x=upto["x"], y=upto["y"], mode="lines+markers", name=f"{layer}:{neuron}",
                           legendgroup=f"traj:{layer}:{neuron}", showlegend=first_panel, legendrank=600,
                           line=dict(color=color, width=2), marker=dict(color=color, size=sizes,
                                                                        line=dict(color="black", width=1)),
                           text=upto["hover"], hovertemplate="%{text}<extra></extra>"), col)
    all_x = np.concatenate([df["x"].to_numpy(float), anchors["x"].to_numpy(float)])
    all_y = np.concatenate([df["y"].to_numpy(float), anchors["y"].to_numpy(float)])
    label = method.upper() if method in ("umap", "pca") else "map"
    fig.update_xaxes(range=_axis_range(all_x), title_text=f"{label} 1", showticklabels=False, zeroline=False)
    for j in range(1, n):
        fig.update_xaxes(matches="x", row=1, col=j + 1)
    fig.update_yaxes(range=_axis_range(all_y, pad=0.1), title_text=f"{label} 2", showticklabels=False,
                     zeroline=False, row=1, col=1)
    share_y(fig, n)
    restyle = layer_idx + category_idx
    buttons_colour = [
        dict(label="colour: layer", method="restyle",
             args=[{"visible": [True] * len(layer_idx) + [False] * len(category_idx)}, restyle]),
        dict(label="colour: category", method="restyle",
             args=[{"visible": [False] * len(layer_idx) + [True] * len(category_idx)}, restyle]),
    ]
    buttons_faint = [
        dict(label="non-interpretable: faint", method="restyle", args=[{"visible": True}, faint_idx]),
        dict(label="non-interpretable: hidden", method="restyle", args=[{"visible": False}, faint_idx]),
    ]
    fig.update_layout(
        title=dict(text=title), template="plotly_white", hovermode="closest", height=520,
        legend=dict(LEGEND_BELOW, y=-0.08), margin=dict(t=130, b=40, l=50, r=20),
        updatemenus=[
            dict(type="buttons", direction="left", buttons=buttons_colour, x=0, xanchor="left", y=1.07,
                 yanchor="bottom", showactive=True, active=0, pad=dict(r=6)),
            dict(type="buttons", direction="left", buttons=buttons_faint, x=1, xanchor="right", y=1.07,
                 yanchor="bottom", showactive=True, active=0),
        ],
    )
    reasons = {why for *_, why in trajectories}
    known = (first["state"] != stats.UNKNOWN).any()
    chosen_rule = ("interpretable and confident at the last epoch shown; moves between confident labels, or "
                   "from no interpretable label to a confident one"
                   if known else "interpretable at the last epoch shown (label confidence unknown)")
    how = (f"Each panel is one epoch on the same 2-D map ({label}); solid dots are interpretable neurons (colour by "
           "layer or category with the buttons), grey ones are not; stars are anchors"
           + (" (chosen automatically: the most frequent concepts)" if automatic else "")
           + ". Lines follow a neuron up to each panel's epoch, ending in a large dot"
           + (f"; drawn: {', '.join(sorted(reasons))} among neurons {chosen_rule}" if trajectories else "")
           + ". Hover a dot for its concept, score and confidence.")
    return Chart(fig, how)


def _axis_range(values: np.ndarray, pad: float = 0.06) -> list[float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return [-1.0, 1.0]
    lo, hi = float(values.min()), float(values.max())
    margin = pad * (hi - lo) if hi > lo else 1.0
    return [lo - margin, hi + margin]


def share_y(fig: go.Figure, n_panels: int, columns: int | None = None) -> None:
    """Panels after the first in each row share the first one's y axis (and its title)."""
    columns = columns or n_panels
    for k in range(n_panels):
        if k % columns:
            name = "yaxis" if k == 0 else f"yaxis{k + 1}"
            fig.layout[name].update(matches="y" if k < columns else f"y{k - k % columns + 1}", title_text=None)


# ----------------------------------------------------------------------------- categories


def categories_figure(categories: pd.DataFrame, epochs: list[int], layers: list[str] | None = None) -> Chart:
    """Figs. 4/14: per shown epoch, interpretable neurons per layer stacked by category."""
    layers = layers or list(dict.fromkeys(categories["layer"]))
    at = categories[categories["epoch"].isin(epochs) & categories["layer"].isin(layers)]
    present = at.groupby("category")["n_interpretable"].sum()
    order = [c for c in dict.fromkeys(at["category"]) if present.get(c, 0) > 0]
    colors = category_colors(order)
    fig = make_subplots(rows=1, cols=len(epochs), subplot_titles=[f"epoch {e}" for e in epochs], shared_yaxes=True,
                        horizontal_spacing=0.03)
    for j, epoch in enumerate(epochs):
        part = at[at["epoch"] == epoch]
        for category in order:
            rows = part[part["category"] == category].set_index("layer").reindex(layers)
            fig.add_trace(go.Bar(
                x=layers, y=rows["n_interpretable"].fillna(0), name=category, legendgroup=category,
                showlegend=j == 0, marker_color=colors[category], customdata=rows["share_of_neurons"].fillna(0),
                hovertemplate="%{x}: %{y} neurons (%{customdata:.1%} of the layer)<extra>" + esc(category)
                              + f" · epoch {epoch}</extra>",
            ), row=1, col=j + 1)
    totals = at.groupby(["epoch", "layer"])["n_interpretable"].sum()
    fig.update_layout(barmode="stack", title=dict(text="Interpretable neurons per category and layer"),
                      template="plotly_white", legend=LEGEND_BELOW, height=460, margin=dict(t=80, b=40))
    fig.update_xaxes(title_text="layer", type="category")
    fig.update_yaxes(**count_axis("interpretable neurons", float(totals.max()) if len(totals) else 0), row=1, col=1)
    share_y(fig, len(epochs))
    how = ("Each bar is a layer; its height counts the interpretable neurons, split by the category of their "
           "top-1 concept (hover for the share of the layer). Non-interpretable and dead units are not counted.")
    return Chart(fig, how)


# ----------------------------------------------------------------------------- retention


def retention_figure(retained: pd.DataFrame, epochs: list[int], *, confidence_known: bool) -> Chart:
    """Fig. 5b: share of the reference's top-x % neurons keeping their concept at later epochs."""
    layers = [l for l in dict.fromkeys(retained["layer"]) if l != stats.ALL_LAYERS] + [stats.ALL_LAYERS]
    rows, cols = grid(len(layers), 4)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=layers, shared_yaxes=True,
                        vertical_spacing=0.16 if rows > 1 else 0.1)
    shades = {e: f"hsl({int(220 - 200 * k / max(len(epochs) - 1, 1))},70%,45%)" for k, e in enumerate(epochs)}
    reference = int(retained["reference_epoch"].iloc[0])
    for i, layer in enumerate(layers):
        at = retained[(retained["layer"] == layer) & retained["epoch"].isin(epochs)]
        for epoch, group in at.groupby("epoch", sort=True):
            place = dict(row=i // cols + 1, col=i % cols + 1)
            fig.add_trace(go.Scatter(
                x=group["percent"], y=group["share_kept"], mode="lines", name=f"epoch {epoch}",
                legendgroup=f"e{epoch}", showlegend=i == 0, line=dict(color=shades[int(epoch)]),
                hovertemplate="top %{x}%: %{y:.1%} kept<extra>" + esc(f"{layer} · epoch {epoch}") + "</extra>",
            ), **place)
            if confidence_known:
                fig.add_trace(go.Scatter(
                    x=group["percent"], y=group["share_confident_kept"], mode="lines",
                    name=f"epoch {epoch}, confident labels", legendgroup=f"c{epoch}", showlegend=i == 0,
                    line=dict(color=shades[int(epoch)], dash="dash"),
                    hovertemplate="top %{x}%: %{y:.1%} of the confident kept<extra>"
                                  + esc(f"{layer} · epoch {epoch}") + "</extra>",
                ), **place)
    fig.update_yaxes(**share_axis("share keeping their concept"))
    share_y(fig, len(layers), cols)
    fig.update_xaxes(title_text="top x % by score", ticksuffix="%", range=[0, 101])
    fig.update_layout(title=dict(text=f"Retention of concepts from epoch {reference} (neurons ranked by their "
                                      f"score at epoch {reference})"), template="plotly_white",
                      legend=dict(LEGEND_BELOW, y=-0.18 / rows), height=380 * rows + 60, margin=dict(t=80, b=40))
    how = (f"Take a layer's top x % neurons by score at epoch {reference}: each line is the share of them whose "
           "top-1 concept is the same at a later epoch (higher = more stable)"
           + ("; dashed: only neurons whose reference label is confident." if confidence_known
              else f"; label confidence is unknown ({stats.NO_CONFIDENCE}), so no confident-only curve."))
    return Chart(fig, how)


# ----------------------------------------------------------------------------- compare


def compare_figure(result, epoch: int | None = None) -> Chart:
    """Figs. 6/16: interpretable neurons per category, two runs side by side, one panel per layer.

    Counts when the layers have the same width in both runs, else shares of the layer's neurons.
    """
    la, lb = result.labels
    cats = result["categories"].dropna(subset=[f"n_interpretable_{la}", f"n_interpretable_{lb}"])
    if cats.empty:
        raise FigureError("compare: the runs share no (layer, epoch) to compare")
    common = sorted(int(e) for e in pd.unique(cats["epoch"]))
    if epoch is None:
        epoch = common[-1]
    elif epoch not in common:
        raise FigureError(f"--epochs: the runs share epochs {stats.format_epochs(common)}, not {epoch}")
    at = cats[cats["epoch"] == epoch]
    layers = list(dict.fromkeys(at["layer"]))
    use_shares = bool(result.widths_differ)
    value = "share_of_neurons" if use_shares else "n_interpretable"
    shown = at.groupby("category")[[f"n_interpretable_{la}", f"n_interpretable_{lb}"]].sum().sum(axis=1)
    order = [c for c in dict.fromkeys(at["category"]) if shown.get(c, 0) > 0]
    rows, cols = grid(len(layers), 3)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=layers, vertical_spacing=0.18 if rows > 1 else 0.1)
    for i, layer in enumerate(layers):
        part = at[at["layer"] == layer].set_index("category").reindex(order)
        for label, color in ((la, "#1f77b4"), (lb, "#d62728")):
            fig.add_trace(go.Bar(
                x=order, y=part[f"{value}_{label}"], name=label, legendgroup=label, showlegend=i == 0,
                marker_color=color,
                hovertemplate="%{x}: %{y" + (":.1%" if use_shares else "") + "}<extra>" + esc(f"{layer} · {label}")
                              + "</extra>",
            ), row=i // cols + 1, col=i % cols + 1)
    if use_shares:
        fig.update_yaxes(title_text="share of the layer's neurons", tickformat=".0%", rangemode="tozero")
    else:
        top = float(np.nanmax(at[[f"n_interpretable_{la}", f"n_interpretable_{lb}"]].to_numpy(float)))
        fig.update_yaxes(**count_axis("interpretable neurons", top))
    fig.update_xaxes(title_text="category", type="category")
    fig.update_layout(barmode="group", title=dict(text=f"Interpretable neurons per category at epoch {epoch}: "
                                                       f"{esc(la)} vs {esc(lb)}"),
                      template="plotly_white", legend=dict(LEGEND_BELOW, y=-0.2 / rows), height=380 * rows + 60,
                      margin=dict(t=80, b=40))
    how = (f"Per layer, interpretable neurons by category in {la} (blue) and {lb} (red) at epoch {epoch}"
           + ("; layer widths differ between the runs, so bars are shares of each layer's neurons, not counts."
              if use_shares else "."))
    return Chart(fig, how)


# ----------------------------------------------------------------------------- export


def write_static(figures: dict[Path, go.Figure], log: Callable[[str], None]) -> list[Path]:
    """Write PNG/SVG files (format from each path's suffix) with kaleido; [] with one notice when impossible.

    kaleido 1.x drives a local Chrome/Chromium (found on PATH, or ``BROWSER_PATH``); it
    needs no network. Each file is written beside its target and renamed into place.
    """
    if not figures:
        return []
    try:
        import kaleido  # noqa: F401
        import plotly.io as pio
    except ImportError:
        log("notice: static export (png/svg) needs kaleido: pip install 'conceptmon[plot-export]'; wrote HTML only")
        return []
    from . import store

    written = []
    try:
        figs = list(figures.values())
        sizes = [(int(f.layout.width or 1400), int(f.layout.height or 500)) for f in figs]
        with _atomic_many(list(figures)) as temporary:
            pio.write_images(figs, [str(t) for t in temporary], width=[w for w, _ in sizes], height=[h for _, h in sizes])
        written = list(figures)
    except (store.StoreError, OSError) as e:
        log(f"notice: static export failed ({e}); wrote HTML only")
    except Exception as e:  # kaleido/choreographer raise their own types (no Chrome found, browser crashed)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        log(f"notice: static export unavailable ({type(e).__name__}: {first}); wrote HTML only. kaleido needs a "
            f"Chrome or Chromium: install one, or set BROWSER_PATH to it")
    return written


class _atomic_many:
    """Temporary paths beside several targets, renamed over them only if the block succeeds."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self.temporary = [p.parent / f".tmp-{p.stem}-{id(self):x}{p.suffix}" for p in self.paths]

    def __enter__(self):
        for p in self.paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        return self.temporary

    def __exit__(self, kind, value, tb):
        import os

        try:
            if kind is None:
                for tmp, path in zip(self.temporary, self.paths):
                    os.replace(tmp, path)
        finally:
            for tmp in self.temporary:
                if tmp.exists():
                    tmp.unlink()
        return False


FIGURES = ("map", "categories", "retention", "compare")


__all__ = [
    "Chart", "FIGURES", "FORMATS", "FigureError", "categories_figure", "choose_trajectories", "compare_figure",
    "count_axis", "map_figure", "retention_figure", "write_static",
]
