"""Ground truth on the synthetic probe set: planted detectors must be found by name."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conceptmon import store
from conceptmon.config import config_from_dict
from conceptmon.engine import dissect_run
from conceptmon.probes.synthetic import PALETTE, generate_synthetic

N_IMAGES = 300


class PlantedUnits(torch.nn.Module):
    """Channel 0 fires on red pixels, channel 1 on striped images; both at mask resolution.

    Inputs are images in [0, 1] (the config uses mean 0, std 1). A faint left-to-right
    ramp breaks ties so that the top-quantile threshold falls inside the concept.
    """

    def forward(self, x):
        b, _, h, w = x.shape
        ramp = 1 + 0.01 * torch.linspace(0, 1, w, device=x.device).expand(h, w)
        red = torch.tensor(PALETTE["red"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1) / 255
        is_red = ((x - red).abs().amax(dim=1) < 1e-3).float()
        striped = torch.stack([self.stripe_score(img) for img in x]).view(b, 1, 1).expand(b, h, w)
        maps = torch.stack([is_red * ramp, striped * ramp], dim=1)
        return F.avg_pool2d(maps, 2)  # synthetic colours are drawn in 2x2 blocks at mask resolution

    @staticmethod
    def stripe_score(img, shift=6):
        """Two colours in near-equal shares, invariant to a shift along one direction."""
        codes = (img * 255).round().long()
        codes = codes[0] + 256 * codes[1] + 65536 * codes[2]
        s = codes.shape[0]
        colours, counts = codes.unique(return_counts=True)
        if len(colours) != 2 or not 0.3 < counts[0] / codes.numel() < 0.7:
            return torch.tensor(0.0)
        best = 0.0
        for dy, dx in ((0, shift), (shift, 0), (shift, shift), (shift, -shift)):
            a = codes[: s - dy, max(0, -dx) : s - max(0, dx)]
            c = codes[dy:, max(0, dx) : s - max(0, -dx)]
            best = max(best, (a == c).float().mean().item())
        return torch.tensor(float(best > 0.97))


class PlantedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.units = PlantedUnits()
        self.gain = torch.nn.Parameter(torch.ones(()))  # the checkpoint's one weight

    def forward(self, x):
        return self.units(x) * self.gain


def make_planted_net():
    return PlantedNet()


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("probe") / "synthetic", n=N_IMAGES, size=112, seed=3)


def test_planted_red_and_striped_units_are_named(synthetic_root, tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save({"epoch": 0, "state_dict": PlantedNet().state_dict()}, ckpts / "epoch_0.pt")
    cfg = config_from_dict({
        "model": {"arch": "tests.test_planted:make_planted_net"},
        "layers": ["units"],
        "probe": {"name": "synthetic", "root": str(synthetic_root), "mean": [0, 0, 0], "std": [1, 1, 1]},
    })
    dissect_run(cfg, ckpts=ckpts, out=tmp_path / "out", log=lambda m: None)
    df = store.read_dissect(tmp_path / "out")
    for unit, concept, category in ((0, "red", "color"), (1, "striped", "texture")):
        rows = df[df.neuron == unit].sort_values("rank")
        assert rows.iloc[0].concept == concept and rows.iloc[0].category == category
        assert rows.iloc[0].interpretable
        assert rows.iloc[0].score > 0.04 and rows.iloc[0].score > 2 * max(rows.iloc[1].score, 1e-3), rows.head(3)[["concept", "score"]]


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
    })
    dissect_run(cfg, ckpts=ckpts, out=tmp_path / "out", log=lambda m: None)
    best = store.read_dissect(tmp_path / "out").query("rank == 0")
    assert len(best) == 128 + 512
    assert best.interpretable.mean() < 0.25  # "mostly not": low-level colour units do appear at random
