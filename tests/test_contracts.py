"""Contract tests generated from the registries: every registered detector, probe set and
text encoder (plugins included) is held to the same promises.

A component that needs something only a test can provide (a CLIP folder) gets it from
the small tables below; everything else runs on defaults.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conceptmon.config import ProbeConfig, config_from_dict
from conceptmon.detectors import DETECTORS, LayerScores, RunContext, TrustSettings, create_detector
from conceptmon.encoders import ENCODERS, create_encoder, encode_cached, text_cache_path
from conceptmon.engine import collect_layers, make_loader, normalize
from conceptmon.errors import ConceptmonError
from conceptmon.probes import PROBES, create_probe

from . import fixtures_runs  # noqa: F401  (registers the offline hashvec encoder)
from .fakes import TinyConv
from .fixtures_clip import make_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def probe_cfg(tmp_path_factory):
    return PROBES.get("synthetic").example(tmp_path_factory.mktemp("probe") / "synthetic")


DETECTOR_OPTIONS = {"clip-dissect": lambda clip: {"clip_model": str(clip)}}
"""Options a built-in detector cannot do without in a test."""


def detector_for(name, tiny_clip, probe_cfg, tmp_path, replicates=4):
    options = DETECTOR_OPTIONS.get(name, lambda clip: {})(tiny_clip)
    cfg = config_from_dict({"layers": ["conv1", "conv2", "head"], "detector": {"name": name, **options},
                            "probe": {**probe_cfg, "mean": [0, 0, 0], "std": [1, 1, 1]}, "batch_size": 7})
    probe = create_probe(cfg.probe)
    ctx = RunContext(device=torch.device("cpu"), cache_dir=tmp_path / "cache", trust=TrustSettings(replicates, 3))
    detector = create_detector(cfg, probe, ctx)
    detector.prepare()
    return cfg, probe, detector


def activations(probe, model):
    """Every probe image's canonical activations per layer, computed once."""
    x = torch.stack([torch.from_numpy(np.asarray(probe.load_image(i), dtype=np.uint8).copy()).permute(2, 0, 1)
                     for i in range(len(probe))])
    x = normalize(x, (0, 0, 0), (1, 1, 1))
    with torch.no_grad():
        a1 = model.conv1(x)
        a2 = model.conv2(torch.relu(a1))
        head = model(x)
    return {"conv1": a1, "conv2": a2, "head": head}


def stream(detector, acts, order, batch):
    results = {}
    for layer, values in acts.items():
        acc = detector.accumulator(layer, values.shape[1])
        for start in range(0, len(order), batch):
            index = order[start:start + batch]
            acc.add(values[index], index)
        results[layer] = LayerScores.of(acc.scores())
    return results


def same(a: LayerScores, b: LayerScores) -> None:
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    for field in ("dead", "confidence", "score_low", "score_high", "interpretable"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-5, atol=1e-6, msg=field)


@pytest.mark.parametrize("name", DETECTORS.names())
def test_detector_contract(name, tiny_clip, probe_cfg, tmp_path):
    cfg, probe, detector = detector_for(name, tiny_clip, probe_cfg, tmp_path)
    acts = activations(probe, TinyConv(seed=1))
    n = len(probe)
    in_order = stream(detector, acts, torch.arange(n), 7)
    for layer, result in in_order.items():  # one row per unit, one column per concept
        assert result.scores.shape == (acts[layer].shape[1], len(detector.concepts)), layer
        assert torch.isfinite(result.scores).all(), layer
        if result.confidence is not None:
            assert ((result.confidence >= 0) & (result.confidence <= 1)).all()
    shuffled = stream(detector, acts, torch.randperm(n, generator=torch.Generator().manual_seed(0)), 5)
    again = stream(detector_for(name, tiny_clip, probe_cfg, tmp_path)[2], acts, torch.arange(n), 7)
    for layer in acts:
        same(in_order[layer], shuffled[layer])  # the order and size of batches do not matter
        same(in_order[layer], again[layer])  # deterministic
    json.dumps(detector.settings())  # recorded in manifests and fingerprints


class Boom(torch.nn.Module):
    """Wraps a layer and raises from inside it on its second call (the second batch)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom")
        return self.inner(x)


@pytest.mark.parametrize("name", DETECTORS.names())
def test_hooks_are_removed_after_an_exception(name, tiny_clip, probe_cfg, tmp_path):
    cfg, probe, detector = detector_for(name, tiny_clip, probe_cfg, tmp_path)
    model = TinyConv()
    model.conv2 = Boom(model.conv2)
    with pytest.raises(RuntimeError, match="boom"):
        collect_layers(model, ["conv1", "conv2"], make_loader(probe, cfg, torch.device("cpu")), detector,
                       torch.device("cpu"), mean=(0, 0, 0), std=(1, 1, 1))
    assert model.conv2.calls == 2  # it really failed mid-run
    assert all(not m._forward_hooks for m in model.modules())


PROBE_NAMES = [n for n in PROBES.names() if PROBES.get(n).example is not None]


@pytest.mark.parametrize("name", PROBE_NAMES)
def test_probe_contract(name, tmp_path):
    section = PROBES.get(name).example(tmp_path / "a")
    probe = create_probe(ProbeConfig(**section))
    assert len(probe) > 0
    paths = [probe.relpath(i) for i in range(len(probe))]
    assert len(set(paths)) == len(paths) and all(isinstance(p, str) for p in paths)
    for i in (0, len(probe) - 1):
        image = probe.load_image(i)
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        if probe.has_masks:
            annotation = probe.load_annotation(i)
            assert annotation.pixel_maps.shape[1:] == tuple(probe.mask_size) or annotation.pixel_maps.shape[0] == 0
            assert len(annotation.categories_present) == len(probe.category_names)
            assert annotation.pixel_maps.max(initial=0) <= len(probe.concepts)
    fingerprint = probe.fingerprint()
    assert create_probe(ProbeConfig(**section)).fingerprint() == fingerprint  # stable
    copied = tmp_path / "b"
    shutil.copytree(section["root"], copied)
    moved = create_probe(ProbeConfig(**{**section, "root": str(copied)}))
    assert moved.fingerprint() == fingerprint  # content, not location
    image_file = copied / probe.relpath(0)
    if image_file.is_file():  # CIFAR-100 keeps its images in pickles: that case has a test of its own
        img = Image.open(image_file).convert("RGB")
        img.putpixel((0, 0), tuple(255 - c for c in img.getpixel((0, 0))))
        img.save(image_file)
        assert create_probe(ProbeConfig(**{**section, "root": str(copied)})).fingerprint() != fingerprint
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a probe set")
    with pytest.raises(ConceptmonError) as bad:
        create_probe(ProbeConfig(**{**section, "root": str(junk)}))
    assert "\n" not in str(bad.value) and "junk" in str(bad.value)


ENCODER_SPECS = {"clip": lambda clip: f"clip:{clip}"}
"""Specs for encoder kinds that need an argument in a test."""


@pytest.mark.parametrize("kind", ENCODERS.names())
def test_encoder_contract(kind, tiny_clip, tmp_path):
    spec = ENCODER_SPECS.get(kind, lambda clip: kind)(tiny_clip)
    encoder = create_encoder(spec, "cpu")
    vectors = encoder.encode(["red", "a blue sky", "red"])
    assert vectors.ndim == 2 and vectors.shape[0] == 3 and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    assert create_encoder(spec, "cpu").fingerprint() == encoder.fingerprint()  # the cache key is stable
    assert encoder.fingerprint() in text_cache_path(tmp_path, encoder).name
    cached = encode_cached(encoder, ["red", "a blue sky"], tmp_path)
    np.testing.assert_allclose(cached, vectors[:2], atol=1e-6)
    np.testing.assert_allclose(encode_cached(encoder, ["a blue sky"], tmp_path), vectors[1:2], atol=1e-6)
