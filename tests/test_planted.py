"""Ground truth on the synthetic probe set: planted detectors must be found by name,
through the whole file-based path (checkpoint files -> dissect_run -> Parquet tables)."""
import numpy as np
import pytest
import torch

from conceptmon import store
from conceptmon.config import config_from_dict
from conceptmon.engine import dissect_run
from conceptmon.planted import PlantedUnits, least_covered_colours
from conceptmon.probes.synthetic import SyntheticProbe, generate_synthetic

N_IMAGES = 300


class PlantedNet(torch.nn.Module):
    """conceptmon.planted's units behind one weight, so that a checkpoint file has something in it."""

    def __init__(self, colours=("red", "blue", "green")):
        super().__init__()
        self.units = PlantedUnits(colours)
        self.gain = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.units(x) * self.gain


def make_planted_net(colours=("red", "blue", "green")):
    return PlantedNet(tuple(colours))


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("probe") / "synthetic", n=N_IMAGES, size=112, seed=3)


def _least_covered(root, k=3):
    probe = SyntheticProbe(root)
    area = np.zeros(len(probe.concepts))
    for i in range(len(probe)):
        a = probe.load_annotation(i)
        area += np.bincount(a.pixel_maps[0].reshape(-1), minlength=len(area) + 1)[1:]
    return least_covered_colours(area, probe.concepts.names, k)


def test_planted_units_are_named_from_checkpoint_files(synthetic_root, tmp_path):
    colours = _least_covered(synthetic_root)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save({"epoch": 0, "state_dict": PlantedNet(colours).state_dict()}, ckpts / "epoch_0.pt")
    cfg = config_from_dict({
        "model": {"arch": "tests.test_planted:make_planted_net", "kwargs": {"colours": colours}},
        "layers": ["units"],
        "probe": {"name": "synthetic", "root": str(synthetic_root), "mean": [0, 0, 0], "std": [1, 1, 1]},
        "trust": {"replicates": 0},
    })
    dissect_run(cfg, ckpts=ckpts, out=tmp_path / "out", log=lambda m: None)
    df = store.read_dissect(tmp_path / "out")
    expected = PlantedUnits(colours).planted_expectations()
    categories = {**dict.fromkeys(colours, "color"), "striped": "texture", "beach": "scene"}
    for unit, concept in expected:
        rows = df[df.neuron == unit].sort_values("rank")
        top = rows.iloc[0]
        if concept is None:  # the dead and the noise unit
            assert not top.interpretable and top.score < 0.04, rows.head(2)[["concept", "score"]]
            continue
        assert (top.concept, top.category) == (concept, categories[concept]), rows.head(3)[["concept", "score"]]
        assert top.interpretable and top.score >= 0.04
        assert top.score > rows.iloc[1].score
    dead = df[(df.neuron == len(colours) + 2)]
    assert dead.score.max() == 0.0


@pytest.mark.slow  # a ResNet-18 over the probe set
def test_random_network_is_mostly_not_interpretable(synthetic_root, tmp_path):
    import torchvision

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), ckpts / "epoch_0.pt")
    cfg = config_from_dict({
        "model": {"arch": "resnet18", "kwargs": {"num_classes": 10}},
        "layers": ["layer2", "layer4"],
        "probe": {"name": "synthetic", "root": str(synthetic_root), "image_size": 64},
        "trust": {"replicates": 0},
    })
    dissect_run(cfg, ckpts=ckpts, out=tmp_path / "out", log=lambda m: None)
    best = store.read_dissect(tmp_path / "out").query("rank == 0")
    assert len(best) == 128 + 512
    assert best.interpretable.mean() < 0.25  # "mostly not": low-level colour units do appear at random
