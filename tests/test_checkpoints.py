import pickle

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
