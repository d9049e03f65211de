from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conceptmon import clip, similarity, store
from conceptmon.concepts import ConceptSet
from conceptmon.config import config_from_dict
from conceptmon.layouts import ResolvedLayout, canonical
from conceptmon.detectors import DetectorError, RunContext, create_detector, list_detectors
from conceptmon.detectors.clipdissect import ClipDissect, pool_activations, resolve_params
from conceptmon.probes.base import ProbeSet
from conceptmon.probes.synthetic import synthetic_concepts

from .fixtures_clip import make_tiny_clip

WORDS = ("red", "green", "blue", "striped", "dog")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(clip.ALLOW_DOWNLOAD_ENV, raising=False)


class ColourProbe(ProbeSet):
    """Solid-colour images; label names double as a concept set."""

    name = "colours"

    def __init__(self, n=10):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, size=(n, 3), dtype=np.uint8)
        self.root = Path(".")
        self.concepts = ConceptSet(WORDS, ("color",) * 3 + ("texture", "object"))

    def __len__(self):
        return len(self.images)

    def relpath(self, i):
        return f"img{i}.png"

    def load_image(self, i):
        return Image.new("RGB", (20, 12), tuple(int(v) for v in self.images[i]))

    def fingerprint(self):
        return f"colours-{len(self)}-{int(self.images.sum())}"


def make_detector(tiny_clip, cache, probe=None, concepts=None, **detector):
    cfg = config_from_dict(
        {"concepts": concepts, "detector": {"name": "clip-dissect", "clip_model": str(tiny_clip), **detector}}
    )
    ctx = RunContext(device=torch.device("cpu"), cache_dir=cache)
    return create_detector(cfg, probe or ColourProbe(), ctx)


# ----------------------------------------------------------------------------- CLIP loading


def test_clip_features_are_normalised_and_images_accept_pil_or_pixels(tiny_clip):
    model, processor = clip.load_clip(str(tiny_clip), "cpu")
    text = clip.encode_texts(model, processor, list(WORDS), "cpu", batch_size=2)
    assert text.shape == (5, 16) and text.dtype == torch.float32
    torch.testing.assert_close(text.norm(dim=1), torch.ones(5))
    assert not torch.allclose(text[0], text[1])  # different words, different features
    probe = ColourProbe(3)
    pil = [probe.load_image(i) for i in range(3)]
    from_pil = clip.encode_images(model, processor, pil, "cpu")
    from_pixels = clip.encode_images(model, processor, clip.preprocess_images(processor, pil), "cpu")
    assert from_pil.shape == (3, 16)
    torch.testing.assert_close(from_pil, from_pixels)
    torch.testing.assert_close(from_pil.norm(dim=1), torch.ones(3))


def test_missing_clip_model_says_how_to_get_it(tmp_path):
    with pytest.raises(clip.ClipModelError) as e:
        clip.load_clip("nobody/no-such-clip", "cpu")
    msg = str(e.value)
    assert "\n" not in msg
    assert "detector.clip_model: CLIP model 'nobody/no-such-clip'" in msg
    assert "hf download nobody/no-such-clip" in msg and "CONCEPTMON_ALLOW_DOWNLOAD=1" in msg
    with pytest.raises(clip.ClipModelError, match=r"is not a folder"):
        clip.load_clip(str(tmp_path / "missing" / "folder"), "cpu")
    (tmp_path / "notclip").mkdir()
    (tmp_path / "notclip" / "readme.txt").write_text("hi")
    with pytest.raises(clip.ClipModelError, match=r"notclip is not a loadable CLIP folder"):
        clip.load_clip(str(tmp_path / "notclip"), "cpu")


def test_model_fingerprint_follows_folder_contents(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    before = clip.model_fingerprint(str(folder))
    (folder / "model.safetensors").write_bytes(b"12345")
    assert clip.model_fingerprint(str(folder)) != before
    assert clip.model_fingerprint("org/a") != clip.model_fingerprint("org/b")


# ----------------------------------------------------------------------------- the detector


def test_registered_without_masks():
    assert "clip-dissect" in list_detectors()
    assert ClipDissect.needs_masks is False


def test_clip_sim_is_cached_and_reused_without_clip(tiny_clip, tmp_path, monkeypatch):
    calls = []
    real_encode = clip.encode_images
    monkeypatch.setattr(clip, "encode_images", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    det = make_detector(tiny_clip, tmp_path)
    det.prepare()
    assert det.clip_sim.shape == (10, 5) and calls
    # Rows are images, columns words: C equals the product of the normalised features.
    model, processor = clip.load_clip(str(tiny_clip), "cpu")
    probe = ColourProbe()
    img = clip.encode_images(model, processor, [probe.load_image(i) for i in range(10)], "cpu")
    txt = clip.encode_texts(model, processor, list(WORDS), "cpu")
    torch.testing.assert_close(det.clip_sim, img @ txt.T, rtol=1e-4, atol=1e-5)
    image_file, sim_file = det.cache_paths()
    assert image_file.exists() and sim_file.exists() and sim_file.parent == tmp_path / "clip"

    def forbidden(*a, **k):
        raise AssertionError("CLIP used although C is cached")

    monkeypatch.setattr(clip, "encode_images", forbidden)
    monkeypatch.setattr(clip, "load_clip", forbidden)
    again = make_detector(tiny_clip, tmp_path)
    again.prepare()
    torch.testing.assert_close(again.clip_sim, det.clip_sim)


def test_new_concepts_reuse_image_features_and_new_probe_does_not(tiny_clip, tmp_path, monkeypatch):
    make_detector(tiny_clip, tmp_path).prepare()
    words = tmp_path / "words.txt"
    words.write_text("cat\tobject\n\nsky\n")
    calls = []
    real_encode = clip.encode_images
    monkeypatch.setattr(clip, "encode_images", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    det = make_detector(tiny_clip, tmp_path, concepts=str(words))
    assert det.concepts.names == ("cat", "sky") and det.concepts.categories == ("object", "other")
    det.prepare()
    assert det.clip_sim.shape == (10, 2) and not calls
    other = make_detector(tiny_clip, tmp_path, probe=ColourProbe(n=7))
    other.prepare()
    assert other.clip_sim.shape == (7, 5) and calls
    assert len(list((tmp_path / "clip").glob("clip_sim_*.pt"))) == 3


def test_damaged_cache_is_recomputed(tiny_clip, tmp_path):
    det = make_detector(tiny_clip, tmp_path)
    det.prepare()
    _, sim_file = det.cache_paths()
    sim_file.write_bytes(b"not a tensor file")
    again = make_detector(tiny_clip, tmp_path)
    again.prepare()
    torch.testing.assert_close(again.clip_sim, det.clip_sim)


def test_accumulator_collects_pooled_activations_in_any_order(tiny_clip, tmp_path):
    det = make_detector(tiny_clip, tmp_path, similarity="cos_similarity_cubed")
    det.prepare()
    maps = torch.randn(10, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    acc = det.accumulator("layer", 4)
    order = torch.tensor([7, 2, 9, 0, 4, 1, 3, 8, 6, 5])
    acc.add(maps[order[:6]], order[:6])
    with pytest.raises(DetectorError, match=r"layer layer: activations of 4 of 10 probe images never arrived"):
        acc.scores()
    acc.add(maps[order[6:]], order[6:])
    expected = similarity.cos_similarity_cubed(det.clip_sim, maps.mean(dim=(2, 3)))
    torch.testing.assert_close(acc.scores().scores, expected)


def test_pooling_per_output_kind():
    maps = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 2, 2)
    torch.testing.assert_close(pool_activations(maps, 3, "avg"), maps.mean(dim=(2, 3)))
    torch.testing.assert_close(pool_activations(maps, 3, "max"), maps[:, :, 1, 1])
    tokens = torch.randn(2, 5, 3)  # (batch, 1 + 2x2 tokens, width)
    cls = canonical(tokens, ResolvedLayout("tokens", 3, 1, (2, 2)), class_token=True)
    assert torch.equal(pool_activations(cls, 3), tokens[:, 0, :])  # pool: cls gets the class token
    grid = canonical(tokens, ResolvedLayout("tokens", 3, 1, (2, 2)))
    torch.testing.assert_close(pool_activations(grid, 3), tokens[:, 1:, :].mean(dim=1))  # avg over patch tokens
    flat = torch.randn(2, 3)
    assert torch.equal(pool_activations(flat, 3), flat)


def test_settings_and_thresholds(tiny_clip, tmp_path):
    det = make_detector(tiny_clip, tmp_path)
    s = det.settings()
    assert s["similarity"] == "soft_wpmi" and s["params"]["top_k"] == 100 and s["params"]["a"] == 10.0
    assert s["clip_model"] == str(tiny_clip) and s["concepts_fingerprint"] == det.concepts.fingerprint()
    assert det.threshold == pytest.approx(1.0)
    assert make_detector(tiny_clip, tmp_path, threshold=2.5).threshold == 2.5
    wp = make_detector(tiny_clip, tmp_path, similarity="wpmi", params={"top_k": 5})
    assert wp.threshold == pytest.approx(similarity.chance_pmi_score("wpmi", 5, {"top_k": 5}) + 1)
    assert make_detector(tiny_clip, tmp_path, similarity="soft-wpmi").similarity == "soft_wpmi"


@pytest.mark.parametrize(
    "detector,message",
    [
        ({"similarity": "soft_wpm"}, r"detector.similarity: unknown 'soft_wpm' \(did you mean soft_wpmi"),
        ({"params": {"topk": 5}}, r"detector.params.topk: not a parameter of similarity soft_wpmi; valid: top_k, a"),
        ({"params": {"top_k": 2.5}}, r"detector.params.top_k: expected an integer, got 2.5"),
        ({"params": {"p_end": 1.5}}, r"detector.params.p_end: must be in \(0, 1\], got 1.5"),
        ({"params": {"a": "ten"}}, r"detector.params.a: expected a number, got 'ten'"),
    ],
)
def test_bad_detector_settings_name_the_field(tiny_clip, tmp_path, detector, message):
    from conceptmon.config import ConfigError

    with pytest.raises(ConfigError, match=message):  # refused when the config is read
        make_detector(tiny_clip, tmp_path, **detector)


def test_resolve_params_keeps_defaults():
    assert resolve_params("wpmi", {"lam": 1}) == {"top_k": 28, "a": 2.0, "lam": 1.0, "min_prob": 1e-7}


# ----------------------------------------------------------------------------- end to end


def test_dissect_run_writes_the_shared_schema_and_reuses_the_cache(
    array_probe_config, tiny_ckpts, tiny_clip, tmp_path, monkeypatch
):
    from conceptmon.engine import dissect_run

    calls = []
    real_encode = clip.encode_images
    monkeypatch.setattr(clip, "encode_images", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    cfg = config_from_dict(
        {
            **array_probe_config,
            "probe": {"name": "synthetic", "root": str(tmp_path / "synthetic"), "n": 12, "image_size": 32},
            "concepts": "synthetic",
            "detector": {"name": "clip-dissect", "clip_model": str(tiny_clip), "params": {"top_k": 4},
                         "interpretable": "threshold"},
        }
    )
    out = tmp_path / "out"
    assert dissect_run(cfg, ckpts=tiny_ckpts, out=out, epochs=[0], log=lambda m: None) == [0]
    assert calls
    calls.clear()
    assert dissect_run(cfg, ckpts=tiny_ckpts, out=out, epochs=[1], log=lambda m: None) == [1]
    assert not calls, "the CLIP image encoder ran again for the second epoch"
    for epoch in (0, 1):
        schema = pq.read_schema(store.dissect_path(out, epoch)).remove_metadata()
        assert schema.equals(store.DISSECT)
        images = pq.read_schema(store.top_images_path(out, epoch)).remove_metadata()
        assert images.equals(store.TOP_IMAGES)
    df = store.read_dissect(out)
    assert set(df.detector) == {"clip-dissect"} and set(df.epoch) == {0, 1}
    vocabulary = synthetic_concepts()
    assert set(df.concept) <= set(vocabulary.names)
    category_of = dict(zip(vocabulary.names, vocabulary.categories))
    assert (df.category == df.concept.map(category_of)).all()
    assert len(df) == 2 * 2 * 6 * 3  # epochs x layers x units x top_k
    assert (df.distance == -df.score).all()
    best = df[df["rank"] == 0]
    assert ((best.score >= 1.0) == best.interpretable).all()
    manifest = store.read_manifest(out)
    assert manifest["detector"]["similarity"] == "soft_wpmi" and manifest["detector"]["params"]["top_k"] == 4
    # Activations are not cached: different weights give different scores.
    a, b = (df[df.epoch == e].sort_values(["layer", "neuron", "rank"]).score.to_numpy() for e in (0, 1))
    assert not np.allclose(a, b)


# ----------------------------------------------------------------------------- trust


def planted(n=400, m=30, j=40, seed=0):
    """C with one clear concept per planted neuron: neuron i < 10 fires with concept i's CLIP
    score; the other neurons are noise."""
    g = torch.Generator().manual_seed(seed)
    clip_sim = 0.2 + 0.02 * torch.randn(n, m, generator=g)
    present = torch.rand(n, m, generator=g) < 0.1
    clip_sim = clip_sim + 0.1 * present
    acts = torch.rand(n, j, generator=g)
    acts[:, :10] = present[:, :10].float() * 2 + 0.05 * torch.rand(n, 10, generator=g)
    return clip_sim, acts


def test_bootstrap_confidence_separates_planted_from_noise_and_is_deterministic():
    from conceptmon.detectors import poisson_weights
    from conceptmon.detectors.clipdissect import bootstrap_similarity

    sim = similarity.SIMILARITIES["soft_wpmi"]
    clip_sim, acts = planted()
    scores = sim(clip_sim, acts)
    weights = poisson_weights(len(acts), 20, seed=3)
    conf, low, high = bootstrap_similarity(sim, clip_sim, acts, {}, scores, weights)
    assert (conf[:10] == 1.0).all()  # planted neurons win every resample
    assert conf[10:].mean() < 0.8  # noise neurons' labels move under resampling
    best = scores.max(dim=1).values
    assert ((low <= best + 1e-4) & (best <= high + 1e-4))[:10].all()
    again = bootstrap_similarity(sim, clip_sim, acts, {}, scores, poisson_weights(len(acts), 20, seed=3))
    assert all(torch.equal(a, b) for a, b in zip((conf, low, high), again))
    other = bootstrap_similarity(sim, clip_sim, acts, {}, scores, poisson_weights(len(acts), 20, seed=4))[0]
    assert not torch.equal(other, conf)


@pytest.mark.parametrize("name", ["soft_wpmi", "wpmi", "cos_similarity_cubed"])
def test_columns_are_exactly_the_full_result(name):
    sim = similarity.SIMILARITIES[name]
    clip_sim, acts = planted()
    columns = torch.tensor([3, 0, 17])
    torch.testing.assert_close(sim.on_columns(clip_sim, acts, columns), sim(clip_sim, acts)[:, columns])


def test_null_calibration_flags_planted_neurons_and_few_noise_ones():
    from conceptmon.detectors.clipdissect import null_threshold

    sim = similarity.SIMILARITIES["soft_wpmi"]
    clip_sim, acts = planted(j=200)
    cut = null_threshold(sim, clip_sim, acts, {}, permutations=4, quantile=0.99, seed=0)
    best = sim(clip_sim, acts).max(dim=1).values
    assert (best[:10] > cut).all()
    assert (best[10:] > cut).float().mean() <= 0.05  # about 1 % by construction
