import torch

from conceptmon import store
from conceptmon.config import config_from_dict
from conceptmon.watch import CollapseTracker, watch_run

from .fakes import TinyConv


def test_watch_picks_up_new_and_half_written_checkpoints(array_probe_config, tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save({"epoch": 0, "state_dict": TinyConv(seed=0).state_dict()}, ckpts / "epoch_0.pt")
    full = tmp_path / "full.pt"
    torch.save({"epoch": 1, "state_dict": TinyConv(seed=1).state_dict()}, full)
    data = full.read_bytes()

    actions = {
        1: lambda: (ckpts / "epoch_1.pt").write_bytes(data[: len(data) // 2]),  # training job mid-write
        3: lambda: (ckpts / "epoch_1.pt").write_bytes(data),  # write finished
    }
    polls = []

    def fake_sleep(seconds):
        polls.append(seconds)
        actions.get(len(polls), lambda: None)()

    messages = []
    done = watch_run(config_from_dict(array_probe_config), ckpts=ckpts, out=tmp_path / "out", interval=0.5,
                     refresh=False, max_polls=6, log=messages.append, sleep=fake_sleep)
    assert done == [0, 1]
    assert store.finished_epochs(tmp_path / "out") == [0, 1]
    assert any("skipping epoch_1.pt" in m and "will retry" in m for m in messages)
    assert any(m.startswith("epoch 1: conv1 ") and "interpretable" in m for m in messages)


def test_collapse_tracker_warns_after_patience():
    tracker = CollapseTracker(patience=2)
    summaries = [{"l": {"concepts": c}} for c in (9, 7, 5)]
    out = [tracker.update(s, {"l": 0.9}) for s in summaries]
    assert out[0] == []
    assert any("over 50%" in w for w in out[1])
    assert any("distinct concepts fell for 2 epochs (9 -> 7 -> 5)" in w for w in out[2])


def _watch(cfg_dict, ckpts, out, actions, polls=6):
    """watch_run with a fake clock: ``actions[k]`` runs during the k-th sleep."""
    slept = []

    def fake_sleep(seconds):
        slept.append(seconds)
        actions.get(len(slept), lambda: None)()

    messages = []
    done = watch_run(config_from_dict(cfg_dict), ckpts=ckpts, out=out, interval=0.5, refresh=False,
                     max_polls=polls, log=messages.append, sleep=fake_sleep)
    return done, messages


def test_second_file_for_an_epoch_is_an_error_and_replaces_nothing(array_probe_config, tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save({"epoch": 1, "state_dict": TinyConv(seed=1).state_dict()}, ckpts / "epoch_0001.pt")
    again = lambda: torch.save({"epoch": 1, "state_dict": TinyConv(seed=5).state_dict()}, ckpts / "again.pt")
    done, messages = _watch(array_probe_config, ckpts, tmp_path / "out", {2: again})
    assert done == [1]
    record = store.read_json(store.epoch_record_path(tmp_path / "out", 1))
    assert record["checkpoint"].endswith("epoch_0001.pt")
    said = [m for m in messages if "both hold epoch 1" in m]
    assert len(said) == 1 and "again.pt and epoch_0001.pt" in said[0]


def test_a_replaced_checkpoint_is_dissected_again(array_probe_config, tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    path = ckpts / "epoch_0002.pt"
    torch.save({"epoch": 2, "state_dict": TinyConv(seed=2).state_dict()}, path)
    replace = lambda: torch.save({"epoch": 2, "state_dict": TinyConv(seed=7).state_dict()}, path)
    done, _ = _watch(array_probe_config, ckpts, tmp_path / "out", {3: replace}, polls=7)
    assert done == [2, 2]
    from conceptmon.checkpoints import checkpoint_sha256

    assert store.read_json(store.epoch_record_path(tmp_path / "out", 2))["sha256"] == checkpoint_sha256(path)


def test_odd_files_are_reported_once_and_never_stop_the_watcher(array_probe_config, tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save({"epoch": float("nan"), "state_dict": TinyConv(seed=0).state_dict()}, ckpts / "nan_epoch.pt")
    torch.save({"epoch": 3, "state_dict": {"other.weight": torch.zeros(2)}}, ckpts / "epoch_0003.pt")
    torch.save({"epoch": 4, "state_dict": TinyConv(seed=4).state_dict()}, ckpts / "epoch_0004.pt")
    done, messages = _watch(array_probe_config, ckpts, tmp_path / "out", {}, polls=8)
    assert done == [4]
    nan = [m for m in messages if "nan_epoch.pt" in m]
    arch = [m for m in messages if "epoch_0003.pt" in m]
    assert len(nan) == 1 and "no epoch" in nan[0]  # a NaN epoch entry is no epoch (the name has no number)
    assert len(arch) == 1 and "weights do not fit model" in arch[0] and "until it changes" in arch[0]


def test_interval_must_be_positive(array_probe_config, tmp_path):
    import pytest

    from conceptmon.errors import ConceptmonError

    with pytest.raises(ConceptmonError, match=r"^--interval: must be a positive number of seconds, got -1"):
        watch_run(config_from_dict(array_probe_config), ckpts=tmp_path, interval=-1, max_polls=1)
