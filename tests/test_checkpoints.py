
import pytest
import torch
from safetensors.torch import save_file

from conceptmon.checkpoints import (
    CheckpointError,
    apply_state_dict,
    epoch_from_name,
    find_checkpoints,
    load_state_dict,
    read_epoch,
    WeightLoader,
)

from .fakes import TinyConv


@pytest.fixture
def model():
    return TinyConv(seed=1)


def assert_same_weights(a, b):
    for (k1, v1), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model_state_dict": sd, "optimizer": {"lr": 0.1}},
        lambda sd: {"model": sd},
        lambda sd: {"net": sd},
        lambda sd: {"module." + k: v for k, v in sd.items()},
        lambda sd: {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3, "global_step": 10},  # Lightning
        lambda sd: {"_orig_mod." + k: v for k, v in sd.items()},  # torch.compile
        lambda sd: {"model._orig_mod.module." + k: v for k, v in sd.items()},
    ],
    ids=["plain", "state_dict", "model_state_dict", "model", "net", "module.", "lightning", "_orig_mod.", "stacked"],
)
@pytest.mark.parametrize("ext", [".pt", ".pth", ".ckpt", ".bin"])
def test_formats_load_into_model(tmp_path, model, wrap, ext):
    path = tmp_path / f"epoch_3{ext}"
    torch.save(wrap(model.state_dict()), path)
    fresh = TinyConv(seed=2)
    apply_state_dict(fresh, load_state_dict(path), path)
    assert_same_weights(model, fresh)


def test_safetensors_with_epoch_metadata(tmp_path, model):
    path = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(path), metadata={"epoch": "7"})
    assert read_epoch(path) == 7
    fresh = TinyConv(seed=2)
    apply_state_dict(fresh, load_state_dict(path), path)
    assert_same_weights(model, fresh)


def test_epoch_from_entry_beats_file_name(tmp_path, model):
    path = tmp_path / "run-step=999.pt"
    torch.save({"epoch": 4, "state_dict": model.state_dict()}, path)
    assert read_epoch(path) == 4
    assert epoch_from_name(tmp_path / "ckpt_e12_v2.pt") == 2
    assert epoch_from_name(tmp_path / "epoch_0012.pt") == 12


def test_find_sorted_and_duplicates(tmp_path, model):
    for e in (10, 2, 0):
        torch.save(model.state_dict(), tmp_path / f"epoch_{e}.pt")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".tmp-epoch_5.pt").write_bytes(b"partial")
    assert [c.epoch for c in find_checkpoints(tmp_path)] == [0, 2, 10]
    torch.save({"epoch": 2, "state_dict": model.state_dict()}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="two checkpoints for epoch 2"):
        find_checkpoints(tmp_path)


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        find_checkpoints(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoints"):
        find_checkpoints(tmp_path)


def test_no_epoch_anywhere(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "final.pt")
    with pytest.raises(CheckpointError, match="final.pt: no epoch"):
        find_checkpoints(tmp_path)


def test_truncated_checkpoint(tmp_path, model):
    path = tmp_path / "epoch_1.pt"
    torch.save(model.state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="epoch_1.pt: unreadable"):
        load_state_dict(path)


def test_pickled_module_needs_trust(tmp_path, model):
    path = tmp_path / "epoch_1.pt"
    torch.save(model, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoints"):
        load_state_dict(path)
    fresh = TinyConv(seed=2)
    apply_state_dict(fresh, load_state_dict(path, trust=True), path)
    assert_same_weights(model, fresh)


def test_mismatch_names_keys(tmp_path, model):
    sd = model.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["head.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys head\.bias; unexpected keys extra\.weight"):
        apply_state_dict(TinyConv(), sd, tmp_path / "x.pt")


def test_shape_mismatch_is_one_line(tmp_path):
    other = TinyConv(width=4)
    with pytest.raises(CheckpointError, match="size mismatch") as e:
        apply_state_dict(TinyConv(width=6), other.state_dict(), tmp_path / "x.pt")
    assert "\n" not in str(e.value)


def test_not_weights(tmp_path):
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "history": [1, 2, 3]}, path)
    with pytest.raises(CheckpointError, match="no weights found"):
        load_state_dict(path)


# ----------------------------------------------------------------------------- BatchNorm counters


class TinyBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2))


def test_state_dict_without_batch_counters_loads_with_one_notice_per_run(tmp_path):
    import collections

    trained = TinyBN()
    with torch.no_grad():
        trained.bn.running_mean.fill_(0.5)
    full = trained.state_dict()
    # As saved with version metadata, which makes torch's own strict load refuse it.
    pruned = collections.OrderedDict((k, v) for k, v in full.items() if not k.endswith("num_batches_tracked"))
    pruned._metadata = full._metadata
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        TinyBN().load_state_dict(pruned, strict=True)
    for epoch in (1, 2):
        torch.save(pruned, tmp_path / f"epoch_{epoch}.pt")
    model, notices = TinyBN(), []
    loader = WeightLoader(model, log=notices.append)
    for epoch in (1, 2):
        loader.load(tmp_path / f"epoch_{epoch}.pt")
    assert torch.equal(model.bn.running_mean, full["bn.running_mean"])
    assert int(model.bn.num_batches_tracked) == 0
    assert len(notices) == 1 and "num_batches_tracked for 2 BatchNorm layer(s)" in notices[0]
    # Other missing keys are still refused.
    del pruned["bn.running_var"]
    with pytest.raises(CheckpointError, match=r"missing keys bn\.running_var$"):
        apply_state_dict(TinyBN(), pruned, tmp_path / "x.pt")


# ----------------------------------------------------------------------------- Lightning epochs


def lightning_file(sd, epoch: int, processed: int | None, **extra) -> dict:
    raw = {"epoch": epoch, "global_step": 10, "pytorch-lightning_version": "2.6.0",
           "state_dict": {"model." + k: v for k, v in sd.items()}, **extra}
    if processed is not None:
        raw["loops"] = {"fit_loop": {"epoch_progress": {"current": {"ready": processed, "started": processed,
                                                                   "processed": processed, "completed": epoch}}}}
    return raw


def test_lightning_epochs_count_completed_epochs(tmp_path, model):
    sd = model.state_dict()
    # ModelCheckpoint at the end of the first epoch: epoch index 0, one epoch processed.
    torch.save(lightning_file(sd, epoch=0, processed=1), tmp_path / "epoch=0-step=5.ckpt")
    assert read_epoch(tmp_path / "epoch=0-step=5.ckpt") == 1
    # Mid-epoch save (every_n_train_steps) during the third epoch: two epochs completed.
    torch.save(lightning_file(sd, epoch=2, processed=2), tmp_path / "mid.ckpt")
    assert read_epoch(tmp_path / "mid.ckpt") == 2
    # No loop progress: assumed saved at the end of its epoch.
    torch.save(lightning_file(sd, epoch=3, processed=None), tmp_path / "old.ckpt")
    assert read_epoch(tmp_path / "old.ckpt") == 4
    # A plain dict's epoch entry is taken as is.
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "plain.pt")
    assert read_epoch(tmp_path / "plain.pt") == 3


def test_saved_hyperparameter_paths_load_but_other_objects_are_named(tmp_path, model):
    import argparse
    from pathlib import PurePosixPath

    path = tmp_path / "epoch=0-step=5.ckpt"
    torch.save(lightning_file(model.state_dict(), epoch=0, processed=1,
                              hyper_parameters={"data_dir": PurePosixPath("/data/x"), "lr": 0.1}), path)
    assert read_epoch(path) == 1 and len(load_state_dict(path)) == len(model.state_dict())
    torch.save(lightning_file(model.state_dict(), epoch=0, processed=1,
                              hyper_parameters={"args": argparse.Namespace(lr=0.1)}), path)
    with pytest.raises(CheckpointError, match=r"holds pickled Python objects \(argparse.Namespace\), which "
                                              r"weights_only loading refuses; .* --trust-checkpoints"):
        read_epoch(path)


def test_lightning_last_ckpt_copy_is_skipped_but_a_unique_one_kept(tmp_path, model):
    sd = model.state_dict()
    torch.save(lightning_file(sd, epoch=0, processed=1), tmp_path / "epoch=0-step=5.ckpt")
    torch.save(lightning_file(sd, epoch=1, processed=2), tmp_path / "epoch=1-step=10.ckpt")
    torch.save(lightning_file(sd, epoch=1, processed=2), tmp_path / "last.ckpt")
    assert [(c.path.name, c.epoch) for c in find_checkpoints(tmp_path)] == [
        ("epoch=0-step=5.ckpt", 1), ("epoch=1-step=10.ckpt", 2)]
    (tmp_path / "epoch=1-step=10.ckpt").unlink()  # save_top_k=1 kept only the best: last.ckpt is the newest epoch
    assert [(c.path.name, c.epoch) for c in find_checkpoints(tmp_path)] == [
        ("epoch=0-step=5.ckpt", 1), ("last.ckpt", 2)]
