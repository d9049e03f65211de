import pandas as pd
import pytest
import torch

from conceptmon import store
from conceptmon.checkpoints import CheckpointError
from conceptmon.config import ConfigError, config_from_dict
from conceptmon.engine import ActivationError, dissect_run
from conceptmon.hooks import LayerError
from conceptmon.models import ModelError

from .fakes import TinyConv


def run(cfg_dict, ckpts, out, **kw):
    return dissect_run(config_from_dict(cfg_dict), ckpts=ckpts, out=out, log=lambda m: None, **kw)


def test_tables_follow_the_schema(array_probe_config, tiny_ckpts, tmp_path):
    out = tmp_path / "out"
    assert run(array_probe_config, tiny_ckpts, out) == [0, 1, 2]
    assert store.finished_epochs(out) == [0, 1, 2]
    df = store.read_dissect(out)
    assert pd.api.types.is_integer_dtype(df.epoch)
    table = pd.read_parquet(store.dissect_path(out, 1))
    import pyarrow.parquet as pq

    assert pq.read_schema(store.dissect_path(out, 1)).remove_metadata().equals(store.DISSECT)
    dead = table[table["rank"] == 0].dead
    assert len(dead) == 2 * 6 and not dead.all()  # layers x units
    assert len(table) == 3 * (~dead).sum() + dead.sum()  # top_k rows per live unit, one per dead unit
    assert set(table["rank"]) == {0, 1, 2}
    per_neuron = table.groupby(["layer", "neuron"])
    assert (per_neuron.interpretable.nunique() == 1).all()
    best = table[table["rank"] == 0].set_index(["layer", "neuron"]).score
    assert ((best >= 0.04) == table[table["rank"] == 0].set_index(["layer", "neuron"]).interpretable).all()
    assert (table.distance == -table.score).all()
    assert (per_neuron.score.apply(lambda s: s.is_monotonic_decreasing)).all()
    images = store.read_top_images(out, [1])
    assert len(images) == 2 * 6 * 10 and images.image.str.match(r"img\d{3}\.png").all()
    manifest = store.read_manifest(out)
    assert manifest["probe"]["n_images"] == 12 and sorted(manifest["epochs"]) == ["0", "1", "2"]
    assert manifest["concepts"]["names"] == ["c0", "c1", "c2", "c3", "c4"]


def test_rerun_skips_force_redoes_and_changed_config_is_refused(array_probe_config, tiny_ckpts, tmp_path):
    out = tmp_path / "out"
    run(array_probe_config, tiny_ckpts, out)
    before = store.dissect_path(out, 1).stat().st_mtime_ns
    assert run(array_probe_config, tiny_ckpts, out) == []
    assert run(array_probe_config, tiny_ckpts, out, epochs=[1], force=True) == [1]
    assert store.dissect_path(out, 1).stat().st_mtime_ns != before
    changed = {**array_probe_config, "detector": {"quantile": 0.1}}
    with pytest.raises(ConfigError, match=r"another config \(detector\.quantile: 0\.05 -> 0\.1\).*--force"):
        run(changed, tiny_ckpts, out)
    # A changed checkpoint (new weights under the same epoch) is redone without --force.
    torch.save({"epoch": 2, "state_dict": TinyConv(seed=9).state_dict()}, tiny_ckpts / "epoch_2.pt")
    assert run(array_probe_config, tiny_ckpts, out) == [2]


def test_epoch_selection_and_shards(array_probe_config, tiny_ckpts, tmp_path):
    assert run(array_probe_config, tiny_ckpts, tmp_path / "a", epochs=[2, 0]) == [0, 2]
    with pytest.raises(CheckpointError, match=r"no checkpoint for epochs \[7\]; available: \[0, 1, 2\]"):
        run(array_probe_config, tiny_ckpts, tmp_path / "b", epochs=[7])
    assert run(array_probe_config, tiny_ckpts, tmp_path / "c", shard=(1, 2)) == [1]
    assert run(array_probe_config, tiny_ckpts, tmp_path / "c", shard=(0, 2)) == [0, 2]


@pytest.mark.parametrize(
    "change,error,message",
    [
        ({"layers": ["conv3"]}, LayerError, r"no layer named 'conv3'.*did you mean conv2, conv1"),
        ({"model": {"arch": "resnet181"}}, ModelError, r"unknown architecture 'resnet181' \(did you mean resnet18"),
        ({"model": {"arch": "tests.fakes:TinyConvv"}}, ModelError, r"has no 'TinyConvv' \(did you mean TinyConv"),
    ],
)
def test_bad_input_fails_before_any_output(array_probe_config, tiny_ckpts, tmp_path, change, error, message):
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        run({**array_probe_config, **change}, tiny_ckpts, out)
    assert not out.exists()


def test_nan_activations_leave_no_table(array_probe_config, tiny_ckpts, tmp_path):
    sd = TinyConv(seed=0).state_dict()
    sd["conv2.weight"][0, 0, 0, 0] = float("nan")
    torch.save({"epoch": 5, "state_dict": sd}, tiny_ckpts / "epoch_5.pt")
    out = tmp_path / "out"
    with pytest.raises(ActivationError, match="layer conv2: NaN or infinite activations"):
        run(array_probe_config, tiny_ckpts, out, epochs=[5])
    assert not store.dissect_path(out, 5).exists() and store.finished_epochs(out) == []
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.name != store.MANIFEST] if out.exists() else []
    assert leftovers == []  # no table, no record, no temporary file


def test_monitor_observe_writes_the_same_files(array_probe_config, tiny_ckpts, tmp_path):
    from conceptmon import Monitor

    run(array_probe_config, tiny_ckpts, tmp_path / "cli", epochs=[1])
    model = TinyConv(seed=1).train()
    monitor = Monitor(array_probe_config, out=tmp_path / "api", log=lambda m: None)
    obs = monitor.observe(model, 1)
    assert model.training  # mode restored for the training loop
    cli = store.read_dissect(tmp_path / "cli").drop(columns="run")
    api = store.read_dissect(tmp_path / "api").drop(columns="run")
    pd.testing.assert_frame_equal(cli, api)
    assert obs.summary["conv1"]["neurons"] == 6
    pd.testing.assert_frame_equal(obs.table.drop(columns="run"), api)


def test_lightning_callback_without_lightning_says_how_to_install(array_probe_config, monkeypatch):
    import builtins

    from conceptmon import lightning_callback
    from conceptmon.errors import ConceptmonError

    real_import = builtins.__import__

    def no_lightning(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.split(".")[0] in ("lightning", "pytorch_lightning"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_lightning)
    for module in [m for m in list(__import__("sys").modules) if m.split(".")[0] in ("lightning", "pytorch_lightning")
                   or m == "conceptmon.lightning"]:
        monkeypatch.delitem(__import__("sys").modules, module)
    with pytest.raises(ConceptmonError, match="pip install lightning"):
        lightning_callback(array_probe_config)


def test_linear_layers_are_dissected_as_whole_image_units(array_probe_config, tiny_ckpts, tmp_path):
    cfg = {**array_probe_config, "layers": ["conv2", "head"]}
    run(cfg, tiny_ckpts, tmp_path / "out", epochs=[0])
    df = store.read_dissect(tmp_path / "out")
    head = df[df.layer == "head"]
    assert sorted(head.neuron.unique()) == [0, 1, 2] and len(head) == 3 * 3


def test_several_checkpoints_per_pass_give_the_same_tables(array_probe_config, tiny_ckpts, tmp_path):
    one = {**array_probe_config, "run": "same"}
    assert run(one, tiny_ckpts, tmp_path / "one", checkpoints_per_pass=1) == [0, 1, 2]
    assert run(one, tiny_ckpts, tmp_path / "all", checkpoints_per_pass=3) == [0, 1, 2]
    pd.testing.assert_frame_equal(store.read_dissect(tmp_path / "one"), store.read_dissect(tmp_path / "all"))
    pd.testing.assert_frame_equal(store.read_top_images(tmp_path / "one"), store.read_top_images(tmp_path / "all"))
    for e in (0, 1, 2):  # byte-identical tables, so the records agree too
        assert (store.read_json(store.epoch_record_path(tmp_path / "one", e))["tables"]
                == store.read_json(store.epoch_record_path(tmp_path / "all", e))["tables"])


def test_force_with_some_epochs_and_a_changed_config_is_refused(array_probe_config, tiny_ckpts, tmp_path):
    out = tmp_path / "out"
    run(array_probe_config, tiny_ckpts, out)
    changed = {**array_probe_config, "probe": {**array_probe_config["probe"], "limit": 8}}
    with pytest.raises(ConfigError, match=r"epochs \[1, 2\] were made with another config \(.*probe\.n_images: "
                                          r"12 -> 8\) and would stay beside the redone ones"):
        run(changed, tiny_ckpts, out, epochs=[0], force=True)
    assert store.check_dissect_lineage(out)  # nothing was mixed
    assert run(changed, tiny_ckpts, out, force=True) == [0, 1, 2]  # all redone: consistent again
    assert len(store.read_dissect(out).neuron.unique()) == 6


def test_a_changed_or_truncated_table_is_redone(array_probe_config, tiny_ckpts, tmp_path):
    out = tmp_path / "out"
    run(array_probe_config, tiny_ckpts, out)
    rows = len(store.read_dissect(out))
    path = store.dissect_path(out, 1)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(store.StaleError, match=r"epoch_0001.parquet: does not match its record"):
        store.read_dissect(out)
    assert run(array_probe_config, tiny_ckpts, out) == [1]
    assert len(store.read_dissect(out)) == rows


def test_everything_that_changes_results_is_in_the_fingerprint(array_probe_config, tmp_path):
    from conceptmon.engine import Dissector

    def fp(**change):
        cfg = config_from_dict({**array_probe_config, **change})
        return Dissector(cfg, tmp_path / "x", model=TinyConv(), log=lambda m: None).fingerprint

    base = fp()
    assert fp(device="cpu", batch_size=3, num_workers=0, run="other") == base  # not results
    for change in ({"amp": True}, {"top_k": 2}, {"trust": {"replicates": 3}}, {"trust": {"seed": 1}},
                   {"detector": {"quantile": 0.1}}, {"detector": {"threshold": 0.2}},
                   {"layers": ["conv1"]}, {"probe": {**array_probe_config["probe"], "limit": 5}},
                   {"probe": {**array_probe_config["probe"], "std": [0.5, 0.5, 0.5]}}):
        assert fp(**change) != base, change


def test_a_second_pass_feeds_only_the_accumulators_that_ask(tmp_path):
    """collect_passes runs the loader again for a model while any of its accumulators asks
    (needs_another_pass), feeding only those; top images come from the first pass."""
    from conceptmon.detectors import Detector, LayerAccumulator, LayerScores, RunContext
    from conceptmon.engine import collect_passes, make_loader

    from .fakes import random_probe

    class Counting(LayerAccumulator):
        def __init__(self, layer, n_units, passes):
            self.layer, self.n_units, self.passes, self.seen, self.asked = layer, n_units, passes, [], 0

        def add(self, acts, index):
            self.seen.extend(index.tolist())

        def needs_another_pass(self):
            self.asked += 1
            return len(self.seen) < self.passes * 12

        def scores(self):
            return LayerScores(scores=torch.zeros(self.n_units, 1))

    accs = {}

    class TwoPasses(Detector):
        name = "two-passes"
        default_threshold = 0.5

        def accumulator(self, layer, n_units):
            accs[layer] = Counting(layer, n_units, passes=2 if layer == "conv2" else 1)
            return accs[layer]

    probe = random_probe(n=12, seed=0)
    cfg = config_from_dict({"layers": ["conv1", "conv2"], "batch_size": 5, "probe": {"mean": [0, 0, 0], "std": [1, 1, 1]}})
    det = TwoPasses(None, probe, probe.concepts, RunContext(device=torch.device("cpu"), cache_dir=tmp_path))
    [results] = collect_passes([TinyConv()], cfg.layers, make_loader(probe, cfg, torch.device("cpu"), shuffled=True),
                               det, torch.device("cpu"), mean=[0, 0, 0], std=[1, 1, 1])
    assert sorted(accs["conv1"].seen) == list(range(12))
    assert sorted(accs["conv2"].seen) == sorted(list(range(12)) * 2)
    assert accs["conv2"].seen[:12] == accs["conv2"].seen[12:] != list(range(12))  # the same fixed random order
    assert accs["conv1"].asked == 1 and accs["conv2"].asked == 2  # asked after each pass it was fed
    assert results["conv2"].top_index.shape == (6, 10) and len(set(results["conv2"].top_index[0].tolist())) == 10


def test_top_images_do_not_depend_on_the_read_order():
    from conceptmon.engine import TopImages

    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (40, 5), generator=g).float()  # many ties
    results = []
    strongest_first = torch.argsort(values.amax(dim=1), descending=True, stable=True)  # late batches mostly skipped
    for order in (torch.arange(40), torch.randperm(40, generator=g), strongest_first):
        top = TopImages(k=10)
        for chunk in order.split(7):
            top.add(values[chunk], chunk)
        results.append((top.values, top.index))
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1])
    want = sorted(range(40), key=lambda i: (-float(values[i, 2]), i))[:10]
    assert results[0][1][2].tolist() == want
