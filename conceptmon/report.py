"""One self-contained HTML report of a run (and optionally a comparison with another).

``OUT/report.html`` opens offline: plotly.js is inlined once in the page head, every
chart is an interactive Plotly div, tables are HTML tables that sort on a header click,
and top images are embedded as base64 JPEG thumbnails read from the probe root.

The embedding map needs ``OUT/embed/neurons.parquet``. When it is missing the report
does not run the embedding itself (that loads a text encoder and fits UMAP: minutes,
and possibly weights that are not on this machine); it says on the page and in the
log to run ``conceptmon embed --out OUT`` and then ``conceptmon report`` again.

To stay light on long runs the map and retention curves show at most
:data:`MAX_MAP_EPOCHS` / :data:`MAX_CURVE_EPOCHS` evenly spaced epochs (always the
first and the last), and the page says so when it leaves epochs out.

A small self-check script records JavaScript errors and, once the charts are drawn,
writes ``<div id="conceptmon-selfcheck" data-charts=N data-drawn=M data-errors=K>``
into the page; the headless-browser test reads it, and it costs nothing otherwise.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import yaml
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from . import __version__, stats, store
from .errors import ConceptmonError

MAX_MAP_EPOCHS = 10
MAX_CURVE_EPOCHS = 10
MOST_CHANGING = 12
"""Neurons shown with their concept trajectory and top images."""
THUMBNAILS_PER_EPOCH = 5
THUMBNAIL_PX = 72
MAX_TABLE_ROWS = 2000

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
CATEGORY_COLORS = {"color": "#d62728", "texture": "#9467bd", "material": "#8c564b", "object": "#1f77b4",
                   "part": "#2ca02c", "scene": "#ff7f0e", "other": "#7f7f7f"}


class ReportError(ConceptmonError):
    """A report that cannot be written from these results."""


# ----------------------------------------------------------------------------- html pieces

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1200px;margin:0 auto;padding:1rem 1.5rem 4rem}
h1{font-size:1.6rem;margin:.5rem 0}h2{margin-top:2.5rem;border-bottom:2px solid #ddd;padding-bottom:.2rem}
nav a{margin-right:1rem}section{background:#fff;padding:.5rem 1rem 1rem;border-radius:6px;
box-shadow:0 1px 3px rgba(0,0,0,.08);margin-bottom:1rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}th,td{border:1px solid #ddd;padding:.2rem .5rem;
text-align:left;vertical-align:top}th{background:#f0f0f0}table.sortable th{cursor:pointer;user-select:none}
table.sortable th:after{content:" \\2195";color:#aaa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.scroll{max-height:28rem;overflow:auto}.note{color:#666;font-size:.9rem}.notice{background:#fff7e0;
border-left:4px solid #f0b400;padding:.4rem .8rem}img.thumb{width:%(px)dpx;height:%(px)dpx;object-fit:cover;
margin:1px;border:1px solid #ccc}pre{background:#f6f6f6;padding:.6rem;overflow:auto;font-size:.8rem}
.kv th{width:12rem}
""" % {"px": THUMBNAIL_PX}

# Records errors before anything else runs, then reports how many charts Plotly drew.
SELF_CHECK_HEAD = """<script>
window.__conceptmonErrors=[];
window.addEventListener('error',function(e){window.__conceptmonErrors.push(String(e.message||e));});
(function(){var ce=console.error;console.error=function(){window.__conceptmonErrors.push(
Array.prototype.join.call(arguments,' '));return ce.apply(console,arguments);};})();
</script>"""

SELF_CHECK_TAIL = """<script>
(function(){var tries=0;function check(){var charts=document.querySelectorAll('.plotly-graph-div');
var drawn=0;charts.forEach(function(c){if(c.querySelector('.main-svg'))drawn++;});tries++;
if(drawn<charts.length&&tries<100){setTimeout(check,100);return;}
var m=document.createElement('div');m.id='conceptmon-selfcheck';m.hidden=true;
m.setAttribute('data-charts',charts.length);m.setAttribute('data-drawn',drawn);
m.setAttribute('data-errors',window.__conceptmonErrors.length);
m.textContent=window.__conceptmonErrors.join('\\n');document.body.appendChild(m);}
window.addEventListener('load',function(){setTimeout(check,50);});})();
</script>"""

SORT_SCRIPT = """<script>
document.addEventListener('click',function(e){var th=e.target.closest('table.sortable th');if(!th)return;
var table=th.closest('table'),body=table.tBodies[0],i=Array.prototype.indexOf.call(th.parentNode.children,th);
var rows=Array.prototype.slice.call(body.rows),asc=th.getAttribute('data-dir')!=='asc';
function key(r){var c=r.cells[i];return c?(c.getAttribute('data-v')||c.textContent):'';}
var numeric=rows.every(function(r){var k=key(r);return k===''||!isNaN(parseFloat(k))&&isFinite(k);});
rows.sort(function(a,b){var x=key(a),y=key(b);if(numeric){x=x===''?-Infinity:parseFloat(x);
y=y===''?-Infinity:parseFloat(y);}return (x<y?-1:x>y?1:0)*(asc?1:-1);});
rows.forEach(function(r){body.appendChild(r);});
Array.prototype.forEach.call(th.parentNode.children,function(h){h.removeAttribute('data-dir');});
th.setAttribute('data-dir',asc?'asc':'desc');});
</script>"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def _cell(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, (int, np.integer)):
        return f'<td class="num">{int(value)}</td>'
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return '<td class="num" data-v=""></td>'
        return f'<td class="num" data-v="{float(value)!r}">{float(value):.4g}</td>'
    if value is None:
        return "<td></td>"
    return f"<td>{esc(value)}</td>"


def html_table(table: pd.DataFrame, max_rows: int = MAX_TABLE_ROWS, raw_columns: tuple[str, ...] = ()) -> str:
    """A sortable HTML table; ``raw_columns`` hold ready HTML (thumbnails), the rest is escaped."""
    shown = table.head(max_rows)
    head = "".join(f"<th>{esc(c)}</th>" for c in shown.columns)
    rows = []
    for values in shown.itertuples(index=False, name=None):
        cells = [f"<td>{v}</td>" if c in raw_columns else _cell(v) for c, v in zip(shown.columns, values)]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = (f'<p class="note">first {max_rows} of {len(table)} rows; all rows are in OUT/stats/</p>'
            if len(table) > max_rows else "")
    return (f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>{more}')


def kv_table(pairs: list[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{rows}</table>'


class Page:
    """Collects sections and charts; each chart becomes a div that plotly.js (inlined once) draws."""

    def __init__(self):
        self.sections: list[tuple[str, str, str]] = []
        self.n_charts = 0

    def chart(self, fig: go.Figure, height: int = 420) -> str:
        self.n_charts += 1
        fig.update_layout(height=height, margin=dict(l=50, r=20, t=80, b=40), template="plotly_white",
                          title_y=0.98, title_yanchor="top")
        return pio.to_html(
            fig, full_html=False, include_plotlyjs=False, auto_play=False, div_id=f"chart-{self.n_charts}",
            config={"displaylogo": False, "responsive": True}, default_height=f"{height}px",
        )

    def section(self, anchor: str, title: str, body: str) -> None:
        self.sections.append((anchor, title, body))

    def render(self, title: str, subtitle: str) -> str:
        nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t, _ in self.sections)
        body = "".join(f'<section id="{a}"><h2>{esc(t)}</h2>{b}</section>' for a, t, b in self.sections)
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style>{SELF_CHECK_HEAD}<script type=\"text/javascript\">{get_plotlyjs()}</script>"
            f"</head><body><main><h1>{esc(title)}</h1><p class=\"note\">{esc(subtitle)}</p><nav>{nav}</nav>"
            f"{body}</main>{SORT_SCRIPT}{SELF_CHECK_TAIL}</body></html>\n"
        )


def notice(text: str) -> str:
    return f'<p class="notice">{esc(text)}</p>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


# ----------------------------------------------------------------------------- figures (pure)


def _layer_colors(layers) -> dict[str, str]:
    return {layer: PALETTE[i % len(PALETTE)] for i, layer in enumerate(layers)}


def _grid(n: int, columns: int = 3) -> tuple[int, int]:
    cols = min(n, columns)
    return -(-n // cols), cols


def interpretable_figure(counts: pd.DataFrame) -> go.Figure:
    """Interpretable neurons over epochs, one line per layer (hover: share)."""
    fig = go.Figure()
    colors = _layer_colors(sorted(counts["layer"].unique()))
    for layer, group in counts.groupby("layer", sort=True):
        fig.add_trace(go.Scatter(
            x=group["epoch"], y=group["n_interpretable"], mode="lines+markers", name=layer,
            line=dict(color=colors[layer]), customdata=np.c_[group["share_interpretable"], group["n_neurons"]],
            hovertemplate="epoch %{x}<br>%{y} of %{customdata[1]} neurons (%{customdata[0]:.1%})"
                          "<extra>" + esc(layer) + "</extra>",
        ))
    fig.update_layout(title="Interpretable neurons per layer", xaxis_title="epoch", yaxis_title="interpretable neurons")
    return fig


def category_figure(categories: pd.DataFrame) -> go.Figure:
    """Stacked bars per layer: interpretable neurons by category of the top-1 concept, per epoch."""
    layers = sorted(categories["layer"].unique())
    rows, cols = _grid(len(layers))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=layers, shared_yaxes=False)
    present = categories.groupby("category")["n_interpretable"].sum()
    order = [c for c in dict.fromkeys(categories["category"]) if present.get(c, 0) > 0]
    for i, layer in enumerate(layers):
        at = categories[categories["layer"] == layer]
        for j, category in enumerate(order):
            part = at[at["category"] == category]
            fig.add_trace(go.Bar(
                x=part["epoch"], y=part["n_interpretable"], name=category, legendgroup=category,
                showlegend=i == 0, marker_color=CATEGORY_COLORS.get(category, PALETTE[j % len(PALETTE)]),
                hovertemplate="epoch %{x}: %{y} neurons<extra>" + esc(f"{layer} · {category}") + "</extra>",
            ), row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(barmode="stack", title="Interpretable neurons per category (top-1 concept)")
    return fig


def retention_figure(retained: pd.DataFrame, epochs: list[int]) -> go.Figure:
    """Fig. 5b: share of the reference's top-x % neurons keeping their concept, per later epoch."""
    layers = [l for l in sorted(retained["layer"].unique()) if l != stats.ALL_LAYERS] + [stats.ALL_LAYERS]
    rows, cols = _grid(len(layers), 4)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=layers, shared_yaxes=True)
    shades = {e: f"hsl({int(220 - 200 * k / max(len(epochs) - 1, 1))},70%,45%)" for k, e in enumerate(epochs)}
    for i, layer in enumerate(layers):
        at = retained[(retained["layer"] == layer) & retained["epoch"].isin(epochs)]
        for epoch, group in at.groupby("epoch", sort=True):
            fig.add_trace(go.Scatter(
                x=group["percent"], y=group["share_kept"], mode="lines", name=f"epoch {epoch}",
                legendgroup=str(epoch), showlegend=i == 0, line=dict(color=shades[int(epoch)]),
                hovertemplate="top %{x}%: %{y:.1%} kept<extra>" + esc(f"{layer} · epoch {epoch}") + "</extra>",
            ), row=i // cols + 1, col=i % cols + 1)
    reference = int(retained["reference_epoch"].iloc[0])
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    fig.update_xaxes(title_text="top x %", ticksuffix="%")
    fig.update_layout(title=f"Retention of concepts from epoch {reference}")
    return fig


def stability_figure(stability: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    colors = _layer_colors([l for l in sorted(stability["layer"].unique()) if l != stats.ALL_LAYERS])
    colors[stats.ALL_LAYERS] = "#000000"
    for layer, group in stability.groupby("layer", sort=True):
        fig.add_trace(go.Scatter(
            x=group["epoch_to"], y=group["share_kept"], mode="lines+markers", name=layer,
            line=dict(color=colors[layer], dash="dot" if layer == stats.ALL_LAYERS else "solid"),
            customdata=group["epoch_from"],
            hovertemplate="epoch %{customdata} → %{x}: %{y:.1%} kept<extra>" + esc(layer) + "</extra>",
        ))
    fig.update_layout(title="Neurons keeping their top-1 concept since the previous checkpoint",
                      xaxis_title="epoch", yaxis_title="share kept", yaxis_tickformat=".0%")
    return fig


def diversity_figure(diversity: pd.DataFrame) -> go.Figure:
    metrics = [("n_distinct_concepts", "distinct top-1 concepts"), ("entropy_bits", "entropy of top-1 concepts (bits)")]
    if diversity["mean_cosine_distance"].notna().any():
        metrics.append(("mean_cosine_distance", "mean pairwise cosine distance"))
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[t for _, t in metrics])
    colors = _layer_colors(sorted(diversity["layer"].unique()))
    for j, (column, title) in enumerate(metrics):
        for layer, group in diversity.groupby("layer", sort=True):
            fig.add_trace(go.Scatter(
                x=group["epoch"], y=group[column], mode="lines+markers", name=layer, legendgroup=layer,
                showlegend=j == 0, line=dict(color=colors[layer]),
                hovertemplate="epoch %{x}: %{y:.4g}<extra>" + esc(f"{layer} · {title}") + "</extra>",
            ), row=1, col=j + 1)
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(title="Diversity and spread of the neurons")
    return fig


def anchor_figure(anchor_distance: pd.DataFrame) -> go.Figure:
    pooled = anchor_distance[anchor_distance["layer"] == stats.ALL_LAYERS]
    fig = go.Figure()
    for i, (anchor, group) in enumerate(pooled.groupby("anchor", sort=True)):
        fig.add_trace(go.Scatter(
            x=group["epoch"], y=group["mean_distance"], mode="lines+markers", name=anchor,
            line=dict(color=PALETTE[i % len(PALETTE)]),
            hovertemplate="epoch %{x}: %{y:.4f}<extra>" + esc(anchor) + "</extra>",
        ))
    k = int(anchor_distance["k"].iloc[0]) if len(anchor_distance) else 0
    fig.update_layout(title=f"Mean distance of the {k} nearest neurons (all layers) to each anchor",
                      xaxis_title="epoch", yaxis_title="distance")
    return fig


def comparison_figures(result: dict[str, pd.DataFrame], labels: tuple[str, str]) -> list[go.Figure]:
    la, lb = labels
    counts = result["interpretable"]
    colors = _layer_colors(sorted(counts["layer"].unique()))
    lines = go.Figure()
    for layer, group in counts.groupby("layer", sort=True):
        for label, dash in ((la, "solid"), (lb, "dash")):
            part = group.dropna(subset=[f"n_interpretable_{label}"])
            lines.add_trace(go.Scatter(
                x=part["epoch"], y=part[f"n_interpretable_{label}"], mode="lines+markers", name=f"{layer} · {label}",
                line=dict(color=colors[layer], dash=dash),
                hovertemplate="epoch %{x}: %{y}<extra>" + esc(f"{layer} · {label}") + "</extra>",
            ))
    lines.update_layout(title=f"Interpretable neurons per layer: {la} (solid) vs {lb} (dashed)",
                        xaxis_title="epoch", yaxis_title="interpretable neurons")
    figures = [lines]
    cats = result["categories"].dropna(subset=[f"n_interpretable_{la}", f"n_interpretable_{lb}"])
    if not cats.empty:
        epoch = int(cats["epoch"].max())
        at = cats[cats["epoch"] == epoch]
        layers = sorted(at["layer"].unique())
        rows, cols = _grid(len(layers))
        bars = make_subplots(rows=rows, cols=cols, subplot_titles=layers)
        for i, layer in enumerate(layers):
            part = at[at["layer"] == layer]
            for label, color in ((la, "#1f77b4"), (lb, "#d62728")):
                bars.add_trace(go.Bar(
                    x=part["category"], y=part[f"n_interpretable_{label}"], name=label, legendgroup=label,
                    showlegend=i == 0, marker_color=color,
                    hovertemplate="%{x}: %{y}<extra>" + esc(f"{layer} · {label}") + "</extra>",
                ), row=i // cols + 1, col=i % cols + 1)
        bars.update_layout(barmode="group", title=f"Interpretable neurons per category at epoch {epoch}")
        figures.append(bars)
    return figures


# ----------------------------------------------------------------------------- data helpers


def most_changing(changes: pd.DataFrame, n: int = MOST_CHANGING) -> pd.DataFrame:
    """The ``n`` neurons with the most top-1 changes (ties: layer, neuron), with their trail."""
    if changes.empty:
        return pd.DataFrame(columns=["layer", "neuron", "n_changes", "trail"])
    counts = changes.groupby(["layer", "neuron"], sort=True).size().rename("n_changes").reset_index()
    counts = counts.sort_values(["n_changes", "layer", "neuron"], ascending=[False, True, True], kind="stable").head(n)
    trails = []
    for layer, neuron in zip(counts["layer"], counts["neuron"]):
        steps = changes[(changes["layer"] == layer) & (changes["neuron"] == neuron)]
        parts = [f"{steps['concept_from'].iloc[0]} (ep {steps['epoch_from'].iloc[0]})"]
        parts += [f"{c} (ep {e})" for c, e in zip(steps["concept_to"], steps["epoch_to"])]
        trails.append(" → ".join(parts))
    return counts.assign(trail=trails).reset_index(drop=True)


class Thumbnails:
    """Base64 JPEG thumbnails of probe images, each file read once."""

    def __init__(self, root: Path | None):
        self.root = Path(root).resolve() if root else None
        self.cache: dict[str, str] = {}
        self.missing: set[str] = set()

    def strip(self, relpaths, titles) -> str:
        """Thumbnails in a row; one short note when none of the files can be read."""
        encoded = [self._cached(p) for p in relpaths]
        if not any(encoded):
            return '<span class="note">images not found</span>'
        return "".join(
            f'<img class="thumb" alt="{esc(p)}" title="{esc(t)}" src="data:image/jpeg;base64,{data}">' if data
            else f'<span class="note" title="{esc(p)}">[missing]</span>'
            for p, t, data in zip(relpaths, titles, encoded)
        )

    def _cached(self, relpath: str) -> str:
        if relpath not in self.cache:
            self.cache[relpath] = self._encode(relpath)
            if not self.cache[relpath]:
                self.missing.add(relpath)
        return self.cache[relpath]

    def _encode(self, relpath: str) -> str:
        from PIL import Image

        if self.root is None:
            return ""
        path = (self.root / relpath).resolve()
        # Only files under the probe root: the tables name images relative to it.
        if self.root not in path.parents or not path.is_file():
            return ""
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((THUMBNAIL_PX * 2, THUMBNAIL_PX * 2))
                buffer = io.BytesIO()
                im.save(buffer, format="JPEG", quality=80)
        except (OSError, ValueError, Image.DecompressionBombError):
            return ""
        return base64.b64encode(buffer.getvalue()).decode("ascii")


def _read_optional(path: Path, schema) -> pd.DataFrame | None:
    return store.read_table(path, schema) if path.exists() else None


# ----------------------------------------------------------------------------- sections


def summary_section(page: Page, out: Path, manifest: dict, epochs: list[int]) -> None:
    config = manifest.get("config") or {}
    detector = manifest.get("detector") or {}
    probe = manifest.get("probe") or {}
    concepts = manifest.get("concepts") or {}
    encoder = ((config.get("embedding") or {}).get("encoder"))
    pairs = [
        ("run", manifest.get("run", "")),
        ("output folder", Path(out).resolve()),
        ("model", (config.get("model") or {}).get("arch", "")),
        ("layers", ", ".join(manifest.get("layers") or [])),
        ("checkpoints", manifest.get("checkpoints", "")),
        ("epochs", f"{len(epochs)}: {stats.format_epochs(epochs)}" if epochs else "none"),
        ("detector", ", ".join(f"{k}={v}" for k, v in detector.items())),
        ("probe", f"{probe.get('name', '')}: {probe.get('n_images', '?')} images at {probe.get('root', '?')} "
                  f"(fingerprint {probe.get('fingerprint', '?')})"),
        ("concept set", f"{concepts.get('source', '')}: {len(concepts.get('names') or [])} concepts "
                        f"(fingerprint {concepts.get('fingerprint', '?')})"),
        ("text encoder", encoder or "?"),
    ]
    versions = manifest.get("versions") or {}
    records = [{"epoch": int(e), "checkpoint": r.get("checkpoint", ""), "sha256": str(r.get("sha256", ""))[:16]}
               for e, r in sorted((manifest.get("epochs") or {}).items(), key=lambda kv: int(kv[0]))]
    body = kv_table(pairs)
    body += "<h3>Versions</h3>" + kv_table(sorted(versions.items()))
    body += "<h3>Checkpoints</h3>" + html_table(pd.DataFrame(records, columns=["epoch", "checkpoint", "sha256"]))
    body += ("<details><summary>Configuration</summary><pre>" + esc(yaml.safe_dump(config, sort_keys=False))
             + "</pre></details>")
    page.section("summary", "Run summary", body)


def report_run(
    out: Path,
    *,
    compare: Path | None = None,
    labels: tuple[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write ``OUT/report.html`` and return its path; with ``compare`` add a comparison section."""
    out = Path(out)
    manifest = store.read_manifest(out)
    tables = stats.read_fresh_stats(out)
    if tables is not None:
        from .embedding import embed_generation

        log(f"report: using the up-to-date statistics in {store.stats_dir(out)}")
        gen = embed_generation(out)
        neurons = (stats.read_neuron_embeddings(gen.path(store.EMBED_FILES["neurons"]), with_vectors=False)[0]
                   if gen is not None else None)
    else:
        inputs = stats.load_inputs(out, log=log)
        tables = stats.compute_stats(inputs["dissect"], categories=inputs["categories"], neurons=inputs["neurons"],
                                     vectors=inputs["vectors"], distances=inputs["distances"])
        neurons = inputs["neurons"]
    epochs = stats.epochs_of(tables["interpretable"])
    page = Page()
    summary_section(page, out, manifest, epochs)

    counts = tables["interpretable"]
    page.section("interpretable", "Interpretable neurons over epochs",
                 page.chart(interpretable_figure(counts)) + html_table(counts))

    categories = tables["categories"]
    last = epochs[-1]
    page.section("categories", "Categories per layer and epoch",
                 page.chart(category_figure(categories), height=380 * _grid(categories["layer"].nunique())[0])
                 + f"<h3>At epoch {last}</h3>" + html_table(categories[categories["epoch"] == last]))

    movers = most_changing(tables["changes"])
    page.section("map", "Embedding map", map_body(page, out, neurons, movers, epochs, log))

    retained = tables["retention"]
    if retained.empty:
        body = note("Retention needs at least two dissected epochs.")
    else:
        later = stats.epochs_of(retained)
        shown = stats.spread_epochs(later, MAX_CURVE_EPOCHS)
        n_layers = retained["layer"].nunique()
        body = page.chart(retention_figure(retained, shown), height=360 * _grid(n_layers, 4)[0])
        if len(shown) < len(later):
            body += note(f"Curves for {len(shown)} of {len(later)} later epochs (evenly spaced, last included); "
                         "the full table is OUT/stats/retention.parquet (`conceptmon stats`).")
        body += note("Neurons ranked by best score at the reference epoch, ties by neuron id; top x % = "
                     "ceil(x·n/100) neurons of a layer; 'all' pools the per-layer selections.")
    page.section("retention", "Retention of concepts", body)

    page.section("changes", "Concept changes", changes_body(page, out, manifest, tables, movers))

    page.section("diversity", "Diversity and spread",
                 page.chart(diversity_figure(tables["diversity"]), height=360)
                 + note("Entropy in bits over all neurons' top-1 concepts; spread = mean pairwise cosine "
                        "distance of the neuron embeddings.")
                 + html_table(tables["diversity"][tables["diversity"]["epoch"] == last]))

    if "anchor_distance" in tables and not tables["anchor_distance"].empty:
        near = tables["anchor_neighbors"]
        latest = near[near["epoch"] == near.groupby("anchor")["epoch"].transform("max")]
        page.section("anchors", "Anchors", page.chart(anchor_figure(tables["anchor_distance"]))
                     + "<h3>Nearest neurons (latest epoch per anchor)</h3>" + html_table(latest))

    concepts = tables["concepts"]
    page.section("concepts", f"Neurons per top-1 concept at epoch {last}",
                 html_table(concepts[concepts["epoch"] == last].drop(columns="epoch")))

    if compare is not None:
        comparison_section(page, out, Path(compare), manifest, labels, log)

    title = f"conceptmon report: {manifest.get('run', out.name)}"
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    text = page.render(title, f"generated {generated} by conceptmon {__version__} from {out.resolve()}")
    path = store.report_path(out)
    store.write_text(path, text)
    log(f"wrote {path} ({len(text) / 1e6:.1f} MB, {page.n_charts} charts)")
    return path


def map_body(page: Page, out: Path, neurons: pd.DataFrame | None, movers: pd.DataFrame,
             epochs: list[int], log: Callable[[str], None]) -> str:
    if neurons is None or neurons.empty:
        message = (f"No embedding yet ({store.embed_dir(out)} is missing): run "
                   f"`conceptmon embed --out {out}` (add --anchors WORD,... for anchor stars), then "
                   "`conceptmon report` again.")
        log(f"notice: report without the embedding map: {message}")
        return notice(message)
    try:
        from .plots import embedding_map_figure
    except ImportError as e:
        log(f"notice: report without the embedding map: conceptmon.plots unavailable ({e})")
        return notice(f"The embedding map needs conceptmon.plots, which could not be imported ({e}).")
    from .embedding import embed_generation

    gen = embed_generation(out)
    anchors = _read_optional(gen.path(store.EMBED_FILES["anchors"]), store.ANCHORS) if gen is not None else None
    if anchors is None:
        anchors = pd.DataFrame({n: pd.Series(dtype=object) for n in store.ANCHORS.names})
    embedded = sorted(int(e) for e in neurons["epoch"].unique())
    shown = stats.spread_epochs(embedded, MAX_MAP_EPOCHS)
    highlight = [(str(l), int(n)) for l, n in zip(movers["layer"].head(5), movers["neuron"].head(5))]
    fig = embedding_map_figure(neurons[neurons["epoch"].isin(shown)].reset_index(drop=True), anchors,
                               highlight=highlight or None)
    body = page.chart(fig, height=700)
    text = ("One frame per epoch (slider / play); stars are anchors; highlighted trajectories are the "
            f"most-changing neurons: {', '.join(f'{l}/{n}' for l, n in highlight) or 'none'}.")
    if len(shown) < len(embedded):
        text += (f" To keep the page light the map shows {len(shown)} of {len(embedded)} embedded epochs "
                 f"(evenly spaced: {', '.join(map(str, shown))}); `conceptmon plot` draws every epoch.")
    return body + note(text)


def changes_body(page: Page, out: Path, manifest: dict, tables: dict, movers: pd.DataFrame) -> str:
    stability = tables["stability"]
    if stability.empty:
        return note("Concept changes need at least two dissected epochs.")
    changes = tables["changes"]
    body = page.chart(stability_figure(stability))
    body += note(f"{len(changes)} top-1 concept changes in total; the {len(movers)} most-changing neurons "
                 f"below, with their top images at the first and the last epoch.")
    if movers.empty:
        return body
    epochs = stats.epochs_of(tables["interpretable"])
    first, last = epochs[0], epochs[-1]
    images = store.read_top_images(out, epochs=sorted({first, last}))
    wanted = pd.MultiIndex.from_arrays([movers["layer"], movers["neuron"]])
    images = images[pd.MultiIndex.from_arrays([images["layer"], images["neuron"]]).isin(wanted)]
    images = images[images["rank"] < THUMBNAILS_PER_EPOCH].sort_values(["epoch", "layer", "neuron", "rank"])
    thumbs = Thumbnails((manifest.get("probe") or {}).get("root"))
    by_neuron = {key: group for key, group in images.groupby(["epoch", "layer", "neuron"], sort=False)}

    def strip(epoch, layer, neuron):
        group = by_neuron.get((epoch, layer, neuron))
        if group is None:
            return '<span class="note">none recorded</span>'
        titles = [f"{p} (activation {a:.3g})" for p, a in zip(group["image"], group["activation"])]
        return thumbs.strip(list(group["image"]), titles)

    view = movers.assign(
        **{f"top images, epoch {first}": [strip(first, l, n) for l, n in zip(movers["layer"], movers["neuron"])],
           f"top images, epoch {last}": [strip(last, l, n) for l, n in zip(movers["layer"], movers["neuron"])]}
    )
    body += html_table(view, raw_columns=(f"top images, epoch {first}", f"top images, epoch {last}"))
    if thumbs.missing:
        body += note(f"{len(thumbs.missing)} image(s) not found under the probe root "
                     f"{(manifest.get('probe') or {}).get('root')}.")
    return body


def _label_from(run_name: str) -> str:
    """A run name made usable as a column-suffix label (letters, digits, _ . -)."""
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_name).strip("_.-")
    return label if label and label != "diff" else "run"


def comparison_section(page: Page, out: Path, other: Path, manifest: dict, labels, log) -> None:
    from .compare import compare_runs

    if labels is None:
        names = tuple(_label_from(str(m.get("run") or folder.name))
                      for m, folder in ((manifest, out), (store.read_manifest(other), other)))
        labels = names if names[0] != names[1] else ("a", "b")
    labels = tuple(labels)
    result = compare_runs(out, other, labels, log=log)
    la, lb = labels
    body = note(f"{la} = {out.resolve()}, {lb} = {other.resolve()}; differences are {lb} - {la}.")
    for fig in comparison_figures(result, labels):
        body += page.chart(fig, height=420)
    counts = result["interpretable"]
    body += "<h3>Interpretable neurons</h3>" + html_table(counts)
    concepts = result["concepts"]
    common = counts.dropna(subset=[f"n_interpretable_{la}", f"n_interpretable_{lb}"])
    if not common.empty:
        epoch = int(common["epoch"].max())
        only = concepts[(concepts["epoch"] == epoch) & concepts["present"].isin([f"{la} only", f"{lb} only"])]
        body += (f"<h3>Concepts present in one run only at epoch {epoch}</h3>"
                 + (html_table(only.drop(columns="epoch")) if not only.empty
                    else note("none: both runs detect the same concepts")))
    page.section("compare", f"Comparison: {la} vs {lb}", body)
