"""The HTML report: self-contained, every chart drawn in a real headless browser, fast."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from conceptmon import report, stats, store
from conceptmon.cli import main

from .figure_checks import check_figure, report_figures
from .fixtures_runs import make_run, set_neuron, write_embedding, write_epoch
from .test_stats import TOP1, distance_rows, make_out, neuron_rows

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "")
                 if p and Path(p).exists()), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install chromium); .ci/run installs it")

try:
    from conceptmon.plots import embedding_map_figure  # noqa: F401
    HAVE_PLOTS = True
except ImportError:
    HAVE_PLOTS = False


def probe_with_images(tmp_path) -> Path:
    root = tmp_path / "probe"
    (root / "imgs").mkdir(parents=True)
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0)]):
        Image.new("RGB", (40, 30), color).save(root / "imgs" / f"img_{i}.png")
    return root


def top_images(epoch: int) -> pd.DataFrame:
    """Two images per neuron; conv neuron 3 (a mover) points at a file that does not exist."""
    rows = []
    for layer, n in (("conv", 4), ("fc", 3)):
        for neuron in range(n):
            for rank in range(2):
                image = "imgs/gone.png" if (layer, neuron, rank) == ("conv", 3, 1) else f"imgs/img_{(neuron + rank + epoch) % 4}.png"
                rows.append(dict(epoch=epoch, layer=layer, neuron=neuron, rank=rank, image=image, activation=2.0 - rank))
    return pd.DataFrame(rows)


@pytest.fixture
def run_with_images(tmp_path):
    root = probe_with_images(tmp_path)
    return make_out(tmp_path, "standard", probe_root=root, top_images=top_images)


def chart_divs(text: str) -> int:
    return len(re.findall(r'class="plotly-graph-div"', text))


def test_report_is_self_contained_with_plotly_once(run_with_images, tmp_path):
    other = make_out(tmp_path, "robust")
    path = report.report_run(run_with_images, compare=other, log=lambda m: None)
    assert path == run_with_images / "report.html"
    text = path.read_text(encoding="utf-8")
    banner = re.match(r"/\*\*?\s*\*?\s*plotly\.js v[0-9.]+", report.get_plotlyjs().lstrip()).group(0)
    assert text.count(banner) == 1  # plotly.js inlined exactly once
    # opens offline: no external scripts, and no URL outside plotly.js's own (unused) defaults
    assert not re.search(r"<script[^>]+src=", text)
    assert not re.search(r"https?://", text.replace(report.get_plotlyjs(), ""))
    # interpretable, categories, retention, stability, diversity, anchors, 2 comparison charts (+ the map)
    assert chart_divs(text) == 8 + HAVE_PLOTS
    for anchor in ("summary", "interpretable", "categories", "map", "retention", "changes", "diversity", "anchors",
                   "concepts", "compare"):
        assert f'<section id="{anchor}">' in text
    assert "Comparison: standard vs robust" in text
    assert text.count('<table class="sortable">') >= 8
    # movers' top images are embedded thumbnails; the absent file is named, not fatal
    assert text.count("data:image/jpeg;base64,") >= 5 * 2
    assert "[missing]" in text and "1 image(s) not found under the probe root" in text
    assert "striped (ep 1) → windmill (ep 2)" in text
    # the run summary carries config, versions and checkpoints
    assert "/ckpts/standard/epoch_5.pt" in text and "torch" in text and "resnet18" in text


def test_report_without_embedding_says_how_to_make_it(tmp_path):
    out = make_out(tmp_path, embed=False)
    messages = []
    text = report.report_run(out, log=messages.append).read_text(encoding="utf-8")
    assert f"run `conceptmon embed --out {out}`" in text
    assert any("notice: report without the embedding map" in m for m in messages)
    assert '<section id="anchors">' not in text
    assert chart_divs(text) == 5


def test_report_escapes_names_from_the_tables(tmp_path):
    out = make_out(tmp_path, name="x<script>alert(1)</script>", embed=False)
    text = report.report_run(out, log=lambda m: None).read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in text
    assert "x&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_most_changing_orders_by_changes_then_layer_and_neuron():
    changes = pd.DataFrame({
        "layer": ["b", "a", "a", "b", "b"], "neuron": [1, 2, 2, 0, 1],
        "epoch_from": [1, 1, 2, 1, 2], "epoch_to": [2, 2, 3, 2, 3],
        "concept_from": ["x", "p", "q", "m", "y"], "concept_to": ["y", "q", "r", "n", "z"],
        "confident": pd.array([True, True, False, True, True], dtype="boolean"),
    })
    movers = report.most_changing(changes, n=2)
    assert list(zip(movers.layer, movers.neuron, movers.n_changes)) == [("a", 2, 2), ("b", 1, 2)]
    assert movers.trail.iloc[1] == "x (ep 1) → y (ep 2) → z (ep 3)"
    # counting confident changes only: a/2 has one, b/1 two; the uncertain step is marked
    movers = report.most_changing(changes, n=3, confident_only=True)
    assert list(zip(movers.layer, movers.neuron, movers.n_changes)) == [("b", 1, 2), ("a", 2, 1), ("b", 0, 1)]
    assert movers.trail.iloc[1] == "p (ep 1) → q (ep 2) → r? (ep 3)"


def test_cli_report_prints_the_path(run_with_images):
    result = CliRunner().invoke(main, ["report", "--out", str(run_with_images)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(run_with_images / "report.html")


# ----------------------------------------------------------------------------- a real browser


def browser_selfcheck(page: Path, tmp_path: Path) -> dict:
    """Open ``page`` in headless Chromium and read the self-check marker the page writes."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=20000",
        "--dump-dom", page.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    marker = re.search(r'<div id="conceptmon-selfcheck"([^>]*)>(.*?)</div>', done.stdout, re.S)
    assert marker, f"no self-check marker in the DOM (chromium exit {done.returncode}): {done.stderr[-2000:]}"
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', marker.group(1)))
    return {"charts": int(attrs["charts"]), "drawn": int(attrs["drawn"]), "errors": int(attrs["errors"]),
            "messages": marker.group(2)}


@pytest.mark.slow  # starts a browser
@needs_chromium
def test_report_renders_in_headless_chromium(run_with_images, tmp_path):
    other = make_out(tmp_path, "robust")
    page = report.report_run(run_with_images, compare=other, log=lambda m: None)
    check = browser_selfcheck(page, tmp_path)
    assert check["errors"] == 0, check["messages"]
    assert check["charts"] == chart_divs(page.read_text(encoding="utf-8")) >= 8
    assert check["drawn"] == check["charts"]


@pytest.mark.slow
def test_every_report_chart_keeps_the_figure_invariants(tmp_path):
    out = make_run(tmp_path / "out", epochs=[0, 1, 2, 3], layers=["layer3", "layer4"], n_neurons=24,
                   embedding={"encoder": "hashvec", "map_method": "pca"}, run="small")
    from conceptmon.embedding import embed_run

    embed_run(out, anchors=["windmill", "field"], log=lambda m: None)
    other = make_run(tmp_path / "other", epochs=[0, 1, 2, 3], layers=["layer3", "layer4"], n_neurons=24, seed=4,
                     embedding={"encoder": "hashvec", "map_method": "pca"}, run="other")
    page = report.report_run(out, compare=other, log=lambda m: None)
    charts = report_figures(page)
    assert len(charts) == chart_divs(page.read_text(encoding="utf-8"))
    for chart in charts:
        check_figure(chart)
    text = page.read_text(encoding="utf-8")
    assert text.count('<p class="how">How to read this: ') == len(charts)  # one reading line per chart
    the_map = next(c for c in charts if any(str(t.get("name", "")).startswith("anchors") for t in c["data"]))
    assert {tuple(t["text"]) for t in the_map["data"] if t["name"] == "anchors"} == {("windmill", "field")}
    first = stats.top1(store.read_dissect(out))
    shown = sorted({int(a["text"].split()[1]) for a in the_map["layout"]["annotations"]})
    drawn = [t["name"] for t in the_map["data"] if str(t.get("legendgroup", "")).startswith("traj:")]
    assert drawn, "the map draws no trajectory"
    for name in set(drawn):
        layer, neuron = name.rsplit(":", 1)
        mine = first[(first.layer == layer) & (first.neuron == int(neuron)) & first.epoch.isin(shown)]
        assert mine["interpretable"].all() and mine.sort_values("epoch")["state"].iloc[-1] == stats.CONFIDENT


@needs_chromium
@pytest.mark.slow
def test_screenshots_of_each_section_at_a_fixed_viewport(run_with_images, tmp_path):
    page = report.report_run(run_with_images, log=lambda m: None)
    dest = tmp_path / "shots"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshots.py"), str(run_with_images), str(dest),
                           "--width", "1200", "--height", "900"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    sections = re.findall(r'<section id="([a-z-]+)">', page.read_text(encoding="utf-8"))
    assert {"summary", "interpretable", "categories", "map", "retention", "changes"} <= set(sections)
    shots = {p.stem: p for p in dest.glob("*.png")}
    assert done.stdout.split() == [str(dest / f"{n}.png") for n in sections] and sorted(shots) == sorted(sections)
    pixels = {}
    for name, path in shots.items():
        with Image.open(path) as im:
            assert im.size == (1200, 900)
            pixels[name] = np.asarray(im.convert("L"), dtype=np.int16)
        assert pixels[name].std() > 10, f"{name} screenshot is blank"
    assert np.abs(pixels["map"] - pixels["categories"]).mean() > 5  # each shows its own section
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshots.py"), str(run_with_images), str(dest),
                          "--sections", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "--sections: nope not in" in bad.stderr
    assert page.exists()


@pytest.mark.slow
def test_report_records_its_inputs_and_never_calls_stale_stats_fresh(tmp_path):
    out = make_out(tmp_path)
    stats.stats_run(out, log=lambda m: None)
    messages = []
    report.report_run(out, log=messages.append)
    inputs = report.report_inputs(out)
    gen = store.read_generation(out, store.STATS)
    assert inputs["stats"] == {"generation": gen.record["generation"], "files": gen.record["files"], "reused": True}
    assert inputs["dissect"] == store.dissect_inputs(store.read_epoch_records(out))
    assert inputs["embed"]["generation"] == store.read_generation(out, store.EMBED).record["generation"]
    assert any("using the up-to-date statistics" in m for m in messages)

    table = store.read_table(store.dissect_path(out, 5), store.DISSECT)
    table.loc[table["rank"] == 0, "score"] = 0.5
    write_epoch(out, 5, table)  # epoch 5 redone...
    write_embedding(out, neuron_rows(), distance_rows())  # ...and embedded again; the stats are now stale
    messages.clear()
    text = report.report_run(out, log=messages.append).read_text(encoding="utf-8")
    inputs = report.report_inputs(out)
    assert inputs["stats"] == {"reused": False, "why": "the dissect tables and embedding changed since they were computed"}
    assert inputs["dissect"]["5"] == store.sha256_file(store.dissect_path(out, 5))
    assert not any("up-to-date" in m for m in messages)
    assert "computed for this report: the tables in" in text and "up-to-date" not in text


@pytest.mark.slow
def test_report_remakes_a_stale_embedding_with_its_settings(tmp_path):
    from conceptmon.embedding import embed_run, read_embed_meta

    out = make_run(tmp_path / "out", epochs=[1, 2], layers=["l"], n_neurons=6,
                   embedding={"encoder": "hashvec", "map_method": "pca"})
    embed_run(out, anchors=["field"], temperature=0.5, log=lambda m: None)
    set_neuron(out, 2, "l", 1, ["windmill"], [0.2])
    messages = []
    text = report.report_run(out, log=messages.append).read_text(encoding="utf-8")
    assert any("re-running embed with its previous settings" in m for m in messages)
    assert "The embedding was stale" in text
    meta = read_embed_meta(out)
    assert meta["settings"]["anchors"] == ["field"] and meta["settings"]["temperature"] == 0.5
    assert report.report_inputs(out)["embed"]["generation"] == meta["generation"]


def test_report_without_a_remakeable_embedding_says_so(tmp_path):
    out = make_out(tmp_path)
    write_embedding(out, neuron_rows(), distance_rows(), settings={"encoder": "no-such-encoder"})
    table = store.read_table(store.dissect_path(out, 2), store.DISSECT)
    table.loc[table["rank"] == 0, "score"] = 0.5
    write_epoch(out, 2, table)  # the embedding is stale, and its encoder does not exist here
    messages = []
    text = report.report_run(out, log=messages.append).read_text(encoding="utf-8")
    assert any(m.startswith("notice: report without the embedding:") for m in messages)
    assert "The embedding is stale and could not be re-made here" in text
    assert f"run `conceptmon embed --out {out}`" in text
    assert report.report_inputs(out)["embed"] is None


@pytest.mark.slow  # starts a browser
@needs_chromium
def test_browser_check_catches_errors_and_undrawn_charts(tmp_path):
    # The harness must be able to fail: a page whose chart never draws and whose script throws.
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head>" + report.SELF_CHECK_HEAD + "</head><body>"
        '<div class="plotly-graph-div"></div><script>Plotly.newPlot("x", []);</script>'
        + report.SELF_CHECK_TAIL + "</body></html>", encoding="utf-8")
    check = browser_selfcheck(page, tmp_path)
    assert (check["charts"], check["drawn"]) == (1, 0)
    assert check["errors"] >= 1 and "Plotly" in check["messages"]


# ----------------------------------------------------------------------------- speed


def big_run(tmp_path, n_epochs=30, layers=("layer2", "layer3", "layer4"), n_neurons=512, top_k=5,
            n_concepts=600, dim=384, anchors=("windmill", "field", "striped")) -> Path:
    """A synthetic run of the size the issue benchmarks (30 epochs x 3 layers x 512 neurons)."""
    rng = np.random.default_rng(0)
    out = tmp_path / "big"
    concepts = np.array([f"c{i}" for i in range(n_concepts)], dtype=object)
    categories = np.array(["color", "texture", "material", "object", "part", "scene"], dtype=object)
    concept_category = categories[np.arange(n_concepts) % len(categories)]
    vocab = rng.normal(size=(n_concepts, dim)).astype(np.float32)
    n_units = len(layers) * n_neurons
    base = rng.integers(0, n_concepts, size=(n_units, top_k))
    layer_col = np.repeat(np.array(layers, dtype=object), n_neurons)
    neuron_col = np.tile(np.arange(n_neurons), len(layers))
    neuron_frames, distance_frames = [], []
    for epoch in range(n_epochs):
        drift = rng.random(n_units) < 0.1  # a tenth of the neurons change concept each epoch
        base[drift] = rng.integers(0, n_concepts, size=(drift.sum(), top_k))
        scores = np.sort(rng.random((n_units, top_k)).astype(np.float32) * 0.1, axis=1)[:, ::-1]
        rows = pd.DataFrame({
            "run": "big", "epoch": epoch, "layer": np.repeat(layer_col, top_k),
            "neuron": np.repeat(neuron_col, top_k), "rank": np.tile(np.arange(top_k), n_units),
            "concept": concepts[base.reshape(-1)], "category": concept_category[base.reshape(-1)],
            "score": scores.reshape(-1), "distance": -scores.reshape(-1),
            "interpretable": np.repeat(scores[:, 0] >= 0.04, top_k), "dead": False,
            "confidence": np.float32(1.0), "score_low": scores.reshape(-1), "score_high": scores.reshape(-1),
            "detector": "netdissect",
        })
        images = pd.DataFrame({
            "epoch": epoch, "layer": np.repeat(layer_col, 10), "neuron": np.repeat(neuron_col, 10),
            "rank": np.tile(np.arange(10), n_units), "image": [f"imgs/{i % 50}.png" for i in range(n_units * 10)],
            "activation": rng.random(n_units * 10).astype(np.float32),
        })
        write_epoch(out, epoch, rows, images, checkpoint=f"e{epoch}.pt")
        vectors = vocab[base[:, 0]]
        neuron_frames.append(pd.DataFrame({
            "epoch": epoch, "layer": layer_col, "neuron": neuron_col,
            "x": rng.random(n_units).astype(np.float32), "y": rng.random(n_units).astype(np.float32),
            "top_concept": concepts[base[:, 0]], "score": scores[:, 0], "interpretable": scores[:, 0] >= 0.04,
            "embedding": list(vectors),
        }))
        for anchor in anchors:
            distance_frames.append(pd.DataFrame({
                "epoch": epoch, "layer": layer_col, "neuron": neuron_col, "anchor": anchor,
                "distance": rng.random(n_units).astype(np.float32),
            }))
    write_embedding(out, pd.concat(neuron_frames), pd.concat(distance_frames), pd.DataFrame({
        "concept": list(anchors), "x": np.float32(0.5), "y": np.float32(0.5),
        "embedding": [rng.normal(size=dim).astype(np.float32) for _ in anchors]}))
    store.write_json(out / store.MANIFEST, {
        "run": "big", "config": {"embedding": {"encoder": "minilm"}}, "detector": {"name": "netdissect", "threshold": 0.04},
        "concepts": {"names": list(concepts), "categories": list(concept_category), "fingerprint": "x", "source": "big"},
        "probe": {"name": "synthetic", "root": str(tmp_path / "no-probe"), "fingerprint": "p", "n_images": 50},
        "versions": {}, "checkpoints": "ckpts", "layers": list(layers),
    })
    return out


@pytest.mark.slow
def test_report_on_30_epochs_3_layers_512_neurons_stays_light(tmp_path):
    # The speed target (stats + report under 10 s) is measured by scripts/bench.py, not asserted here.
    out = big_run(tmp_path)
    tables = stats.stats_run(out, log=lambda m: None)
    assert set(tables) == set(stats.TABLES) and len(tables["interpretable"]) == 90
    messages = []
    text = report.report_run(out, log=messages.append).read_text(encoding="utf-8")
    assert any("using the up-to-date statistics" in m for m in messages)
    assert len(text) < 20e6  # one file that a browser opens quickly
    assert "Epochs 0, 10, 19, 29 of 30 embedded (first, last, evenly spaced)" in text
    assert f"Curves for {report.MAX_CURVE_EPOCHS} of 29 later epochs" in text
    assert "images not found" in text and "[missing]" not in text  # no probe images at all


def test_report_of_a_single_epoch_explains_what_needs_two(tmp_path):
    out = make_out(tmp_path, top1={k: {1: v[1]} for k, v in TOP1.items()}, embed=False)
    text = report.report_run(out, log=lambda m: None).read_text(encoding="utf-8")
    assert "Retention needs at least two dissected epochs." in text
    assert "Concept changes need at least two dissected epochs." in text
    assert chart_divs(text) == 3  # interpretable, categories, diversity
