"""Interactive Plotly maps of the unified embedding, and per-neuron cards.

``plot_run`` writes under ``OUT/plots/``:

* ``map_<layer>.html`` -- every neuron of the layer on the fixed 2-D map, one animation
  frame per epoch (slider + play), grey neurons (darker = interpretable), red anchor
  stars with labels, hover text with layer, neuron and top concepts with scores; chosen
  neurons coloured, their trajectory across epochs drawn as a line.
* ``neurons.html`` -- for chosen neurons, a card per epoch with the top concepts,
  anchor distances and the top-activating probe images as embedded thumbnails (the
  paper's Figs. 2 and 13).

plotly.js (4.6 MB) is written once as ``OUT/plots/plotly.min.js`` and referenced by the
maps, so they open offline while a folder of per-layer 30-epoch maps stays small; copy
the folder, not a single file (``conceptmon report`` makes one self-contained file).
"""
from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from . import store
from .embedding import (
    EmbedError, embed_like_before, read_anchor_distances, read_anchors, read_embed_meta, read_neurons, top_k_arrays,
)

NEURON_COLOR = "#6b6b6b"
DIM_NEURON_COLOR = "#c8c8c8"
ANCHOR_COLOR = "#d62728"
HIGHLIGHT_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
THUMBNAIL_PX = 96
CARD_IMAGES = 5


class PlotError(EmbedError):
    """Plot options (layers, neurons, epochs) that do not match the results."""


# ----------------------------------------------------------------------------- option parsing


def parse_neuron_refs(text: str | Iterable[str] | None) -> list[tuple[str, int]] | None:
    """``"layer4:479,layer4:256"`` -> [("layer4", 479), ("layer4", 256)]."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    refs = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2:
            item = f"{item[0]}:{item[1]}"
        item = str(item).strip()
        if not item:
            continue
        layer, sep, index = item.rpartition(":")
        if not sep or not layer or not index.strip().isdigit():
            raise PlotError(f"--neurons: expected LAYER:INDEX[,LAYER:INDEX...] (e.g. layer4:479), got {item!r}")
        refs.append((layer.strip(), int(index)))
    return list(dict.fromkeys(refs))


def check_selection(
    neurons_df: pd.DataFrame, *, layers: list[str] | None, epochs: list[int] | None,
    refs: list[tuple[str, int]] | None,
) -> tuple[list[str], list[int]]:
    """Validate --layers/--epochs/--neurons against a table with epoch, layer, neuron columns
    (dissection or embedding); returns the chosen (layers, epochs)."""
    all_layers = list(pd.unique(neurons_df["layer"]))
    all_epochs = sorted(int(e) for e in pd.unique(neurons_df["epoch"]))
    for layer in layers or []:
        if layer not in all_layers:
            raise PlotError(f"--layers: unknown layer {layer!r}; layers: {', '.join(all_layers)}")
    missing = sorted(set(epochs or []) - set(all_epochs))
    if missing:
        raise PlotError(f"--epochs: epochs {missing} not dissected; available: {all_epochs}")
    sizes = neurons_df.groupby("layer")["neuron"].max()
    for layer, index in refs or []:
        if layer not in all_layers:
            raise PlotError(f"--neurons: unknown layer {layer!r} in {layer}:{index}; layers: {', '.join(all_layers)}")
        if index > sizes[layer]:
            raise PlotError(f"--neurons: {layer} has neurons 0..{sizes[layer]}, got {layer}:{index}")
    chosen_layers = list(layers) if layers else all_layers
    outside = [f"{l}:{i}" for l, i in refs or [] if l not in chosen_layers]
    if outside:
        raise PlotError(f"--neurons: {', '.join(outside)} not in the chosen --layers ({', '.join(chosen_layers)})")
    return chosen_layers, (sorted(epochs) if epochs else all_epochs)


# ----------------------------------------------------------------------------- hover text


def hover_texts(dissect: pd.DataFrame, top_k: int = 5) -> pd.DataFrame:
    """(epoch, layer, neuron, hover): 'layer4 · neuron 479 · epoch 5' then one concept + score a line.

    Built column by column over the (N, k) concept table: no per-neuron Python.
    """
    keys, concepts, scores = top_k_arrays(dissect, top_k)
    names = pd.unique(pd.Series(concepts.ravel(), dtype=object).dropna())
    escaped = {c: html.escape(str(c)) for c in names}
    flag = np.where(keys["interpretable"].to_numpy(bool), "", " (not interpretable)")
    text = (
        keys["layer"].map(lambda s: html.escape(str(s))) + " · neuron " + keys["neuron"].astype(str)
        + " · epoch " + keys["epoch"].astype(str) + flag
    )
    for j in range(concepts.shape[1]):
        present = pd.notna(concepts[:, j])
        line = (
            "<br>" + pd.Series(concepts[:, j], dtype=object).map(escaped).fillna("")
            + " " + pd.Series(scores[:, j]).map("{:.3f}".format)
        )
        text = text + np.where(present, line, "")
    return keys[["epoch", "layer", "neuron"]].assign(hover=text.to_numpy(dtype=object))


def _default_hover(df: pd.DataFrame) -> pd.Series:
    return (
        df["layer"].map(lambda s: html.escape(str(s))) + " · neuron " + df["neuron"].astype(str)
        + " · epoch " + df["epoch"].astype(str) + "<br>"
        + df["top_concept"].map(lambda c: html.escape(str(c))) + " " + df["score"].map("{:.3f}".format)
    )


# ----------------------------------------------------------------------------- the map figure


def _ref_label(ref: tuple[str, int]) -> str:
    return f"{ref[0]}:{ref[1]}"


def _axis_range(values: np.ndarray) -> list[float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return [-1.0, 1.0]
    lo, hi = float(values.min()), float(values.max())
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    return [lo - pad, hi + pad]


def embedding_map_figure(
    neurons_df: pd.DataFrame,
    anchors_df: pd.DataFrame | None,
    highlight: list[tuple[str, int]] | None = None,
    *,
    title: str | None = None,
) -> go.Figure:
    """The 2-D map with one frame per epoch.

    ``neurons_df``: epoch, layer, neuron, x, y, interpretable, and ``hover`` (else built
    from top_concept and score). ``anchors_df``: concept, x, y. Trace order: 0 neurons of
    the shown epoch, 1 anchors, then per highlighted neuron its trajectory (all epochs)
    and its marker at the shown epoch; frames update trace 0 and the markers.
    """
    df = neurons_df.copy()
    if "hover" not in df.columns:
        df["hover"] = _default_hover(df)
    df = df.sort_values(["epoch", "layer", "neuron"], kind="stable")
    epochs = sorted(int(e) for e in pd.unique(df["epoch"]))
    by_epoch = {int(e): g for e, g in df.groupby("epoch", sort=True)}
    refs = [r for r in (highlight or []) if ((df["layer"] == r[0]) & (df["neuron"] == r[1])).any()]
    paths = {r: df[(df["layer"] == r[0]) & (df["neuron"] == r[1])].set_index("epoch") for r in refs}
    anchors = anchors_df if anchors_df is not None else pd.DataFrame(columns=["concept", "x", "y"])

    # Plain dicts of numbers and numpy object arrays, not go.Scatter objects and Python lists
    # of strings: plotly validates list elements one by one and deep-copies trace objects,
    # which costs seconds for 30 frames of 512 points.
    def neuron_trace(epoch: int) -> dict:
        g = by_epoch[epoch]
        return dict(
            type="scatter", x=g["x"].to_numpy(np.float32), y=g["y"].to_numpy(np.float32), mode="markers", name="neurons",
            marker=dict(color=g["interpretable"].to_numpy(np.int8), cmin=0, cmax=1, size=5, opacity=0.7,
                        colorscale=[[0, DIM_NEURON_COLOR], [1, NEURON_COLOR]]),
            text=g["hover"].to_numpy(dtype=object), hovertemplate="%{text}<extra></extra>",
        )

    def marker_trace(ref, color: str, epoch: int) -> dict:
        path = paths[ref]
        here = path.loc[[epoch]] if epoch in path.index else path.iloc[:0]
        return dict(
            type="scatter", x=here["x"].to_numpy(np.float32), y=here["y"].to_numpy(np.float32), mode="markers",
            name=_ref_label(ref), marker=dict(color=color, size=15, line=dict(color="black", width=1.5)),
            text=here["hover"].to_numpy(dtype=object), hovertemplate="%{text}<extra></extra>", showlegend=False,
        )

    colors = {r: HIGHLIGHT_COLORS[i % len(HIGHLIGHT_COLORS)] for i, r in enumerate(refs)}
    first = epochs[0] if epochs else 0
    data = [neuron_trace(first)] if epochs else [dict(type="scatter", x=[], y=[], name="neurons")]
    data.append(go.Scatter(
        x=anchors["x"].to_numpy(), y=anchors["y"].to_numpy(), mode="markers+text", name="anchors",
        text=[html.escape(str(a)) for a in anchors["concept"]], textposition="top center",
        textfont=dict(color=ANCHOR_COLOR, size=13),
        marker=dict(symbol="star", size=18, color=ANCHOR_COLOR, line=dict(color="white", width=1)),
        hovertemplate="anchor %{text}<extra></extra>",
    ))
    marker_indices = []
    for ref in refs:
        path = paths[ref]
        data.append(go.Scatter(
            x=path["x"].to_numpy(), y=path["y"].to_numpy(), mode="lines+markers+text",
            name=f"{_ref_label(ref)} trajectory", line=dict(color=colors[ref], width=2),
            marker=dict(color=colors[ref], size=6), text=[f"e{e}" for e in path.index],
            textposition="bottom center", textfont=dict(size=9, color=colors[ref]),
            customdata=path["hover"].tolist(), hovertemplate="%{customdata}<extra></extra>",
        ))
        marker_indices.append(len(data))
        data.append(marker_trace(ref, colors[ref], first))

    frames = [
        dict(name=str(e), data=[neuron_trace(e)] + [marker_trace(r, colors[r], e) for r in refs],
             traces=[0] + marker_indices)
        for e in epochs
    ]
    all_x = np.concatenate([df["x"].to_numpy(float), anchors["x"].to_numpy(float)])
    all_y = np.concatenate([df["y"].to_numpy(float), anchors["y"].to_numpy(float)])
    step_args = dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0))
    fig = go.Figure(data=data, frames=frames)
    fig.update_layout(
        title=title or "Neurons in the unified embedding",
        template="plotly_white", height=800, hovermode="closest", margin=dict(t=110),
        xaxis=dict(range=_axis_range(all_x), showticklabels=False, zeroline=False, showgrid=False,
                   title=dict(text="map axis 1")),
        yaxis=dict(range=_axis_range(all_y), showticklabels=False, zeroline=False, showgrid=False,
                   title=dict(text="map axis 2")),
        legend=dict(orientation="h", x=0, y=1.0, yanchor="bottom"),
        updatemenus=[dict(
            type="buttons", direction="left", x=0.1, y=0, xanchor="right", yanchor="top",
            pad=dict(r=10, t=70), showactive=False,
            buttons=[
                dict(label="Play", method="animate",
                     args=[None, dict(step_args, frame=dict(duration=700, redraw=True), fromcurrent=True)]),
                dict(label="Pause", method="animate", args=[[None], step_args]),
            ],
        )],
        sliders=[dict(
            active=0, x=0.1, len=0.9, y=0, xanchor="left", yanchor="top", pad=dict(b=10, t=40),
            currentvalue=dict(prefix="epoch ", visible=True, xanchor="right"),
            steps=[dict(label=str(e), method="animate", args=[[str(e)], step_args]) for e in epochs],
        )],
    )
    return fig


# ----------------------------------------------------------------------------- cards


def thumbnail_uri(path: Path, size: int = THUMBNAIL_PX) -> str | None:
    """A small JPEG of ``path`` as a data: URI, or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CARD_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
h2{margin:28px 0 8px} .note{color:#a33}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ddd;border-radius:8px;padding:10px;width:300px;background:#fafafa}
.card h3{margin:0 0 6px;font-size:15px} .badge{font-size:11px;color:#fff;background:#2a7;border-radius:4px;padding:1px 5px}
.badge.off{background:#aaa} ol{margin:4px 0 6px 18px;padding:0;font-size:13px} .score{color:#777}
.dist{font-size:12px;color:#555;margin-bottom:6px} .thumbs img{width:56px;height:56px;object-fit:cover;margin:1px;border-radius:3px}
"""


def neuron_cards_html(
    refs: list[tuple[str, int]],
    dissect: pd.DataFrame,
    top_images: pd.DataFrame,
    *,
    probe_root: Path | None,
    distances: pd.DataFrame | None = None,
    title: str = "Chosen neurons",
    top_k: int = 5,
    n_images: int = CARD_IMAGES,
) -> str:
    """One section per chosen neuron, one card per epoch: top concepts, anchor distances, top images."""
    esc = html.escape
    notes = []
    root_ok = probe_root is not None and Path(probe_root).is_dir()
    if not root_ok:
        notes.append(f"Probe images not shown: the probe folder {esc(str(probe_root))} is not available here.")
    thumbs: dict[str, str | None] = {}

    def thumb(rel: str) -> str | None:
        if rel not in thumbs:
            thumbs[rel] = thumbnail_uri(Path(probe_root) / rel) if root_ok else None
        return thumbs[rel]

    rows = dissect[dissect["rank"] < top_k]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<style>{_CARD_CSS}</style></head><body><h1>{esc(title)}</h1>"]
    parts += [f"<p class='note'>{n}</p>" for n in notes]
    for layer, neuron in refs:
        mine = rows[(rows["layer"] == layer) & (rows["neuron"] == neuron)]
        imgs = top_images[(top_images["layer"] == layer) & (top_images["neuron"] == neuron)]
        dist = None
        if distances is not None and len(distances):
            dist = distances[(distances["layer"] == layer) & (distances["neuron"] == neuron)]
        parts.append(f"<section><h2>{esc(layer)} · neuron {neuron}</h2><div class='cards'>")
        for epoch, g in mine.sort_values(["epoch", "rank"]).groupby("epoch", sort=True):
            ok = bool(g["interpretable"].iloc[0])
            badge = "<span class='badge'>interpretable</span>" if ok else "<span class='badge off'>not interpretable</span>"
            concepts = "".join(
                f"<li>{esc(str(c))} <span class='score'>{s:.3f}</span></li>" for c, s in zip(g["concept"], g["score"])
            )
            parts.append(f"<div class='card' data-epoch='{int(epoch)}'><h3>epoch {int(epoch)} {badge}</h3><ol>{concepts}</ol>")
            if dist is not None:
                d = dist[dist["epoch"] == epoch]
                if len(d):
                    text = ", ".join(f"{esc(str(a))} {v:.3f}" for a, v in zip(d["anchor"], d["distance"]))
                    parts.append(f"<div class='dist'>distance to {text}</div>")
            shown = imgs[imgs["epoch"] == epoch].sort_values("rank").head(n_images)
            tags = []
            for rel, act in zip(shown["image"], shown["activation"]):
                uri = thumb(str(rel))
                if uri:
                    tags.append(f"<img src='{uri}' title='{esc(str(rel))} (activation {act:.3g})' alt='{esc(str(rel))}'>")
            parts.append(f"<div class='thumbs'>{''.join(tags)}</div></div>")
        parts.append("</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the run


def _file_slug(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", layer) or "layer"


def write_figure_html(fig: go.Figure, path: Path, caption: str | None = None) -> None:
    """Write ``fig`` with plotly.js referenced from ``plotly.min.js`` beside it (written once),
    and ``caption`` (how to read the figure) under it."""
    from plotly.offline import get_plotlyjs

    path = Path(path)
    bundle = path.parent / "plotly.min.js"
    js = get_plotlyjs()
    if not bundle.exists() or bundle.stat().st_size != len(js.encode("utf-8")):
        store.write_text(bundle, js)
    page = fig.to_html(include_plotlyjs="directory", full_html=True, auto_play=False)
    if caption:
        text = (f'<p style="font-family:system-ui,sans-serif;color:#555;max-width:70rem;margin:0 1rem 1rem">'
                f'How to read this: {html.escape(caption)}</p>')
        page = page.replace("</body>", text + "</body>", 1)
    store.write_text(path, page)


def plot_run(
    out: Path,
    *,
    anchors=None,
    neurons: list[tuple[str, int]] | None = None,
    layers=None,
    epochs=None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Write the per-layer maps (and, for chosen neurons, their cards); returns the files written.

    Runs ``embed_run`` first; it does nothing when the embedding is up to date.
    """
    out = Path(out)
    manifest = store.read_manifest(out)
    # Check the selection against the dissection first: a typo should not wait for an embedding.
    dissect = store.read_dissect(out)
    refs = parse_neuron_refs(neurons) if neurons is not None else []
    layers = [layers] if isinstance(layers, str) else layers
    chosen_layers, chosen_epochs = check_selection(dissect, layers=layers, epochs=epochs, refs=refs)
    dissect = dissect[dissect["epoch"].isin(chosen_epochs) & dissect["layer"].isin(chosen_layers)]
    embed_like_before(out, anchors=anchors, log=log)
    meta = read_embed_meta(out) or {}
    top_k = int((meta.get("settings") or {}).get("top_k", 5))
    neurons_df = read_neurons(out, epochs=chosen_epochs)
    neurons_df = neurons_df[neurons_df["layer"].isin(chosen_layers)]
    neurons_df = neurons_df.merge(hover_texts(dissect, top_k), on=["epoch", "layer", "neuron"], how="left")
    anchors_df = read_anchors(out)
    run = manifest.get("run", out.name)
    encoder = meta.get("encoder", "?")
    temperature = (meta.get("settings") or {}).get("temperature", 1.0)
    written = []
    plots = store.plots_dir(out)
    for layer in chosen_layers:
        layer_refs = [r for r in refs if r[0] == layer]
        fig = embedding_map_figure(
            neurons_df[neurons_df["layer"] == layer], anchors_df, layer_refs,
            title=f"{html.escape(run)} · {html.escape(layer)} · encoder {html.escape(encoder)}, T={temperature:g}",
        )
        path = plots / f"map_{_file_slug(layer)}.html"
        write_figure_html(fig, path)
        written.append(path)
    if refs:
        chosen = [r for r in refs if r[0] in chosen_layers]
        root = (manifest.get("probe") or {}).get("root")
        try:
            top_images = store.read_top_images(out, chosen_epochs)
        except store.StoreError as e:  # cards still show concepts without their images
            log(f"plot: no top images ({e})")
            top_images = pd.DataFrame({c: pd.Series(dtype=object) for c in store.TOP_IMAGES.names})
        distances = read_anchor_distances(out)
        page = neuron_cards_html(
            chosen, dissect, top_images, probe_root=Path(root) if root else None,
            distances=distances[distances["epoch"].isin(chosen_epochs)],
            title=f"{run} · chosen neurons · encoder {encoder}", top_k=top_k,
        )
        path = plots / "neurons.html"
        store.write_text(path, page)
        written.append(path)
    for p in written:
        log(f"plot: wrote {p}")
    return written


# ----------------------------------------------------------------------------- the paper's figures, by name


def parse_figures(names) -> list[str]:
    """``"map,categories"`` (or a list) -> checked figure names, in the order given."""
    from .figures import FIGURES
    from .registry import did_you_mean

    items = names.split(",") if isinstance(names, str) else list(names or [])
    chosen = list(dict.fromkeys(str(n).strip() for n in items if str(n).strip()))
    for name in chosen:
        if name not in FIGURES:
            raise PlotError(f"--figure: unknown figure {name!r}{did_you_mean(name, FIGURES)}; "
                            f"choices: {', '.join(FIGURES)}")
    if not chosen:
        raise PlotError(f"--figure: name at least one of {', '.join(FIGURES)}")
    return chosen


def parse_formats(formats) -> list[str]:
    from .figures import FORMATS

    items = formats.split(",") if isinstance(formats, str) else list(formats or [])
    chosen = list(dict.fromkeys(str(f).strip().lower() for f in items if str(f).strip()))
    bad = [f for f in chosen if f not in FORMATS]
    if bad or not chosen:
        raise PlotError(f"--format: {', '.join(bad) or 'nothing'} is not one of {', '.join(FORMATS)} "
                        f"(comma-separated, e.g. html,png)")
    return chosen


STATIC_WIDTH = 1400
"""Pixel width of PNG/SVG exports (the height is the figure's)."""


def figure_page(chart, path: Path) -> None:
    """The figure as an HTML page (plotly.js beside it), with its "how to read this" line under it."""
    write_figure_html(chart.figure, path, caption=chart.how_to_read)


def figure_run(
    out: Path,
    names,
    *,
    compare: Path | None = None,
    labels: tuple[str, str] | None = None,
    anchors=None,
    neurons: list[tuple[str, int]] | None = None,
    layers=None,
    epochs=None,
    formats=("html", "png"),
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Write the named paper figures as ``OUT/plots/figure_<name>.<format>``; returns the files.

    ``map`` re-runs ``embed`` first when its outputs are stale (with the previous
    settings, like ``plot``); the others need only the dissection. Static formats go
    through kaleido; without it (or without a Chrome), one notice and HTML only.
    """
    from . import figures, stats

    out = Path(out)
    names, formats = parse_figures(names), parse_formats(formats)
    if "compare" in names and compare is None:
        raise PlotError("--figure compare: needs --compare OUT_B, the run to compare with")
    dissect = store.read_dissect(out)
    refs = parse_neuron_refs(neurons) if neurons is not None else []
    layers = [layers] if isinstance(layers, str) else layers
    chosen_layers, _ = check_selection(dissect, layers=layers, epochs=epochs, refs=refs)
    trust = stats.run_trust_level(out)
    first = stats.top1(dissect[dissect["layer"].isin(chosen_layers)], trust)
    tables = stats.read_fresh_stats(out, layers=layers)
    if tables is None:
        inputs = stats.load_inputs(out, layers, log, with_embedding=False)
        tables = stats.compute_stats(inputs)
    confidence_known = bool(tables["interpretable"]["n_confident"].notna().any())
    charts = {}
    for name in names:
        if name == "map":
            embed_like_before(out, anchors=anchors, log=log)
            meta = read_embed_meta(out) or {}
            coords = read_neurons(out)
            coords = coords[coords["layer"].isin(chosen_layers)]
            shown = figures.pick_epochs(stats.epochs_of(coords), epochs, figures.MAP_PANELS, "the embedding")
            distances = read_anchor_distances(out)
            trajectories = figures.choose_trajectories(coords, first, shown, distances=distances, given=refs)
            charts[name] = figures.map_figure(
                coords, first, read_anchors(out), shown, trajectories=trajectories,
                anchor_source=meta.get("anchor_source"), method=(meta.get("settings") or {}).get("map_method", "umap"),
                title=f"{html.escape(str(meta.get('encoder', '')))} embedding of {html.escape(', '.join(chosen_layers))}")
        elif name == "categories":
            shown = figures.pick_epochs(stats.epochs_of(tables["categories"]), epochs, figures.CATEGORY_PANELS, "the run")
            charts[name] = figures.categories_figure(tables["categories"], shown, chosen_layers)
        elif name == "retention":
            retained = tables["retention"]
            if retained.empty:
                log("plot: retention needs at least two dissected epochs; figure skipped")
                continue
            later = stats.epochs_of(retained)
            wanted = [e for e in (epochs or []) if e in later] or None
            shown = figures.pick_epochs(later, wanted, figures.RETENTION_CURVES, "the later epochs")
            charts[name] = figures.retention_figure(retained, shown, confidence_known=confidence_known)
        elif name == "compare":
            from .compare import compare_runs

            result = compare_runs(out, Path(compare), labels, layers=layers, log=log)
            charts[name] = figures.compare_figure(result, epoch=max(epochs) if epochs else None)
    written, static = [], {}
    plots = store.plots_dir(out)
    for name, chart in charts.items():
        if "html" in formats:
            path = plots / f"figure_{name}.html"
            figure_page(chart, path)
            written.append(path)
        for fmt in formats:
            if fmt in figures.STATIC_FORMATS:
                fig = go.Figure(chart.figure)
                fig.update_layout(width=STATIC_WIDTH)
                fig.layout.updatemenus = ()  # buttons do nothing on paper
                static[plots / f"figure_{name}.{fmt}"] = fig
    written += figures.write_static(static, log)
    for p in written:
        log(f"plot: wrote {p}")
    return written


__all__ = [
    "PlotError", "check_selection", "embedding_map_figure", "figure_run", "hover_texts", "neuron_cards_html",
    "parse_figures", "parse_formats", "parse_neuron_refs", "plot_run", "thumbnail_uri", "write_figure_html",
]
