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
             concept_fingerprint="f00d", probe_root=None, top_images=None, probe_fingerprint="p") -> "Path":  # noqa: F821
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
            "probe": {"name": "synthetic", "root": str(probe_root or tmp_path / "probe"), "fingerprint": probe_fingerprint,
                      "n_images": 8},
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
        assert (row.n_live, row.n_distinct_concepts, row.n_distinct_interpretable) == (n, distinct, distinct_interp)
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
    assert set(tables) == set(stats.statistic_names()) == set(stats.BUILTIN_STATISTICS)
    gen = store.read_generation(out, store.STATS)
    assert gen.record["tables"] == list(stats.BUILTIN_STATISTICS)
    for name in stats.statistic_names():
        written = store.read_table(stats.stats_table_path(out, name), stats.schema_of(name))
        assert written.shape == tables[name].shape and len(written) > 0
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
    gen = store.read_generation(out, store.STATS)  # the new generation alone is current
    assert "anchor_neighbors" not in gen.record["tables"] and not gen.path("anchor_neighbors.parquet").exists()
    assert "conceptmon embed" in gen.record["omitted"]["anchor_neighbors"]
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
    assert lines[0] == ("layer,epoch_from,epoch_to,n_neurons,n_kept,share_kept,n_confident,n_confident_kept,"
                        "share_confident_kept,n_uncertain,n_uncertain_kept,share_uncertain_kept")
    assert "all,1,2,7,4,0.5714285714285714,7,4,0.5714285714285714,0,0," in lines
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
    assert store.read_generation(out, store.STATS) is None  # refused before computing anything


@pytest.mark.slow
def test_fresh_stats_are_reused_only_while_inputs_and_options_match(tmp_path):
    out = make_out(tmp_path)
    assert stats.read_fresh_stats(out) is None  # nothing written yet
    written = stats.stats_run(out, log=lambda m: None)
    fresh = stats.read_fresh_stats(out)
    assert fresh is not None and set(fresh) == set(written)
    pd.testing.assert_frame_equal(fresh["retention"], written["retention"], check_dtype=False)
    # the same bytes written again: the content hashes match, so still fresh
    table = store.read_table(store.dissect_path(out, 5), store.DISSECT)
    write_epoch(out, 5, table)
    assert stats.read_fresh_stats(out) is not None
    # a re-dissected epoch with other labels makes them stale, and says why
    changed = table.copy()
    changed.loc[(changed["layer"] == "fc") & (changed["neuron"] == 2) & (changed["rank"] == 0), "concept"] = "red"
    write_epoch(out, 5, changed)
    tables, why = stats.check_fresh_stats(out)  # the embedding is stale now, too
    assert tables is None and "embed: made from other dissect tables (epochs [5]" in why
    write_embedding(out, neuron_rows(), distance_rows(), encoder="minilm")
    assert stats.check_fresh_stats(out)[1] == "the dissect tables and embedding changed since they were computed"
    stats.stats_run(out, log=lambda m: None)
    assert stats.read_fresh_stats(out) is not None
    # tables computed with non-default options are not what the report should show
    stats.stats_run(out, reference=2, log=lambda m: None)
    assert stats.check_fresh_stats(out)[1].startswith("they were computed with other options")
    assert stats.read_fresh_stats(out, reference=2) is not None
    stats.stats_run(out, log=lambda m: None)
    # a new embedding generation (same dissect tables) makes them stale too
    gen = store.read_generation(out, store.EMBED)
    write_embedding(out, neuron_rows(), distance_rows().head(3), encoder="minilm")
    assert store.read_generation(out, store.EMBED).record["generation"] != gen.record["generation"]
    assert stats.check_fresh_stats(out)[1] == "the embedding changed since they were computed"
    stats.stats_run(out, log=lambda m: None)
    # a table of the stats generation edited on disk
    path = stats.stats_table_path(out, "concepts")
    path.write_bytes(path.read_bytes()[:-10])
    assert "changed on disk" in stats.check_fresh_stats(out)[1]
    stats.stats_run(out, log=lambda m: None)
    drop_embedding(out)
    assert stats.read_fresh_stats(out) is None


# ----------------------------------------------------------------------------- dead units and confidence

# Layer L, threshold 0.04, trust level 0.9. (concept, score, confidence) or DEAD:
#            epoch 1               epoch 2                epoch 3
#   n0   red   .30 c.95       red   .30 c.95        blue  .30 c.95    confident change 2->3
#   n1   DEAD                 green .10 c.50        green .10 c.97    no change out of a dead unit
#   n2   car   .20 c.99       car   .20 c.40        DEAD              gone at 3: not kept
#   n3   sky   .02 c.92 (no)  red   .05 c.91        red   .05 c.20    confident change 1->2
#   n4   dog   .10 c.50       cat   .10 c.95        cat   .10 c.95    uncertain change 1->2
DEAD = None
LIVES = {
    0: {1: ("red", .30, .95), 2: ("red", .30, .95), 3: ("blue", .30, .95)},
    1: {1: DEAD, 2: ("green", .10, .50), 3: ("green", .10, .97)},
    2: {1: ("car", .20, .99), 2: ("car", .20, .40), 3: DEAD},
    3: {1: ("sky", .02, .92), 2: ("red", .05, .91), 3: ("red", .05, .20)},
    4: {1: ("dog", .10, .50), 2: ("cat", .10, .95), 3: ("cat", .10, .95)},
}
LIFE_CATEGORY = {"red": "color", "blue": "color", "green": "color", "car": "object", "dog": "object",
                 "cat": "object", "sky": "scene"}


def life_rows(with_confidence: bool = True) -> pd.DataFrame:
    rows = []
    for neuron, per_epoch in LIVES.items():
        for epoch, label in per_epoch.items():
            base = dict(run="life", epoch=epoch, layer="L", neuron=neuron, detector="netdissect", distance=0.0)
            if label is DEAD:
                rows.append(dict(base, rank=0, concept=None, category=None, score=0.0, interpretable=False,
                                 dead=True, confidence=0.0, score_low=0.0, score_high=0.0))
                continue
            concept, score, confidence = label
            for rank, c in enumerate([concept, "sky" if concept != "sky" else "red"]):
                rows.append(dict(base, rank=rank, concept=c, category=LIFE_CATEGORY[c], score=score / (rank + 1),
                                 interpretable=score >= THRESHOLD, dead=False,
                                 confidence=confidence if with_confidence else np.nan,
                                 score_low=np.nan, score_high=np.nan))
    return store.to_arrow(pd.DataFrame(rows), store.DISSECT).to_pandas()


def life_out(tmp_path, with_confidence: bool = True, name="life"):
    out = tmp_path / name
    table = life_rows(with_confidence)
    for epoch in (1, 2, 3):
        write_epoch(out, epoch, table[table["epoch"] == epoch])
    store.write_json(out / store.MANIFEST, {
        "run": name, "config": {"trust": {"replicates": 50 if with_confidence else 0, "level": 0.9}},
        "detector": {"name": "netdissect", "threshold": THRESHOLD},
        "concepts": {"names": sorted(LIFE_CATEGORY), "categories": [LIFE_CATEGORY[c] for c in sorted(LIFE_CATEGORY)],
                     "fingerprint": "life", "source": "hand"},
        "probe": {"name": "synthetic", "root": str(tmp_path), "fingerprint": "p", "n_images": 4},
        "layers": ["L"]})
    return out


def test_dead_units_are_counted_and_skipped_by_every_concept_statistic():
    first = stats.top1(life_rows())
    counts = stats.interpretable_counts(first)
    got = {int(r.epoch): (r.n_neurons, r.n_dead, r.n_interpretable) for r in counts.itertuples()}
    assert got == {1: (5, 1, 3), 2: (5, 0, 5), 3: (5, 1, 4)}
    assert lookup(counts, epoch=1).share_dead == 1 / 5
    categories = stats.category_counts(first, ["color", "object", "scene"])
    assert set(categories["category"]) == {"color", "object", "scene"}  # no category for the dead unit
    at1 = {r.category: r.n_interpretable for r in categories[categories.epoch == 1].itertuples()}
    assert at1 == {"color": 1, "object": 2, "scene": 0}
    concepts = stats.concept_counts(first)
    assert concepts["concept"].notna().all()
    assert concepts[concepts.epoch == 1]["n_neurons"].sum() == 4  # the live ones
    diversity = stats.concept_diversity(first)
    assert tuple(lookup(diversity, epoch=1)[["n_live", "n_distinct_concepts"]]) == (4, 4)
    assert lookup(diversity, epoch=1).entropy_bits == pytest.approx(2.0)
    changes = stats.concept_changes(first)
    assert [(r.neuron, r.epoch_from, r.concept_from, r.concept_to) for r in changes.itertuples()] == [
        (0, 2, "red", "blue"), (3, 1, "sky", "red"), (4, 1, "dog", "cat")]


def test_confident_and_uncertain_labels_side_by_side():
    first = stats.top1(life_rows(), trust_level=0.9)
    counts = stats.interpretable_counts(first)
    got = {int(r.epoch): (r.n_confident, r.n_uncertain) for r in counts.itertuples()}
    assert got == {1: (2, 1), 2: (3, 2), 3: (3, 1)}
    assert lookup(counts, epoch=2).share_confident == 3 / 5
    categories = stats.category_counts(first)
    assert lookup(categories, epoch=1, category="object").n_confident == 1  # car yes, dog no

    changes = stats.concept_changes(first)
    assert list(changes["confident"]) == [True, True, False]
    assert list(changes["confidence_from"]) == pytest.approx([.95, .92, .50])

    stability = stats.concept_stability(first)
    row = lookup(stability, layer="L", epoch_from=1)
    assert (row.n_neurons, row.n_kept) == (4, 2)  # n1 is dead at 1
    assert (row.n_confident, row.n_confident_kept, row.n_uncertain, row.n_uncertain_kept) == (3, 2, 1, 0)
    assert row.share_confident_kept == 2 / 3 and row.share_uncertain_kept == 0
    row = lookup(stability, layer="L", epoch_from=2)
    assert (row.n_neurons, row.n_kept) == (4, 3)  # n2 is dead at 3
    assert (row.n_confident, row.n_confident_kept, row.n_uncertain, row.n_uncertain_kept) == (3, 2, 1, 1)

    retained = stats.retention(first, percents=[50, 75, 100])
    expected = {  # (percent, epoch): (selected, kept, confident, confident kept, uncertain, uncertain kept)
        (50, 2): (2, 2, 2, 2, 0, 0), (50, 3): (2, 0, 2, 0, 0, 0),
        (75, 2): (3, 2, 2, 2, 1, 0), (100, 2): (4, 2, 3, 2, 1, 0), (100, 3): (4, 0, 3, 0, 1, 0),
    }
    for (percent, epoch), numbers in expected.items():
        row = lookup(retained, layer="L", percent=percent, epoch=epoch)
        assert (row.n_selected, row.n_kept, row.n_confident, row.n_confident_kept, row.n_uncertain,
                row.n_uncertain_kept) == numbers, (percent, epoch)
    assert lookup(retained, layer="L", percent=100, epoch=2).share_confident_kept == 2 / 3
    assert np.isnan(lookup(retained, layer="L", percent=50, epoch=2).share_uncertain_kept)  # none selected: blank


def test_unknown_confidence_is_blank_never_zero_and_never_called_confident():
    first = stats.top1(life_rows(with_confidence=False))
    counts = stats.interpretable_counts(first)
    assert counts["n_confident"].isna().all() and counts["n_uncertain"].isna().all()
    assert counts["share_confident"].isna().all()
    assert stats.concept_changes(first)["confident"].isna().all()
    stability = stats.concept_stability(first)
    assert stability["n_confident"].isna().all() and stability["share_confident_kept"].isna().all()
    assert (stability["n_kept"] >= 0).all()  # the overall numbers stay
    assert stats.retention(first)["n_confident_kept"].isna().all()


def test_summary_shows_dead_units_and_the_confidence_split(tmp_path):
    out = life_out(tmp_path)
    result = CliRunner().invoke(main, ["stats", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "epochs: 1, 2, 3 (all 3)" in text
    assert "at epoch 3, labels with confidence >= 0.9: L 3 confident / 1 uncertain" in text
    assert "dead units (no activation to label) at epoch 3: L 1/5; most: L at epoch 1 (1)" in text
    assert "concept changes: 3 over 2 checkpoint transitions, 2 confident" in text
    assert "most-changing neurons (confident changes):" in text
    assert "L neuron 4" not in text  # its only change is uncertain
    assert "nearest neurons per anchor" not in text  # no embedding, no anchors: no empty heading

    out = life_out(tmp_path, with_confidence=False, name="off")
    result = CliRunner().invoke(main, ["stats", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "label confidence: unknown (the dissect tables hold no bootstrap confidence: trust.replicates 0, " \
           "or a detector that does not resample)" in result.stdout
    assert "confident" not in result.stdout.replace("called confident", "")
    data = json.loads(CliRunner().invoke(main, ["stats", "--out", str(out), "--format", "json"]).stdout)
    assert data["confidence_known"] is False
    assert {r["n_confident"] for r in data["tables"]["interpretable"]} == {None}


def test_summary_names_the_epochs_it_shows():
    table = pd.concat([dissect_rows({k: {e: v[1] for e in range(10)} for k, v in TOP1.items()})])
    tables = {"interpretable": stats.interpretable_counts(table)}
    text = stats.format_summary(tables)
    assert text.startswith("epochs shown: 0, 1, 3, 4, 5, 6, 8, 9 (8 of 10: the first, the last and evenly spaced")
    assert "ep 2" not in text and "ep 9" in text
    assert stats.describe_shown_epochs([1, 2], [1, 2]) == "epochs: 1, 2 (all 2)"


def test_stats_refuses_a_stale_embedding_in_one_line(tmp_path):
    out = make_out(tmp_path)
    table = store.read_table(store.dissect_path(out, 2), store.DISSECT)
    table.loc[table["rank"] == 0, "score"] = 0.5  # epoch 2 dissected again, differently
    write_epoch(out, 2, table)
    result = CliRunner().invoke(main, ["stats", "--out", str(out)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "embed: made from other dissect tables (epochs [2]" in lines[0]
    assert f"re-run `conceptmon embed --out {out}`" in lines[0]
    assert store.read_generation(out, store.STATS) is None  # nothing written


def test_stats_generation_records_what_it_read_and_replaces_legacy_files(tmp_path):
    out = make_out(tmp_path)
    store.stats_dir(out).mkdir(parents=True)
    (store.stats_dir(out) / "interpretable.parquet").write_bytes(b"0.1 table")
    (store.stats_dir(out) / "stats.json").write_text("{}")
    stats.stats_run(out, layers=["conv"], anchor_k=3, log=lambda m: None)
    record = store.read_generation(out, store.STATS).record
    assert record["inputs"]["dissect"] == store.dissect_inputs(store.read_epoch_records(out))
    embed = store.read_generation(out, store.EMBED)
    assert record["inputs"]["embed"] == {"generation": embed.record["generation"], "files": embed.record["files"]}
    assert record["options"] == {"layers": ["conv"], "reference": None, "anchor_k": 3, "trust_level": 0.9}
    assert record["statistics"] == list(stats.BUILTIN_STATISTICS)
    assert set(record["files"]) == {f"{n}.parquet" for n in record["tables"]}
    assert sorted(p.name for p in store.stats_dir(out).iterdir() if p.is_file()) == ["current.json"]
