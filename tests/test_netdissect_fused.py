"""The fused CPU kernels against the tensor path they replace on a CPU: bit-identical.

The brute-force tests (test_netdissect*.py, test_layouts.py) run both paths through the
whole detector; these compare each step on inputs chosen to hit the edges: ties at the
cut, every map or no map a candidate, maps of one pixel, masks smaller than the maps.
"""
import math

import numpy as np
import pytest
import torch

from conceptmon.detectors import netdissect
from conceptmon.detectors.netdissect import (BilinearGrid, MaskCache, _Candidates, _MapCountsFused, _MapCountsTensor,
                                             _prune_candidates, _prune_fused, _sparsify, _sparsify_fused, margin_below)

SHAPES = [(28, 28, 56, 56), (7, 7, 56, 56), (5, 7, 16, 12), (1, 1, 8, 8), (16, 16, 8, 8), (3, 9, 10, 40), (2, 2, 3, 3),
          (3, 64, 6, 128), (4, 65, 8, 130), (2, 130, 4, 260)]  # the last three: rows of one, two and three 64-bit words


def batch(b: int, u: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Gaussian maps, a third of them quantised to three levels (flat regions, ties)."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(b, u, h, w, generator=g)
    acts[:, : u // 3] = torch.randint(0, 3, (b, u // 3, h, w), generator=g).float() * 0.7
    return acts


def assert_same_candidates(a: _Candidates, b: _Candidates) -> None:
    for field in ("units", "images", "maxima", "counts", "entry_pos", "entry_val"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype, field
        assert torch.equal(x, y), field


def by_map(c: _Candidates) -> _Candidates:
    """The store with its maps in (image, unit) order: the same content whatever the order
    of the parts it came in."""
    order = torch.argsort(c.images.long() * (int(c.units.max()) + 1) + c.units.long())
    offsets = c.offsets()
    entries = torch.cat([torch.arange(int(offsets[s]), int(offsets[s + 1])) for s in order.tolist()])
    return _Candidates(c.units[order], c.images[order], c.maxima[order], c.counts[order], c.entry_pos[entries],
                       c.entry_val[entries])


@pytest.mark.parametrize("h,w,mh,mw", SHAPES)
@pytest.mark.parametrize("cut_kind", ["quantile", "tie", "none", "all"])
@pytest.mark.parametrize("threads", [1, 3])
def test_sparsify_matches_the_tensor_path(monkeypatch, h, w, mh, mw, cut_kind, threads):
    from conceptmon.detectors import netdissect_cpu

    monkeypatch.setattr(netdissect_cpu, "MIN_SPLIT", 1)
    monkeypatch.setattr(netdissect_cpu, "threads", lambda: threads)
    acts = batch(6, 9, h, w, seed=h * w)
    cut = {"quantile": torch.quantile(acts.transpose(0, 1).reshape(9, -1), 0.9, dim=1),
           "tie": torch.full((9,), 1.4), "none": torch.full((9,), math.inf),
           "all": torch.full((9,), -math.inf)}[cut_kind]
    bound = cut + 0.3
    images = torch.arange(100, 106)
    want, entry_unit = _sparsify(acts, cut, images, torch.int16)
    parts, pending_units, pending_values = _sparsify_fused(acts, acts.amax(dim=(2, 3)), cut, bound, images,
                                                           torch.int16)
    assert len(parts) <= threads
    if parts:
        assert_same_candidates(_Candidates.concat(parts), want)
    else:
        assert want.units.numel() == 0
    above = want.entry_val > bound[entry_unit]
    assert torch.equal(pending_units, entry_unit[above].to(torch.int32))
    assert torch.equal(pending_values, want.entry_val[above])
    if cut_kind == "all":
        assert want.entry_val.numel() == acts.numel()
        assert len(parts) == min(threads, acts.shape[0] * acts.shape[1])


@pytest.mark.parametrize("h,w,mh,mw", SHAPES)
def test_prune_matches_the_tensor_path(h, w, mh, mw):
    acts = batch(8, 6, h, w, seed=h + w)
    low = torch.quantile(acts.transpose(0, 1).reshape(6, -1), 0.5, dim=1)
    cand, _ = _sparsify(acts, low, torch.arange(8), torch.int32)
    for q in (0.5, 0.8, 0.95, 1.0):
        cut = torch.quantile(acts.transpose(0, 1).reshape(6, -1), q, dim=1)
        assert_same_candidates(_prune_fused(cand, cut, (h, w)), _prune_candidates(cand, cut, (h, w)))


def mask_cache(n_images: int, mh: int, mw: int, n_concepts: int, seed: int) -> MaskCache:
    """Random label maps (0 to 2 per image) and whole-image labels: what the counters read."""
    rng = np.random.default_rng(seed)
    maps_per_image = rng.integers(0, 3, n_images)
    map_offsets = np.concatenate([[0], np.cumsum(maps_per_image)]).astype(np.int64)
    maps = rng.integers(0, n_concepts + 1, (int(map_offsets[-1]), mh, mw)).astype(np.int16)
    labels = [np.unique(rng.integers(0, n_concepts, rng.integers(0, 3))) for _ in range(n_images)]
    label_offsets = np.concatenate([[0], np.cumsum([len(x) for x in labels])]).astype(np.int64)
    empty = np.zeros(0, np.int64)
    return MaskCache(maps=maps, map_offsets=map_offsets, label_offsets=label_offsets,
                     label_values=np.concatenate(labels).astype(np.int64) if labels else empty,
                     categories_present=np.ones((n_images, 1), bool), area_offsets=np.zeros(n_images + 1, np.int64),
                     area_concept=empty.astype(np.int32), area_pixels=empty, label_area=np.ones(n_concepts),
                     mask_size=(mh, mw))


def triplets(counter, n_maps: int) -> tuple[np.ndarray, set]:
    area = np.zeros(n_maps)
    cells = {}
    for start, stop in counter.chunks():
        a, m, c, k = (t.numpy() for t in counter.counts(start, stop))
        area[start:stop] = a
        for mi, ci, ki in zip(m + start, c, k):
            cells[(int(mi), int(ci))] = cells.get((int(mi), int(ci)), 0) + float(ki)
    return area, cells


@pytest.mark.parametrize("h,w,mh,mw", SHAPES)
def test_scoring_counts_match_the_tensor_path(h, w, mh, mw):
    n_images, n_units, n_concepts = 10, 7, 5
    acts = batch(n_images, n_units, h, w, seed=mh * mw)
    cut = margin_below(torch.quantile(acts.transpose(0, 1).reshape(n_units, -1), 0.85, dim=1))
    cut[: n_units // 3] = margin_below(torch.tensor(1.4))  # the quantised units: the tied top block
    keep = margin_below(margin_below(cut))
    cand, _ = _sparsify(acts, keep, torch.arange(n_images), torch.int16)
    masks = mask_cache(n_images, mh, mw, n_concepts, seed=h)
    grid = BilinearGrid.of((h, w), (mh, mw), "cpu")
    want_area, want = triplets(_MapCountsTensor(cand, cut, grid, masks, n_concepts, (h, w)), cand.units.numel())
    got_area, got = triplets(_MapCountsFused(cand, cut, grid, masks, n_concepts, (h, w)), cand.units.numel())
    np.testing.assert_array_equal(got_area, want_area)
    assert got == want
    assert want_area.sum() > 0 and len(want) > 0


def test_fused_chunks_cover_every_map_once(monkeypatch):
    acts = batch(12, 5, 7, 7, seed=3)
    cand, _ = _sparsify(acts, torch.full((5,), -math.inf), torch.arange(12), torch.int16)
    monkeypatch.setattr(_MapCountsFused, "_ENTRIES", 100)  # many chunks, some cut inside a map's entries
    counter = _MapCountsFused(cand, torch.zeros(5), BilinearGrid.of((7, 7), (14, 14), "cpu"),
                              mask_cache(12, 14, 14, 3, seed=0), 3, (7, 7))
    chunks = counter.chunks()
    assert len(chunks) > 5
    assert chunks[0][0] == 0 and chunks[-1][1] == cand.units.numel()
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))


@pytest.mark.parametrize("replicates,threads", [(0, 1), (7, 1), (7, 3)])
def test_both_paths_give_bit_identical_labels(tmp_path, monkeypatch, replicates, threads):
    """Whole accumulators over the same activations: the same store, scores and confidences,
    also with the kernels' work split over threads (3: ranges of unequal sizes)."""
    from conceptmon.config import config_from_dict
    from conceptmon.detectors import RunContext, TrustSettings, create_detector, netdissect_cpu

    from .fakes import random_probe

    monkeypatch.setattr(netdissect_cpu, "threads", lambda: threads)
    monkeypatch.setattr(netdissect_cpu, "MIN_SPLIT", 1)

    probe = random_probe(n=40, seed=5)
    cfg = config_from_dict({"layers": ["x"], "detector": {"quantile": 0.05}})
    ctx = RunContext(device=torch.device("cpu"), cache_dir=tmp_path, trust=TrustSettings(replicates=replicates, seed=1))
    det = create_detector(cfg, probe, ctx)
    det.prepare()
    acts = torch.relu(batch(40, 12, 6, 6, seed=11))
    acts[:, 5] = 0.0  # a dead unit
    monkeypatch.setattr(netdissect._IoUAccumulator, "min_merge", 1)
    results = {}
    for backend in ("auto", "tensor"):
        monkeypatch.setattr(netdissect._IoUAccumulator, "backend", backend)
        acc = det.accumulator("x", 12)
        for start in range(0, 40, 6):
            acc.add(acts[start:start + 6], torch.arange(start, min(start + 6, 40)))
        # The stores differ in which entries the rolling prune has reached yet (the fused path
        # keeps a part per thread); pruned to the final cut, before scores(), they are the same.
        final = margin_below(netdissect.active_cut(acc.thresholds(), acc.floor))
        store = _prune_candidates(_Candidates.concat(acc.parts), final, (6, 6))
        results[backend] = (acc.scores(), by_map(store))
    (fused, fused_store), (tensor, tensor_store) = results["auto"], results["tensor"]
    assert fused_store.entry_val.numel() > 0
    assert_same_candidates(fused_store, tensor_store)
    for field in ("scores", "dead", "confidence", "score_low", "score_high"):
        a, b = getattr(fused, field), getattr(tensor, field)
        assert (a is None) == (b is None) == (replicates == 0 and field not in ("scores", "dead")), field
        if a is not None:
            assert torch.equal(a, b), field
    assert bool(fused.dead[5]) and float(fused.scores.max()) > 0


def test_an_unknown_backend_is_refused(monkeypatch):
    from conceptmon.detectors.base import DetectorError

    monkeypatch.setattr(netdissect._IoUAccumulator, "backend", "gpu")
    acc = netdissect._IoUAccumulator.__new__(netdissect._IoUAccumulator)
    with pytest.raises(DetectorError, match="expected auto or tensor"):
        acc._fused(torch.device("cpu"))


@pytest.mark.parametrize("n,threads,min_split", [(10, 3, 1), (1000, 2, 256), (300, 2, 256), (0, 4, 1)])
def test_split_covers_every_item_once_in_order(monkeypatch, n, threads, min_split):
    from conceptmon.detectors import netdissect_cpu

    monkeypatch.setattr(netdissect_cpu, "threads", lambda: threads)
    monkeypatch.setattr(netdissect_cpu, "MIN_SPLIT", min_split)
    for weights in (None, np.arange(n) % 7 + 1):
        ranges = netdissect_cpu.split(n, weights)
        covered = [i for lo, hi in ranges for i in range(lo, hi)]
        assert covered == list(range(n))
        assert len(ranges) <= max(1, threads)
    assert len(netdissect_cpu.split(1000, None)) == min(threads, 1000 // min_split)


def test_append_rows_keeps_each_units_values_in_order():
    from conceptmon.detectors import netdissect_cpu

    block = np.full((3, 5), -np.inf, np.float32)
    block[:, :2] = 9.0
    netdissect_cpu.append_rows(block, 2, np.array([2, 0, 2, 2, 0], np.int32),
                               np.array([1, 2, 3, 4, 5], np.float32))
    assert block.tolist() == [[9, 9, 2, 5, -np.inf], [9, 9, -np.inf, -np.inf, -np.inf], [9, 9, 1, 3, 4]]


def test_lowest_bit_of_every_word():
    from conceptmon.detectors import netdissect_cpu

    for bit in range(64):
        assert netdissect_cpu.lowest_bit(np.uint64(1 << bit)) == bit
        assert netdissect_cpu.lowest_bit(np.uint64(((2**64 - 1) << bit) % 2**64)) == bit  # higher bits set too
