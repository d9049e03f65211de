"""The Lightning callback with real Lightning: epochs agree with ModelCheckpoint files,
rank zero only under DDP, resumed fits continue, scalars reach the logger."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conceptmon import store
from conceptmon.config import config_from_dict
from conceptmon.engine import dissect_run
from conceptmon.errors import ConceptmonError
from conceptmon.probes.synthetic import generate_synthetic

from .fakes import TinyConv

pl = pytest.importorskip("lightning.pytorch")
from conceptmon.lightning import ConceptMonitorCallback  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Classifier(pl.LightningModule):
    """TinyConv as ``self.model``: its checkpoint keys are ``model.conv1.weight``, ..."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.model = TinyConv(seed=seed)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 3, (8,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


def quiet(_message: str) -> None:
    pass


def rank_log(message: str) -> None:
    """Appends ``<rank> <message>`` to $RANK_LOG (module level: ddp_spawn pickles the callback)."""
    rank = os.environ.get("LOCAL_RANK") or (str(torch.distributed.get_rank()) if torch.distributed.is_initialized() else "?")
    with open(os.environ["RANK_LOG"], "a") as f:
        f.write(f"{rank} {message}\n")


@pytest.fixture(scope="module")
def probe_root(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("probe") / "syn", n=10, size=32, seed=4)


@pytest.fixture
def config(probe_root):
    return {
        "model": {"arch": "tests.fakes:TinyConv"}, "layers": ["conv1", "conv2"], "run": "r",
        "probe": {"name": "synthetic", "root": str(probe_root)}, "detector": {"quantile": 0.05},
        "trust": {"replicates": 5}, "batch_size": 5, "top_k": 2, "device": "cpu",
    }


def trainer(tmp_path: Path, epochs: int, callbacks, **options) -> "pl.Trainer":
    defaults = dict(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                    enable_model_summary=False, logger=False, num_sanity_val_steps=0)
    return pl.Trainer(default_root_dir=str(tmp_path), callbacks=callbacks, **{**defaults, **options})


def checkpointing(folder: Path):
    return pl.callbacks.ModelCheckpoint(dirpath=str(folder), save_top_k=-1, every_n_epochs=1, save_last=True)


# ----------------------------------------------------------------------------- fast


def test_short_form_is_the_callback_and_state_round_trips(config, tmp_path):
    from conceptmon import lightning_callback

    cb = lightning_callback(config, tmp_path / "out", module="model", log=quiet)
    assert isinstance(cb, ConceptMonitorCallback) and isinstance(cb, pl.Callback)
    cb.observed = [0, 1]
    fresh = ConceptMonitorCallback(config, log=quiet)
    fresh.load_state_dict(cb.state_dict())
    assert fresh.out == (tmp_path / "out").resolve() and fresh.observed == [0, 1]
    with pytest.raises(ConceptmonError, match="every_n_epochs"):
        ConceptMonitorCallback(config, every_n_epochs=0)


def test_layers_of_the_inner_network_name_the_module_option(config, tmp_path):
    cb = ConceptMonitorCallback(config, tmp_path / "out", log=quiet)
    with pytest.raises(ConceptmonError, match=r"'conv1' is not a layer of the LightningModule but of its 'model': "
                                              r"pass module='model'"):
        cb._network(Classifier())


@pytest.mark.slow
def test_without_lightning_conceptmon_imports_and_says_how_to_install(config):
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None\n"
        "import conceptmon\n"
        "from conceptmon.errors import ConceptmonError\n"
        "try:\n"
        f"    conceptmon.lightning_callback({config!r})\n"
        "except ConceptmonError as e:\n"
        "    print('ERR', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "ERR" in result.stdout and "pip install lightning" in result.stdout


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
def test_epochs_and_tables_agree_with_model_checkpoint_files(config, tmp_path):
    out, ckpts = tmp_path / "callback", tmp_path / "ckpts"
    logger = pl.loggers.CSVLogger(str(tmp_path / "logs"), name="csv", version=0)
    cb = ConceptMonitorCallback(config, out, module="model", log=quiet)
    trainer(tmp_path, 2, [cb, checkpointing(ckpts)], logger=logger).fit(Classifier(), loader())
    assert store.finished_epochs(out) == [0, 1, 2]
    # The files ModelCheckpoint wrote after 1 and 2 epochs say epoch=0 and epoch=1 inside; dissect reads them as 1, 2.
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "last.ckpt"]
    assert dissect_run(config_from_dict(config), ckpts=ckpts, out=tmp_path / "cli", log=quiet) == [1, 2]
    from_callback = store.read_dissect(out, epochs=[1, 2])
    from_files = store.read_dissect(tmp_path / "cli")
    pd.testing.assert_frame_equal(from_callback, from_files)
    assert not store.read_dissect(out, epochs=[0]).equals(store.read_dissect(out, epochs=[1]))
    # Scalars reached the trainer's logger, one row per observation.
    with open(tmp_path / "logs" / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("conceptmon/epoch")]
    assert [float(r["conceptmon/epoch"]) for r in rows] == [0, 1, 2]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]  # trainer.global_step
    table = store.read_dissect(out)
    best = table[table["rank"] == 0]
    for row, epoch in zip(rows, (0, 1, 2)):
        mine = best[(best.epoch == epoch) & (best.layer == "conv2")]
        assert float(row["conceptmon/conv2/interpretable"]) == mine.interpretable.sum()
        assert float(row["conceptmon/conv2/dead"]) == mine.dead.sum()
        assert "conceptmon/conv2/interpretable_share" in row and "conceptmon/conv1/distinct_concepts" in row


@pytest.mark.slow
def test_resumed_fit_continues_the_same_folder(config, tmp_path, monkeypatch):
    first_cwd, second_cwd = tmp_path / "first", tmp_path / "second"
    first_cwd.mkdir()
    second_cwd.mkdir()
    ckpts = tmp_path / "ckpts"
    monkeypatch.chdir(first_cwd)  # the output folder defaults to ./conceptmon_out
    trainer(tmp_path, 2, [ConceptMonitorCallback(config, module="model", log=quiet), checkpointing(ckpts)]
            ).fit(Classifier(), loader())
    out = first_cwd / "conceptmon_out"
    before = {e: store.read_json(store.epoch_record_path(out, e)) for e in (0, 1, 2)}
    monkeypatch.chdir(second_cwd)
    resumed = ConceptMonitorCallback(config, module="model", log=quiet)
    trainer(tmp_path, 3, [resumed, checkpointing(ckpts)]).fit(Classifier(seed=9), loader(),
                                                                 ckpt_path=str(ckpts / "last.ckpt"))
    assert store.finished_epochs(out) == [0, 1, 2, 3] and not (second_cwd / "conceptmon_out").exists()
    for epoch, record in before.items():  # nothing redone: epoch 0 still shows the untrained weights
        assert store.read_json(store.epoch_record_path(out, epoch)) == record
    assert resumed.observed == [0, 1, 2, 3]
    # The resumed run's checkpoint of epoch 3 dissects to the callback's epoch 3.
    assert dissect_run(config_from_dict(config), ckpts=ckpts, out=tmp_path / "cli", epochs=[3], log=quiet) == [3]
    pd.testing.assert_frame_equal(store.read_dissect(out, epochs=[3]), store.read_dissect(tmp_path / "cli"))


@pytest.mark.slow
def test_only_rank_zero_observes_under_ddp(config, tmp_path, monkeypatch):
    log_file = tmp_path / "ranks.log"
    monkeypatch.setenv("RANK_LOG", str(log_file))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "out"
    cb = ConceptMonitorCallback(config, out, module="model", log=rank_log)
    trainer(tmp_path, 1, [cb], devices=2, strategy="ddp_spawn", enable_checkpointing=False).fit(Classifier(), loader())
    assert store.finished_epochs(out) == [0, 1]
    lines = log_file.read_text().splitlines()
    done = [line for line in lines if ": done in" in line]
    assert len(done) == 2 and all(line.startswith("0 ") for line in lines), lines
