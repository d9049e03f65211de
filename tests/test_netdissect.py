import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conceptmon.config import config_from_dict
from conceptmon.detectors import RunContext, create_detector
from conceptmon.detectors.netdissect import iou_from_counts, quantile_keep_count, threshold_from_top
from conceptmon.engine import collect_layers, make_loader

from .fakes import TinyConv, random_probe


@pytest.mark.parametrize("n,q", [(10, 0.005), (1000, 0.005), (997, 0.1), (50, 0.5), (7, 0.3)])
def test_threshold_matches_numpy_quantile(n, q):
    values = torch.randn(3, n, generator=torch.Generator().manual_seed(n))
    k = quantile_keep_count(n, q)
    top = values.topk(k, dim=1).values
    got = threshold_from_top(top, n, q)
    want = np.quantile(values.numpy(), 1 - q, axis=1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_iou_formula_and_empty_union():
    inter = torch.tensor([[2.0, 0.0]])
    act_area = torch.tensor([[4.0, 0.0]])
    label_area = torch.tensor([3.0, 0.0])
    cat = torch.tensor([0, 1])
    iou = iou_from_counts(inter, act_area, label_area, cat)
    assert iou[0, 0].item() == pytest.approx(2 / (4 + 3 - 2))
    assert iou[0, 1].item() == 0.0


def reference_iou(acts: np.ndarray, probe, quantile: float) -> np.ndarray:
    """Brute force: all maps in memory, numpy quantile, full upsampling, loops over everything."""
    n, u, h, w = acts.shape
    mh, mw = probe.mask_size
    m = len(probe.concepts)
    cats = list(probe.category_names)
    out = np.zeros((u, m))
    for unit in range(u):
        t = np.quantile(acts[:, unit].reshape(-1), 1 - quantile)
        up = F.interpolate(torch.from_numpy(acts[:, unit : unit + 1]), size=(mh, mw), mode="bilinear",
                           align_corners=False)[:, 0].numpy()
        active = up > t
        for c in range(m):
            ci = cats.index(probe.concepts.categories[c])
            inter = union_act = lab = 0.0
            for i in range(n):
                ann = probe.load_annotation(i)
                label = np.zeros((mh, mw), bool)
                for mp in ann.pixel_maps:
                    label |= mp == c + 1
                lab_count = sum(float((mp == c + 1).sum()) for mp in ann.pixel_maps)
                inter_count = sum(float((active[i] & (mp == c + 1)).sum()) for mp in ann.pixel_maps)
                if c in ann.image_labels:
                    lab_count += mh * mw
                    inter_count += float(active[i].sum())
                inter += inter_count
                lab += lab_count
                if ann.categories_present[ci]:
                    union_act += float(active[i].sum())
            union = union_act + lab - inter
            out[unit, c] = inter / union if union > 0 else 0.0
    return out


@pytest.mark.parametrize(
    "batch_size,quantile,n,seed", [(4, 0.05, 12, 0), (5, 0.2, 12, 0), (12, 0.03, 12, 0), (3, 0.05, 30, 1), (7, 0.1, 30, 2)]
)
def test_single_pass_iou_equals_brute_force(tmp_path, batch_size, quantile, n, seed):
    """Exercises the running bound, pruning and the sparse neighbourhood store."""
    probe = random_probe(n=n, seed=seed)
    model = TinyConv(seed=seed)
    cfg = config_from_dict({"layers": ["conv1", "conv2"], "batch_size": batch_size,
                            "probe": {"mean": [0, 0, 0], "std": [1, 1, 1]},
                            "detector": {"quantile": quantile}})
    ctx = RunContext(device=torch.device("cpu"), cache_dir=tmp_path)
    det = create_detector(cfg, probe, ctx)
    det.prepare()
    results = collect_layers(model, cfg.layers, make_loader(probe, cfg, ctx.device), det, ctx.device,
                             mean=cfg.probe.mean, std=cfg.probe.std)

    x = torch.stack([torch.from_numpy(probe.images[i]).permute(2, 0, 1).float() / 255 for i in range(len(probe))])
    with torch.no_grad():
        a1 = model.conv1(x)  # hooks see module outputs, before the ReLU in forward()
        a2 = model.conv2(torch.relu(a1))
    for name, acts in (("conv1", a1), ("conv2", a2)):
        want = reference_iou(acts.numpy(), probe, quantile)
        np.testing.assert_allclose(results[name].scores.numpy(), want, rtol=1e-5, atol=1e-6)
        assert want.max() > 0  # the comparison is not vacuous



def test_linear_units_cover_the_whole_image(tmp_path):
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
    want = reference_iou(head[:, :, None, None].numpy(), probe, 0.2)
    np.testing.assert_allclose(results["head"].scores.numpy(), want, rtol=1e-5, atol=1e-6)
    assert want.max() > 0
