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
