"""Plot files: anchors, chosen neurons' trajectories, one frame per epoch, cards, CLI."""
from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner

from conceptmon import store
from conceptmon.cli import main
from conceptmon.embedding import embed_run, read_anchors, read_embed_meta, read_neurons
from conceptmon.plots import PlotError, embedding_map_figure, parse_neuron_refs, plot_run
from tests.fixtures_runs import FAST_EMBEDDING, figure_from_html, make_run, set_neuron, values, quiet

FAST = FAST_EMBEDDING
EPOCHS = [1, 2, 4]


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "out", epochs=EPOCHS, layers=["layer3", "layer4"], n_neurons=10,
                    probe_root=tmp_path / "probe", embedding=FAST)


def trace(fig: dict, name: str) -> dict:
    matches = [t for t in fig["data"] if t.get("name") == name]
    assert len(matches) == 1, [t.get("name") for t in fig["data"]]
    return matches[0]


def xy_of(neurons, epoch, layer, neuron):
    row = neurons[(neurons["epoch"] == epoch) & (neurons["layer"] == layer) & (neurons["neuron"] == neuron)]
    return row[["x", "y"]].to_numpy()[0]


def test_map_has_anchors_trajectories_and_one_frame_per_epoch(run):
    paths = plot_run(run, anchors=["windmill", "field"], neurons=[("layer4", 1), ("layer4", 7)], log=quiet)
    plots = store.plots_dir(run)
    assert paths == [plots / "map_layer3.html", plots / "map_layer4.html", plots / "neurons.html"]
    assert (plots / "plotly.min.js").stat().st_size > 1_000_000  # opens offline
    fig = figure_from_html(plots / "map_layer4.html")
    neurons = read_neurons(run)

    assert [f["name"] for f in fig["frames"]] == [str(e) for e in EPOCHS]
    assert [s["label"] for s in fig["layout"]["sliders"][0]["steps"]] == [str(e) for e in EPOCHS]
    for frame, epoch in zip(fig["frames"], EPOCHS):
        shown = frame["data"][0]
        assert len(values(shown["x"])) == 10  # this layer's neurons of this epoch
        assert all(f"epoch {epoch}" in t for t in shown["text"])
        assert all("layer4 · neuron" in t for t in shown["text"])

    stars = trace(fig, "anchors")
    assert list(stars["text"]) == ["windmill", "field"] and stars["marker"]["symbol"] == "star"
    np.testing.assert_allclose(values(stars["x"]), read_anchors(run)["x"], atol=1e-6)

    for neuron in (1, 7):
        path = trace(fig, f"layer4:{neuron} trajectory")
        expected = np.array([xy_of(neurons, e, "layer4", neuron) for e in EPOCHS])
        np.testing.assert_allclose(np.c_[values(path["x"]), values(path["y"])], expected, atol=1e-6)
        assert "lines" in path["mode"]
        # the moving marker: one point per frame, at that epoch's position
        marker_index = fig["data"].index(trace(fig, f"layer4:{neuron}"))
        for frame, epoch in zip(fig["frames"], EPOCHS):
            k = frame["traces"].index(marker_index)
            pos = np.r_[values(frame["data"][k]["x"]), values(frame["data"][k]["y"])]
            np.testing.assert_allclose(pos, xy_of(neurons, epoch, "layer4", neuron), atol=1e-6)

    other_layer = figure_from_html(plots / "map_layer3.html")
    assert not any("trajectory" in (t.get("name") or "") for t in other_layer["data"])


def test_hover_lists_top_concepts_with_scores(run):
    plot_run(run, layers=["layer3"], epochs=[2], log=quiet)
    fig = figure_from_html(store.plots_dir(run) / "map_layer3.html")
    assert [f["name"] for f in fig["frames"]] == ["2"]
    dissect = store.read_dissect(run, [2])
    mine = dissect[(dissect["layer"] == "layer3") & (dissect["neuron"] == 0)].sort_values("rank")
    first = fig["frames"][0]["data"][0]["text"][0]
    lines = first.split("<br>")
    assert lines[0].startswith("layer3 · neuron 0 · epoch 2")
    assert lines[1:] == [f"{c} {s:.3f}" for c, s in zip(mine["concept"], mine["score"])]


class _Cards(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cards, self.images, self.sections = [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and attrs.get("class") == "card":
            self.cards.append(int(attrs["data-epoch"]))
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "section":
            self.sections += 1


def test_cards_show_each_epoch_with_thumbnails(run):
    plot_run(run, anchors=["windmill"], neurons="layer3:2,layer4:0", log=quiet)
    page = (store.plots_dir(run) / "neurons.html").read_text(encoding="utf-8")
    cards = _Cards()
    cards.feed(page)
    assert cards.sections == 2 and cards.cards == EPOCHS * 2
    assert len(cards.images) == 2 * len(EPOCHS) * 5
    assert all(src.startswith("data:image/jpeg;base64,") for src in cards.images)
    assert "distance to windmill" in page


def test_cards_without_the_probe_folder_say_so(tmp_path):
    out = make_run(tmp_path / "out", epochs=[1], layers=["layer4"], n_neurons=3, embedding=FAST)
    plot_run(out, neurons=[("layer4", 2)], log=quiet)
    cards = _Cards()
    page = (store.plots_dir(out) / "neurons.html").read_text(encoding="utf-8")
    cards.feed(page)
    assert cards.cards == [1] and cards.images == []
    assert "Probe images not shown" in page


def test_plot_reembeds_stale_outputs_but_keeps_the_embedding_settings(run):
    embed_run(run, temperature=0.05, anchors=["field"], log=quiet)
    plot_run(run, log=quiet)
    meta = read_embed_meta(run)
    assert meta["settings"]["temperature"] == 0.05 and meta["settings"]["anchors"] == ["field"]

    set_neuron(run, 4, "layer4", 3, ["windmill"], [0.2])  # epoch 4 dissected again
    plot_run(run, anchors=["windmill"], log=quiet)
    meta = read_embed_meta(run)
    assert meta["settings"]["anchors"] == ["windmill"] and meta["settings"]["temperature"] == 0.05
    fig = figure_from_html(store.plots_dir(run) / "map_layer4.html")
    star = trace(fig, "anchors")
    frame = fig["frames"][EPOCHS.index(4)]["data"][0]
    k = [i for i, t in enumerate(frame["text"]) if t.startswith("layer4 · neuron 3 ·")][0]
    np.testing.assert_allclose([values(frame["x"])[k], values(frame["y"])[k]],
                               [values(star["x"])[0], values(star["y"])[0]], atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"neurons": "layer4-3"}, "--neurons: expected LAYER:INDEX"),
        ({"neurons": "layer9:1"}, "layers: layer3, layer4"),
        ({"neurons": "layer4:99"}, "layer4 has neurons 0..9"),
        ({"layers": ["fc"]}, "--layers: unknown layer 'fc'; layers: layer3, layer4"),
        ({"epochs": [3]}, "available: [1, 2, 4]"),
        ({"neurons": "layer3:1", "layers": ["layer4"]}, "layer3:1 not in the chosen --layers (layer4)"),
    ],
)
def test_bad_selections_are_one_line_errors(run, kwargs, fragment):
    with pytest.raises(PlotError) as e:
        plot_run(run, log=quiet, **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_parse_neuron_refs():
    assert parse_neuron_refs("layer4:479, layer4.1.conv2:3,layer4:479") == [("layer4", 479), ("layer4.1.conv2", 3)]
    assert parse_neuron_refs([("layer4", 2)]) == [("layer4", 2)]


def test_figure_escapes_concept_names():
    import pandas as pd

    neurons = pd.DataFrame({"epoch": [1], "layer": ["l"], "neuron": [0], "x": [0.0], "y": [0.0],
                            "top_concept": ["<script>"], "score": [0.5], "interpretable": [True]})
    anchors = pd.DataFrame({"concept": ["<b>"], "x": [1.0], "y": [1.0]})
    fig = embedding_map_figure(neurons, anchors).to_plotly_json()
    assert "&lt;script&gt;" in fig["frames"][0]["data"][0]["text"][0]
    assert list(fig["data"][1]["text"]) == ["&lt;b&gt;"]


def test_cli_embed_and_plot(run):
    runner = CliRunner()
    res = runner.invoke(main, ["embed", "--out", str(run), "--anchors", "windmill", "--temperature", "0.5"])
    assert res.exit_code == 0, res.output
    assert read_embed_meta(run)["settings"]["temperature"] == 0.5
    res = runner.invoke(main, ["plot", "--out", str(run), "--neurons", "layer4:2", "--layers", "layer4",
                               "--epochs", "1,4"])
    assert res.exit_code == 0, res.output
    assert "map_layer4.html" in res.output and "neurons.html" in res.output
    fig = figure_from_html(store.plots_dir(run) / "map_layer4.html")
    assert [f["name"] for f in fig["frames"]] == ["1", "4"]

    res = runner.invoke(main, ["plot", "--out", str(run), "--neurons", "layer9:1"])
    assert res.exit_code == 1 and res.output.strip().count("\n") == 0
    assert "unknown layer 'layer9'" in res.output
    res = runner.invoke(main, ["embed", "--out", str(run), "--encoder", "nope"])
    assert res.exit_code == 1 and "embedding.encoder: unknown encoder 'nope'" in res.output


@pytest.mark.parametrize("command", ["embed", "plot"])
def test_commands_have_help(command):
    res = CliRunner().invoke(main, [command, "--help"])
    assert res.exit_code == 0 and "--anchors" in res.output
