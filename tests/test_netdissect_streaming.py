"""The streaming part of Network Dissection: exact thresholds from a bounded, filtered top-K,
and a sparse candidate store far smaller than the maps, fed activations directly."""
import math

import numpy as np
import pytest
import torch

from conceptmon.config import config_from_dict
from conceptmon.detectors import RunContext, create_detector
from conceptmon.detectors import netdissect
from conceptmon.detectors.netdissect import TIE_TOLERANCE, active_cut, margin_below, threshold_from_top

from .fakes import random_probe


def accumulator(tmp_path, n_images, n_units, quantile):
    cfg = config_from_dict({"layers": ["x"], "detector": {"quantile": quantile}})
    det = create_detector(cfg, random_probe(n=n_images), RunContext(device=torch.device("cpu"), cache_dir=tmp_path))
    return det.accumulator("x", n_units)


def stream(acc, acts: torch.Tensor, batch_size: int) -> None:
    for start in range(0, len(acts), batch_size):
        acc.add(acts[start : start + batch_size], torch.arange(start, min(start + batch_size, len(acts))))


def activations(kind: str, n: int, u: int, h: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, u, h, h, generator=g)
    if kind == "relu":
        return torch.relu(x - 1.0)  # mostly zeros
    if kind == "ties":
        return torch.randint(0, 4, (n, u, h, h), generator=g).float()  # four levels, massive ties
    if kind == "ascending":  # every new value beats the bound: the worst case for filtering
        return torch.arange(n * u * h * h, dtype=torch.float32).view(u, n, h, h).transpose(0, 1).contiguous()
    if kind == "descending":
        return -activations("ascending", n, u, h, seed)
    if kind == "bf16":
        return x.to(torch.bfloat16).float()
    return x


@pytest.mark.parametrize("kind", ["normal", "relu", "ties", "ascending", "descending", "bf16"])
@pytest.mark.parametrize("batch_size,quantile,min_merge", [(1, 0.05, 1), (7, 0.005, 64), (40, 0.2, 1), (13, 0.01, 4)])
def test_streamed_threshold_and_floor_are_exact(netdissect_backend, tmp_path, monkeypatch, kind, batch_size, quantile, min_merge):
    monkeypatch.setattr(netdissect._IoUAccumulator, "min_merge", min_merge)
    acts = activations(kind, 40, 3, 5, seed=batch_size)
    acc = accumulator(tmp_path, 40, 3, quantile)
    stream(acc, acts, batch_size)
    values = acts.transpose(0, 1).reshape(3, -1).numpy()
    np.testing.assert_array_equal(acc.thresholds().numpy(), np.quantile(values, 1 - quantile, axis=1).astype(np.float32))
    np.testing.assert_array_equal(acc.floor.numpy(), values.min(axis=1))


def test_linear_outputs_stream_like_one_pixel_maps(tmp_path):
    acts = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    acc = accumulator(tmp_path, 50, 4, 0.1)
    stream(acc, acts, 6)
    np.testing.assert_allclose(acc.thresholds().numpy(), np.quantile(acts.numpy(), 0.9, axis=0), rtol=1e-6)


def test_threshold_from_top_takes_the_top_values_in_any_order():
    values = torch.randn(4, 301, generator=torch.Generator().manual_seed(0))
    top = values.topk(netdissect.quantile_keep_count(301, 0.05), dim=1).values
    shuffled = top[:, torch.randperm(top.shape[1], generator=torch.Generator().manual_seed(1))]
    want = np.quantile(values.numpy(), 0.95, axis=1)
    np.testing.assert_allclose(threshold_from_top(shuffled, 301, 0.05).numpy(), want, rtol=1e-6)


def test_only_values_above_the_bound_are_merged(tmp_path):
    """Random order: about K (1 + ln(n / K)) values per unit ever beat the bound, not n."""
    n_images, u, h, q = 400, 4, 8, 0.01
    acc = accumulator(tmp_path, n_images, u, q)
    stream(acc, activations("normal", n_images, u, h, seed=3), 16)
    state = acc.state_bytes()
    n = n_images * h * h
    k = state["k"]
    assert k == netdissect.quantile_keep_count(n, q)
    expected = u * k * (1 + math.log(n / k))
    assert state["merged_values"] < 2 * expected < 0.3 * u * n  # the old merge took every value


def test_kept_state_is_far_smaller_than_the_maps(tmp_path):
    n_images, u, h, q = 300, 6, 12, 0.005
    acts = torch.relu(activations("normal", n_images, u, h, seed=4))
    acc = accumulator(tmp_path, n_images, u, q)
    stream(acc, acts, 25)
    state = acc.state_bytes()
    dense = acts.numel() * 4
    assert 0 < state["peak_candidates"] < 0.25 * dense
    assert state["top_values"] == u * state["k"] * 4
    assert state["pending"] <= state["peak_pending"] and state["total"] == sum(
        state[key] for key in ("top_values", "pending", "candidates"))
    assert state["candidates"] == sum(part.nbytes() for part in acc.parts) > 0  # the running count is right
    acc.scores()
    assert acc.state_bytes()["candidates"] == sum(part.nbytes() for part in acc.parts)


def test_active_cut_rule():
    t = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.0])
    floor = torch.tensor([0.0, 0.0, -1.0, 2.0 - 1e-7, -3.0])
    cut = active_cut(t, floor)
    assert cut[0] == torch.tensor(1.0) - TIE_TOLERANCE  # tied top block: >= T - tol
    assert cut[1] > 0 and cut[1] < 1e-30  # T == floor == 0 (sparse ReLU): strictly above 0
    assert cut[2] > -1.0 + 0.5 * TIE_TOLERANCE  # T == floor: above the floor by more than rounding
    assert cut[3] > 2.0  # T within tol of the floor counts as the floor
    assert cut[4] < 0  # T = 0 above a negative floor: a tied block of zeros is active
    x = torch.tensor([-math.inf, -2.0, -1e-38, 0.0, 1e-38, 3.0])
    m = margin_below(x)
    assert m[0] == -math.inf and bool((m[1:] < x[1:]).all()) and bool((m[1:] > m[:-1]).all())
