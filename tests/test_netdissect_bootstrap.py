"""Bootstrap label confidence of Network Dissection: replicate IoUs from per-image counts."""
import numpy as np
import pytest
import torch

from conceptmon.config import config_from_dict
from conceptmon.detectors import RunContext, TrustSettings, create_detector, poisson_weights
from conceptmon.detectors.netdissect import (CountTable, add_weighted_image_sums, bootstrap_labels,
                                             weighted_image_sums)
from conceptmon.engine import collect_layers, make_loader

from .fakes import TinyConv, random_probe
from .reference_netdissect import reference_bootstrap, reference_netdissect


def table(dense: np.ndarray) -> CountTable:
    """(n_rows, N) dense counts -> CountTable."""
    rows, images = np.nonzero(dense)
    return CountTable(torch.from_numpy(rows), torch.from_numpy(images), torch.from_numpy(dense[rows, images]),
                      dense.shape[0])


def confidence_of(inter, area, labels, reported, replicates=1000, seed=0, concept_category=None):
    """inter (U, M, N), area (U, n_cat, N), labels (M, N) per-image counts."""
    u, m, n = inter.shape
    weights = poisson_weights(n, replicates, seed).double()
    sums = [weighted_image_sums(weights, table(x.reshape(-1, n))).view(*x.shape[:-1], replicates)
            for x in (inter, area, labels)]
    cat = torch.zeros(m, dtype=torch.long) if concept_category is None else torch.tensor(concept_category)
    return bootstrap_labels(*sums, cat, torch.tensor(reported))


def test_weighted_image_sums_equal_dense_products():
    rng = np.random.default_rng(0)
    dense = rng.integers(0, 3, size=(7, 20)) * (rng.random((7, 20)) < 0.3)
    weights = poisson_weights(20, 5, seed=1).double()
    got = weighted_image_sums(weights, table(dense.astype(np.float64)))
    np.testing.assert_array_equal(got.numpy(), dense @ weights.numpy().T)  # integers: exact
    # Repeated cells add up.
    doubled = CountTable(torch.tensor([2, 2]), torch.tensor([4, 4]), torch.tensor([1.0, 2.0]), 7)
    np.testing.assert_array_equal(weighted_image_sums(weights, doubled)[2].numpy(), 3 * weights[:, 4].numpy())
    # Chunk by chunk into a running total (as the scoring step does) gives the same sums.
    total = torch.zeros(7, 5, dtype=torch.float64)
    rows, images = np.nonzero(dense)
    for part in np.array_split(np.arange(len(rows)), 3):
        add_weighted_image_sums(total, weights, CountTable(torch.from_numpy(rows[part]), torch.from_numpy(images[part]),
                                                           torch.from_numpy(dense[rows[part], images[part]] * 1.0), 7))
    np.testing.assert_array_equal(total.numpy(), got.numpy())


def test_a_concept_that_wins_in_every_image_has_confidence_one():
    n = 40
    inter = np.zeros((1, 2, n))
    inter[0, 0] = 10  # concept 0: the active region is exactly its mask in every image (IoU 1)
    inter[0, 1] = 2
    area = np.full((1, 1, n), 10.0)
    labels = np.full((2, n), 10.0)
    conf, low, high = confidence_of(inter, area, labels, [0])
    assert conf.item() == 1.0 and low.item() == pytest.approx(1.0) and high.item() == pytest.approx(1.0)
    conf, _, _ = confidence_of(inter, area, labels, [1])
    assert conf.item() == 0.0


def test_concepts_tied_in_every_image_follow_the_tie_rule():
    """Identical per-image counts tie in every replicate: the lower concept index wins each time."""
    rng = np.random.default_rng(3)
    n = 50
    counts = rng.integers(0, 6, size=n).astype(float)
    inter = np.stack([counts, counts])[None]
    area = np.full((1, 1, n), 8.0)
    labels = np.stack([counts + 3, counts + 3])
    assert confidence_of(inter, area, labels, [0])[0].item() == 1.0
    assert confidence_of(inter, area, labels, [1])[0].item() == 0.0


def test_concepts_tied_overall_but_in_different_images_split_the_replicates():
    """Same totals from disjoint halves of the probe set: each replicate favours the half it
    weights more, so about half the replicates (plus half the exact ties) keep concept 0."""
    n = 400
    inter = np.zeros((1, 2, n))
    inter[0, 0, : n // 2] = 5
    inter[0, 1, n // 2 :] = 5
    area = np.full((1, 1, n), 10.0)
    labels = inter[0].copy()
    conf, low, high = confidence_of(inter, area, labels, [0], replicates=2000)
    assert 0.45 < conf.item() < 0.58
    assert low.item() < 0.25 < high.item()  # full-data IoU = 5 * 200 / (10 * 400) = 0.25


def test_active_area_counts_only_images_annotated_for_the_category():
    """A concept of category 1 ignores the active area of images without category-1 labels."""
    n = 30
    inter = np.zeros((1, 2, n))
    inter[0, 0] = 4
    inter[0, 1, :10] = 4
    area = np.zeros((1, 2, n))
    area[0, 0] = 4  # category 0 annotated everywhere
    area[0, 1, :10] = 4  # category 1 only in the first ten images
    labels = inter[0].copy()
    conf, low, high = confidence_of(inter, area, labels, [0], concept_category=[0, 1])
    # Both concepts have IoU 1 in every replicate where they are seen; concept 0 wins the ties.
    assert conf.item() == 1.0 and low.item() == pytest.approx(1.0)


def dissect(tmp_path, trust: TrustSettings, n=30, seed=1):
    probe = random_probe(n=n, seed=seed)
    model = TinyConv(seed=seed)
    cfg = config_from_dict({"layers": ["conv1", "conv2"], "batch_size": 7,
                            "probe": {"mean": [0, 0, 0], "std": [1, 1, 1]}, "detector": {"quantile": 0.1}})
    ctx = RunContext(device=torch.device("cpu"), cache_dir=tmp_path, trust=trust)
    det = create_detector(cfg, probe, ctx)
    det.prepare()
    results = collect_layers(model, cfg.layers, make_loader(probe, cfg, ctx.device), det, ctx.device,
                             mean=cfg.probe.mean, std=cfg.probe.std)
    return probe, model, results


def test_confidences_equal_the_brute_force_bootstrap(netdissect_backend, tmp_path):
    trust = TrustSettings(replicates=40, seed=7)
    probe, model, results = dissect(tmp_path, trust)
    x = torch.stack([torch.from_numpy(probe.images[i]).permute(2, 0, 1).float() / 255 for i in range(len(probe))])
    with torch.no_grad():
        a1 = model.conv1(x)
        a2 = model.conv2(torch.relu(a1))
    weights = poisson_weights(len(probe), 40, 7).numpy()
    for name, acts in (("conv1", a1), ("conv2", a2)):
        _, _, counts = reference_netdissect(acts.numpy(), probe, 0.1)
        conf, low, high = reference_bootstrap(counts, weights)
        labels = results[name].labels
        # Exact float64 replicate sums on both sides: the same replicate winners, to the bit.
        np.testing.assert_array_equal(labels.confidence.numpy(), conf.astype(np.float32))
        np.testing.assert_allclose(labels.score_low.numpy(), low, rtol=1e-6)
        np.testing.assert_allclose(labels.score_high.numpy(), high, rtol=1e-6)
        assert (conf < 1).any()  # some labels are uncertain: the comparison is not vacuous


def test_same_seed_same_confidences_and_none_without_replicates(tmp_path):
    _, _, a = dissect(tmp_path / "a", TrustSettings(replicates=30, seed=3))
    _, _, b = dissect(tmp_path / "b", TrustSettings(replicates=30, seed=3))
    _, _, c = dissect(tmp_path / "c", TrustSettings(replicates=30, seed=4))
    _, _, off = dissect(tmp_path / "d", TrustSettings(replicates=0))
    differs = False
    for name in ("conv1", "conv2"):
        for field in ("confidence", "score_low", "score_high"):
            assert torch.equal(getattr(a[name].labels, field), getattr(b[name].labels, field))
            differs |= not torch.equal(getattr(a[name].labels, field), getattr(c[name].labels, field))
        assert off[name].labels.confidence is None and off[name].labels.score_low is None
        assert torch.equal(off[name].scores, a[name].scores)  # the bootstrap never changes the IoU
    assert differs
