"""Ties and dead units: units that hold one exact value over whole regions, on the synthetic probe.

Saturating units (exact palette colours, ReLU6, hardtanh), bf16-quantised activations and
dead units must come out as the brute-force reference says (tests/reference_netdissect.py),
and with the right concept: under the old rule (active = value > T) a tied top block was
never active and these units got IoU 0 everywhere.
"""
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conceptmon import store
from conceptmon.config import ProbeConfig, config_from_dict
from conceptmon.detectors import RunContext, create_detector
from conceptmon.engine import collect_layers, dissect_run, make_loader
from conceptmon.probes import create_probe
from conceptmon.probes.synthetic import generate_synthetic

from .reference_netdissect import reference_netdissect, upsample

N_IMAGES = 60
UNITS = ("green", "relu6_red", "hardtanh_blue", "zero", "constant", "corner")
COARSE = ("green", "clamped_red", "hardtanh_blue", "constant")


class SaturatingUnits(torch.nn.Module):
    """Units at mask resolution (16x16 for 32 px images) that saturate on exact colours.

    Inputs are images in [0, 1] (mean 0, std 1). The synthetic probe draws its colours in
    2x2 blocks at mask resolution, so a 2x2 average keeps every value exact.
    """

    def forward(self, x):
        rgb = (x * 255).round()
        r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        green = ((r == 0) & (g == 160) & (b == 0)).float()  # 1.0 on pure green pixels, 0 elsewhere
        relu6 = F.relu6(8 * (r - g - b) / 255)  # 6 on pure red, below 6 everywhere else
        hardtanh = F.hardtanh(4 * (b - torch.maximum(r, g)) / 255 - 1)  # +1 on pure blue, -1 on most pixels
        zero = torch.zeros_like(r)
        constant = torch.full_like(r, 0.7)
        corner = torch.zeros_like(r)  # > 0 on one pixel per image: fewer than `quantile` of the positions
        corner[:, 0, 0] = 1 + g[:, 0, 0] / 255
        return F.avg_pool2d(torch.stack([green, relu6, hardtanh, zero, constant, corner], dim=1), 2)


class CoarseUnits(torch.nn.Module):
    """Units on a 6x6 grid that saturate at exactly +-0.7: upsampled to 16x16, flat regions
    at 0.7 come back a little below it and regions at -0.7 a little above (float32 rounding
    of interpolation weights that are not powers of two)."""

    def forward(self, x):
        rgb = (x * 255).round()
        r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        cells = lambda m: F.adaptive_avg_pool2d(m[:, None], 6)[:, 0]
        green = (cells(((r == 0) & (g == 160) & (b == 0)).float()) == 1).float() * 0.7  # cells wholly green
        clamped = torch.clamp(cells(8 * (r - g - b) / 255), 0, 0.7)
        hardtanh = F.hardtanh(cells(4 * (b - torch.maximum(r, g)) / 255 - 1), -0.7, 0.7)
        constant = torch.full_like(green, -0.7)
        return torch.stack([green, clamped, hardtanh, constant], dim=1)


class SaturatingNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.units = SaturatingUnits()
        self.coarse = CoarseUnits()
        self.gain = torch.nn.Parameter(torch.ones(()))  # the checkpoint's one weight

    def forward(self, x):
        return self.units(x).sum() * self.gain + self.coarse(x).sum()


def make_saturating_net():
    return SaturatingNet()


class Bf16(torch.nn.Module):
    def forward(self, x):
        return x.to(torch.bfloat16).float()


class Bf16Net(torch.nn.Module):
    """A random conv whose outputs are quantised to bfloat16 (as --amp or a bf16 model does)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(5, 5, 3, stride=2, padding=1)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.q1, self.q2 = Bf16(), Bf16()

    def forward(self, x):
        a = self.q1(self.conv1(x))
        return self.q2(torch.relu(self.conv2(torch.relu(a))))


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    root = generate_synthetic(tmp_path_factory.mktemp("ties") / "synthetic", n=N_IMAGES, size=32, seed=5)
    return create_probe(ProbeConfig(name="synthetic", root=str(root)))


def images_of(probe) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(probe.load_image(i), dtype=np.float32)).permute(2, 0, 1) / 255
                        for i in range(len(probe))])


def dissect(model, layers, probe, tmp_path, batch_size=7, quantile=0.005):
    cfg = config_from_dict({"layers": layers, "batch_size": batch_size, "probe": {"mean": [0, 0, 0], "std": [1, 1, 1]},
                            "detector": {"quantile": quantile}})
    ctx = RunContext(device=torch.device("cpu"), cache_dir=tmp_path)
    det = create_detector(cfg, probe, ctx)
    det.prepare()
    return collect_layers(model, layers, make_loader(probe, cfg, ctx.device), det, ctx.device,
                          mean=cfg.probe.mean, std=cfg.probe.std)


def best_concepts(scores: torch.Tensor, probe) -> list[str]:
    return [probe.concepts.names[i] for i in scores.argmax(dim=1).tolist()]


@pytest.mark.slow
def test_saturating_units_get_their_colour_and_equal_brute_force(netdissect_backend, probe, tmp_path):
    net = SaturatingNet()
    results = dissect(net, ["units", "coarse"], probe, tmp_path)
    x = images_of(probe)
    with torch.no_grad():
        acts = {"units": net.units(x).numpy(), "coarse": net.coarse(x).numpy()}

    units = results["units"]
    want, dead, counts = reference_netdissect(acts["units"], probe, 0.005)
    np.testing.assert_allclose(units.scores.numpy(), want, rtol=1e-5, atol=1e-6)
    assert units.labels.dead.tolist() == [False, False, False, True, True, False]
    assert dead.tolist() == units.labels.dead.tolist()
    best = best_concepts(units.scores, probe)
    assert best[:3] == ["green", "red", "blue"]
    # Exact colours at mask resolution: the active region is the colour itself.
    assert units.scores[0].max().item() == pytest.approx(1.0) and units.scores[2].max().item() == pytest.approx(1.0)
    # The sparse unit: T == floor == 0, so only its 60 positive pixels are active (not the whole map).
    assert counts.thresholds[5] == counts.floors[5] == 0.0
    assert counts.area[5].sum() == N_IMAGES

    coarse = results["coarse"]
    want, dead, counts = reference_netdissect(acts["coarse"], probe, 0.005)
    np.testing.assert_allclose(coarse.scores.numpy(), want, rtol=1e-5, atol=1e-6)
    assert coarse.labels.dead.tolist() == [False, False, False, True] == dead.tolist()
    best = best_concepts(coarse.scores, probe)
    assert best[0] in ("green", "grass")  # 6x6 cells wholly green lie in grass
    # Flat regions at T upsample to T +- rounding: without the tolerance, `>= T` would lose some
    # of them and the constant unit (T == floor) would get spurious active pixels above T.
    up = np.stack([upsample(acts["coarse"][:, u], probe.mask_size) for u in range(4)], axis=1)
    t = counts.thresholds
    assert (up[:, 0] >= t[0]).sum() < counts.area[0].sum() and (up[:, 3] > t[3]).sum() > 0


@pytest.mark.slow
def test_bf16_activations_equal_brute_force(netdissect_backend, probe, tmp_path):
    net = Bf16Net(seed=3)
    results = dissect(net, ["q1", "q2"], probe, tmp_path, batch_size=9, quantile=0.02)
    x = images_of(probe)
    with torch.no_grad():
        a1 = net.q1(net.conv1(x))
        a2 = net.q2(torch.relu(net.conv2(torch.relu(a1))))
    for name, acts in (("q1", a1), ("q2", a2)):
        values = acts.numpy()
        want, dead, counts = reference_netdissect(values, probe, 0.02)
        np.testing.assert_allclose(results[name].scores.numpy(), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(results[name].labels.dead.numpy(), dead)
        # The comparison is about ties: bf16 values at T cover more than `quantile` of some unit.
        shares = [(values[:, u] == counts.thresholds[u]).mean() for u in range(values.shape[1])]
        assert max(shares) > 0.02
        assert want.max() > 0


@pytest.mark.slow
def test_dead_units_get_one_row_without_concept(netdissect_backend, probe, tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save({"epoch": 0, "state_dict": SaturatingNet().state_dict()}, ckpts / "epoch_0.pt")
    cfg = config_from_dict({
        "model": {"arch": "tests.test_netdissect_ties:make_saturating_net"},
        "layers": ["units"],
        "probe": {"name": "synthetic", "root": str(probe.root), "mean": [0, 0, 0], "std": [1, 1, 1]},
        "trust": {"replicates": 20},
        "top_k": 3,
    })
    dissect_run(cfg, ckpts=ckpts, out=tmp_path / "out", log=lambda m: None)
    df = store.read_dissect(tmp_path / "out")
    for unit in (3, 4):  # all-zero and constant
        rows = df[df.neuron == unit]
        assert len(rows) == 1 and rows.iloc[0]["rank"] == 0 and rows.iloc[0].dead
        assert pd.isna(rows.iloc[0].concept) and rows.iloc[0].score == 0 and not rows.iloc[0].interpretable
        assert rows.iloc[0].confidence == 0
    green = df[(df.neuron == 0) & (df["rank"] == 0)].iloc[0]
    assert green.concept == "green" and green.interpretable and not green.dead
    assert green.confidence == 1.0  # IoU 1 with green in every resample
    assert len(df[df.neuron == 0]) == 3
