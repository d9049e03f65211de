"""Text encoders: registry, on-disk cache per (encoder, text), CLIP wiring, the real MiniLM."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from conceptmon import store
from conceptmon.encoders import (
    EncoderError, MiniLMEncoder, create_encoder, encode_cached, list_encoders, mean_pool, parse_encoder_spec,
    text_cache_path,
)
from tests.fixtures_runs import HashEncoder, hash_vector


def test_spec_parsing_and_registry():
    assert parse_encoder_spec("clip:openai/clip-vit-base-patch16") == ("clip", "openai/clip-vit-base-patch16")
    assert parse_encoder_spec("minilm") == ("minilm", None)
    assert {"clip", "minilm"} <= set(list_encoders())
    enc = create_encoder("clip:/models/clip", "cpu")
    assert enc.id == "clip:/models/clip" and enc.device == torch.device("cpu")


@pytest.mark.parametrize(
    "spec, fragment",
    [("minlm", "did you mean minilm"), ("clip", "clip needs a model"), ("minilm:x", "takes no argument")],
)
def test_bad_encoder_specs_name_the_field(spec, fragment):
    with pytest.raises(EncoderError) as e:
        create_encoder(spec, "cpu")
    msg = str(e.value)
    assert msg.startswith("embedding.encoder:") and fragment in msg and "\n" not in msg


def test_cache_encodes_each_text_once(tmp_path):
    enc = create_encoder("hashvec", "cpu")
    HashEncoder.calls.clear()
    first = encode_cached(enc, ["red", "dog", "red"], tmp_path)
    assert HashEncoder.calls == [["red", "dog"]]
    np.testing.assert_allclose(first[0], hash_vector("red"), atol=1e-6)
    np.testing.assert_array_equal(first[0], first[2])
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-6)

    again = encode_cached(enc, ["dog", "windmill", "red"], tmp_path)
    assert HashEncoder.calls == [["red", "dog"], ["windmill"]]  # only the new word
    np.testing.assert_array_equal(again[0], first[1])
    np.testing.assert_array_equal(again[2], first[0])
    cached = store.read_table(text_cache_path(tmp_path, enc), store.TEXT_EMBEDDINGS)
    assert sorted(cached["text"]) == ["dog", "red", "windmill"]


def test_damaged_cache_is_rebuilt(tmp_path):
    enc = create_encoder("hashvec", "cpu")
    path = text_cache_path(tmp_path, enc)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not parquet")
    notes = []
    vec = encode_cached(enc, ["field"], tmp_path, log=notes.append)
    np.testing.assert_allclose(vec[0], hash_vector("field"), atol=1e-6)
    assert any("damaged text cache" in n for n in notes)
    assert store.read_table(path, store.TEXT_EMBEDDINGS)["text"].tolist() == ["field"]


def test_encoders_with_different_fingerprints_do_not_share_a_cache(tmp_path):
    a = create_encoder("hashvec", "cpu")
    b = create_encoder("clip:/nonexistent/clip-folder", "cpu")
    assert text_cache_path(tmp_path, a) != text_cache_path(tmp_path, b)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_clip_encoder_uses_conceptmon_clip_on_the_given_device(monkeypatch, tmp_path):
    seen = {}
    fake = types.ModuleType("conceptmon.clip")

    def load_clip(name, device, *, field="detector.clip_model"):
        seen["load"] = (name, torch.device(device), field)
        return "model", "processor"

    def encode_texts(model, processor, words, device, batch_size=256):
        seen["words"] = list(words)
        return torch.tensor([[3.0, 4.0]] * len(words))

    fake.load_clip, fake.encode_texts = load_clip, encode_texts
    fake.model_fingerprint = lambda name: f"fp-{name}"
    monkeypatch.setitem(sys.modules, "conceptmon.clip", fake)
    monkeypatch.setattr("conceptmon.clip", fake, raising=False)

    enc = create_encoder("clip:my/clip", "cpu")
    vecs = encode_cached(enc, ["windmill", "field"], tmp_path)
    assert seen["load"] == ("my/clip", torch.device("cpu"), "embedding.encoder")
    assert seen["words"] == ["windmill", "field"]
    np.testing.assert_allclose(vecs, [[0.6, 0.8], [0.6, 0.8]], atol=1e-6)
    assert text_cache_path(tmp_path, enc).exists()


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(tmp_path):
    words = ["red", "striped", "living room", "windmill"]
    enc = create_encoder("minilm", "cpu")
    fp = enc.fingerprint()
    vecs = encode_cached(enc, words, tmp_path)
    assert vecs.shape == (4, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)

    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(MiniLMEncoder.model_dir()), device="cpu").encode(
        words, normalize_embeddings=True
    )
    np.testing.assert_allclose(vecs, reference, atol=1e-4)
    assert create_encoder("minilm", "cpu").fingerprint() == fp  # stable across instances
