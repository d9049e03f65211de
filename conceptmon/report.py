"""One self-contained HTML report of a run (and optionally a comparison with another).

``OUT/report.html`` opens offline: plotly.js is inlined once in the page head, every
chart is an interactive Plotly div with a "how to read this" line under it, tables are
HTML tables that sort on a header click and scroll inside their card, and top images
are embedded as base64 JPEG thumbnails read from the probe root.

The page is a list of **sections** in the :data:`REPORT_SECTIONS` registry, each a
:class:`ReportSection` (a function of the :class:`ReportContext` that returns HTML, or
None to leave the section out) with an ``order``; :func:`report_run` builds the context
once and walks them. A plugin can add one in the ``conceptmon.report_sections``
entry-point group. Statistics that no section presents are shown as tables in "More
statistics", so a new statistic appears without touching this file.

**Inputs and honesty.** The report reuses the tables in ``OUT/stats`` only when they are
fresh (:func:`conceptmon.stats.check_fresh_stats`); otherwise it computes them and says
why on the page. A stale embedding is re-made with its previous settings (as ``plot``
does); when that is impossible, the page goes without it and names the command. When
there is no embedding at all, the report does not make one (that loads a text encoder:
possibly weights that are not on this machine); it says to run ``conceptmon embed``.
``<meta name="conceptmon-inputs">`` records the hashes of every table read.

**Browser checks.** A small script records JavaScript errors and, once the charts are
drawn, writes ``<div id="conceptmon-selfcheck" data-charts=N data-drawn=M data-errors=K>``
into the page; ``report.html#only=<section>`` shows one section alone (for screenshots,
``scripts/screenshots.py``).
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import yaml
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from . import __version__, figures, stats, store
from .errors import ConceptmonError
from .figures import Chart, count_axis, epoch_axis, layer_colors, share_axis
from .registry import Registry, RegistryError

MAP_PANELS = figures.MAP_PANELS
MAX_CURVE_EPOCHS = figures.RETENTION_CURVES
MOST_CHANGING = 12
"""Neurons shown with their concept trajectory and top images."""
THUMBNAILS_PER_EPOCH = 5
THUMBNAIL_PX = 72
MAX_TABLE_ROWS = 2000
BLANKS = ("blank = unknown or not applicable (e.g. a confidence the dissect tables do not hold, a layer one run "
          "lacks); 0 = none")


class ReportError(ConceptmonError):
    """A report that cannot be written from these results."""


# ----------------------------------------------------------------------------- html pieces

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1200px;margin:0 auto;padding:1rem 1.5rem 4rem}
h1{font-size:1.6rem;margin:.5rem 0}h2{margin-top:.8rem;border-bottom:2px solid #ddd;padding-bottom:.2rem}
nav a{margin-right:1rem}section{background:#fff;padding:.5rem 1rem 1rem;border-radius:6px;
box-shadow:0 1px 3px rgba(0,0,0,.08);margin-bottom:1rem;overflow-x:auto}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}th,td{border:1px solid #ddd;padding:.2rem .5rem;
text-align:left;vertical-align:top}th{background:#f0f0f0;position:sticky;top:0}table.sortable th{cursor:pointer;
user-select:none}table.sortable th:after{content:" \\2195";color:#aaa}td.num{text-align:right;
font-variant-numeric:tabular-nums}.scroll{max-height:28rem;overflow:auto;max-width:100%%}
.note{color:#666;font-size:.9rem}.how{color:#555;font-size:.88rem;margin:.1rem 0 1rem;font-style:italic}
.notice{background:#fff7e0;border-left:4px solid #f0b400;padding:.4rem .8rem}img.thumb{width:%(px)dpx;
height:%(px)dpx;object-fit:cover;margin:1px;border:1px solid #ccc}pre{background:#f6f6f6;padding:.6rem;overflow:auto;
font-size:.8rem}.kv th{width:12rem}.kv td{word-break:break-word}
html.only nav,html.only h1,html.only main>p.note{display:none}
""" % {"px": THUMBNAIL_PX}

# Records errors before anything else runs, then reports how many charts Plotly drew.
SELF_CHECK_HEAD = """<script>
window.__conceptmonErrors=[];
window.addEventListener('error',function(e){window.__conceptmonErrors.push(String(e.message||e));});
(function(){var ce=console.error;console.error=function(){window.__conceptmonErrors.push(
Array.prototype.join.call(arguments,' '));return ce.apply(console,arguments);};})();
</script>"""

# report.html#only=map shows that one section (screenshots of one section at a fixed viewport).
ONLY_SECTION = """<script>
(function(){var m=location.hash.match(/^#only=([A-Za-z0-9_-]+)/);if(!m)return;
document.documentElement.classList.add('only');var st=document.createElement('style');
st.textContent='html.only section:not(#'+m[1]+'){display:none}';document.head.appendChild(st);})();
</script>"""
"""Hides the other sections before anything draws, so the charts get the page's width."""

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
    if value is None or value is pd.NA:
        return '<td class="num" data-v=""></td>'
    if isinstance(value, (bool, np.bool_)):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, (int, np.integer)):
        return f'<td class="num">{int(value)}</td>'
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return '<td class="num" data-v=""></td>'
        return f'<td class="num" data-v="{float(value)!r}">{float(value):.4g}</td>'
    return f"<td>{esc(value)}</td>"


def html_table(table: pd.DataFrame, max_rows: int = MAX_TABLE_ROWS, raw_columns: tuple[str, ...] = ()) -> str:
    """A sortable HTML table that scrolls inside its card; ``raw_columns`` hold ready HTML
    (thumbnails), the rest is escaped. A table with blank cells says what a blank means."""
    shown = table.head(max_rows)
    head = "".join(f"<th>{esc(c)}</th>" for c in shown.columns)
    rows = []
    for values in shown.itertuples(index=False, name=None):
        cells = [f"<td>{v}</td>" if c in raw_columns else _cell(v) for c, v in zip(shown.columns, values)]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = (f'<p class="note">first {max_rows} of {len(table)} rows; all rows are in OUT/stats/</p>'
            if len(table) > max_rows else "")
    data = shown.drop(columns=[c for c in raw_columns if c in shown.columns])
    blanks = note(BLANKS) if len(data) and data.isna().to_numpy().any() else ""
    return (f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>{more}{blanks}')


def kv_table(pairs: list[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{rows}</table>'


def notice(text: str) -> str:
    return f'<p class="notice">{esc(text)}</p>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


class Page:
    """Collects charts; each becomes a div that plotly.js (inlined once) draws, with its reading line."""

    def __init__(self):
        self.n_charts = 0

    def chart(self, chart: Chart, height: int | None = None) -> str:
        self.n_charts += 1
        fig = chart.figure
        height = int(height or fig.layout.height or 420)
        fig.update_layout(height=height, template="plotly_white", title_y=0.98, title_yanchor="top")
        div = pio.to_html(
            fig, full_html=False, include_plotlyjs=False, auto_play=False, div_id=f"chart-{self.n_charts}",
            config={"displaylogo": False, "responsive": True}, default_height=f"{height}px",
        )
        return div + f'<p class="how">How to read this: {esc(chart.how_to_read)}</p>'


# ----------------------------------------------------------------------------- sections


@dataclass
class ReportContext:
    """Everything a section may use, read once by :func:`report_run`."""

    out: Path
    manifest: dict
    tables: dict[str, pd.DataFrame]
    page: Page
    log: Callable[[str], None]
    trust_level: float = stats.DEFAULT_TRUST_LEVEL
    neurons: pd.DataFrame | None = None
    anchors: pd.DataFrame | None = None
    distances: pd.DataFrame | None = None
    embed_meta: dict | None = None
    embedding_note: str | None = None
    stats_note: str = ""
    compare: object | None = None
    inputs: dict = field(default_factory=dict)

    @property
    def epochs(self) -> list[int]:
        return stats.epochs_of(self.tables["interpretable"])

    @property
    def last(self) -> int:
        return self.epochs[-1]

    @property
    def confidence_known(self) -> bool:
        return bool(self.tables["interpretable"]["n_confident"].notna().any())

    @property
    def first(self) -> pd.DataFrame:
        """Top-1 labels per (epoch, layer, neuron) with confidence states (for the map)."""
        if not hasattr(self, "_first"):
            self._first = stats.top1(store.read_dissect(self.out, check=False), self.trust_level)
        return self._first

    @property
    def movers(self) -> pd.DataFrame:
        """The most-changing neurons, counting confident changes only when confidence is known."""
        return stats.most_changing(self.tables["changes"], MOST_CHANGING, confident_only=self.confidence_known)


@dataclass(frozen=True)
class ReportSection:
    """One part of the page: ``render(context)`` returns its HTML, or None to leave it out.

    ``shows`` names the statistics it presents; the "More statistics" section shows the rest.
    """

    name: str
    title: str | Callable[[ReportContext], str]
    order: int
    render: Callable[[ReportContext], str | None]
    shows: tuple[str, ...] = ()

    def heading(self, ctx: ReportContext) -> str:
        return self.title(ctx) if callable(self.title) else self.title


def _check_section(name: str, obj) -> None:
    if not isinstance(obj, ReportSection):
        raise RegistryError(f"report: {name!r} is a {type(obj).__name__}, not a conceptmon.report.ReportSection")


BUILTIN_SECTIONS = {name: f"conceptmon.report:{name.upper()}_SECTION" for name in (
    "summary", "validation", "interpretable", "categories", "map", "retention", "changes", "diversity", "anchors", "concepts",
    "more", "compare")}
REPORT_SECTIONS: Registry[ReportSection] = Registry(
    "report section", group="conceptmon.report_sections", field="report", builtins=BUILTIN_SECTIONS,
    check=_check_section, allow_specs=False)


def sections() -> list[ReportSection]:
    """Every section, by order (then name)."""
    return sorted((obj for _, obj in REPORT_SECTIONS.items()), key=lambda s: (s.order, s.name))


# ----------------------------------------------------------------------------- report charts


def interpretable_chart(counts: pd.DataFrame, confidence_known: bool) -> Chart:
    """Interpretable neurons over epochs per layer; confident ones dashed, dead units dotted."""
    fig = go.Figure()
    layers = list(dict.fromkeys(counts["layer"]))
    colors = layer_colors(layers)
    any_dead = bool(counts["n_dead"].sum())
    for layer in layers:
        group = counts[counts["layer"] == layer]
        extra = dict(line=dict(color=colors[layer]), legendgroup=layer)
        fig.add_trace(go.Scatter(
            x=group["epoch"], y=group["n_interpretable"], mode="lines+markers", name=layer, **extra,
            customdata=np.c_[group["share_interpretable"], group["n_neurons"]],
            hovertemplate="epoch %{x}<br>%{y} of %{customdata[1]} neurons (%{customdata[0]:.1%})"
                          "<extra>" + esc(layer) + "</extra>"))
        if confidence_known:
            fig.add_trace(go.Scatter(
                x=group["epoch"], y=group["n_confident"].astype("Float64").to_numpy(np.float64, na_value=np.nan),
                mode="lines", name=f"{layer} · confident", legendgroup=layer,
                line=dict(color=colors[layer], dash="dash"),
                hovertemplate="epoch %{x}: %{y} confident<extra>" + esc(layer) + "</extra>"))
        if any_dead:
            fig.add_trace(go.Scatter(
                x=group["epoch"], y=group["n_dead"], mode="lines", name=f"{layer} · dead", legendgroup=layer,
                line=dict(color=colors[layer], dash="dot"),
                hovertemplate="epoch %{x}: %{y} dead units<extra>" + esc(layer) + "</extra>"))
    top = float(counts[["n_interpretable", "n_dead"]].to_numpy(float).max()) if len(counts) else 0
    fig.update_layout(title=dict(text="Interpretable neurons per layer"), legend=figures.LEGEND_BELOW,
                      xaxis=epoch_axis(stats.epochs_of(counts)), yaxis=count_axis("neurons", top),
                      margin=dict(t=60, b=40))
    how = ("Solid: interpretable neurons per layer over training"
           + ("; dashed: those whose label is confident" if confidence_known else
              f"; label confidence unknown ({stats.NO_CONFIDENCE}), so no confident line")
           + ("; dotted: dead units (no activation to label)" if any_dead else "; no layer has dead units")
           + ". Hover for the share of the layer.")
    return Chart(fig, how)


def stability_chart(stability: pd.DataFrame, confidence_known: bool) -> Chart:
    fig = go.Figure()
    layers = [l for l in dict.fromkeys(stability["layer"]) if l != stats.ALL_LAYERS]
    colors = layer_colors(layers)
    colors[stats.ALL_LAYERS] = "#000000"
    for layer in [*layers, stats.ALL_LAYERS]:
        group = stability[stability["layer"] == layer]
        fig.add_trace(go.Scatter(
            x=group["epoch_to"], y=group["share_kept"], mode="lines+markers", name=layer, legendgroup=layer,
            line=dict(color=colors[layer], dash="dot" if layer == stats.ALL_LAYERS else "solid"),
            customdata=group["epoch_from"],
            hovertemplate="epoch %{customdata} → %{x}: %{y:.1%} kept<extra>" + esc(layer) + "</extra>"))
        if confidence_known and layer != stats.ALL_LAYERS:
            fig.add_trace(go.Scatter(
                x=group["epoch_to"], y=group["share_confident_kept"], mode="lines", name=f"{layer} · confident",
                legendgroup=layer, line=dict(color=colors[layer], dash="dash"), customdata=group["epoch_from"],
                hovertemplate="epoch %{customdata} → %{x}: %{y:.1%} of confident labels kept<extra>"
                              + esc(layer) + "</extra>"))
    fig.update_layout(title=dict(text="Neurons keeping their top-1 concept since the previous checkpoint"),
                      xaxis=epoch_axis(sorted(set(stability["epoch_to"].astype(int)))),
                      yaxis=share_axis("share kept"), legend=figures.LEGEND_BELOW, margin=dict(t=60, b=40))
    how = ("Each point: of a layer's live neurons at the previous checkpoint, the share with the same top-1 concept "
           "at this one ('all' pools the layers)"
           + ("; dashed: among labels that were confident." if confidence_known else "."))
    return Chart(fig, how)


def diversity_chart(diversity: pd.DataFrame) -> Chart:
    metrics = [("n_distinct_concepts", "distinct top-1 concepts"), ("entropy_bits", "entropy (bits)")]
    if diversity["mean_cosine_distance"].notna().any():
        metrics.append(("mean_cosine_distance", "mean cosine distance"))
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[t for _, t in metrics])
    layers = list(dict.fromkeys(diversity["layer"]))
    colors = layer_colors(layers)
    epochs = stats.epochs_of(diversity)
    for j, (column, title) in enumerate(metrics):
        for layer in layers:
            group = diversity[diversity["layer"] == layer]
            fig.add_trace(go.Scatter(
                x=group["epoch"], y=group[column], mode="lines+markers", name=layer, legendgroup=layer,
                showlegend=j == 0, line=dict(color=colors[layer]),
                hovertemplate="epoch %{x}: %{y:.4g}<extra>" + esc(f"{layer} · {title}") + "</extra>",
            ), row=1, col=j + 1)
        fig.update_xaxes(**epoch_axis(epochs), row=1, col=j + 1)
    fig.update_yaxes(**count_axis("distinct concepts", float(diversity["n_distinct_concepts"].max())), row=1, col=1)
    fig.update_yaxes(title_text="bits", row=1, col=2)
    if len(metrics) == 3:
        fig.update_yaxes(title_text="1 − cos", row=1, col=3)
    fig.update_layout(title=dict(text="Diversity and spread of the neurons"), legend=figures.LEGEND_BELOW,
                      margin=dict(t=70, b=40))
    how = ("Left: how many different top-1 concepts a layer's live neurons have; middle: the entropy of that "
           "distribution (higher = more evenly spread)"
           + ("; right: mean pairwise cosine distance of the neuron embeddings (higher = spread out)."
              if len(metrics) == 3 else "; the embedding spread needs `conceptmon embed`."))
    return Chart(fig, how)


def anchor_chart(anchor_distance: pd.DataFrame) -> Chart:
    pooled = anchor_distance[anchor_distance["layer"] == stats.ALL_LAYERS]
    fig = go.Figure()
    for i, (anchor, group) in enumerate(pooled.groupby("anchor", sort=True)):
        fig.add_trace(go.Scatter(
            x=group["epoch"], y=group["mean_distance"], mode="lines+markers", name=anchor,
            line=dict(color=figures.PALETTE[i % len(figures.PALETTE)]),
            hovertemplate="epoch %{x}: %{y:.4f}<extra>" + esc(anchor) + "</extra>"))
    k = int(anchor_distance["k"].iloc[0]) if len(anchor_distance) else 0
    fig.update_layout(title=dict(text=f"Mean distance of the {k} nearest neurons (all layers) to each anchor"),
                      xaxis=epoch_axis(stats.epochs_of(pooled)), yaxis=dict(title=dict(text="cosine distance")),
                      legend=figures.LEGEND_BELOW, margin=dict(t=60, b=40))
    return Chart(fig, f"Lower = the {k} neurons nearest to the anchor word are closer to it in the embedding space.")


def comparison_lines_chart(result) -> Chart:
    la, lb = result.labels
    counts = result["interpretable"]
    layers = list(dict.fromkeys(counts["layer"]))
    colors = layer_colors(layers)
    use_shares = bool(result.widths_differ)
    value = "share_interpretable" if use_shares else "n_interpretable"
    fig = go.Figure()
    for layer in layers:
        group = counts[counts["layer"] == layer]
        for label, dash in ((la, "solid"), (lb, "dash")):
            part = group.dropna(subset=[f"{value}_{label}"])
            fig.add_trace(go.Scatter(
                x=part["epoch"], y=part[f"{value}_{label}"], mode="lines+markers", name=f"{layer} · {label}",
                legendgroup=layer, line=dict(color=colors[layer], dash=dash),
                hovertemplate="epoch %{x}: %{y" + (":.1%" if use_shares else "") + "}<extra>"
                              + esc(f"{layer} · {label}") + "</extra>"))
    yaxis = (dict(title=dict(text="share of the layer's neurons interpretable"), tickformat=".0%", rangemode="tozero")
             if use_shares else count_axis("interpretable neurons", float(np.nanmax(
                 counts[[f"n_interpretable_{la}", f"n_interpretable_{lb}"]].to_numpy(float)))))
    fig.update_layout(title=dict(text=f"Interpretable neurons per layer: {esc(la)} (solid) vs {esc(lb)} (dashed)"),
                      xaxis=epoch_axis(stats.epochs_of(counts)), yaxis=yaxis, legend=figures.LEGEND_BELOW,
                      margin=dict(t=60, b=40))
    how = (f"Solid: {la}, dashed: {lb}, one colour per layer"
           + ("; layer widths differ between the runs, so the lines are shares of each layer's neurons." if use_shares
              else "."))
    return Chart(fig, how)


# ----------------------------------------------------------------------------- thumbnails


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


def most_changing(changes: pd.DataFrame, n: int = MOST_CHANGING, *, confident_only: bool = False) -> pd.DataFrame:
    """See :func:`conceptmon.stats.most_changing`."""
    return stats.most_changing(changes, n, confident_only=confident_only)


# ----------------------------------------------------------------------------- built-in sections


def render_summary(ctx: ReportContext) -> str:
    manifest, out, epochs = ctx.manifest, ctx.out, ctx.epochs
    config = manifest.get("config") or {}
    detector = manifest.get("detector") or {}
    probe = manifest.get("probe") or {}
    concepts = manifest.get("concepts") or {}
    encoder = (ctx.embed_meta or {}).get("encoder") or (config.get("embedding") or {}).get("encoder")
    trust = config.get("trust") or {}
    confidence = (f"bootstrap with {trust.get('replicates')} replicates; confident = confidence ≥ {ctx.trust_level:g}"
                  if ctx.confidence_known else f"unknown ({stats.NO_CONFIDENCE})")
    pairs = [
        ("run", manifest.get("run", "")),
        ("output folder", Path(out).resolve()),
        ("model", (config.get("model") or {}).get("arch", "")),
        ("layers", ", ".join(manifest.get("layers") or [])),
        ("checkpoints", manifest.get("checkpoints", "")),
        ("epochs", f"{len(epochs)}: {stats.format_epochs(epochs)}" if epochs else "none"),
        ("detector", ", ".join(f"{k}={v}" for k, v in detector.items())),
        ("label confidence", confidence),
        ("probe", f"{probe.get('name', '')}: {probe.get('n_images', '?')} images at {probe.get('root', '?')} "
                  f"(fingerprint {probe.get('fingerprint', '?')})"),
        ("concept set", f"{concepts.get('source', '')}: {len(concepts.get('names') or [])} concepts "
                        f"(fingerprint {concepts.get('fingerprint', '?')})"),
        ("text encoder", encoder or "?"),
        ("statistics", ctx.stats_note),
    ]
    body = kv_table(pairs)
    if ctx.embedding_note:
        body += notice(ctx.embedding_note)
    versions = manifest.get("versions") or {}
    records = [{"epoch": int(e), "checkpoint": r.get("checkpoint", ""), "sha256": str(r.get("sha256", ""))[:16],
                "dissect table sha256": str((r.get("tables") or {}).get("dissect", ""))[:16]}
               for e, r in sorted((manifest.get("epochs") or {}).items(), key=lambda kv: int(kv[0]))]
    body += "<h3>Versions</h3>" + kv_table(sorted(versions.items()))
    body += "<h3>Checkpoints</h3>" + html_table(pd.DataFrame(
        records, columns=["epoch", "checkpoint", "sha256", "dissect table sha256"]))
    body += ("<details><summary>Configuration</summary><pre>" + esc(yaml.safe_dump(config, sort_keys=False))
             + "</pre></details>")
    return body


def render_interpretable(ctx: ReportContext) -> str:
    counts = ctx.tables["interpretable"]
    body = ctx.page.chart(interpretable_chart(counts, ctx.confidence_known), height=420)
    return body + html_table(counts)


def render_categories(ctx: ReportContext) -> str:
    categories = ctx.tables["categories"]
    shown = stats.spread_epochs(ctx.epochs, figures.CATEGORY_PANELS)
    body = ctx.page.chart(figures.categories_figure(categories, shown), height=460)
    if len(shown) < len(ctx.epochs):
        body += note(f"Epochs {', '.join(map(str, shown))} of {len(ctx.epochs)} (first, last, evenly spaced); "
                     "`conceptmon plot --figure categories --epochs ...` draws others.")
    return body + f"<h3>At epoch {ctx.last}</h3>" + html_table(categories[categories["epoch"] == ctx.last])


def render_map(ctx: ReportContext) -> str:
    if ctx.neurons is None or ctx.neurons.empty:
        message = ctx.embedding_note or (
            f"No embedding yet ({store.embed_dir(ctx.out)} is missing): run `conceptmon embed --out {ctx.out}` "
            "(add --anchors WORD,... for anchor stars), then `conceptmon report` again.")
        ctx.log(f"notice: report without the embedding map: {message}")
        return notice(message)
    embedded = stats.epochs_of(ctx.neurons)
    shown = stats.spread_epochs(embedded, MAP_PANELS)
    trajectories = figures.choose_trajectories(ctx.neurons, ctx.first, shown, distances=ctx.distances)
    meta = ctx.embed_meta or {}
    chart = figures.map_figure(
        ctx.neurons, ctx.first, ctx.anchors, shown, trajectories=trajectories,
        anchor_source=meta.get("anchor_source"), method=(meta.get("settings") or {}).get("map_method", "umap"))
    body = ctx.page.chart(chart, height=560)
    text = f"Epochs {', '.join(map(str, shown))}"
    if len(shown) < len(embedded):
        text += (f" of {len(embedded)} embedded (first, last, evenly spaced); `conceptmon plot` draws every epoch "
                 "as an animation, `conceptmon plot --figure map --epochs ...` other panels")
    text += ". Trajectories: " + (", ".join(f"{l}:{n} ({why})" for l, n, why in trajectories) or
                                  "none (no neuron is interpretable and confident at the last epoch shown, and moves)") + "."
    return body + note(text)


def render_retention(ctx: ReportContext) -> str:
    retained = ctx.tables["retention"]
    if retained.empty:
        return note("Retention needs at least two dissected epochs.")
    later = stats.epochs_of(retained)
    shown = stats.spread_epochs(later, MAX_CURVE_EPOCHS)
    n_layers = retained["layer"].nunique()
    body = ctx.page.chart(figures.retention_figure(retained, shown, confidence_known=ctx.confidence_known),
                          height=380 * figures.grid(n_layers, 4)[0] + 60)
    if len(shown) < len(later):
        body += note(f"Curves for {len(shown)} of {len(later)} later epochs (evenly spaced, last included); "
                     "the full table is in OUT/stats (`conceptmon stats --format csv --table retention`).")
    body += note("Neurons ranked by best score at the reference epoch, ties by neuron id; top x % = "
                 "ceil(x·n/100) live neurons of a layer; 'all' pools the per-layer selections.")
    return body


def render_changes(ctx: ReportContext) -> str:
    tables = ctx.tables
    stability = tables["stability"]
    if stability.empty:
        return note("Concept changes need at least two dissected epochs.")
    changes = tables["changes"]
    movers = ctx.movers
    body = ctx.page.chart(stability_chart(stability, ctx.confidence_known))
    if ctx.confidence_known:
        n_confident = int(changes["confident"].fillna(False).sum())
        body += note(f"{len(changes)} top-1 concept changes in total, {n_confident} of them confident (both labels' "
                     f"confidence ≥ {ctx.trust_level:g})."
                     + (f" The {_neurons(len(movers))} with the most confident changes below (a ? marks an uncertain "
                        "step), with top images at the first and the last epoch." if len(movers) else ""))
    else:
        body += note(f"{len(changes)} top-1 concept changes in total; label confidence is unknown ({stats.NO_CONFIDENCE}), "
                     f"so none is called confident. The {_neurons(len(movers))} with the most changes below, with top "
                     "images at the first and the last epoch.")
    if movers.empty:
        return body + (note("No confident change: every change involves an uncertain label.") if len(changes) else "")
    first, last = ctx.epochs[0], ctx.epochs[-1]
    images = store.read_top_images(ctx.out, epochs=sorted({first, last}))
    wanted = pd.MultiIndex.from_arrays([movers["layer"], movers["neuron"]])
    images = images[pd.MultiIndex.from_arrays([images["layer"], images["neuron"]]).isin(wanted)]
    images = images[images["rank"] < THUMBNAILS_PER_EPOCH].sort_values(["epoch", "layer", "neuron", "rank"])
    thumbs = Thumbnails((ctx.manifest.get("probe") or {}).get("root"))
    by_neuron = {key: group for key, group in images.groupby(["epoch", "layer", "neuron"], sort=False)}

    def strip(epoch, layer, neuron):
        group = by_neuron.get((epoch, layer, neuron))
        if group is None:
            return '<span class="note">none recorded</span>'
        titles = [f"{p} (activation {a:.3g})" for p, a in zip(group["image"], group["activation"])]
        return thumbs.strip(list(group["image"]), titles)

    view = movers.assign(
        **{f"top images, epoch {first}": [strip(first, l, n) for l, n in zip(movers["layer"], movers["neuron"])],
           f"top images, epoch {last}": [strip(last, l, n) for l, n in zip(movers["layer"], movers["neuron"])]})
    body += html_table(view, raw_columns=(f"top images, epoch {first}", f"top images, epoch {last}"))
    if thumbs.missing:
        body += note(f"{len(thumbs.missing)} image(s) not found under the probe root "
                     f"{(ctx.manifest.get('probe') or {}).get('root')}.")
    return body


def _neurons(n: int) -> str:
    return "neuron" if n == 1 else f"{n} neurons"


def render_diversity(ctx: ReportContext) -> str:
    diversity = ctx.tables["diversity"]
    return (ctx.page.chart(diversity_chart(diversity), height=400)
            + html_table(diversity[diversity["epoch"] == ctx.last]))


def render_anchors(ctx: ReportContext) -> str | None:
    if "anchor_distance" not in ctx.tables or ctx.tables["anchor_distance"].empty:
        return None
    near = ctx.tables["anchor_neighbors"]
    latest = near[near["epoch"] == near.groupby("anchor")["epoch"].transform("max")]
    return (ctx.page.chart(anchor_chart(ctx.tables["anchor_distance"]))
            + "<h3>Nearest neurons (latest epoch per anchor)</h3>" + html_table(latest))


def render_concepts(ctx: ReportContext) -> str:
    concepts = ctx.tables["concepts"]
    return html_table(concepts[concepts["epoch"] == ctx.last].drop(columns="epoch"))


def render_validation(ctx: ReportContext) -> str | None:
    """``conceptmon validate``'s last result: does the detector name the classifier's output
    units by their classes? Flagged when it was made from other checkpoints than the tables."""
    path = Path(ctx.out) / store.VALIDATE
    if not path.exists():
        return None
    report = store.read_json(path)
    rows = report.get("results") or []
    if not rows:
        return None
    records = store.read_epoch_records(ctx.out)
    stale = [r["epoch"] for r in rows if r.get("sha256") and (records.get(int(r["epoch"])) or {}).get("sha256")
             not in (None, r["sha256"])]
    table = pd.DataFrame([{"epoch": r["epoch"], "layer": r["layer"], "units": r["n_units"], "top-1": r["top1"],
                           "top-5": r["top5"], "misses": ", ".join(f"{m['class']} → {m['top'][0] if m['top'] else '-'}"
                                                                   for m in r["misses"]) or "none"}
                          for r in rows])
    body = html_table(table) + note(
        "How to read this: the classifier's output unit i should be labelled with class i; top-1 is the share "
        "named exactly (CLIP-Dissect's final-layer accuracy), top-5 the share with the class among the first five. "
        "A miss reads class → the concept the detector chose.")
    unknown = sorted({c for r in rows for c in r.get("not_in_concepts", [])})
    if unknown:
        body += notice(f"Classes not in the concept set (they cannot be named and count as misses): "
                       f"{', '.join(unknown)}.")
    if stale:
        body += notice(f"Made from other checkpoints than the tables for epochs {stale}; re-run `conceptmon validate`.")
    ctx.inputs["validate"] = store.sha256_file(path)
    return body


def render_more(ctx: ReportContext) -> str | None:
    """Every statistic no other section presents (e.g. one a plugin registered)."""
    shown = {name for section in sections() for name in section.shows}
    parts = []
    for statistic in stats.statistics():
        if statistic.name in shown or statistic.name not in ctx.tables:
            continue
        parts.append(f"<h3>{esc(statistic.title)}</h3>" + (note(statistic.description) if statistic.description else "")
                     + html_table(ctx.tables[statistic.name]))
    return "".join(parts) or None


def render_compare(ctx: ReportContext) -> str | None:
    result = ctx.compare
    if result is None:
        return None
    la, lb = result.labels
    body = "".join(note(line) for line in result.notes())
    body += ctx.page.chart(comparison_lines_chart(result), height=420)
    try:
        body += ctx.page.chart(figures.compare_figure(result))
    except figures.FigureError as e:
        body += note(str(e))
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
    return body


def _compare_title(ctx: ReportContext) -> str:
    la, lb = ctx.compare.labels if ctx.compare is not None else ("a", "b")
    return f"Comparison: {la} vs {lb}"


SUMMARY_SECTION = ReportSection("summary", "Run summary", 10, render_summary)
VALIDATION_SECTION = ReportSection("validation", "Self-check: classifier units named by their classes", 15,
                                   render_validation)
INTERPRETABLE_SECTION = ReportSection("interpretable", "Interpretable neurons over epochs", 20, render_interpretable,
                                      shows=("interpretable",))
CATEGORIES_SECTION = ReportSection("categories", "Categories per layer and epoch", 30, render_categories,
                                   shows=("categories",))
MAP_SECTION = ReportSection("map", "Embedding map", 40, render_map)
RETENTION_SECTION = ReportSection("retention", "Retention of concepts", 50, render_retention, shows=("retention",))
CHANGES_SECTION = ReportSection("changes", "Concept changes", 60, render_changes, shows=("changes", "stability"))
DIVERSITY_SECTION = ReportSection("diversity", "Diversity and spread", 70, render_diversity, shows=("diversity",))
ANCHORS_SECTION = ReportSection("anchors", "Anchors", 80, render_anchors,
                                shows=("anchor_neighbors", "anchor_distance"))
CONCEPTS_SECTION = ReportSection("concepts", lambda ctx: f"Neurons per top-1 concept at epoch {ctx.last}", 90,
                                 render_concepts, shows=("concepts",))
MORE_SECTION = ReportSection("more", "More statistics", 95, render_more)
COMPARE_SECTION = ReportSection("compare", _compare_title, 100, render_compare)


# ----------------------------------------------------------------------------- the run


def current_embedding(out: Path, log: Callable[[str], None]) -> tuple[store.Generation | None, str | None]:
    """The fresh embed generation (re-made with its previous settings when stale), and a note for the page."""
    from .embedding import embed_generation, embed_like_before

    try:
        return embed_generation(out), None
    except store.StaleError as e:
        log(f"report: {e}; re-running embed with its previous settings")
        try:
            embed_like_before(out, log=log)
            return embed_generation(out), f"The embedding was stale ({e}); it was re-made with its previous settings."
        except ConceptmonError as again:
            log(f"notice: report without the embedding: {again}")
            return None, (f"The embedding is stale and could not be re-made here ({again}); the map and the "
                          f"embedding statistics are left out: run `conceptmon embed --out {out}`.")


def render_page(ctx: ReportContext) -> str:
    parts, nav = [], []
    for section in sections():
        body = section.render(ctx)
        if body is None:
            continue
        title = section.heading(ctx)
        nav.append(f'<a href="#{esc(section.name)}">{esc(title)}</a>')
        parts.append(f'<section id="{esc(section.name)}"><h2>{esc(title)}</h2>{body}</section>')
    title = f"conceptmon report: {ctx.manifest.get('run', ctx.out.name)}"
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    subtitle = f"generated {generated} by conceptmon {__version__} from {ctx.out.resolve()}"
    inputs = esc(json.dumps(ctx.inputs, sort_keys=True))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
        f"<meta name=\"conceptmon-inputs\" content=\"{inputs}\">"
        f"<style>{CSS}</style>{SELF_CHECK_HEAD}{ONLY_SECTION}<script type=\"text/javascript\">{get_plotlyjs()}</script>"
        f"</head><body><main><h1>{esc(title)}</h1><p class=\"note\">{esc(subtitle)}</p><nav>{''.join(nav)}</nav>"
        f"{''.join(parts)}</main>{SORT_SCRIPT}{SELF_CHECK_TAIL}</body></html>\n"
    )


def report_inputs(out: Path) -> dict | None:
    """The ``conceptmon-inputs`` record of ``OUT/report.html`` (None when there is no report)."""
    import re

    path = store.report_path(out)
    if not path.exists():
        return None
    match = re.search(r'<meta name="conceptmon-inputs" content="([^"]*)">', path.read_text(encoding="utf-8"))
    return json.loads(html.unescape(match.group(1))) if match else None


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
    gen, embedding_note = current_embedding(out, log)
    tables, why = stats.check_fresh_stats(out)
    stats_gen = store.read_generation(out, store.STATS) if tables is not None else None
    if tables is not None:
        log(f"report: using the up-to-date statistics in {stats_gen.folder}")
        lineage = stats_gen.record["inputs"]
        stats_note = f"the up-to-date tables of {stats_gen.folder.relative_to(out)}"
    else:
        inputs = stats.load_inputs(out, log=log, with_embedding=gen is not None)
        tables, lineage = stats.compute_stats(inputs), inputs.lineage
        stats_note = f"computed for this report: the tables in {store.stats_dir(out)} are not used because {why}"
    ctx = ReportContext(out=out, manifest=manifest, tables=tables, page=Page(), log=log,
                        trust_level=stats.trust_level_of(manifest), embedding_note=embedding_note,
                        stats_note=stats_note)
    if stats_gen is None:
        ctx._first = inputs.first  # the very labels the statistics were computed from
    if gen is not None:
        ctx.embed_meta = gen.record
        ctx.neurons = stats.read_neuron_embeddings(gen.path(store.EMBED_FILES["neurons"]), with_vectors=False)[0]
        anchors_path = gen.path(store.EMBED_FILES["anchors"])
        ctx.anchors = store.read_table(anchors_path, store.ANCHORS) if anchors_path.exists() else None
        distances = store.read_table(gen.path(store.EMBED_FILES["neuron_anchor_distance"]), store.NEURON_ANCHOR_DISTANCE)
        ctx.distances = distances if len(distances) else None
    if compare is not None:
        from .compare import compare_runs

        ctx.compare = compare_runs(out, Path(compare), labels, log=log)
    ctx.inputs = {"dissect": lineage.get("dissect"), "embed": lineage.get("embed"),
                  "stats": ({"generation": stats_gen.record.get("generation"), "files": stats_gen.record.get("files"),
                             "reused": True} if stats_gen is not None else {"reused": False, "why": why})}
    if ctx.compare is not None:
        ctx.inputs["compare"] = {"out": str(Path(compare).resolve())}
    text = render_page(ctx)
    path = store.report_path(out)
    store.write_text(path, text)
    log(f"wrote {path} ({len(text) / 1e6:.1f} MB, {ctx.page.n_charts} charts)")
    return path


__all__ = ["REPORT_SECTIONS", "ReportContext", "ReportError", "ReportSection", "report_inputs", "report_run",
           "sections"]
