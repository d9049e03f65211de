"""The paper's figures by name: invariants on their Plotly JSON, trajectory choice, the plot
--figure command, static export."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conceptmon import figures, stats, store
from conceptmon.cli import main
from conceptmon.embedding import embed_run
from conceptmon.plots import figure_run

from .figure_checks import check_figure
from .fixtures_runs import figure_from_html, make_run
from .test_compare import WIDE
from .test_stats import make_out

FAST = {"encoder": "hashvec", "map_method": "pca"}


def quiet(_msg):
    pass


@pytest.fixture
def embedded(tmp_path):
    out = make_run(tmp_path / "out", epochs=[0, 1, 2, 3, 4], layers=["layer3", "layer4"], n_neurons=24,
                   embedding=FAST, run="std")
    embed_run(out, anchors=["windmill", "field"], log=quiet)
    return out


def traces(fig, prefix):
    return [t for t in fig["data"] if str(t.get("name", "")).startswith(prefix)]


@pytest.mark.slow
def test_every_figure_keeps_the_invariants(embedded, tmp_path):
    other = make_run(tmp_path / "other", epochs=[0, 1, 2, 3, 4], layers=["layer3", "layer4"], n_neurons=24,
                     embedding=FAST, seed=5, run="pgd")
    paths = figure_run(embedded, "map,categories,retention,compare", compare=other, formats="html", log=quiet)
    plots = store.plots_dir(embedded)
    assert paths == [plots / f"figure_{n}.html" for n in ("map", "categories", "retention", "compare")]
    for path in paths:
        check_figure(figure_from_html(path))
        assert "How to read this: " in path.read_text(encoding="utf-8")
    fig = figure_from_html(plots / "figure_map.html")
    assert [a["text"] for a in fig["layout"]["annotations"]][:4] == ["epoch 0", "epoch 1", "epoch 3", "epoch 4"]
    stars = traces(fig, "anchors")
    assert len(stars) == 4 and stars[0]["name"] == "anchors"  # one per panel and list(stars[0]["text"]) == ["windmill", "field"]
    # the colour toggle switches between existing traces; category traces start hidden
    colour, faint = fig["layout"]["updatemenus"]
    by_layer, by_category = colour["buttons"]
    indices = by_layer["args"][1]
    assert max(indices) < len(fig["data"]) and indices == by_category["args"][1]
    hidden = [fig["data"][i] for i, v in zip(indices, by_layer["args"][0]["visible"]) if not v]
    assert hidden and all(t.get("visible") is False for t in hidden)
    assert {t["name"] for t in hidden} <= {"color", "texture", "material", "object", "part", "scene"}
    assert all(fig["data"][i]["name"] == "not interpretable" for i in faint["buttons"][1]["args"][1])
    # shared axes: every panel shows the same region
    assert fig["layout"]["xaxis2"]["matches"] == "x" and fig["layout"]["yaxis2"]["matches"] == "y"
    cats = figure_from_html(plots / "figure_categories.html")
    assert cats["layout"]["yaxis"]["tickformat"] == "d"
    assert {t["name"] for t in cats["data"]} <= set(store.read_manifest(embedded)["concepts"]["categories"])
    compared = figure_from_html(plots / "figure_compare.html")
    assert {t["name"] for t in compared["data"]} == {"std", "pgd"}


def test_highlighted_trajectories_are_interpretable_confident_neurons():
    epochs = [1, 2, 3]
    # (interpretable, confidence per epoch, x per epoch): B and C move more but are noise or uncertain
    spec = {
        "A": (True, [.95, .95, .95], [0, 1, 2]),
        "B": (False, [.99, .99, .99], [0, 10, 20]),
        "C": (True, [.95, .95, .50], [0, 5, 10]),
        "D": (True, [.95, .20, .95], [0, 30, 0]),  # its only moves start or end at an uncertain label
        "E": (True, [.95, .95, .95], [0, 0, 0]),  # does not move, but comes closer to an anchor
        "F": ([False, False, True], [.30, .30, .95], [0, 0, 8]),  # learns its concept: noise, then confident
    }
    rows, coords, dist = [], [], []
    for n, (name, (ok, confidence, xs)) in enumerate(spec.items()):
        ok = ok if isinstance(ok, list) else [ok] * len(epochs)
        for epoch, ok, c, x in zip(epochs, ok, confidence, xs):
            rows.append(dict(epoch=epoch, layer="L", neuron=n, rank=0, concept="red", category="color", score=.3,
                             interpretable=ok, dead=False, confidence=c))
            coords.append(dict(epoch=epoch, layer="L", neuron=n, x=float(x), y=0.0, interpretable=ok))
            dist.append(dict(epoch=epoch, layer="L", neuron=n, anchor="field",
                             distance={"E": 1.0 - epoch / 4}.get(name, 0.9)))
    first = stats.top1(pd.DataFrame(rows))
    neurons, distances = pd.DataFrame(coords), pd.DataFrame(dist)
    picks = figures.choose_trajectories(neurons, first, epochs, distances=distances)
    assert picks == [("L", 5, "moves most"), ("L", 0, "moves most"), ("L", 4, "approaches an anchor")]
    assert figures.choose_trajectories(neurons, first, epochs, given=[("L", 1)])[:2] == [
        ("L", 1, "chosen"), ("L", 5, "moves most")]
    chart = figures.map_figure(neurons, first, None, epochs, trajectories=picks)
    fig = chart.figure.to_plotly_json()
    drawn = {t["name"] for t in fig["data"] if str(t.get("legendgroup", "")).startswith("traj:")}
    assert drawn == {"L:0", "L:4", "L:5"}
    last = first[first["epoch"] == epochs[-1]].set_index("neuron")
    assert all(last.loc[int(name.split(":")[1]), "interpretable"] for name in drawn)  # never a noise neuron
    check_figure(fig)
    assert "confident" in chart.how_to_read


def test_automatic_anchors_are_labelled_as_such():
    neurons = pd.DataFrame({"epoch": [1, 2], "layer": "L", "neuron": 0, "x": [0.0, 1.0], "y": 0.0,
                            "interpretable": True})
    first = stats.top1(pd.DataFrame({"epoch": [1, 2], "layer": "L", "neuron": 0, "rank": 0, "concept": "red",
                                     "category": "color", "score": .3, "interpretable": True, "dead": False,
                                     "confidence": np.nan}))
    anchors = pd.DataFrame({"concept": ["red", "sky"], "x": [0.0, 1.0], "y": [1.0, 1.0]})
    chart = figures.map_figure(neurons, first, anchors, [1, 2], anchor_source="automatic")
    names = {t.name for t in chart.figure.data}
    assert "anchors (automatic: most frequent concepts)" in names
    assert "chosen automatically" in chart.how_to_read


def test_counts_never_get_fractional_ticks():
    assert figures.count_axis("n", 3)["dtick"] == 1 and figures.count_axis("n", 3)["tickformat"] == "d"
    assert "dtick" not in figures.count_axis("n", 400)


def test_compare_figure_uses_shares_when_widths_differ(tmp_path):
    from conceptmon.compare import compare_runs

    result = compare_runs(make_out(tmp_path, "standard"), make_out(tmp_path, "wide", top1=WIDE), log=quiet)
    chart = figures.compare_figure(result)
    fig = chart.figure.to_plotly_json()
    assert fig["layout"]["yaxis"]["title"]["text"] == "share of the layer's neurons"
    assert "widths differ" in chart.how_to_read
    check_figure(fig)


@pytest.mark.parametrize("args, fragment", [
    (["--figure", "mapp"], "--figure: unknown figure 'mapp' (did you mean map?); choices: map, categories, "
                           "retention, compare"),
    (["--figure", "compare"], "--figure compare: needs --compare OUT_B"),
    (["--figure", "map", "--format", "html,gif"], "--format: gif is not one of html, png, svg"),
    (["--figure", "map", "--epochs", "7"], "--epochs: epochs [7] not dissected; available: [0, 1, 2, 3, 4]"),
])
def test_plot_figure_errors_are_one_line(embedded, args, fragment):
    result = CliRunner().invoke(main, ["plot", "--out", str(embedded), *args])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [f"Error: {fragment}"] or fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_plot_figure_without_kaleido_keeps_html_and_says_so_once(embedded, monkeypatch):
    monkeypatch.setitem(sys.modules, "kaleido", None)  # import kaleido -> ImportError
    result = CliRunner().invoke(main, ["plot", "--out", str(embedded), "--figure", "categories,retention",
                                       "--format", "html,png,svg"])
    assert result.exit_code == 0, result.output
    notices = [l for l in result.stderr.splitlines() if l.startswith("notice:")]
    assert notices == ["notice: static export (png/svg) needs kaleido: pip install 'conceptmon[plot-export]'; "
                       "wrote HTML only"]
    plots = store.plots_dir(embedded)
    assert sorted(p.name for p in plots.glob("figure_*")) == ["figure_categories.html", "figure_retention.html"]


HAVE_EXPORT = importlib.util.find_spec("kaleido") is not None and any(
    shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_EXPORT, reason="kaleido or a Chrome/Chromium is not installed")
def test_static_export_writes_png_and_svg(embedded):
    paths = figure_run(embedded, "map,categories", formats="png,svg", log=quiet)
    plots = store.plots_dir(embedded)
    assert sorted(paths) == sorted(plots / f"figure_{n}.{f}" for n in ("map", "categories") for f in ("png", "svg"))
    assert (plots / "figure_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (plots / "figure_categories.svg").read_text(encoding="utf-8")
    assert svg.lstrip().startswith("<svg") and "interpretable neurons" in svg
    assert not list(plots.glob(".tmp-*"))


def test_a_failing_browser_leaves_no_file_and_one_notice(tmp_path, monkeypatch):
    import plotly.io as pio

    pytest.importorskip("kaleido")

    class ChromeNotFoundError(RuntimeError):
        pass

    def no_browser(figs, files, **kw):
        for f in files:  # as a crashed export might: part of a file at the temporary path
            Path(f).write_bytes(b"\x89PNG partial")
        raise ChromeNotFoundError("Chrome not found\nmore detail")

    monkeypatch.setattr(pio, "write_images", no_browser)
    dissect = store.read_dissect(make_run(tmp_path / "run", epochs=[1], n_neurons=4))
    chart = figures.categories_figure(stats.category_counts(dissect), [1])
    target = tmp_path / "plots" / "figure_categories.png"
    notices = []
    assert figures.write_static({target: chart.figure}, notices.append) == []
    assert notices == ["notice: static export unavailable (ChromeNotFoundError: Chrome not found); wrote HTML only. "
                       "kaleido needs a Chrome or Chromium: install one, or set BROWSER_PATH to it"]
    assert not target.exists() and not list(target.parent.glob(".tmp-*"))
