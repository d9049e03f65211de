import os

import pytest

from conceptmon.probes import register_probe

from .fakes import random_probe


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory):
    """Every test (and every process a test starts) uses one throw-away user cache, never ~/.cache."""
    folder = tmp_path_factory.mktemp("user-cache")
    old = os.environ.get("CONCEPTMON_CACHE")
    os.environ["CONCEPTMON_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("CONCEPTMON_CACHE", None)
    else:
        os.environ["CONCEPTMON_CACHE"] = old


@pytest.fixture
def array_probe_config():
    """Registers an in-memory probe set and returns a config dict that uses it with TinyConv."""
    register_probe("test-array")(lambda cfg: random_probe(n=cfg.limit or 12))
    return {
        "model": {"arch": "tests.fakes:TinyConv", "kwargs": {}},
        "layers": ["conv1", "conv2"],
        "probe": {"name": "test-array", "mean": [0, 0, 0], "std": [1, 1, 1]},
        "detector": {"quantile": 0.05},
        "batch_size": 5,
        "top_k": 3,
    }


@pytest.fixture
def tiny_ckpts(tmp_path):
    """Three per-epoch checkpoints of TinyConv (epochs 0, 1, 2) with different weights."""
    import torch

    from .fakes import TinyConv

    folder = tmp_path / "ckpts"
    folder.mkdir()
    for epoch in range(3):
        torch.save({"epoch": epoch, "state_dict": TinyConv(seed=epoch).state_dict()}, folder / f"epoch_{epoch}.pt")
    return folder


@pytest.fixture(params=["fused", "tensor"])
def netdissect_backend(request, monkeypatch):
    """Runs a Network Dissection test with the fused CPU kernels and with the tensor path."""
    from conceptmon.detectors import netdissect

    monkeypatch.setattr(netdissect._IoUAccumulator, "backend", "auto" if request.param == "fused" else "tensor")
    return request.param
