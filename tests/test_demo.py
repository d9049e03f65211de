"""The demo pipeline with tiny settings (training, dissect, embed, stats, validate, report),
and what the demo may conclude from a run (pure functions)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from conceptmon import store
from conceptmon.checkpoints import find_checkpoints, load_state_dict
from conceptmon.cli import main
from conceptmon.config import ModelConfig, load_config
from conceptmon.demo import DemoError, DemoSettings, observation, run_demo
from conceptmon.stats import stats_table_path
from conceptmon.demo import run as demo_module
from conceptmon.demo.data import chance_accuracy, synthetic_classes, synthetic_classification, task_seed
from conceptmon.demo.model import MODEL_ARCH
from conceptmon.demo.verdict import closing_line, judge, learned, learning_bar, percent
from conceptmon.models import build_model
from conceptmon.probes.synthetic import render_image


@pytest.fixture(autouse=True)
def _restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


# PCA instead of UMAP keeps numba compilation out of this test; the rest is the real pipeline.
TINY = DemoSettings.tiny(map_method="pca", seed=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    echoed, logged = [], []
    torch_det = torch.are_deterministic_algorithms_enabled()
    result = run_demo(out, TINY, echo=echoed.append, log=logged.append)
    torch.use_deterministic_algorithms(torch_det)
    return out, result, echoed, logged


@pytest.mark.slow
def test_demo_writes_every_stage(tiny_run):
    out, result, echoed, logged = tiny_run
    assert result.report == out / "report.html" and result.report.stat().st_size > 10_000
    assert [f.epoch for f in find_checkpoints(out / "checkpoints")] == [0, 1, 2]
    assert store.finished_epochs(out) == [0, 1, 2]
    assert store.read_generation(out, store.EMBED).path(store.EMBED_FILES["neurons"]).exists()
    assert stats_table_path(out, "diversity").exists()  # the current stats generation
    cfg = load_config(out / "conceptmon.yaml")  # the folder is an ordinary run: other commands work on it
    assert cfg.out == str(out.resolve()) and cfg.layers == ["layer2", "layer3", "layer4"]
    assert cfg.embedding.temperature == TINY.temperature
    assert cfg.model.arch == MODEL_ARCH
    # Every step reported its progress, and the results went to echo, the verdict last.
    for step in range(1, demo_module.STEPS + 1):
        assert any(line.startswith(f"[{step}/{demo_module.STEPS}]") for line in logged)
    assert [line.split()[:2] for line in echoed[:3]] == [["epoch", "0"], ["epoch", "1"], ["epoch", "2"]]
    assert "val acc" in echoed[1] and "train loss" in echoed[1]
    assert echoed[-4].startswith("layer4: interpretable neurons")
    assert echoed[-3].startswith("fc at epoch 2: the detector names")
    assert echoed[-2] == f"report: {result.report.resolve()}"
    assert echoed[-1] == result.verdict["line"]
    # A rerun can replace the folder only if it knows every file the demo wrote.
    assert {p.name for p in out.iterdir()} <= {p.name for p in demo_module.owned_paths(out)}


@pytest.mark.slow
def test_demo_writes_its_classes_and_validates_its_classifier(tiny_run):
    out, result, echoed, _ = tiny_run
    classes = (out / demo_module.CLASSES).read_text().splitlines()
    assert classes == list(synthetic_classes()) and len(classes) == 16
    validation = json.loads((out / store.VALIDATE).read_text())
    assert validation["classes"] == classes
    (row,) = validation["results"]
    assert row["epoch"] == TINY.epochs and row["layer"] == "fc" and row["n_units"] == 16
    assert 0 <= row["top1"] <= row["top5"] <= 1
    marker = json.loads((out / demo_module.MARKER).read_text())
    assert marker["validation"]["top1"] == row["top1"] and marker["validation"]["top5"] == row["top5"]
    assert f"top-1 {percent(row['top1'])}" in echoed[-3] and f"top-5 {percent(row['top5'])}" in echoed[-3]
    assert f"names {round(16 * row['top1'])}/16 output units" in echoed[-3]


@pytest.mark.slow
def test_tiny_demo_never_claims_the_paper(tiny_run):
    out, result, echoed, _ = tiny_run
    verdict = json.loads((out / demo_module.MARKER).read_text())["verdict"]
    assert verdict["smoke"] and not verdict["states_observation"]
    assert echoed[-1].startswith("smoke run (--tiny): too small to test the paper's observation")
    assert "holds" not in echoed[-1] and "as in the paper" not in echoed[-1]
    assert verdict["val_acc"] == result.history[-1]["val_acc"]


@pytest.mark.slow
def test_demo_records_real_training_and_its_finding(tiny_run):
    out, result, _, _ = tiny_run
    training = json.loads((out / demo_module.TRAINING).read_text())
    history = training["history"]
    assert training["classes"] == list(synthetic_classes()) and 0 < training["chance"] < 1
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert all(0 <= h["val_acc"] <= 1 for h in history) and history[0]["train_acc"] is None
    first = load_state_dict(out / "checkpoints" / "epoch_0000.pt")
    last = load_state_dict(out / "checkpoints" / "epoch_0002.pt")
    assert not torch.equal(first["layer4.0.conv1.weight"], last["layer4.0.conv1.weight"])
    marker = json.loads((out / demo_module.MARKER).read_text())
    obs = marker["observation"]
    counts = pd.read_parquet(stats_table_path(out, "interpretable"))
    layer4 = counts[counts.layer == "layer4"].set_index("epoch")["n_interpretable"]
    assert obs["interpretable_first"] == layer4[0] and obs["interpretable_last"] == layer4[2]
    assert obs == result.observation


@pytest.mark.slow
def test_same_seed_same_demo_and_reruns_replace_the_folder(tiny_run):
    out, result, _, _ = tiny_run
    before = load_state_dict(out / "checkpoints" / "epoch_0002.pt")
    dissect_before = store.read_dissect(out)
    stale = store.top_images_path(out, 99)
    stale.write_bytes(b"from an earlier, longer demo")
    again = run_demo(out, TINY, echo=lambda m: None, log=lambda m: None)  # same folder: replaced
    assert not stale.exists()
    assert torch.equal(load_state_dict(out / "checkpoints" / "epoch_0002.pt")["fc.weight"], before["fc.weight"])
    pd.testing.assert_frame_equal(store.read_dissect(out), dissect_before)
    assert again.observation == result.observation
    assert again.validation["results"][0]["top1"] == result.validation["results"][0]["top1"]


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(DemoError, match="not empty"):
        run_demo(tmp_path, TINY, echo=lambda m: None, log=lambda m: None)
    assert (tmp_path / "thesis.tex").read_text() == "precious"
    with pytest.raises(DemoError, match="--epochs"):
        run_demo(tmp_path / "new", DemoSettings.tiny(epochs=0), echo=lambda m: None, log=lambda m: None)


def test_cli_passes_options_and_fails_in_one_line(tmp_path, monkeypatch):
    import conceptmon.demo

    seen = {}

    def fake_run_demo(out, settings, echo, log):
        seen.update(out=out, settings=settings)
        echo("report: somewhere")

    monkeypatch.setattr(conceptmon.demo, "run_demo", fake_run_demo)
    runner = CliRunner()
    result = runner.invoke(main, ["demo", "--out", str(tmp_path / "d"), "--epochs", "3", "--seed", "7", "--tiny"])
    assert result.exit_code == 0, result.output
    assert seen["out"] == tmp_path / "d"
    assert seen["settings"] == DemoSettings.tiny(epochs=3, seed=7) and seen["settings"].smoke
    assert "report: somewhere" in result.output

    monkeypatch.undo()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    failed = runner.invoke(main, ["demo", "--out", str(tmp_path / "busy"), "--tiny"])
    assert failed.exit_code == 1
    assert "Error:" in failed.output and "Traceback" not in failed.output
    assert "--help" in runner.invoke(main, ["demo", "--help"]).output


# ----------------------------------------------------------------------------- what the demo may say


def test_observation_compares_first_and_last_epoch_of_one_layer():
    tables = {
        "interpretable": pd.DataFrame({"epoch": [0, 0, 3, 3], "layer": ["a", "b", "a", "b"],
                                       "n_neurons": [8, 8, 8, 8], "n_interpretable": [1, 5, 6, 2]}),
        "diversity": pd.DataFrame({"epoch": [0, 0, 3, 3], "layer": ["a", "b", "a", "b"],
                                   "mean_cosine_distance": [0.2, 0.5, 0.4, 0.1],
                                   "n_distinct_interpretable": [1, 4, 5, 2]}),
    }
    grew = observation(tables, "a")
    assert (grew["interpretable_first"], grew["interpretable_last"], grew["shown"]) == (1, 6, True)
    assert grew["spread_first"] == pytest.approx(0.2) and grew["spread_last"] == pytest.approx(0.4)
    assert observation(tables, "b")["shown"] is False


def _obs(first: int, last: int, spread_first: float, spread_last: float) -> dict:
    return {"layer": "layer4", "first_epoch": 0, "last_epoch": 8, "n_neurons": 128, "interpretable_first": first,
            "interpretable_last": last, "spread_first": spread_first, "spread_last": spread_last,
            "distinct_concepts_first": 1, "distinct_concepts_last": 9,
            "shown": last > first and spread_last > spread_first}


GREW = _obs(1, 53, 0.274, 0.482)
SHRANK = _obs(7, 3, 0.30, 0.25)


def test_learning_means_twice_chance_and_twenty_points_above_it():
    assert learning_bar(1 / 16) == pytest.approx(1 / 16 + 0.20)  # 20 points above is the stricter bar
    assert learning_bar(0.3) == pytest.approx(0.6)  # twice chance is the stricter bar
    assert learned(0.27, 1 / 16) and not learned(0.26, 1 / 16)
    assert learned(0.6, 0.3) and not learned(0.59, 0.3)


def test_a_run_that_learned_and_showed_it_states_the_observation():
    line = closing_line(GREW, 0.958, 0.0625)
    assert line.startswith("the paper's observation holds on this run: more interpretable neurons in layer4 "
                           "at epoch 8 than at epoch 0 (1 -> 53 of 128), and the embedding spread out "
                           "(0.274 -> 0.482)")
    assert line.endswith("95.8 % validation accuracy, chance is 6.25 %")


def test_a_run_that_did_not_learn_says_so_and_never_cites_the_paper_as_shown():
    line = closing_line(GREW, 0.094, 0.0625)
    assert line.startswith("the run did not learn: 9.4 % validation accuracy, chance is 6.25 % "
                           "(learning means at least 26.25 %), so it cannot test the paper's observation")
    assert "holds" not in line and "as in the paper" not in line
    assert "(1 -> 53 of 128)" in line  # still says what it saw


def test_a_run_that_learned_without_the_observation_says_what_it_saw():
    line = closing_line(SHRANK, 0.9, 0.0625)
    assert line.startswith("the run learned (90 % validation accuracy, chance is 6.25 %) but did not show "
                           "the paper's observation")
    assert "fewer interpretable neurons in layer4 at epoch 8 than at epoch 0 (7 -> 3 of 128)" in line
    assert "the embedding did not spread out (0.300 -> 0.250)" in line
    assert "holds" not in line


def test_a_smoke_run_never_claims_the_observation_even_when_it_looks_shown():
    line = closing_line(GREW, 0.958, 0.0625, smoke=True)
    assert line.startswith("smoke run (--tiny): too small to test the paper's observation")
    assert "holds" not in line


def test_the_recorded_verdict_agrees_with_its_line():
    assert judge(GREW, 0.958, 0.0625)["states_observation"] is True
    for verdict in (judge(GREW, 0.958, 0.0625, smoke=True), judge(GREW, 0.094, 0.0625), judge(SHRANK, 0.9, 0.0625)):
        assert verdict["states_observation"] is False and "holds" not in verdict["line"]
    assert judge(GREW, 0.094, 0.0625)["learned"] is False and judge(SHRANK, 0.9, 0.0625)["learned"] is True


# ----------------------------------------------------------------------------- the task and the model


def test_synthetic_task_is_seeded_labelled_and_apart_from_the_probe_set():
    x, y, classes = synthetic_classification(40, size=16, seed=3)
    assert x.shape == (40, 3, 16, 16) and x.dtype == torch.uint8 and classes == synthetic_classes()
    assert len(classes) == 16 and y.min() >= 0 and y.max() < 16
    assert len(set(y.tolist())) > 8  # many classes, not one
    x2, y2, _ = synthetic_classification(40, size=16, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    other, _, _ = synthetic_classification(40, size=16, seed=4)
    assert not torch.equal(x, other)
    val, _, _ = synthetic_classification(40, size=16, seed=3, split="val")
    flat = {bytes(img.numpy()) for img in x}
    assert not flat & {bytes(img.numpy()) for img in val}  # train and validation share no image
    probe_colors = [render_image(i, 8, 3)[0].color for i in range(40)]
    task_colors = [render_image(i, 8, task_seed(3, "train"))[0].color for i in range(40)]
    assert not any(np.array_equal(p, t) for p in probe_colors for t in task_colors)
    # Each label is the scene or texture the generator drew.
    scene_or_texture = [s or t for _, s, t in (render_image(i, 8, task_seed(3, "train")) for i in range(80))]
    assert [classes[k] for k in y.tolist()] == [name for name in scene_or_texture if name][:40]


def test_percentages_keep_what_matters():
    assert (percent(0.0625), percent(0.9), percent(0.95833), percent(1.0)) == ("6.25 %", "90 %", "95.83 %", "100 %")


def test_chance_is_the_share_of_the_most_frequent_class():
    assert chance_accuracy(torch.tensor([0, 1, 1, 2])) == pytest.approx(0.5)
    assert chance_accuracy(torch.arange(16)) == pytest.approx(1 / 16)


def test_old_demo_folders_still_name_a_model_that_builds():
    old = build_model(ModelConfig(arch="conceptmon.training:small_resnet", kwargs={"num_classes": 16}))
    new = build_model(ModelConfig(arch=MODEL_ARCH, kwargs={"num_classes": 16}))
    assert type(old) is type(new) and old.state_dict().keys() == new.state_dict().keys()


@pytest.mark.slow
def test_a_small_demo_learns_and_its_verdict_matches_what_it_measured(tmp_path):
    """A run big enough to learn, not a smoke run: its last line follows from its own numbers
    (whichever they are: whether the observation shows at this size is the generator's business)."""
    small = DemoSettings.tiny(n_train=1600, n_val=128, epochs=6, image_size=48, widths=(8, 16, 32, 64),
                              probe_n=300, map_method="pca", seed=1, smoke=False)
    echoed = []
    result = run_demo(tmp_path / "small", small, echo=echoed.append, log=lambda m: None)
    obs, verdict = result.observation, result.verdict
    assert obs["layer"] == "layer4" and obs["last_epoch"] == 6
    assert verdict["learned"], verdict  # well above chance, not by luck
    assert verdict["states_observation"] == obs["shown"]
    assert echoed[-1].startswith("the paper's observation holds" if obs["shown"] else "the run learned")
    # The report's map highlights neurons that are interpretable and confident where it ends.
    from conceptmon import embedding, figures, report, stats

    out = tmp_path / "small"
    neurons = embedding.read_neurons(out)
    first = stats.top1(store.read_dissect(out))
    shown = stats.spread_epochs(stats.epochs_of(neurons), report.MAP_PANELS)
    picks = figures.choose_trajectories(neurons, first, shown, distances=embedding.read_anchor_distances(out))
    assert picks, "the demo's map highlights no neuron"
    last = first[first["epoch"] == shown[-1]].set_index(["layer", "neuron"])
    for layer, neuron, _ in picks:
        row = last.loc[(layer, neuron)]
        assert row["interpretable"] and row["state"] == stats.CONFIDENT, (layer, neuron, row.to_dict())
    page = (out / "report.html").read_text()
    assert all(f"{layer}:{neuron} (" in page for layer, neuron, _ in picks)  # and the page names them
