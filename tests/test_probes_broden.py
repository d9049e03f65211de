"""The Broden-format reader against a hand-made tiny folder (tests/fixtures_broden.py)."""
from __future__ import annotations

import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conceptmon.config import ProbeConfig
from conceptmon.probes import ProbeError, create_probe
from conceptmon.probes.broden import BrodenProbe, primary_category, read_broden_concepts
from conceptmon.probes.synthetic import SyntheticProbe, generate_synthetic
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


# ----------------------------------------------------------------------------- label-number bounds


@pytest.mark.parametrize("number", ["99999999999", "1" + "0" * 30, "65536"])
def test_huge_label_numbers_in_label_csv_are_refused_without_allocating(tiny, number):
    _replace_in(tiny.root / "label.csv", "4,leg", f"{number},leg")
    with pytest.raises(ProbeError, match=rf"label.csv: line 6, column number: label number {number} is too large "
                                         r"\(at most 65535, the largest R \+ 256 \* G of an 8-bit label map\)"):
        BrodenProbe(tiny.root)


def test_largest_label_number_is_accepted(tiny):
    _replace_in(tiny.root / "label.csv", "4,leg", "65535,leg")
    write_label_png(tiny.root / "images/ade/img0_part_1.png", np.full((4, 4), 65535))
    probe = BrodenProbe(tiny.root)
    assert probe.labels_of(0, "part")["leg"] == 16


def test_huge_numbers_in_index_csv_are_refused(tiny):
    _replace_in(tiny.root / "index.csv", ",6,", ",99999999999,")
    with pytest.raises(ProbeError, match=r"index.csv: line 3, column scene: label number 99999999999 is too large"):
        BrodenProbe(tiny.root)


def test_huge_segmentation_size_is_refused(tiny):
    text = (tiny.root / "index.csv").read_text().replace(",8,8,4,4,", ",8,8,99999999999,4,")
    (tiny.root / "index.csv").write_text(text)
    with pytest.raises(ProbeError, match=r"index.csv: line 2, columns sh/sw: segmentation size 99999999999x4 is too "
                                         r"large \(at most 64000000 pixels\)"):
        BrodenProbe(tiny.root)


def test_mask_values_beyond_label_csv_are_named(tiny):
    Image.fromarray(np.full((4, 4), 99_999_999, dtype=np.int32), "I").save(tiny.root / "images/ade/img3_color.png",
                                                                          format="TIFF")
    with pytest.raises(ProbeError, match=r"img3_color.png: label number 99999999 not in label.csv \(largest is 300\)"):
        BrodenProbe(tiny.root).load_annotation(3)
    Image.fromarray(np.full((4, 4), -5, dtype=np.int32), "I").save(tiny.root / "images/ade/img3_color.png",
                                                                  format="TIFF")
    with pytest.raises(ProbeError, match=r"img3_color.png: label map holds negative numbers \(mode I\)"):
        BrodenProbe(tiny.root).load_annotation(3)


# ----------------------------------------------------------------------------- label-map encodings


def write_png16(path, samples: np.ndarray) -> None:
    """A PNG with 16 bits per channel (RGB for (h, w, 3), RGBA for (h, w, 4)), written by hand:
    Pillow reads these but cannot write them."""
    samples = np.asarray(samples)
    h, w, c = samples.shape
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def write_tiff16(path, samples: np.ndarray) -> None:
    """A little-endian, uncompressed TIFF with 16 bits per RGB sample, written by hand."""
    samples = np.asarray(samples)
    h, w, c = samples.shape
    data = samples.astype("<u2").tobytes()
    n_tags, ifd = 10, 8
    bits_at = ifd + 2 + n_tags * 12 + 4
    data_at = bits_at + 2 * c

    def tag(code, kind, count, value):  # kind 3 = SHORT, 4 = LONG
        packed = struct.pack("<H", value) + b"\0\0" if kind == 3 and count == 1 else struct.pack("<I", value)
        return struct.pack("<HHI", code, kind, count) + packed

    tags = [tag(256, 4, 1, w), tag(257, 4, 1, h), tag(258, 3, c, bits_at), tag(259, 3, 1, 1), tag(262, 3, 1, 2),
            tag(273, 4, 1, data_at), tag(277, 3, 1, c), tag(278, 4, 1, h), tag(279, 4, 1, len(data)), tag(284, 3, 1, 1)]
    head = b"II*\0" + struct.pack("<IH", ifd, n_tags) + b"".join(tags) + b"\0\0\0\0"
    path.write_bytes(head + struct.pack("<" + "H" * c, *([16] * c)) + data)


def _rgb_planes(numbers: np.ndarray) -> np.ndarray:
    return np.stack([numbers % 256, numbers // 256, np.zeros_like(numbers)], axis=-1)


COLOUR_MAP = np.array([[1, 1, 2, 2], [300, 300, 2, 2], [1, 0, 0, 2], [300, 1, 2, 0]])
"""Raw label numbers for img3_color.png: red, blue, purple (300 = R 44 + 256 * G 1) and unlabelled."""


def _expected_colours(probe):
    return {probe.concepts.names[probe.labels.lookup[v] - 1]: int((COLOUR_MAP == v).sum()) for v in (1, 2, 300)}


@pytest.mark.parametrize("encoding", ["scaled", "unscaled", "scaled-rgba", "unscaled-tiff", "scaled-tiff"])
def test_sixteen_bit_label_maps_decode_to_the_same_numbers(tiny, encoding):
    planes = _rgb_planes(COLOUR_MAP)
    if encoding.startswith("scaled"):
        planes = planes * 257  # what an image tool writes converting the 8-bit map to 16 bits
    if encoding.endswith("rgba"):
        planes = np.concatenate([planes, np.full((4, 4, 1), 65535)], axis=-1)
    write = write_tiff16 if encoding.endswith("tiff") else write_png16  # TIFF: little-endian samples
    write(tiny.root / "images/ade/img3_color.png", planes)
    probe = BrodenProbe(tiny.root)
    assert probe.labels_of(3, "color") == dict(sorted(_expected_colours(probe).items(), key=lambda kv: -kv[1]))


def test_sixteen_bit_maps_that_are_neither_scaled_nor_small_are_refused(tiny):
    planes = _rgb_planes(COLOUR_MAP) * 257
    planes[0, 0, 0] = 1000  # neither v * 257 nor below 256
    write_png16(tiny.root / "images/ade/img3_color.png", planes)
    with pytest.raises(ProbeError, match=r"img3_color.png: 16-bit-per-channel label map whose samples are neither "
                                         r"8-bit values scaled by 257 nor below 256"):
        BrodenProbe(tiny.root).load_annotation(3)


def test_palette_label_maps_use_their_palette_colours(tiny):
    colours = [(0, 0, 0), (1, 0, 0), (2, 0, 0), (44, 1, 0)]  # raw 0, 1, 2, 300
    index = {0: 0, 1: 1, 2: 2, 300: 3}
    im = Image.fromarray(np.vectorize(index.get)(COLOUR_MAP).astype(np.uint8), "P")
    im.putpalette([v for rgb in colours for v in rgb])
    im.save(tiny.root / "images/ade/img3_color.png")
    probe = BrodenProbe(tiny.root)
    assert probe.labels_of(3, "color") == dict(sorted(_expected_colours(probe).items(), key=lambda kv: -kv[1]))


def test_sixteen_bit_greyscale_label_maps_hold_the_number(tiny):
    Image.fromarray(COLOUR_MAP.astype(np.uint16)).save(tiny.root / "images/ade/img3_color.png")
    assert Image.open(tiny.root / "images/ade/img3_color.png").mode == "I;16"
    probe = BrodenProbe(tiny.root)
    assert probe.labels_of(3, "color") == dict(sorted(_expected_colours(probe).items(), key=lambda kv: -kv[1]))


@pytest.mark.parametrize("mode, fmt", [("LA", "PNG"), ("F", "TIFF"), ("CMYK", "JPEG")])
def test_other_label_map_modes_are_refused(tiny, mode, fmt):
    Image.new(mode, (4, 4)).save(tiny.root / "images/ade/img3_color.png", format=fmt)
    with pytest.raises(ProbeError, match=rf"img3_color.png: unsupported label-map mode {mode} \(use RGB with label = "
                                         r"R \+ 256 \* G, or greyscale L / I;16 holding the label number\)"):
        BrodenProbe(tiny.root).load_annotation(3)


# ----------------------------------------------------------------------------- content fingerprint


@pytest.fixture
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTMON_CACHE", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache" / "file-hashes"


def test_fingerprint_follows_content_not_location(tmp_path, hash_cache):
    root = generate_synthetic(tmp_path / "a" / "probe", n=12, size=32, seed=0)
    first = SyntheticProbe(root).fingerprint()
    copied = shutil.copytree(root, tmp_path / "elsewhere" / "probe")  # same bytes, another root
    assert SyntheticProbe(copied).fingerprint() == first
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for path in sorted(root.rglob("*")):  # a plain copy: new mtimes as well
        target = fresh / path.relative_to(root)
        if path.is_dir():
            target.mkdir()
        else:
            target.write_bytes(path.read_bytes())
    assert SyntheticProbe(fresh).fingerprint() == first
    assert BrodenProbe(root).fingerprint() != first  # another reader of the same folder
    generate_synthetic(root, n=12, size=32, seed=1, overwrite=True)  # other content, same root
    assert SyntheticProbe(root).fingerprint() != first
    assert SyntheticProbe(root, limit=5).fingerprint() != SyntheticProbe(root).fingerprint()


def test_fingerprint_sees_any_changed_byte_and_caches_unchanged_files(tiny, hash_cache, monkeypatch):
    from conceptmon.probes import base

    calls = []
    real = base.file_sha256
    monkeypatch.setattr(base, "file_sha256", lambda path: calls.append(path) or real(path))
    before = BrodenProbe(tiny.root).fingerprint()
    n_files = len(calls)
    assert n_files == 8 + 4 + 8 and any(hash_cache.glob("*.json"))  # index, label, category, 5 c_*.csv; images; maps
    calls.clear()
    assert BrodenProbe(tiny.root).fingerprint() == before and calls == []  # warm: nothing rehashed
    jpg = tiny.root / "images/ade/img1.jpg"
    st = jpg.stat()
    data = bytearray(jpg.read_bytes())
    data[-10] ^= 0xFF  # one byte, same size
    jpg.write_bytes(bytes(data))
    os.utime(jpg, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime, as `cp -p` or rsync -t keep it
    assert jpg.stat().st_size == st.st_size and jpg.stat().st_mtime_ns == st.st_mtime_ns
    assert BrodenProbe(tiny.root).fingerprint() != before  # ctime gave it away
    assert calls == [os.path.abspath(jpg)]


def test_fingerprint_survives_a_corrupt_hash_table_and_names_missing_files(tiny, hash_cache):
    before = BrodenProbe(tiny.root).fingerprint()
    for table in hash_cache.glob("*.json"):
        table.write_text("{not json")
    assert BrodenProbe(tiny.root).fingerprint() == before
    (tiny.root / "images/ade/img1.jpg").unlink()
    with pytest.raises(ProbeError, match=r"images/ade/img1.jpg: not found \(the probe set lists it\)"):
        BrodenProbe(tiny.root).fingerprint()


def test_sixteen_bit_layouts_without_a_byte_swap_are_refused(tiny, monkeypatch):
    from conceptmon.probes import broden

    monkeypatch.setattr(broden, "_BYTE_SWAP", {})  # as for a layout this reader does not know
    write_png16(tiny.root / "images/ade/img3_color.png", _rgb_planes(COLOUR_MAP))
    with pytest.raises(ProbeError, match=r"img3_color.png: 16-bit label map in an unsupported layout \(RGB;16B\)"):
        BrodenProbe(tiny.root).load_annotation(3)
