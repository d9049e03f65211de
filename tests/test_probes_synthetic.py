"""The synthetic Broden-format probe set: determinism, ground truth, registry and CLI."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conceptmon.cli import main
from conceptmon.config import ProbeConfig
from conceptmon.probes import ProbeError, create_probe
from conceptmon.probes.broden import BrodenProbe
from conceptmon.probes.synthetic import (
    COLORS,
    MARKER,
    NUMBER,
    PALETTE,
    PARTS,
    SCENES,
    SHAPES,
    TEXTURES,
    SyntheticProbe,
    default_cache_root,
    generate_synthetic,
    image_level_targets,
    is_complete,
    objects_of,
    scene_of,
    synthetic_concepts,
    texture_of,
)

N, SIZE = 60, 48


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "set", n=N, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def probe(generated):
    return SyntheticProbe(generated)


@pytest.fixture(scope="module")
def annotations(probe):
    return [probe.load_annotation(i) for i in range(len(probe))]


def _names(probe, indices) -> set[str]:
    return {probe.concepts.names[k] for k in indices}


def test_same_seed_same_files_other_seed_other_pixels(tmp_path, generated):
    again = generate_synthetic(tmp_path / "again", n=N, size=SIZE, seed=0)
    for name in ("index.csv", "label.csv", "category.csv", "c_color.csv", "c_texture.csv", MARKER):
        assert (again / name).read_bytes() == (generated / name).read_bytes(), name
    files = sorted(p.relative_to(generated) for p in (generated / "images").rglob("*.png"))
    assert len(files) > N
    for rel in files:
        assert np.array_equal(np.asarray(Image.open(again / rel)), np.asarray(Image.open(generated / rel))), rel
    other = generate_synthetic(tmp_path / "other", n=N, size=SIZE, seed=1)
    first = "images/synthetic/000000.png"
    assert not np.array_equal(np.asarray(Image.open(other / first)), np.asarray(Image.open(generated / first)))


def test_reader_reads_it_with_the_synthetic_vocabulary(probe, generated):
    assert len(probe) == N and probe.name == "synthetic"
    assert probe.mask_size == (SIZE // 2, SIZE // 2)
    assert probe.category_names == ("color", "object", "part", "scene", "texture")
    vocab = synthetic_concepts()
    assert probe.concepts.names == vocab.names and probe.concepts.categories == vocab.categories
    plain = BrodenProbe(generated)  # the plain Broden reader sees the same set
    assert plain.concepts.names == vocab.names and len(plain) == N
    assert probe.load_image(0).size == (SIZE, SIZE)
    assert NUMBER["black"] == 1 and NUMBER["circle"] == len(COLORS) + 1  # label numbers are fixed
    assert probe.concepts.names[NUMBER["striped"] - 1] == "striped"


def test_every_colour_texture_shape_part_and_scene_occurs(probe, annotations):
    seen = set()
    for a in annotations:
        seen |= _names(probe, np.unique(a.pixel_maps[a.pixel_maps > 0]) - 1) | _names(probe, a.image_labels)
    for group in (COLORS, TEXTURES, SHAPES, PARTS, SCENES, ("house", "tree", "sky", "sea", "road")):
        assert set(group) <= seen, set(group) - seen
    assert len(TEXTURES) >= 8 and len(SHAPES) >= 6 and len(SCENES) >= 4


def test_scene_object_and_texture_images_carry_different_categories(probe, annotations):
    cats = list(probe.category_names)
    kinds = {"scene": 0, "object": 0, "texture": 0}
    for i, a in enumerate(annotations):
        present = dict(zip(cats, a.categories_present))
        assert present["color"]
        assert not (present["scene"] and present["texture"])
        if present["texture"]:
            assert a.pixel_maps.shape[0] == 1 and not present["object"] and not present["part"]
            assert texture_of(probe, i) in TEXTURES and scene_of(probe, i) is None
            kinds["texture"] += 1
        elif present["scene"]:
            assert a.pixel_maps.shape[0] == 3 and present["object"] and present["part"]
            assert scene_of(probe, i) in SCENES and texture_of(probe, i) is None
            kinds["scene"] += 1
        else:  # object images: shapes, houses and trees on an unlabelled background
            assert a.pixel_maps.shape[0] == 3 and present["object"] and present["part"]
            assert scene_of(probe, i) is None and texture_of(probe, i) is None
            assert (a.pixel_maps[1] == 0).any() and set(objects_of(probe, i)) & set(SHAPES)
            kinds["object"] += 1
    assert kinds == {"scene": N * 7 // 20, "object": N * 7 // 20, "texture": N * 6 // 20}


def test_colour_labels_are_exactly_the_pixel_colours(probe, annotations):
    images = np.stack([np.asarray(probe.load_image(i)) for i in range(len(probe))])  # (N, S, S, 3)
    colour_maps = np.stack([a.pixel_maps[0] for a in annotations])  # colour map comes first
    per_pixel = colour_maps.repeat(2, axis=1).repeat(2, axis=2)  # mask pixel -> 2x2 image block
    assert per_pixel.min() >= 1 and per_pixel.max() <= len(COLORS)  # every pixel has a colour
    palette = np.asarray([PALETTE[probe.concepts.names[k]] for k in range(len(COLORS))], dtype=np.uint8)
    np.testing.assert_array_equal(images, palette[per_pixel - 1])
    red = per_pixel == NUMBER["red"]
    assert red.sum() > 100 and (images[red] == (255, 0, 0)).all()
    assert not (images[~red] == (255, 0, 0)).all(axis=-1).any()


def test_objects_and_parts_sit_where_they_are_drawn(probe, annotations):
    for i, a in enumerate(annotations):
        if a.pixel_maps.shape[0] != 3:
            continue
        objects, parts = a.pixel_maps[1], a.pixel_maps[2]
        if scene_of(probe, i) is not None:
            assert (objects > 0).all()  # scene layouts label every pixel with some object
        names = np.asarray(probe.concepts.names)
        roof_or_door = np.isin(parts, [NUMBER["roof"], NUMBER["door"]])
        assert (names[objects[roof_or_door] - 1] == "house").all()
        trunk_or_leaves = np.isin(parts, [NUMBER["trunk"], NUMBER["leaves"]])
        assert (names[objects[trunk_or_leaves] - 1] == "tree").all()
        border = parts == NUMBER["border"]
        assert np.isin(names[objects[border] - 1], SHAPES).all()
        found = objects_of(probe, i)
        assert list(found.values()) == sorted(found.values(), reverse=True)
        assert set(found) == set(names[np.unique(objects[objects > 0]) - 1])


def _stripe_score(images: np.ndarray, shift: int = 6) -> np.ndarray:
    """A label-blind stripe detector per image: two colours in near-equal shares, unchanged by a
    shift of several pixels along one direction (0, 45, 90 or 135 degrees), and alternating
    several times across the image."""
    codes = images.astype(np.int64) @ np.array([1, 256, 65536])  # (N, S, S) one code per colour
    s = codes.shape[1]
    invariance = np.zeros(len(codes))
    for dy, dx in ((0, shift), (shift, 0), (shift, shift), (shift, -shift)):
        a = codes[:, : s - dy, max(0, -dx) : s - max(0, dx)]
        b = codes[:, dy:, max(0, dx) : s - max(0, -dx)]
        invariance = np.maximum(invariance, (a == b).mean(axis=(1, 2)))
    two_colours = np.array([len(np.unique(c)) == 2 for c in codes])
    share = np.array([np.mean(c == c.flat[0]) for c in codes])
    middle_row, middle_col = codes[:, s // 2], codes[:, :, s // 2]
    changes = np.maximum((middle_row[:, 1:] != middle_row[:, :-1]).sum(1), (middle_col[:, 1:] != middle_col[:, :-1]).sum(1))
    return (invariance > 0.97) & two_colours & (share > 0.3) & (share < 0.7) & (changes >= 5)


def test_striped_textures_are_genuinely_striped_and_others_are_not(probe):
    targets, classes = image_level_targets(probe, "texture")
    assert classes == TEXTURES
    is_texture = targets >= 0
    images = np.stack([np.asarray(probe.load_image(i)) for i in np.flatnonzero(is_texture)])
    striped = targets[is_texture] == TEXTURES.index("striped")
    detected = _stripe_score(images)
    assert striped.sum() >= 2
    np.testing.assert_array_equal(detected, striped)


def test_image_level_targets_for_scene_classifiers(probe):
    targets, classes = image_level_targets(probe, "scene")
    assert classes == SCENES and targets.shape == (N,)
    for i in range(N):
        assert (classes[targets[i]] if targets[i] >= 0 else None) == scene_of(probe, i)
    assert set(targets[targets >= 0]) == set(range(len(SCENES)))


# ----------------------------------------------------------------------------- registry and folders


def test_factory_generates_into_empty_root_then_reads_it(tmp_path):
    root = tmp_path / "probe"
    root.mkdir()
    cfg = ProbeConfig(name="synthetic", root=str(root), n=12, image_size=32, seed=3, limit=5)
    probe = create_probe(cfg)
    assert len(probe) == 5 and probe.mask_size == (16, 16) and is_complete(root)
    stamp = (root / "index.csv").stat().st_mtime_ns
    again = create_probe(ProbeConfig(name="synthetic", root=str(root), n=999))  # n applies only when generating
    assert len(again) == 12 and (root / "index.csv").stat().st_mtime_ns == stamp
    assert len(create_probe(ProbeConfig(name="synthetic", root=str(root), split="val"))) == 2


def test_factory_without_root_uses_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTMON_CACHE", str(tmp_path / "cache"))
    cfg = ProbeConfig(name="synthetic", n=10, image_size=32, seed=1)
    first = create_probe(cfg)
    expected = default_cache_root(10, 32, 1)
    assert expected.parent == tmp_path / "cache" / "synthetic" and expected.name.startswith("n10_s32_seed1")
    assert first.root == expected and is_complete(expected)
    stamp = (expected / "index.csv").stat().st_mtime_ns
    assert create_probe(cfg).fingerprint() == first.fingerprint()
    assert (expected / "index.csv").stat().st_mtime_ns == stamp  # reused, not regenerated


def test_factory_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ProbeError, match=r"probe.root: .* is neither empty nor a synthetic probe set"):
        create_probe(ProbeConfig(name="synthetic", root=str(tmp_path), n=5, image_size=32))
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ProbeError, match=r"probe.image_size: .*at least 16 pixels, got 8"):
        create_probe(ProbeConfig(name="synthetic", root=str(tmp_path / "x"), image_size=8))


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path):
    def stop(done, total):
        if done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(tmp_path / "set", n=10, size=32, progress=stop)
    assert not (tmp_path / "set").exists() and not is_complete(tmp_path / "set")
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone too
    with pytest.raises(ProbeError, match=r"no complete synthetic probe set"):
        SyntheticProbe(tmp_path / "set")


def test_generate_refuses_non_empty_folders_unless_replacing_a_synthetic_set(tmp_path):
    root = generate_synthetic(tmp_path / "set", n=5, size=32, seed=0)
    with pytest.raises(ProbeError, match=r"holds a synthetic probe set"):
        generate_synthetic(root, n=5, size=32, seed=1)
    generate_synthetic(root, n=7, size=32, seed=1, overwrite=True)
    assert len(SyntheticProbe(root)) == 7
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("x")
    with pytest.raises(ProbeError, match=r"not an empty folder"):
        generate_synthetic(tmp_path / "other", n=5, size=32, overwrite=True)
    with pytest.raises(ProbeError, match=r"size: .*at least 16"):
        generate_synthetic(tmp_path / "tiny", n=5, size=10)


def test_cli_probe_synthetic(tmp_path):
    out = tmp_path / "probe"
    result = CliRunner().invoke(main, ["probe", "synthetic", str(out), "--n", "12", "--size", "32", "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert "generated 12/12 images" in result.stderr
    assert len(SyntheticProbe(out)) == 12 and SyntheticProbe(out).mask_size == (16, 16)
    again = CliRunner().invoke(main, ["probe", "synthetic", str(out), "--n", "12", "--size", "32", "--seed", "4"])
    assert again.exit_code == 0 and "nothing to do" in again.stderr
    clash = CliRunner().invoke(main, ["probe", "synthetic", str(out), "--n", "5", "--size", "32"])
    assert clash.exit_code == 1 and "pass --force" in clash.stderr
    forced = CliRunner().invoke(main, ["probe", "synthetic", str(out), "--n", "5", "--size", "32", "--force"])
    assert forced.exit_code == 0 and len(SyntheticProbe(out)) == 5
    helped = CliRunner().invoke(main, ["probe", "synthetic", "--help"])
    assert helped.exit_code == 0 and "--seed" in helped.output


# ----------------------------------------------------------------------------- what Network Dissection can find

QUANTILE = 0.005  # the detector's default


def dissection_tables(probe):
    """Every concept's pixels as one (N, h, w, M) bool array (image-level labels cover the image),
    which categories each image is annotated for, and each concept's category index."""
    n, (h, w), m = len(probe), probe.mask_size, len(probe.concepts)
    labels = np.zeros((n, h, w, m), dtype=bool)
    present = np.zeros((n, len(probe.category_names)), dtype=bool)
    for i in range(n):
        a = probe.load_annotation(i)
        for numbers in a.pixel_maps:
            labelled = numbers > 0
            labels[i][labelled, numbers[labelled] - 1] = True
        labels[i][:, :, a.image_labels] = True
        present[i] = a.categories_present
    category = np.asarray([probe.category_names.index(c) for c in probe.concepts.categories])
    return labels, present, category


def reference_iou(values, labels, present, category, quantile=QUANTILE):
    """One unit's IoU with every concept, with everything in memory (numpy).

    values (N, h, w) at mask resolution. Tie rule: T is the exact (1 - quantile) quantile;
    active = values >= T when T is above the unit's floor, else values > T. The active
    area counted against a concept is the active area in images annotated for its category.
    """
    t = np.quantile(values, 1 - quantile)
    active = values >= t if t > values.min() else values > t
    area = (active.sum(axis=(1, 2))[:, None] * present).sum(0).astype(float)  # per category
    inter = labels[active].sum(0).astype(float)
    union = area[category] + labels.sum(axis=(0, 1, 2)) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def ideal_unit(mask, rng=None):
    """1 on ``mask``, 0 elsewhere; with ``rng`` the firing values vary (1 to 1.01), as a trained
    unit's do, so that only the top ``QUANTILE`` of them is active."""
    values = mask.astype(np.float64)
    return values * (1 + 0.01 * rng.random(values.shape)) if rng is not None else values


def scene_separation(probe):
    """Per scene: the ideal scene unit's IoU (flat and varying) and the best IoU any ideal
    single-colour unit reaches for that scene (same two regimes)."""
    labels, present, category = dissection_tables(probe)
    names = probe.concepts.names
    rng = np.random.default_rng(0)
    colour_units = {
        regime: [reference_iou(ideal_unit(labels[..., NUMBER[c] - 1], r), labels, present, category) for c in COLORS]
        for regime, r in (("flat", None), ("varying", rng))
    }
    out = {}
    for scene in SCENES:
        k = NUMBER[scene] - 1
        row = {"images": int(labels[:, 0, 0, k].sum())}
        for regime, r in (("flat", None), ("varying", rng)):
            iou = reference_iou(ideal_unit(labels[..., k], r), labels, present, category)
            best_colour = max(range(len(COLORS)), key=lambda j: colour_units[regime][j][k])
            row[regime] = (float(iou[k]), names[int(np.argmax(iou))])
            row[f"{regime}_colour"] = (float(colour_units[regime][best_colour][k]), COLORS[best_colour])
        out[scene] = row
    return out


def assert_scenes_are_findable_and_not_colours(separation, n_images):
    for scene, row in separation.items():
        flat, flat_top = row["flat"]
        varying, varying_top = row["varying"]
        assert flat == pytest.approx(1.0) and flat_top == scene, (scene, row)
        # A varying unit activates QUANTILE of all pixels, all inside its scene: IoU = q N / N_scene.
        assert varying >= 0.04 and varying_top == scene, (scene, row)
        assert varying == pytest.approx(QUANTILE * n_images / row["images"], rel=0.05), (scene, row)
        assert row["flat_colour"][0] <= 0.25 * flat, (scene, row)
        assert row["varying_colour"][0] <= 0.25 * varying, (scene, row)


@pytest.fixture(scope="module")
def probe_200(tmp_path_factory):
    return SyntheticProbe(generate_synthetic(tmp_path_factory.mktemp("syn200") / "set", n=200, size=64, seed=0))


def test_ideal_scene_units_pass_and_no_colour_unit_explains_a_scene(probe_200):
    separation = scene_separation(probe_200)
    assert_scenes_are_findable_and_not_colours(separation, len(probe_200))


def test_the_reference_sees_the_whole_image_scene_ceiling(probe_200):
    """The check above can fail: a scene shown in a large share of the images (here all scene
    images merged into one label) cannot pass with a varying unit (IoU = 0.005 / 0.35)."""
    labels, present, category = dissection_tables(probe_200)
    all_scenes = labels[..., [NUMBER[s] - 1 for s in SCENES]].any(-1)
    iou = reference_iou(ideal_unit(all_scenes, np.random.default_rng(1)), labels, present, category)
    best = max(iou[NUMBER[s] - 1] for s in SCENES)
    assert best < 0.04


@pytest.mark.slow
@pytest.mark.parametrize("size", [64, 112])
def test_at_the_default_size_scenes_are_findable_and_not_colours(tmp_path, size):
    probe = SyntheticProbe(generate_synthetic(tmp_path / "set", n=1000, size=size, seed=0))
    separation = scene_separation(probe)
    assert_scenes_are_findable_and_not_colours(separation, 1000)
