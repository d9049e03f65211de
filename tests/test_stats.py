"""Every statistic against numbers worked out by hand from a small hand-written run.

The run (threshold 0.04, top-1 concept and best score per neuron; rank-1 rows carry a
different concept so that a statistic reading the wrong rank fails):

    layer conv        epoch 1            epoch 2             epoch 5
      neuron 0     red      .30       red      .32        red      .35
      neuron 1     striped  .10       windmill .12        windmill .15
      neuron 2     car      .02 (no)  car      .06        red      .07
      neuron 3     red      .05       sky      .03 (no)   sky      .04
    layer fc
      neuron 0     car      .20       car      .25        windmill .22
      neuron 1     car      .20       sky      .05        sky      .06
      neuron 2     sky      .01 (no)  sky      .02 (no)   sky      .03 (no)
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conceptmon import stats, store
from conceptmon.cli import main

from .fixtures_runs import write_embedding, write_epoch

THRESHOLD = 0.04
CATEGORY = {"red": "color", "striped": "texture", "car": "object", "windmill": "object", "sky": "scene", "grass": "material"}
CATEGORIES = ["color", "texture", "material", "object", "part", "scene"]
TOP1 = {
    ("conv", 0): {1: ("red", 0.30), 2: ("red", 0.32), 5: ("red", 0.35)},
    ("conv", 1): {1: ("striped", 0.10), 2: ("windmill", 0.12), 5: ("windmill", 0.15)},
    ("conv", 2): {1: ("car", 0.02), 2: ("car", 0.06), 5: ("red", 0.07)},
    ("conv", 3): {1: ("red", 0.05), 2: ("sky", 0.03), 5: ("sky", 0.04)},
    ("fc", 0): {1: ("car", 0.20), 2: ("car", 0.25), 5: ("windmill", 0.22)},
    ("fc", 1): {1: ("car", 0.20), 2: ("sky", 0.05), 5: ("sky", 0.06)},
    ("fc", 2): {1: ("sky", 0.01), 2: ("sky", 0.02), 5: ("sky", 0.03)},
}
EPOCHS = [1, 2, 5]


def dissect_rows(top1=TOP1, run="hand", detector="netdissect") -> pd.DataFrame:
    rows = []
    for (layer, neuron), per_epoch in top1.items():
        for epoch, (concept, score) in per_epoch.items():
            second = "grass" if concept != "grass" else "sky"
            for rank, (c, s) in enumerate([(concept, score), (second, score / 2)]):
                rows.append(
                    dict(run=run, epoch=epoch, layer=layer, neuron=neuron, rank=rank, concept=c,
                         category=CATEGORY[c], score=s, distance=-s,
                         interpretable=score >= THRESHOLD, dead=False, confidence=1.0,
                         score_low=s, score_high=s, detector=detector)
                )
    frame = pd.DataFrame(rows)
    # Round-trip through the schema as the engine would: scores become float32.
    return store.to_arrow(frame, store.DISSECT).to_pandas()


# Embeddings: conv@1 has pairwise cosines 0,1,0,0,0,0 (mean 1/6); fc@1 has one zero vector
# (left out) and two orthogonal ones; conv@2 has a single usable vector.
EMBEDDINGS = {
    (1, "conv"): [[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 2]],
    (1, "fc"): [[1, 1, 0], [1, -1, 0], [0, 0, 0]],
    (2, "conv"): [[3, 4, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]],
}


def neuron_rows() -> pd.DataFrame:
    rows = []
    for (epoch, layer), vectors in EMBEDDINGS.items():
        for neuron, v in enumerate(vectors):
            concept, score = TOP1[(layer, neuron)][epoch]
            rows.append(dict(epoch=epoch, layer=layer, neuron=neuron, x=float(neuron), y=float(epoch),
                             top_concept=concept, score=score, interpretable=score >= THRESHOLD,
                             embedding=np.asarray(v, dtype=np.float32)))
    return store.to_arrow(pd.DataFrame(rows), store.EMBED_NEURONS).to_pandas()


# Dyadic distances so float32 storage keeps them exact.
DISTANCES = [
    ("windmill", 1, "conv", 0, 0.875), ("windmill", 1, "conv", 1, 0.25), ("windmill", 1, "conv", 2, 0.5),
    ("windmill", 1, "conv", 3, 0.75), ("windmill", 1, "fc", 0, 0.25), ("windmill", 1, "fc", 1, 0.625),
    ("windmill", 1, "fc", 2, 0.125),
    ("sky", 1, "conv", 0, 0.5), ("sky", 1, "fc", 1, 1.0),
    ("windmill", 2, "fc", 0, 0.5), ("windmill", 2, "conv", 0, 0.5),
]


def distance_rows() -> pd.DataFrame:
    frame = pd.DataFrame(DISTANCES, columns=["anchor", "epoch", "layer", "neuron", "distance"])
    return store.to_arrow(frame, store.NEURON_ANCHOR_DISTANCE).to_pandas()


def make_out(tmp_path, name="run", top1=TOP1, detector="netdissect", embed=True, encoder="minilm",
             concept_fingerprint="f00d", probe_root=None, top_images=None) -> "Path":  # noqa: F821
    """Write a complete output folder by hand: manifest, per-epoch tables and records."""
    out = tmp_path / name
    table = dissect_rows(top1, run=name, detector=detector)
    for epoch in sorted(pd.unique(table["epoch"])):
        epoch = int(epoch)
        images = top_images(epoch) if top_images else None
        write_epoch(out, epoch, table[table["epoch"] == epoch], images, checkpoint=f"/ckpts/{name}/epoch_{epoch}.pt")
    names = sorted(CATEGORY)
    store.write_json(
        out / store.MANIFEST,
        {
            "run": name,
            "config": {"model": {"arch": "resnet18"}, "embedding": {"encoder": encoder}, "top_k": 2},
            "detector": {"name": detector, "threshold": THRESHOLD},
            "concepts": {"names": names, "categories": [CATEGORY[n] for n in names],
                         "fingerprint": concept_fingerprint, "source": "hand"},
            "probe": {"name": "synthetic", "root": str(probe_root or tmp_path / "probe"), "fingerprint": "p", "n_images": 8},
            "versions": {"conceptmon": "0.1.0", "torch": "2.x"},
            "checkpoints": f"/ckpts/{name}",
            "layers": ["conv", "fc"],
        },
    )
    if embed:
        write_embedding(out, neuron_rows(), distance_rows(), encoder=encoder)
    return out


def drop_embedding(out):
    """As if the run had never been embedded."""
    import shutil

    shutil.rmtree(store.embed_dir(out))


def lookup(table: pd.DataFrame, **keys) -> pd.Series:
    mask = np.ones(len(table), dtype=bool)
    for k, v in keys.items():
        mask &= (table[k] == v).to_numpy()
    assert mask.sum() == 1, f"expected one row for {keys}, found {mask.sum()}"
    return table[mask].iloc[0]


# ----------------------------------------------------------------------------- pure statistics


def test_interpretable_counts():
    t = stats.interpretable_counts(dissect_rows())
    expected = {(1, "conv"): (4, 3), (1, "fc"): (3, 2), (2, "conv"): (4, 3), (2, "fc"): (3, 2),
                (5, "conv"): (4, 4), (5, "fc"): (3, 2)}
    assert len(t) == len(expected)
    for (epoch, layer), (n, k) in expected.items():
        row = lookup(t, epoch=epoch, layer=layer)
        assert (row.n_neurons, row.n_interpretable) == (n, k)
        assert row.share_interpretable == k / n


def test_category_counts_count_interpretable_neurons_by_top1_category():
    t = stats.category_counts(dissect_rows(), CATEGORIES)
    assert len(t) == 6 * len(CATEGORIES)  # every category listed, zeros included
    expected = {
        (1, "conv"): {"color": 2, "texture": 1},
        (1, "fc"): {"object": 2},
        (2, "conv"): {"color": 1, "object": 2},
        (2, "fc"): {"object": 1, "scene": 1},
        (5, "conv"): {"color": 2, "object": 1, "scene": 1},
        (5, "fc"): {"object": 1, "scene": 1},
    }
    n_neurons = {"conv": 4, "fc": 3}
    for (epoch, layer), counts in expected.items():
        total = sum(counts.values())
        for category in CATEGORIES:
            row = lookup(t, epoch=epoch, layer=layer, category=category)
            k = counts.get(category, 0)
            assert row.n_interpretable == k
            assert row.share_of_interpretable == k / total
            assert row.share_of_neurons == k / n_neurons[layer]
    # categories given first keep their order; ones only seen in the data follow
    assert list(stats.category_counts(dissect_rows(), ["scene"])["category"].unique()) == [
        "scene", "color", "object", "texture"]


def test_concept_counts_and_order():
    t = stats.concept_counts(dissect_rows())
    got = {
        (int(e), l): [(r.concept, r.n_neurons, r.n_interpretable) for r in g.itertuples()]
        for (e, l), g in t.groupby(["epoch", "layer"], sort=True)
    }
    assert got == {
        (1, "conv"): [("red", 2, 2), ("striped", 1, 1), ("car", 1, 0)],
        (1, "fc"): [("car", 2, 2), ("sky", 1, 0)],
        (2, "conv"): [("car", 1, 1), ("red", 1, 1), ("windmill", 1, 1), ("sky", 1, 0)],
        (2, "fc"): [("sky", 2, 1), ("car", 1, 1)],
        (5, "conv"): [("red", 2, 2), ("sky", 1, 1), ("windmill", 1, 1)],
        (5, "fc"): [("sky", 2, 1), ("windmill", 1, 1)],
    }
    assert lookup(t, epoch=1, layer="conv", concept="striped").category == "texture"


def test_concept_changes_between_consecutive_checkpoints():
    t = stats.concept_changes(dissect_rows())
    got = [(r.layer, r.neuron, r.epoch_from, r.epoch_to, r.concept_from, r.concept_to) for r in t.itertuples()]
    assert got == [
        ("conv", 1, 1, 2, "striped", "windmill"),
        ("conv", 2, 2, 5, "car", "red"),
        ("conv", 3, 1, 2, "red", "sky"),
        ("fc", 0, 2, 5, "car", "windmill"),
        ("fc", 1, 1, 2, "car", "sky"),
    ]
    row = t.iloc[0]
    assert (row.score_from, row.score_to) == (np.float32(0.10), np.float32(0.12))


def test_concept_changes_skip_epochs_where_a_neuron_is_missing():
    partial = {k: dict(v) for k, v in TOP1.items()}
    del partial[("conv", 1)][2]  # neuron absent at epoch 2: no pair (1,2) or (2,5) for it
    t = stats.concept_changes(dissect_rows(partial))
    assert not ((t.layer == "conv") & (t.neuron == 1)).any()
    s = stats.concept_stability(dissect_rows(partial))
    assert tuple(lookup(s, layer="conv", epoch_from=1)[["n_neurons", "n_kept"]]) == (3, 2)


def test_single_epoch_has_no_changes():
    only_first = {k: {1: v[1]} for k, v in TOP1.items()}
    assert stats.concept_changes(dissect_rows(only_first)).empty
    assert stats.concept_stability(dissect_rows(only_first)).empty
    assert stats.retention(dissect_rows(only_first)).empty


def test_stability_shares():
    t = stats.concept_stability(dissect_rows())
    expected = {("conv", 1): (4, 2), ("conv", 2): (4, 3), ("fc", 1): (3, 2), ("fc", 2): (3, 2),
                ("all", 1): (7, 4), ("all", 2): (7, 5)}
    assert len(t) == len(expected)
    for (layer, epoch_from), (n, k) in expected.items():
        row = lookup(t, layer=layer, epoch_from=epoch_from)
        assert row.epoch_to == {1: 2, 2: 5}[epoch_from]
        assert (row.n_neurons, row.n_kept, row.share_kept) == (n, k, k / n)


def test_retention_default_reference_is_first_epoch():
    t = stats.retention(dissect_rows())
    assert set(t.reference_epoch) == {1}
    assert set(t.epoch) == {2, 5}
    assert sorted(set(t.percent)) == list(range(5, 101, 5))
    # (layer, percent) -> (n_selected, kept at epoch 2, kept at epoch 5); fc's tie at .20
    # between neurons 0 and 1 goes to neuron 0 (kept at epoch 2), which decides the 5 % row.
    expected = {
        ("conv", 5): (1, 1, 1), ("conv", 25): (1, 1, 1), ("conv", 30): (2, 1, 1),
        ("conv", 50): (2, 1, 1), ("conv", 75): (3, 1, 1), ("conv", 100): (4, 2, 1),
        ("fc", 5): (1, 1, 0), ("fc", 25): (1, 1, 0), ("fc", 30): (1, 1, 0), ("fc", 35): (2, 1, 0),
        ("fc", 50): (2, 1, 0), ("fc", 75): (3, 2, 1), ("fc", 100): (3, 2, 1),
        ("all", 5): (2, 2, 1), ("all", 30): (3, 2, 1), ("all", 50): (4, 2, 1), ("all", 75): (6, 3, 2),
        ("all", 100): (7, 4, 2),
    }
    for (layer, percent), (n, kept2, kept5) in expected.items():
        for epoch, kept in ((2, kept2), (5, kept5)):
            row = lookup(t, layer=layer, percent=percent, epoch=epoch)
            assert (row.n_selected, row.n_kept) == (n, kept), (layer, percent, epoch)
            assert row.share_kept == kept / n


def test_retention_from_a_later_reference_and_errors():
    t = stats.retention(dissect_rows(), reference=2, percents=[50, 75, 100])
    assert set(t.epoch) == {5}
    got = {(r.layer, r.percent): (r.n_selected, r.n_kept) for r in t.itertuples()}
    assert got[("conv", 50)] == (2, 2)
    assert got[("conv", 75)] == (3, 2)
    assert got[("conv", 100)] == (4, 3)
    with pytest.raises(stats.StatsError, match=r"--reference 3: .*available epochs: 1, 2, 5"):
        stats.retention(dissect_rows(), reference=3)


def test_retention_selection_uses_exact_integer_ceiling():
    # 20 neurons, 35 %: 0.35 * 20 is 7.000000000000001 in floating point; the top 7 are meant.
    top1 = {("l", n): {0: ("red", 1.0 - n / 100), 1: ("red" if n < 7 else "sky", 0.5)} for n in range(20)}
    t = stats.retention(dissect_rows(top1), percents=[35])
    row = lookup(t, layer="l")
    assert (row.n_selected, row.n_kept) == (7, 7)


def test_diversity_entropy_in_bits():
    t = stats.concept_diversity(dissect_rows())
    h_third = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected = {(1, "conv"): (4, 3, 1.5, 2), (1, "fc"): (3, 2, h_third, 1), (2, "conv"): (4, 4, 2.0, 3),
                (2, "fc"): (3, 2, h_third, 2), (5, "conv"): (4, 3, 1.5, 3), (5, "fc"): (3, 2, h_third, 2)}
    for (epoch, layer), (n, distinct, entropy, distinct_interp) in expected.items():
        row = lookup(t, epoch=epoch, layer=layer)
        assert (row.n_neurons, row.n_distinct_concepts, row.n_distinct_interpretable) == (n, distinct, distinct_interp)
        assert row.entropy_bits == pytest.approx(entropy, abs=1e-12)


def test_embedding_spread_mean_pairwise_cosine_distance():
    t = stats.embedding_spread(neuron_rows())
    assert lookup(t, epoch=1, layer="conv").mean_cosine_distance == pytest.approx(5 / 6, abs=1e-12)
    assert lookup(t, epoch=1, layer="fc").mean_cosine_distance == pytest.approx(1.0, abs=1e-12)
    assert np.isnan(lookup(t, epoch=2, layer="conv").mean_cosine_distance)


def test_embedding_spread_matches_brute_force_on_random_vectors():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(9, 5)).astype(np.float32)
    frame = pd.DataFrame({"epoch": 3, "layer": "l", "neuron": range(9), "embedding": list(vectors)})
    unit = vectors.astype(np.float64) / np.linalg.norm(vectors.astype(np.float64), axis=1, keepdims=True)
    pairs = [1 - unit[i] @ unit[j] for i in range(9) for j in range(i + 1, 9)]
    assert stats.embedding_spread(frame).mean_cosine_distance.iloc[0] == pytest.approx(np.mean(pairs), abs=1e-12)


def test_anchor_neighbors_and_mean_distance():
    first = stats.top1(dissect_rows())
    near = stats.anchor_neighbors(distance_rows(), first, k=2)
    got = [(r.anchor, r.epoch, r.rank, r.layer, r.neuron, r.concept, r.distance) for r in near.itertuples()]
    assert got == [
        ("sky", 1, 0, "conv", 0, "red", 0.5), ("sky", 1, 1, "fc", 1, "car", 1.0),
        ("windmill", 1, 0, "fc", 2, "sky", 0.125), ("windmill", 1, 1, "conv", 1, "striped", 0.25),
        ("windmill", 2, 0, "conv", 0, "red", 0.5), ("windmill", 2, 1, "fc", 0, "car", 0.5),
    ]
    mean = stats.anchor_mean_distance(distance_rows(), k=2)
    expected = {("windmill", 1, "conv"): (2, 0.375), ("windmill", 1, "fc"): (2, 0.1875),
                ("windmill", 1, "all"): (2, 0.1875), ("sky", 1, "conv"): (1, 0.5), ("sky", 1, "fc"): (1, 1.0),
                ("sky", 1, "all"): (2, 0.75), ("windmill", 2, "all"): (2, 0.5)}
    for (anchor, epoch, layer), (n, d) in expected.items():
        row = lookup(mean, anchor=anchor, epoch=epoch, layer=layer)
        assert (row.k, row.n_neighbors, row.mean_distance) == (2, n, d)
    with pytest.raises(stats.StatsError, match="at least 1"):
        stats.anchor_mean_distance(distance_rows(), k=0)


# ----------------------------------------------------------------------------- stats_run and CLI


def test_stats_run_writes_every_table(tmp_path):
    out = make_out(tmp_path)
    notices = []
    tables = stats.stats_run(out, log=notices.append)
    assert set(tables) == set(stats.TABLES)
    for name in stats.TABLES:
        written = store.read_table(store.stats_dir(out) / f"{name}.parquet", store.STATS_SCHEMAS[name])
        assert len(written) == len(tables[name]) > 0
    assert not any("notice" in n for n in notices)
    # the manifest's concept categories are all listed (material has no neuron)
    assert set(tables["categories"].category) == {"color", "material", "object", "scene", "texture"}
    assert lookup(tables["diversity"], epoch=1, layer="conv").mean_cosine_distance == pytest.approx(5 / 6)


def test_stats_run_without_embedding_omits_anchor_tables_with_a_notice(tmp_path):
    out = make_out(tmp_path)
    stats.stats_run(out, log=lambda m: None)
    drop_embedding(out)
    notices = []
    tables = stats.stats_run(out, log=notices.append)
    assert "anchor_neighbors" not in tables and "anchor_distance" not in tables
    assert not (store.stats_dir(out) / "anchor_neighbors.parquet").exists()  # stale file removed
    assert tables["diversity"].mean_cosine_distance.isna().all()
    assert sum("conceptmon embed" in n for n in notices) == 1


def test_stats_run_layers_filter_and_unknown_layer(tmp_path):
    out = make_out(tmp_path)
    tables = stats.stats_run(out, layers=["fc"], log=lambda m: None)
    assert set(tables["interpretable"].layer) == {"fc"}
    assert set(tables["anchor_neighbors"].layer) == {"fc"}
    with pytest.raises(stats.StatsError, match=r"--layers layer9: .*available layers: conv, fc"):
        stats.stats_run(out, layers=["layer9"], log=lambda m: None)


def test_cli_stats_json_is_pure_json_on_stdout(tmp_path):
    out = make_out(tmp_path)
    drop_embedding(out)  # a notice must not pollute stdout
    result = CliRunner().invoke(main, ["stats", "--out", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {(r["epoch"], r["layer"]): r["n_interpretable"] for r in data["tables"]["interpretable"]}
    assert rows[(5, "conv")] == 4
    assert data["tables"]["diversity"][0]["mean_cosine_distance"] is None
    assert any("conceptmon embed" in n for n in data["notices"])
    assert "conceptmon embed" in result.stderr


def test_cli_stats_csv_and_table(tmp_path):
    out = make_out(tmp_path)
    result = CliRunner().invoke(main, ["stats", "--out", str(out), "--format", "csv", "--table", "stability"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "layer,epoch_from,epoch_to,n_neurons,n_kept,share_kept"
    assert "all,1,2,7,4,0.5714285714285714" in lines
    result = CliRunner().invoke(main, ["stats", "--out", str(out), "--reference", "2", "--layers", "conv"])
    assert result.exit_code == 0, result.output
    assert "conv" in result.stdout and "interpretable" in result.stdout
    assert "fc" not in result.stdout.replace("conceptmon", "")


def test_cli_stats_errors_are_one_line(tmp_path):
    out = make_out(tmp_path)
    result = CliRunner().invoke(main, ["stats", "--out", str(out), "--reference", "7"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "Error: --reference 7: epoch not in the results; available epochs: 1, 2, 5"]
    result = CliRunner().invoke(main, ["stats", "--out", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "no dissection results" in result.stderr
    result = CliRunner().invoke(main, ["stats", "--out", str(out), "--format", "csv", "--table", "nope"])
    assert result.exit_code == 2 and "nope" in result.stderr


def test_fresh_stats_are_reused_only_while_inputs_and_options_match(tmp_path):
    out = make_out(tmp_path)
    assert stats.read_fresh_stats(out) is None  # nothing written yet
    written = stats.stats_run(out, log=lambda m: None)
    fresh = stats.read_fresh_stats(out)
    assert fresh is not None and set(fresh) == set(written)
    pd.testing.assert_frame_equal(fresh["retention"], written["retention"], check_dtype=False)
    # a re-dissected epoch (new file) makes them stale
    table = store.read_table(store.dissect_path(out, 5), store.DISSECT)
    store.write_table(store.dissect_path(out, 5), table, store.DISSECT)
    assert stats.read_fresh_stats(out) is None
    # tables computed with non-default options are not what the report should show
    stats.stats_run(out, reference=2, log=lambda m: None)
    assert stats.read_fresh_stats(out) is None
    stats.stats_run(out, log=lambda m: None)
    assert stats.read_fresh_stats(out) is not None
    drop_embedding(out)
    assert stats.read_fresh_stats(out) is None
