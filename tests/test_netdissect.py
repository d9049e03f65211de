import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conceptmon.config import config_from_dict
from conceptmon.detectors import RunContext, create_detector
from conceptmon.detectors.netdissect import (BilinearGrid, active_pixels, iou_from_counts, margin_below,
                                             quantile_keep_count, threshold_from_top)
from conceptmon.engine import collect_layers, make_loader

from .fakes import TinyConv, random_probe
from .reference_netdissect import reference_netdissect, upsample


@pytest.mark.parametrize("n,q", [(10, 0.005), (1000, 0.005), (997, 0.1), (50, 0.5), (7, 0.3)])
def test_threshold_matches_numpy_quantile(n, q):
    values = torch.randn(3, n, generator=torch.Generator().manual_seed(n))
    k = quantile_keep_count(n, q)
    top = values.topk(k, dim=1).values
    got = threshold_from_top(top, n, q)
    want = np.quantile(values.numpy(), 1 - q, axis=1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


SHAPES = [(28, 28, 56, 56), (7, 7, 56, 56), (13, 13, 56, 56), (5, 7, 16, 12), (1, 1, 8, 8), (16, 16, 8, 8),
          (6, 6, 16, 16), (3, 9, 10, 40), (2, 2, 3, 3)]


@pytest.mark.parametrize("h,w,mh,mw", SHAPES)
def test_reference_upsampling_is_bilinear(h, w, mh, mw):
    """The reference's upsampling is F.interpolate's, up to the rounding of the last bit."""
    maps = torch.randn(40, h, w, generator=torch.Generator().manual_seed(h * w))
    want = F.interpolate(maps[:, None], size=(mh, mw), mode="bilinear", align_corners=False)[:, 0]
    got = upsample(maps.numpy(), (mh, mw))
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=4e-6 * float(maps.abs().max()))


@pytest.mark.parametrize("h,w,mh,mw", SHAPES)
def test_active_pixels_equal_full_upsampling(h, w, mh, mw):
    """Only tiles next to a source >= margin_below(cut) are evaluated; the result is what
    upsampling every pixel and comparing gives, also for tied values at the cut."""
    g = torch.Generator().manual_seed(mh * mw)
    maps = torch.randn(60, h, w, generator=g)
    maps[:20] = torch.randint(0, 3, (20, h, w), generator=g).float() * 0.7  # flat regions, ties
    cut = margin_below(torch.quantile(maps.view(60, -1), 0.8, dim=1))
    cut[:20] = margin_below(torch.tensor(1.4))
    want = np.nonzero(upsample(maps.numpy(), (mh, mw)) >= cut.numpy()[:, None, None])
    got = active_pixels(maps, cut, BilinearGrid.of((h, w), (mh, mw), "cpu"))
    key = lambda m, y, x: np.sort((np.asarray(m) * mh + np.asarray(y)) * mw + np.asarray(x))
    np.testing.assert_array_equal(key(*got), key(*want))
    assert len(want[0]) > 0


def test_iou_formula_and_empty_union():
    inter = torch.tensor([[2.0, 0.0]])
    act_area = torch.tensor([[4.0, 0.0]])
    label_area = torch.tensor([3.0, 0.0])
    cat = torch.tensor([0, 1])
    iou = iou_from_counts(inter, act_area, label_area, cat)
    assert iou[0, 0].item() == pytest.approx(2 / (4 + 3 - 2))
    assert iou[0, 1].item() == 0.0


@pytest.mark.parametrize(
    "batch_size,quantile,n,seed,min_merge",
    [(4, 0.05, 12, 0, 64), (5, 0.2, 12, 0, 64), (12, 0.03, 12, 0, 64), (3, 0.05, 30, 1, 64), (7, 0.1, 30, 2, 64),
     (3, 0.05, 30, 1, 1), (7, 0.1, 30, 2, 1)],
)
@pytest.mark.parametrize("speculation", ["default", "failing"])
def test_single_pass_iou_equals_brute_force(netdissect_backend, tmp_path, monkeypatch, batch_size, quantile, n, seed,
                                            min_merge, speculation):
    """Exercises the running bound, the pending merges (min_merge 1: a merge nearly every
    batch), pruning and the sparse neighbourhood store; "failing": a speculative cut far
    too high (the top 1 % of what the estimate should keep), so that nearly every unit
    needs the second pass, which must give the same result."""
    from conceptmon.detectors import netdissect

    monkeypatch.setattr(netdissect._IoUAccumulator, "min_merge", min_merge)
    if speculation == "failing":
        monkeypatch.setattr(netdissect._IoUAccumulator, "speculation", 0.01)
        monkeypatch.setattr(netdissect._IoUAccumulator, "speculation_slack_images", 0)
    probe = random_probe(n=n, seed=seed)
    model = TinyConv(seed=seed)
    cfg = config_from_dict({"layers": ["conv1", "conv2"], "batch_size": batch_size,
                            "probe": {"mean": [0, 0, 0], "std": [1, 1, 1]},
                            "detector": {"quantile": quantile}})
    logs = []
    ctx = RunContext(device=torch.device("cpu"), cache_dir=tmp_path, log=logs.append)
    det = create_detector(cfg, probe, ctx)
    det.prepare()
    results = collect_layers(model, cfg.layers, make_loader(probe, cfg, ctx.device), det, ctx.device,
                             mean=cfg.probe.mean, std=cfg.probe.std)

    x = torch.stack([torch.from_numpy(probe.images[i]).permute(2, 0, 1).float() / 255 for i in range(len(probe))])
    with torch.no_grad():
        a1 = model.conv1(x)  # hooks see module outputs, before the ReLU in forward()
        a2 = model.conv2(torch.relu(a1))
    for name, acts in (("conv1", a1), ("conv2", a2)):
        want, dead, _ = reference_netdissect(acts.numpy(), probe, quantile)
        np.testing.assert_allclose(results[name].scores.numpy(), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(results[name].labels.dead.numpy(), dead)
        assert want.max() > 0  # the comparison is not vacuous
    second = [m for m in logs if "second pass" in m]
    assert len(second) == (2 if speculation == "failing" else 0), logs



def test_linear_units_cover_the_whole_image(netdissect_backend, tmp_path):
    probe = random_probe(n=30, seed=4)
    model = TinyConv(seed=4)
    cfg = config_from_dict({"layers": ["head"], "batch_size": 7, "probe": {"mean": [0, 0, 0], "std": [1, 1, 1]},
                            "detector": {"quantile": 0.2}})
    ctx = RunContext(device=torch.device("cpu"), cache_dir=tmp_path)
    det = create_detector(cfg, probe, ctx)
    results = collect_layers(model, cfg.layers, make_loader(probe, cfg, ctx.device), det, ctx.device,
                             mean=cfg.probe.mean, std=cfg.probe.std)
    x = torch.stack([torch.from_numpy(probe.images[i]).permute(2, 0, 1).float() / 255 for i in range(len(probe))])
    with torch.no_grad():
        head = model(x)
    want, _, _ = reference_netdissect(head[:, :, None, None].numpy(), probe, 0.2)
    np.testing.assert_allclose(results["head"].scores.numpy(), want, rtol=1e-5, atol=1e-6)
    assert want.max() > 0
