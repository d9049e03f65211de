"""Two hand-written runs side by side, and the refusals that keep comparisons honest."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conceptmon import compare, store
from conceptmon.cli import main

from .test_stats import TOP1, lookup, make_out

# The "robust" run differs from the standard one at epoch 5 only: conv neuron 1 detects
# grass (material) instead of windmill, and fc neuron 2 becomes interpretable for striped.
ROBUST = {k: dict(v) for k, v in TOP1.items()}
ROBUST[("conv", 1)][5] = ("grass", 0.09)
ROBUST[("fc", 2)][5] = ("striped", 0.05)
LABELS = ("standard", "robust")


@pytest.fixture
def runs(tmp_path):
    return make_out(tmp_path, "standard"), make_out(tmp_path, "robust", top1=ROBUST)


def test_interpretable_side_by_side_with_differences(runs):
    result = compare.compare_runs(*runs, labels=LABELS, log=lambda m: None)
    t = result["interpretable"]
    assert list(t.columns[:6]) == ["layer", "epoch", "basis", "n_neurons_standard", "n_neurons_robust",
                                   "n_neurons_diff"]
    assert set(t["basis"]) == {"counts"}  # same layer widths: counts are comparable
    row = lookup(t, layer="fc", epoch=5)
    assert (row.n_interpretable_standard, row.n_interpretable_robust, row.n_interpretable_diff) == (2, 3, 1)
    assert row.share_interpretable_diff == pytest.approx(1 / 3, abs=1e-15)
    row = lookup(t, layer="conv", epoch=5)
    assert (row.n_interpretable_standard, row.n_interpretable_robust, row.n_interpretable_diff) == (4, 4, 0)
    earlier = t[t.epoch < 5]
    assert (earlier.n_interpretable_diff == 0).all() and len(earlier) == 4


def test_category_differences(runs):
    t = compare.compare_runs(*runs, labels=LABELS, log=lambda m: None)["categories"]
    at5 = t[t.epoch == 5]
    diffs = {(r.layer, r.category): r.n_interpretable_diff for r in at5.itertuples() if r.n_interpretable_diff != 0}
    assert diffs == {("conv", "object"): -1, ("conv", "material"): 1, ("fc", "texture"): 1}
    row = lookup(t, layer="conv", epoch=5, category="color")
    assert (row.n_interpretable_standard, row.n_interpretable_robust) == (2, 2)


def test_concepts_present_in_one_run_only(runs):
    t = compare.compare_runs(*runs, labels=LABELS, log=lambda m: None)["concepts"]
    at5 = {(r.layer, r.concept): r.present for r in t[t.epoch == 5].itertuples()}
    assert at5 == {
        ("conv", "grass"): "robust only", ("conv", "red"): "both", ("conv", "sky"): "both",
        ("conv", "windmill"): "standard only", ("fc", "sky"): "both", ("fc", "striped"): "robust only",
        ("fc", "windmill"): "both",
    }
    grass = lookup(t, layer="conv", epoch=5, concept="grass")
    assert grass.category == "material"
    assert np.isnan(grass.n_interpretable_standard) and grass.n_interpretable_robust == 1
    # a concept only non-interpretable neurons have as top-1 is in neither run
    assert lookup(t, layer="fc", epoch=1, concept="sky").present == "neither"


def test_epochs_of_one_run_only_are_kept_with_gaps(tmp_path):
    longer = {k: {**v, 7: v[5]} for k, v in TOP1.items()}
    a, b = make_out(tmp_path, "a"), make_out(tmp_path, "b", top1=longer)
    t = compare.compare_runs(a, b, log=lambda m: None)["interpretable"]
    row = lookup(t, layer="conv", epoch=7)
    assert np.isnan(row.n_interpretable_a) and row.n_interpretable_b == 4 and np.isnan(row.n_interpretable_diff)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(detector="clip-dissect"), "detector.name is 'netdissect' in standard but 'clip-dissect' in robust"),
        (dict(concept_fingerprint="beef"), "different concept sets: standard hand (6 concepts, fingerprint f00d), "
                                           "robust hand (6 concepts, fingerprint beef)"),
        (dict(probe_fingerprint="other"), "different probe sets: standard synthetic (8 images at "),
        (dict(encoder="clip:openai/clip-vit-base-patch16"),
         "different text encoders: 'minilm' in standard but 'clip:openai/clip-vit-base-patch16' in robust"),
    ],
)
def test_refuses_runs_that_are_not_comparable(tmp_path, kwargs, message):
    a, b = make_out(tmp_path, "standard"), make_out(tmp_path, "robust", **kwargs)
    with pytest.raises(compare.CompareError, match="cannot compare") as info:
        compare.compare_runs(a, b, labels=LABELS, log=lambda m: None)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_refuses_different_detector_settings_and_reads_embed_record(tmp_path):
    a, b = make_out(tmp_path, "standard"), make_out(tmp_path, "robust")
    manifest = store.read_json(b / store.MANIFEST)
    manifest["detector"]["threshold"] = 0.05
    store.write_json(b / store.MANIFEST, manifest)
    with pytest.raises(compare.CompareError, match="detector.threshold is 0.04 in standard but 0.05 in robust"):
        compare.compare_runs(a, b, labels=LABELS, log=lambda m: None)
    # the encoder the embedding actually used (its record) wins over the config's
    manifest["detector"]["threshold"] = 0.04
    store.write_json(b / store.MANIFEST, manifest)
    gen = store.read_generation(b, store.EMBED)
    store.write_json(store.embed_dir(b) / store.GENERATION_POINTER, {**gen.record, "encoder": "clip:other"})
    with pytest.raises(compare.CompareError, match="'minilm' in standard but 'clip:other' in robust"):
        compare.compare_runs(a, b, labels=LABELS, log=lambda m: None)


@pytest.mark.parametrize("labels, message", [(("x", "x"), "must differ"), (("x",), "expected two"),
                                             (("a b", "c"), "'a b'"), (("diff", "c"), "'diff'")])
def test_bad_labels(labels, message):
    with pytest.raises(compare.CompareError, match=message):
        compare.check_labels(labels)


def test_cli_compare_table_json_and_refusal(runs, tmp_path):
    a, b = runs
    result = CliRunner().invoke(main, ["compare", str(a), str(b), "--labels", "standard,robust"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "interpretable neurons per layer at epoch 5" in text
    assert "concepts only in robust at epoch 5:" in text and "fc: striped (1)" in text
    assert "concepts only in standard at epoch 5:" in text and "conv: windmill (1)" in text

    result = CliRunner().invoke(main, ["compare", str(a), str(b), "--labels", "standard,robust", "--format", "json",
                                       "--table", "interpretable"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["labels"] == ["standard", "robust"] and list(data["tables"]) == ["interpretable"]
    row = next(r for r in data["tables"]["interpretable"] if r["layer"] == "fc" and r["epoch"] == 5)
    assert row["n_interpretable_diff"] == 1

    other = make_out(tmp_path, "other", detector="clip-dissect")
    result = CliRunner().invoke(main, ["compare", str(a), str(other)])
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "detector.name" in result.stderr


def test_refusal_names_both_probe_sets(tmp_path):
    a, b = make_out(tmp_path, "standard"), make_out(tmp_path, "robust", probe_fingerprint="other")
    with pytest.raises(compare.CompareError) as info:
        compare.compare_runs(a, b, log=lambda m: None)
    assert "fingerprint p), robust synthetic (8 images at" in str(info.value)
    assert str(info.value).endswith("fingerprint other)")


# fc is twice as wide in the "wide" run: 5 of its 6 neurons are interpretable at epoch 5 (83.3 %)
# against 2 of 3 (66.7 %) in the standard one. "+3" would compare apples with oranges.
WIDE = {**TOP1, **{("fc", n): {e: ("car" if n < 5 else "sky", 0.3) for e in (1, 2, 5)} for n in (3, 4, 5)}}


@pytest.mark.slow
def test_different_layer_widths_are_compared_as_shares_and_said_so(tmp_path):
    a, b = make_out(tmp_path, "standard"), make_out(tmp_path, "wide", top1=WIDE)
    result = compare.compare_runs(a, b, log=lambda m: None)
    assert result.labels == ("standard", "wide") and result.label_source == "run names"
    assert result.widths_differ == {"fc": (3, 6)}
    t = result["interpretable"]
    fc = lookup(t, layer="fc", epoch=5)
    assert fc.basis == "shares" and np.isnan(fc.n_interpretable_diff)
    assert (fc.n_interpretable_standard, fc.n_interpretable_wide) == (2, 5)
    assert fc.share_interpretable_diff == pytest.approx(5 / 6 - 2 / 3)
    assert fc.n_neurons_diff == 3  # the widths themselves are shown
    conv = lookup(t, layer="conv", epoch=5)
    assert conv.basis == "counts" and conv.n_interpretable_diff == 0
    cats = result["categories"]
    assert np.isnan(lookup(cats, layer="fc", epoch=5, category="object").n_interpretable_diff)

    text = compare.format_comparison(result)
    assert "fc has 3 neurons in standard but 6 in wide: compared as shares of the layer's neurons" in text
    line = next(l for l in text.splitlines() if l.strip().startswith("fc ") and "/" in l)
    assert line.split() == ["fc", "2/3", "(66.7%)", "5/6", "(83.3%)", "+16.7", "pp", "(shares)"]
    assert "category shares of the layer's neurons, wide - standard, percentage points" in text

    result = CliRunner().invoke(main, ["compare", str(a), str(b), "--format", "json", "--table", "interpretable"])
    data = json.loads(result.stdout)
    assert data["widths_differ"] == {"fc": [3, 6]} and data["labels"] == ["standard", "wide"]
    row = next(r for r in data["tables"]["interpretable"] if r["layer"] == "fc" and r["epoch"] == 5)
    assert row["n_interpretable_diff"] is None and row["basis"] == "shares"


@pytest.mark.slow
def test_labels_come_from_run_names_else_a_b_with_the_folders_named(tmp_path):
    first = make_out(tmp_path / "one", "same")
    second = make_out(tmp_path / "two", "same", top1=ROBUST)
    result = compare.compare_runs(first, second, log=lambda m: None)
    assert result.labels == ("a", "b") and result.label_source == "a/b"
    notes = result.notes()
    assert notes[0] == f"a = {first} (run 'same'), b = {second} (run 'same'); differences are b - a"
    assert "pass --labels NAME_A,NAME_B" in notes[1]
    text = CliRunner().invoke(main, ["compare", str(first), str(second)]).stdout
    assert text.startswith(f"a = {first} (run 'same'), b = {second}")
    given = compare.compare_runs(first, second, ("std", "pgd"), log=lambda m: None)
    assert given.labels == ("std", "pgd") and "n_interpretable_pgd" in given["interpretable"].columns


def test_a_layer_one_run_lacks_is_blank_and_explained(tmp_path):
    extra = {**TOP1, ("head", 0): {1: ("car", 0.3), 2: ("car", 0.3), 5: ("car", 0.3)}}
    a, b = make_out(tmp_path, "standard"), make_out(tmp_path, "more", top1=extra)
    result = compare.compare_runs(a, b, log=lambda m: None)
    row = lookup(result["interpretable"], layer="head", epoch=5)
    assert np.isnan(row.n_interpretable_standard) and row.n_interpretable_more == 1
    text = compare.format_comparison(result)
    assert "(blank: the layer is not in that run)" in text
    head = next(l for l in text.splitlines() if l.strip().startswith("head"))
    assert head.split() == ["head", "1/1", "(100.0%)"]
