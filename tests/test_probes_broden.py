"""The Broden-format reader against a hand-made tiny folder (tests/fixtures_broden.py)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conceptmon.config import ProbeConfig
from conceptmon.probes import ProbeError, create_probe
from conceptmon.probes.broden import BrodenProbe, primary_category, read_broden_concepts
from .fixtures_broden import (
    CATEGORIES,
    LABELS,
    EXPECTED_CONCEPTS,
    MASK_SIZE,
    write_label_png,
    write_tiny_broden,
)


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_broden(tmp_path / "broden")


def _replace_in(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_concepts_drop_suffixes_and_keep_primary_categories(tiny):
    probe = BrodenProbe(tiny.root)
    assert list(zip(probe.concepts.names, probe.concepts.categories)) == EXPECTED_CONCEPTS
    assert probe.category_names == CATEGORIES
    assert probe.labels.raw_names[0] == "red-c"
    assert probe.mask_size == (MASK_SIZE, MASK_SIZE)
    assert len(probe) == 4


def test_primary_category_falls_back_to_label_csv_counts(tmp_path):
    tiny = write_tiny_broden(tmp_path / "b", c_files=False, zero_row=False)
    cats = dict(zip(BrodenProbe(tiny.root).concepts.names, BrodenProbe(tiny.root).concepts.categories))
    assert cats["wheel"] == "object"  # label.csv: object(3);part(1)
    assert cats["leg"] == "part"


def test_primary_category_rules():
    order = ["object", "part"]
    assert primary_category(5, {"object": {5: 0.1}, "part": {5: 0.2}}, {"object": 9}, order) == "part"
    assert primary_category(5, {"object": {5: 0.2}, "part": {5: 0.2}}, {}, order) == "object"  # tie: first
    assert primary_category(5, {}, {"object": 1, "part": 3}, order) == "part"
    assert primary_category(5, {}, {}, order) == "other"


def test_label_maps_decode_r_plus_256_g_into_concept_indices(tiny):
    probe = BrodenProbe(tiny.root)
    index_of = {n: k for k, (n, _, _) in enumerate(LABELS)}
    a = probe.load_annotation(2)
    assert a.pixel_maps.dtype == np.int32 and a.pixel_maps.shape == (1, MASK_SIZE, MASK_SIZE)
    raw = tiny.maps["dtd/striped_1_color.png"]
    expected = np.vectorize(lambda v: index_of[v] + 1)(raw)
    np.testing.assert_array_equal(a.pixel_maps[0], expected)
    assert probe.concepts.names[a.pixel_maps[0, 1, 1] - 1] == "purple"  # label 300 needs G


def test_several_maps_in_one_cell_and_zero_means_unlabelled(tiny):
    probe = BrodenProbe(tiny.root)
    a = probe.load_annotation(0)
    assert a.pixel_maps.shape == (4, MASK_SIZE, MASK_SIZE)  # color, object, part_1, part_2
    names = probe.concepts.names
    part_1, part_2 = a.pixel_maps[2], a.pixel_maps[3]
    assert {names[v - 1] for v in np.unique(part_1) if v} == {"leg"}
    assert {names[v - 1] for v in np.unique(part_2) if v} == {"wheel"}
    assert (part_1 == 0).sum() == MASK_SIZE * MASK_SIZE - 2
    assert a.image_labels.size == 0


def test_image_level_labels_and_categories_present(tiny):
    probe = BrodenProbe(tiny.root)
    names = probe.concepts.names
    scene = probe.load_annotation(1)
    assert [(names[k], probe.concepts.categories[k]) for k in scene.image_labels] == [("street", "scene")]
    assert scene.image_labels.dtype == np.int64
    present = dict(zip(CATEGORIES, scene.categories_present))
    assert present == {"color": True, "object": True, "part": False, "material": False, "scene": True, "texture": False}
    texture = probe.load_annotation(2)
    assert [names[k] for k in texture.image_labels] == ["striped"]
    assert texture.categories_present.tolist() == [True, False, False, False, False, True]


def test_labels_of_one_category(tiny):
    probe = BrodenProbe(tiny.root)
    assert probe.labels_of(1, "scene") == {"street": MASK_SIZE * MASK_SIZE}
    assert probe.labels_of(0, "color") == {"red": 8, "blue": 8}
    assert probe.labels_of(3, "object") == {}
    with pytest.raises(ProbeError, match="'animal' not in"):
        probe.labels_of(0, "animal")


def test_limit_split_and_relative_paths(tiny):
    assert len(BrodenProbe(tiny.root, limit=2)) == 2
    val = BrodenProbe(tiny.root, split="val")
    assert [val.relpath(i) for i in range(len(val))] == ["images/dtd/striped_1.jpg", "images/ade/img3.jpg"]
    assert val.load_image(0).size == (8, 8) and val.load_image(0).mode == "RGB"
    assert len(BrodenProbe(tiny.root, split="val", limit=1)) == 1
    with pytest.raises(ProbeError, match=r"probe.split: no rows of split 'test'.*train, val"):
        BrodenProbe(tiny.root, split="test")


def test_registry_factory_and_fingerprint(tiny):
    probe = create_probe(ProbeConfig(name="broden", root=str(tiny.root), limit=3))
    assert probe.name == "broden" and len(probe) == 3 and probe.has_masks
    before = probe.fingerprint()
    assert before == BrodenProbe(tiny.root, limit=3).fingerprint()
    assert before != BrodenProbe(tiny.root, limit=2).fingerprint()
    (tiny.root / "label.csv").write_text((tiny.root / "label.csv").read_text() + "9,cat,object(1),1,0.1,\n")
    assert BrodenProbe(tiny.root, limit=3).fingerprint() != before
    with pytest.raises(ProbeError, match="probe.root: required"):
        create_probe(ProbeConfig(name="broden"))


def test_read_broden_concepts_merges_duplicate_names(tiny):
    cs = read_broden_concepts(tiny.root)
    assert cs.names.count("street") == 1
    assert dict(zip(cs.names, cs.categories))["street"] == "scene"  # first seen wins
    assert len(cs) == len(EXPECTED_CONCEPTS) - 1


# ----------------------------------------------------------------------------- bad input


def test_missing_root_says_how_to_get_broden(tmp_path):
    with pytest.raises(ProbeError, match=r"probe.root: .*nowhere not found; download Broden.*probe: synthetic"):
        BrodenProbe(tmp_path / "nowhere")


def test_missing_index_csv_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeError, match=r"index.csv: not found"):
        BrodenProbe(tmp_path / "empty")


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("image,split,ih,iw,sh,sw", "image,split,ih,iw,sh,width", r"index.csv: line 1: missing column 'sw'"),
        ("ade/img1.jpg,train,8,8,4,4", "ade/img1.jpg,train,8,8,four,4", r"index.csv: line 3, column sh: expected a non-negative integer, got 'four'"),
        ("ade/img1.jpg,train,8,8,4,4,", "ade/img1.jpg,train,8,8,4,", r"index.csv: line 3: 11 fields, expected 12"),
        (",6,", ",66,", r"index.csv: line 3, column scene: label number 66 not in label.csv"),
        ("ade/img3.jpg,val,8,8,4,4", "ade/img3.jpg,val,16,16,8,8", r"index.csv: line 5: segmentation size sh x sw = 8x8 differs from 4x4 on line 2"),
        ("ade/img3.jpg,val", "../img3.jpg,val", r"index.csv: line 5, column image: '../img3.jpg' must be a path relative to images/"),
    ],
)
def test_malformed_index_csv_names_file_line_and_column(tiny, old, new, message):
    _replace_in(tiny.root / "index.csv", old, new)
    with pytest.raises(ProbeError, match=message):
        BrodenProbe(tiny.root)


def test_malformed_label_csv_names_file_line_and_column(tiny):
    _replace_in(tiny.root / "label.csv", "4,leg", "four,leg")
    with pytest.raises(ProbeError, match=r"label.csv: line 6, column number: expected a non-negative integer"):
        BrodenProbe(tiny.root)


def test_duplicate_label_number_is_refused(tiny):
    _replace_in(tiny.root / "label.csv", "4,leg", "3,leg")
    with pytest.raises(ProbeError, match=r"label.csv: line 6, column number: label number 3 already used on line 5"):
        BrodenProbe(tiny.root)


def test_mask_of_wrong_shape_names_png_and_both_shapes(tiny):
    write_label_png(tiny.root / "images/ade/img1_object.png", np.zeros((5, 3), dtype=np.int64))
    probe = BrodenProbe(tiny.root)
    probe.load_annotation(0)
    with pytest.raises(ProbeError, match=r"img1_object.png: label map is 5x3, expected 4x4"):
        probe.load_annotation(1)


def test_label_number_in_png_not_in_label_csv(tiny):
    write_label_png(tiny.root / "images/ade/img3_color.png", np.full((4, 4), 299))
    with pytest.raises(ProbeError, match=r"img3_color.png: label number 299 not in label.csv"):
        BrodenProbe(tiny.root).load_annotation(3)
    write_label_png(tiny.root / "images/ade/img3_color.png", np.full((4, 4), 301))
    with pytest.raises(ProbeError, match=r"img3_color.png: label number 301 not in label.csv"):
        BrodenProbe(tiny.root).load_annotation(3)


def test_missing_or_truncated_files_are_named(tiny):
    (tiny.root / "images/ade/img0_part_2.png").unlink()
    with pytest.raises(ProbeError, match=r"img0_part_2.png: label map not found \(listed in .*index.csv line 2\)"):
        BrodenProbe(tiny.root).load_annotation(0)
    jpg = tiny.root / "images/ade/img1.jpg"
    jpg.write_bytes(jpg.read_bytes()[:40])
    with pytest.raises(ProbeError, match=r"img1.jpg: unreadable image"):
        BrodenProbe(tiny.root).load_image(1)
    png = tiny.root / "images/ade/img1_color.png"
    png.write_bytes(png.read_bytes()[:30])
    with pytest.raises(ProbeError, match=r"img1_color.png: unreadable label map"):
        BrodenProbe(tiny.root).load_annotation(1)


def test_grayscale_label_maps_are_read_as_numbers(tiny):
    Image.fromarray(np.full((4, 4), 2, dtype=np.uint8), "L").save(tiny.root / "images/ade/img3_color.png")
    probe = BrodenProbe(tiny.root)
    assert probe.labels_of(3, "color") == {"blue": 16}
