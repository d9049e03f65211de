"""conceptmon.planted: the planted-unit self-test passes on a synthetic probe and fails when broken."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptmon.planted import (
    PlantedCheckError,
    PlantedUnits,
    is_beach,
    is_striped,
    judge,
    pixel_hash,
    run_planted_check,
)
from conceptmon.probes.broden import BrodenProbe
from conceptmon.probes.synthetic import _RGB, COLORS, generate_synthetic, render_image

from .fixtures_broden import write_tiny_broden


@pytest.fixture(scope="module")
def probe_root(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("planted") / "probe", n=150, size=48, seed=0)


@pytest.fixture(scope="module")
def report(probe_root):
    return run_planted_check(probe_root, device="cpu")


def test_check_passes_on_a_small_synthetic_probe(report):
    assert report.passed, "\n".join(report.lines())
    planted = [u.planted for u in report.units]
    assert planted[3:] == ["striped", "beach", "dead", "noise"] and len(planted) == 7
    for u in report.units[:5]:
        assert u.got == u.expected and u.expected_rank == 0 and u.expected_score >= 0.04
        assert u.expected_score > u.runner_up_score
    dead, noise = report.units[5], report.units[6]
    assert dead.got is None and dead.score == 0.0 and dead.expected_rank is None
    assert noise.got is None and 0 < noise.score < 0.04
    assert report.lines()[-1] == "planted check: passed"
    assert report.to_dict()["passed"] is True and report.settings["n_images"] == 150


class SwappedColours(PlantedUnits):
    """Claims unit 0 detects unit 1's colour and vice versa: the check must notice."""

    def planted_expectations(self):
        pairs = super().planted_expectations()
        (u0, c0), (u1, c1) = pairs[0], pairs[1]
        return [(u0, c1), (u1, c0), *pairs[2:]]


class NoisyDeadUnit(PlantedUnits):
    """The 'dead' unit secretly fires on the first colour: a unit expected to show nothing."""

    def forward(self, x):
        out = super().forward(x)
        out[:, len(self.colours) + 2] = out[:, 0]
        return out


@pytest.mark.slow
def test_check_fails_when_expectations_are_swapped(probe_root, report):
    colours = [u.expected for u in report.units[:3]]
    broken = run_planted_check(probe_root, device="cpu", units=SwappedColours(colours))
    assert not broken.passed
    failed = [u.unit for u in broken.units if not u.passed]
    assert failed == [0, 1]
    assert broken.units[0].got == colours[0] and broken.units[0].expected == colours[1]
    assert broken.lines()[-1] == "planted check: 2 of 7 units failed"
    assert "FAIL" in broken.lines()[0]


@pytest.mark.slow
def test_check_fails_when_a_unit_expected_dead_fires(probe_root, report):
    colours = [u.expected for u in report.units[:3]]
    broken = run_planted_check(probe_root, device="cpu", units=NoisyDeadUnit(colours))
    assert [u.unit for u in broken.units if not u.passed] == [5]
    assert broken.units[5].got == colours[0]


def test_judge_rules_on_a_hand_made_score_table():
    concepts = ["red", "blue", "beach"]
    scores = torch.tensor([[0.30, 0.10, 0.0], [0.05, 0.03, 0.0], [0.0, 0.0, 0.0], [0.02, 0.01, 0.0]])
    dead = torch.tensor([False, False, True, False])
    planted = ["red", "blue", "dead", "noise"]
    expectations = [(0, "red"), (1, "blue"), (2, None), (3, None)]
    got = judge(scores, dead, concepts, expectations, 0.04, planted)
    assert [u.passed for u in got] == [True, False, True, True]
    assert got[1].got == "red" and got[1].expected_rank == 1 and got[1].expected_score == pytest.approx(0.03)
    assert got[2].dead and got[2].got is None
    below = judge(scores, None, concepts, [(0, "red")], 0.5, planted)[0]
    assert not below.passed and below.got is None  # right concept, but under the threshold


def test_pixel_rules_have_no_false_positives_on_rendered_images():
    found = {"beach": [0, 0], "striped": [0, 0]}  # [true positives, images of that kind]
    for seed in (0, 1):
        for i in range(200):
            canvas, scene, texture = render_image(i, 24, seed)
            rgb = torch.from_numpy(_RGB[canvas.color].astype(np.int64))
            codes = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
            for name, rule, truth in (("beach", is_beach, scene == "beach"), ("striped", is_striped, texture == "striped")):
                hit = rule(codes)
                assert not (hit and not truth), (name, seed, i, scene, texture)
                found[name][0] += hit
                found[name][1] += truth
    for name, (hits, total) in found.items():
        assert total >= 10 and hits >= total / 2, (name, hits, total)


def test_jitter_is_deterministic_and_spread():
    codes = torch.randint(0, 2**24, (4, 16, 16), generator=torch.Generator().manual_seed(0))
    a, b = pixel_hash(codes, 1), pixel_hash(codes.clone(), 1)
    assert torch.equal(a, b) and not torch.equal(a, pixel_hash(codes, 2))
    levels = (a % 1024).flatten()
    assert levels.unique().numel() > 600  # 1,024 pixels over 1,024 levels: no large tied blocks


def test_unknown_colour_and_non_synthetic_probes_are_refused(tmp_path):
    with pytest.raises(PlantedCheckError, match=r"planted colours: expected some of black, "):
        PlantedUnits(["infrared"])
    tiny = write_tiny_broden(tmp_path / "broden")
    with pytest.raises(PlantedCheckError, match=r"needs the synthetic probe set's masks and vocabulary \(missing beach, black"):
        run_planted_check(BrodenProbe(tiny.root), device="cpu")
    few = generate_synthetic(tmp_path / "few", n=4, size=32, seed=0)
    with pytest.raises(PlantedCheckError, match=r"no (striped|beach) images among its 4 images; the planted check needs"):
        run_planted_check(few, device="cpu")
    assert set(COLORS) >= {"red", "blue"}
