"""TensorBoard export, read back with TensorBoard's own readers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conceptmon import store
from conceptmon.embedding import embed_run, read_neurons
from conceptmon.export import (
    EXPORT_MARKER, ExportError, dead_counts, export_tensorboard, observation_scalars, scalar_table,
)
from conceptmon.stats import stats_run
from tests.fixtures_runs import FAST_EMBEDDING, make_run, rewrite_epoch_table, quiet

pytest.importorskip("tensorboard")
from google.protobuf import text_format  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.projector import projector_plugin  # noqa: E402
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig  # noqa: E402

FAST = FAST_EMBEDDING
EPOCHS = [0, 2, 5]


@pytest.fixture
def run(tmp_path):
    out = make_run(tmp_path / "out", epochs=EPOCHS, layers=["layer3", "layer4"], n_neurons=6, embedding=FAST,
                   run="my run")
    # Two dead units in layer4 at epoch 5, written as the engine writes dead units: one rank-0 row.
    path = store.dissect_path(out, 5)
    df = store.read_table(path, store.DISSECT)
    dead = (df["layer"] == "layer4") & df["neuron"].isin([1, 3])
    template = df[dead & (df["rank"] == 0)].assign(concept=None, category=None, score=0.0, interpretable=False,
                                                    dead=True, confidence=0.0)
    rewrite_epoch_table(out, 5, pd.concat([df[~dead], template], ignore_index=True))
    return out


def scalars_of(run_dir) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_scalars_per_layer_and_epoch_reach_tensorboard(run, tmp_path):
    embed_run(run, anchors=["windmill"], log=quiet)
    tables = stats_run(run, log=quiet)
    run_dir = export_tensorboard(run, tmp_path / "tb", log=quiet)
    assert run_dir == tmp_path / "tb" / "my_run"
    scalars = scalars_of(run_dir)
    interpretable = tables["interpretable"].set_index(["layer", "epoch"])
    for layer in ("layer3", "layer4"):
        assert sorted(scalars[f"{layer}/interpretable"]) == EPOCHS  # step = epoch
        for epoch in EPOCHS:
            expected = interpretable.loc[(layer, epoch)]
            assert scalars[f"{layer}/interpretable"][epoch] == expected["n_interpretable"]
            assert scalars[f"{layer}/interpretable_share"][epoch] == pytest.approx(expected["share_interpretable"])
    assert scalars["layer4/dead"] == {0: 0, 2: 0, 5: 2} and scalars["layer3/dead"][5] == 0
    diversity = tables["diversity"].set_index(["layer", "epoch"])
    assert scalars["layer3/spread"][2] == pytest.approx(diversity.loc[("layer3", 2), "mean_cosine_distance"])
    assert scalars["layer3/distinct_concepts"][2] == diversity.loc[("layer3", 2), "n_distinct_interpretable"]
    assert "layer3/category/color" in scalars and "all/anchor_distance/windmill" in scalars


def test_projector_config_and_tensors_read_by_tensorboard(run, tmp_path):
    embed_run(run, anchors=["windmill", "field"], log=quiet)
    run_dir = export_tensorboard(run, tmp_path / "tb", log=quiet)
    config = ProjectorConfig()
    text_format.Parse((run_dir / "projector_config.pbtxt").read_text(), config)
    assert [e.tensor_name for e in config.embeddings] == ["neurons:00000", "neurons:00002", "neurons:00005"]
    neurons = read_neurons(run, with_embedding=True)
    dissect = store.read_dissect(run)
    for info, epoch in zip(config.embeddings, EPOCHS):
        tensor = projector_plugin._read_tensor_tsv_file(str(run_dir / info.tensor_path))
        lines = (run_dir / info.metadata_path).read_text().splitlines()
        header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:]]
        assert header == ["epoch", "layer", "neuron", "top_concept", "score", "interpretable", "confidence"]
        mine = neurons[neurons["epoch"] == epoch]
        assert tensor.shape == (len(mine) + 2, len(mine["embedding"].iloc[0])) == tuple(info.tensor_shape)
        assert len(rows) == len(tensor) and rows[-1][1:4] == ["(anchor)", "", "field"]
        first = rows[0]
        row = mine.iloc[0]
        assert first[:4] == [str(epoch), row["layer"], str(row["neuron"]), row["top_concept"]]
        conf = dissect[(dissect.epoch == epoch) & (dissect.layer == row["layer"]) & (dissect.neuron == row["neuron"])
                       & (dissect["rank"] == 0)]["confidence"].iloc[0]
        assert float(first[6]) == pytest.approx(conf, rel=1e-3)
        np.testing.assert_allclose(tensor[0], np.asarray(row["embedding"]), rtol=1e-5, atol=1e-6)


def test_re_export_replaces_instead_of_duplicating(run, tmp_path):
    logdir = tmp_path / "tb"
    export_tensorboard(run, logdir, log=quiet)  # without an embedding: scalars only
    make_run(run, epochs=EPOCHS + [7], layers=["layer3", "layer4"], n_neurons=6, embedding=FAST, run="my run")
    run_dir = export_tensorboard(run, logdir, log=quiet)
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("layer3/interpretable")]
    assert steps == EPOCHS + [7]  # each epoch once
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in logdir.iterdir()) == ["my_run"]  # no staging or old copies left
    assert not (run_dir / "projector_config.pbtxt").exists()


def test_a_foreign_folder_is_never_replaced(run, tmp_path):
    foreign = tmp_path / "tb" / "my_run"
    foreign.mkdir(parents=True)
    (foreign / "events.out.tfevents.1.someone").write_bytes(b"")
    with pytest.raises(ExportError, match=r"my_run: exists and was not written by conceptmon export"):
        export_tensorboard(run, tmp_path / "tb", log=quiet)
    assert (foreign / "events.out.tfevents.1.someone").exists() and not (foreign / EXPORT_MARKER).exists()


def test_scalar_names_and_observation_scalars_agree(run):
    dissect = store.read_dissect(run, epochs=[5])
    from conceptmon.stats import category_counts, concept_diversity, interpretable_counts

    tables = {"interpretable": interpretable_counts(dissect), "diversity": concept_diversity(dissect),
              "categories": category_counts(dissect), "dead": dead_counts(dissect)}
    rows = scalar_table(tables, prefix="conceptmon/")
    logged = observation_scalars(dissect, prefix="conceptmon/")
    assert logged == dict(zip(rows["tag"], rows["value"]))
    assert logged["conceptmon/layer4/dead"] == 2
    assert "conceptmon/layer4/spread" not in logged  # not computed without an embedding: skipped, not NaN


def test_cli_export_tensorboard(run, tmp_path):
    from click.testing import CliRunner

    from conceptmon.cli import main

    result = CliRunner().invoke(main, ["export", "tensorboard", "--out", str(run), "--logdir", str(tmp_path / "tb")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tb" / "my_run" / EXPORT_MARKER).exists()
    file_logdir = tmp_path / "file"
    file_logdir.write_text("x")
    result = CliRunner().invoke(main, ["export", "tensorboard", "--out", str(run), "--logdir", str(file_logdir)])
    assert result.exit_code != 0 and "Traceback" not in result.output
