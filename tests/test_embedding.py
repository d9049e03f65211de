"""Neuron embedding u = Σ softmax(s/T)_i f(w_i), anchors, and the stable 2-D map."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conceptmon import store
from conceptmon.embedding import (
    EmbedError, cosine_distance, embed_run, embedding_matrix, fit_pca_map, fit_umap_map, map_path, read_anchor_distances,
    read_anchors, read_embed_meta, read_neurons, same_map, softmax_weights, top_k_arrays,
)
from conceptmon.encoders import register_encoder
from tests.fixtures_runs import HashEncoder, hash_vector, make_run, set_neuron


@register_encoder
class WideHashEncoder(HashEncoder):
    kind = "hashvec32"
    dim = 32

    def fingerprint(self) -> str:
        return "hashvec-32"

FAST = {"encoder": "hashvec", "map_method": "pca"}


def quiet(_msg):
    pass


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "out", epochs=[1, 2, 3], layers=["layer3", "layer4"], n_neurons=12, embedding=FAST)


def coords(neurons: pd.DataFrame, epoch: int, layer: str, neuron: int) -> np.ndarray:
    row = neurons[(neurons["epoch"] == epoch) & (neurons["layer"] == layer) & (neurons["neuron"] == neuron)]
    assert len(row) == 1
    return row[["x", "y"]].to_numpy()[0]


# ----------------------------------------------------------------------------- pure maths


def test_softmax_weights_rows_sum_to_one_and_skip_missing():
    scores = np.array([[0.3, 0.2, 0.1], [1.0, np.nan, 1.0], [np.nan, np.nan, np.nan]])
    w = softmax_weights(scores, 1.0)
    e = np.exp([0.3, 0.2, 0.1])
    np.testing.assert_allclose(w[0], e / e.sum())
    np.testing.assert_allclose(w[1], [0.5, 0.0, 0.5])
    np.testing.assert_array_equal(w[2], 0.0)
    # IoU-sized gaps: nearly uniform at T = 1, close to one-hot at a small T
    iou = np.array([[0.12, 0.11, 0.10, 0.09, 0.08]])
    assert np.ptp(softmax_weights(iou, 1.0)) < 0.01
    assert softmax_weights(iou, 0.002)[0, 0] > 0.99


def test_cosine_distance_is_zero_for_parallel_vectors():
    u = np.array([[2.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(cosine_distance(u, np.array([[1.0, 0.0]])), [[0.0], [1.0]], atol=1e-12)


def test_top_k_arrays_pads_missing_ranks():
    df = pd.DataFrame({
        "epoch": [1, 1, 1], "layer": ["l", "l", "l"], "neuron": [0, 0, 1], "rank": [1, 0, 0],
        "concept": ["b", "a", "c"], "score": [0.1, 0.2, 0.5], "interpretable": [True, True, False],
    })
    keys, concepts, scores = top_k_arrays(df, 3)
    assert keys["top_concept"].tolist() == ["a", "c"] and keys["interpretable"].tolist() == [True, False]
    assert concepts.tolist() == [["a", "b", None], ["c", None, None]]
    np.testing.assert_allclose(scores[0, :2], [0.2, 0.1])
    assert np.isnan(scores[1, 1:]).all()


# ----------------------------------------------------------------------------- the neuron vectors


def test_u_is_the_softmax_weighted_sum_of_concept_vectors(run):
    temperature = 0.05  # small enough that the weights are far from uniform
    embed_run(run, temperature=temperature, log=quiet)
    neurons = read_neurons(run, with_embedding=True)
    dissect = store.read_dissect(run)
    assert len(neurons) == 3 * 2 * 12
    u = embedding_matrix(neurons)
    for i in [0, 7, 30, 71]:
        row = neurons.iloc[i]
        mine = dissect[(dissect["epoch"] == row["epoch"]) & (dissect["layer"] == row["layer"])
                       & (dissect["neuron"] == row["neuron"])].sort_values("rank")
        s = mine["score"].to_numpy(np.float64) / temperature
        lam = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        expected = sum(l * hash_vector(c) for l, c in zip(lam, mine["concept"]))
        assert np.ptp(lam) > 0.2
        np.testing.assert_allclose(u[i], expected, atol=1e-5)
        assert row["top_concept"] == mine["concept"].iloc[0]
        assert row["score"] == pytest.approx(mine["score"].iloc[0])


def test_anchor_equal_to_the_only_concept_is_at_distance_zero(run):
    set_neuron(run, 2, "layer4", 5, ["windmill"], [0.2])
    embed_run(run, anchors=["windmill", "field"], log=quiet)
    anchors = read_anchors(run)
    assert anchors["concept"].tolist() == ["windmill", "field"]
    np.testing.assert_allclose(np.stack(anchors["embedding"])[0], hash_vector("windmill"), atol=1e-6)
    dist = read_anchor_distances(run)
    assert len(dist) == 3 * 2 * 12 * 2
    here = dist[(dist["epoch"] == 2) & (dist["layer"] == "layer4") & (dist["neuron"] == 5)].set_index("anchor")
    assert here.loc["windmill", "distance"] == pytest.approx(0.0, abs=1e-6)
    assert here.loc["field", "distance"] > 0.1
    # and on the map the neuron sits exactly on the anchor's star
    neurons = read_neurons(run)
    np.testing.assert_allclose(coords(neurons, 2, "layer4", 5), anchors[["x", "y"]].to_numpy()[0], atol=1e-5)


# ----------------------------------------------------------------------------- the stable map


def test_unchanged_neurons_keep_their_coordinates(run):
    embed_run(run, log=quiet)
    neurons = read_neurons(run)
    dissect = store.read_dissect(run)
    per = {
        key: tuple(zip(g.sort_values("rank")["concept"], g.sort_values("rank")["score"]))
        for key, g in dissect.groupby(["epoch", "layer", "neuron"])
    }
    same, moved = 0, 0
    for layer in ("layer3", "layer4"):
        for n in range(12):
            a, b = coords(neurons, 1, layer, n), coords(neurons, 2, layer, n)
            if per[(1, layer, n)] == per[(2, layer, n)]:
                np.testing.assert_array_equal(a, b)
                same += 1
            else:
                assert not np.array_equal(a, b)
                moved += 1
    assert same > 0 and moved > 0  # the fixture redraws ~30 % of neurons per epoch


def test_two_runs_on_one_cached_map_place_identical_neurons_identically(tmp_path):
    cache = tmp_path / "shared-cache"
    a = make_run(tmp_path / "a", epochs=[1, 2], layers=["layer4"], n_neurons=10, seed=1, embedding=FAST)
    b = make_run(tmp_path / "b", epochs=[5], layers=["layer4"], n_neurons=6, seed=2, embedding=FAST)
    twin = store.read_dissect(a, [2])
    twin = twin[(twin["layer"] == "layer4") & (twin["neuron"] == 3)].sort_values("rank")
    set_neuron(b, 5, "layer4", 0, twin["concept"].tolist(), twin["score"].tolist())

    logs_a, logs_b = [], []
    embed_run(a, anchors=["windmill"], cache_dir=cache, log=logs_a.append)
    embed_run(b, anchors=["windmill"], cache_dir=cache, log=logs_b.append)
    assert any("fitting pca map" in m for m in logs_a)
    assert any("using cached 2-D map" in m for m in logs_b) and not any("fitting" in m for m in logs_b)
    assert len(list((cache / "maps").glob("*.parquet"))) == 1
    assert same_map(read_embed_meta(a), read_embed_meta(b))
    np.testing.assert_array_equal(coords(read_neurons(a), 2, "layer4", 3), coords(read_neurons(b), 5, "layer4", 0))
    np.testing.assert_array_equal(read_anchors(a)[["x", "y"]].to_numpy(), read_anchors(b)[["x", "y"]].to_numpy())


def test_map_depends_on_encoder_and_outputs_record_it(run, tmp_path):
    embed_run(run, log=quiet)
    meta = read_embed_meta(run)
    assert meta["encoder"] == "hashvec" and meta["settings"]["encoder"] == "hashvec"
    assert map_path(meta["cache_dir"], meta["map_key"]).exists()

    other = make_run(tmp_path / "other", epochs=[1], layers=["layer4"], n_neurons=4, embedding=FAST)
    embed_run(other, log=quiet, temperature=0.5)
    assert same_map(meta, read_embed_meta(other))  # temperature moves neurons, not the map
    embed_run(other, log=quiet, anchors=["sky"])
    assert not same_map(meta, read_embed_meta(other))  # anchors are fitted with the vocabulary
    embed_run(other, log=quiet, encoder="hashvec32")
    wide = read_embed_meta(other)
    assert wide["encoder"] == "hashvec32" and wide["dim"] == 32
    assert not same_map(meta, wide) and wide["map_key"] != meta["map_key"]
    assert len(read_neurons(other, with_embedding=True)["embedding"].iloc[0]) == 32


def test_transform_placement_equals_mean_placement_for_a_linear_map(run):
    embed_run(run, log=quiet)
    mean_xy = read_neurons(run)[["x", "y"]].to_numpy()
    embed_run(run, placement="transform", log=quiet)
    assert read_embed_meta(run)["settings"]["placement"] == "transform"
    np.testing.assert_allclose(read_neurons(run)[["x", "y"]].to_numpy(), mean_xy, atol=1e-5)


def test_map_fit_on_neurons_places_identical_vectors_identically(run):
    embed_run(run, map_fit="neurons", anchors=["windmill"], log=quiet)
    neurons = read_neurons(run, with_embedding=True)
    u = embedding_matrix(neurons)
    _, first, inverse = np.unique(u, axis=0, return_index=True, return_inverse=True)
    xy = neurons[["x", "y"]].to_numpy()
    np.testing.assert_array_equal(xy, xy[first][inverse.reshape(-1)])
    assert np.isfinite(read_anchors(run)[["x", "y"]].to_numpy()).all()


# ----------------------------------------------------------------------------- freshness and errors


def test_embed_skips_fresh_outputs_and_redoes_stale_ones(run):
    first = embed_run(run, anchors=["field"], log=quiet)
    assert not first["skipped"]
    assert embed_run(run, anchors=["field"], log=quiet)["skipped"]
    assert not embed_run(run, anchors=["field"], temperature=0.3, log=quiet)["skipped"]
    set_neuron(run, 3, "layer3", 0, ["red"], [0.25])  # a re-dissected epoch
    again = embed_run(run, anchors=["field"], temperature=0.3, log=quiet)
    assert not again["skipped"]
    neurons = read_neurons(run)
    assert neurons[(neurons["epoch"] == 3) & (neurons["layer"] == "layer3") & (neurons["neuron"] == 0)][
        "top_concept"].item() == "red"
    assert embed_run(run, anchors=["field"], temperature=0.3, force=True, log=quiet)["skipped"] is False


@pytest.mark.parametrize(
    "kwargs, fragment",
    [({"temperature": 0.0}, "embedding.temperature"), ({"map_fit": "words"}, "embedding.map_fit"),
     ({"placement": "nearest"}, "embedding.placement"), ({"anchors": ["_"]}, "--anchors")],
)
def test_bad_settings_are_one_line_errors(run, kwargs, fragment):
    with pytest.raises(EmbedError) as e:
        embed_run(run, log=quiet, **kwargs)
    assert str(e.value).startswith(fragment) and "\n" not in str(e.value)


def test_missing_results_are_reported(tmp_path):
    with pytest.raises(store.StoreError, match="conceptmon.json"):
        embed_run(tmp_path / "nothing", log=quiet)
    with pytest.raises(EmbedError, match="conceptmon embed"):
        read_neurons(tmp_path)


def test_pca_map_is_deterministic():
    x = np.random.default_rng(0).normal(size=(20, 8))
    a, b = fit_pca_map(x), fit_pca_map(x.copy())
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_allclose(a.transform(x[:3]), a.positions[:3], atol=1e-5)


@pytest.mark.slow
def test_real_umap_on_a_tiny_vocabulary_is_seeded_and_cached(run):
    x = np.stack([hash_vector(w) for w in ["red", "green", "blue", "dog", "car", "field", "wood", "metal"]])
    a, b = fit_umap_map(x, seed=3), fit_umap_map(x, seed=3)
    np.testing.assert_array_equal(a.positions, b.positions)
    logs = []
    embed_run(run, map_method="umap", anchors=["windmill"], log=logs.append)
    assert any("fitting umap map" in m for m in logs)
    xy = read_neurons(run)[["x", "y"]].to_numpy()
    assert np.isfinite(xy).all() and np.ptp(xy[:, 0]) > 0
    logs.clear()
    embed_run(run, map_method="umap", anchors=["windmill"], force=True, log=logs.append)
    assert any("using cached 2-D map" in m for m in logs)
    np.testing.assert_array_equal(read_neurons(run)[["x", "y"]].to_numpy(), xy)


# ----------------------------------------------------------------------------- anchors persist


def test_anchors_default_to_the_most_frequent_concepts_and_persist_until_told(run):
    from conceptmon.embedding import AUTOMATIC_ANCHORS, automatic_anchors

    first = embed_run(run, log=quiet)  # nothing given, nothing configured: automatic
    last = store.read_dissect(run, [3])
    assert first["anchor_source"] == "automatic"
    assert read_anchors(run)["concept"].tolist() == automatic_anchors(last)
    assert len(read_anchors(run)) == AUTOMATIC_ANCHORS
    embed_run(run, anchors=["windmill", "field"], log=quiet)  # told: kept from now on
    assert embed_run(run, log=quiet)["skipped"]  # embed without --anchors keeps them (fresh)
    assert read_anchors(run)["concept"].tolist() == ["windmill", "field"]
    assert read_embed_meta(run)["anchor_source"] == "given"
    assert embed_run(run, anchors=["auto"], log=quiet)["anchor_source"] == "automatic"
    assert read_anchors(run)["concept"].tolist() == automatic_anchors(last)
    embed_run(run, anchors=["none"], log=quiet)
    assert read_anchors(run).empty and embed_run(run, log=quiet)["anchor_source"] == "none"


def test_automatic_anchors_rank_interpretable_top_concepts():
    from conceptmon.embedding import automatic_anchors

    df = pd.DataFrame({
        "epoch": [1] * 4 + [2] * 5, "rank": [0] * 9, "neuron": [0, 1, 2, 3, 0, 1, 2, 3, 4],
        "concept": ["a", "a", "a", "b", "c", "d", "d", "c", None],
        "interpretable": [True] * 4 + [True, True, True, False, False],
    })
    assert automatic_anchors(df, 2) == ["d", "c"]  # last epoch only, interpretable, ties by name; dead skipped
