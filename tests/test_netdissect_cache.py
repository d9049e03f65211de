"""The probe mask cache: reused when valid, rebuilt when damaged, one clear error on a full disk."""
import errno
import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from conceptmon.cli import main
from conceptmon.detectors import DetectorError
from conceptmon.detectors import netdissect
from conceptmon.detectors.netdissect import build_mask_cache

from .fakes import TinyConv, random_probe


def same_cache(a, b):
    for name in ("map_offsets", "label_offsets", "label_values", "categories_present", "area_offsets", "area_concept",
                 "area_pixels", "label_area"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(np.asarray(a.maps), np.asarray(b.maps))


def test_cache_holds_every_map_and_label_area(tmp_path):
    probe = random_probe(n=9, seed=2)
    cache = build_mask_cache(probe, tmp_path / "masks")
    for i in range(len(probe)):
        ann = probe.load_annotation(i)
        lo, hi = cache.map_offsets[i], cache.map_offsets[i + 1]
        np.testing.assert_array_equal(cache.maps[lo:hi], ann.pixel_maps)
        area = np.zeros(len(probe.concepts))
        for mp in ann.pixel_maps:
            area += np.bincount(mp.reshape(-1), minlength=len(probe.concepts) + 1)[1:]
        area[np.unique(ann.image_labels)] += np.prod(probe.mask_size)
        a_lo, a_hi = cache.area_offsets[i], cache.area_offsets[i + 1]
        got = np.zeros(len(probe.concepts))
        got[cache.area_concept[a_lo:a_hi]] = cache.area_pixels[a_lo:a_hi]
        np.testing.assert_array_equal(got, area)
    # Ragged: each image's maps once, never padded to the widest image.
    assert cache.maps.shape[0] == sum(len(probe.load_annotation(i).pixel_maps) for i in range(len(probe)))


def _truncate_maps(folder):
    path = folder / "pixel_maps.bin"
    path.write_bytes(path.read_bytes()[:-10])


def _garble_meta(folder):
    (folder / "meta.json").write_text("{not json")


def _old_format(folder):
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format": 1}))


def _truncate_npy(folder):
    path = folder / "label_offsets.npy"
    path.write_bytes(path.read_bytes()[:100])


def _drop_file(folder):
    (folder / "area_pixels.npy").unlink()


def _drop_meta(folder):  # a folder left by hand, without the file that marks it complete
    (folder / "meta.json").unlink()


@pytest.mark.parametrize("damage", [_truncate_maps, _garble_meta, _old_format, _truncate_npy, _drop_file, _drop_meta])
def test_damaged_cache_is_rebuilt(tmp_path, damage):
    probe = random_probe(n=9, seed=2)
    folder = tmp_path / "masks"
    fresh = build_mask_cache(probe, folder)
    fresh.maps = np.array(fresh.maps)  # a copy: the damage below edits the mapped file in place
    damage(folder)
    messages = []
    rebuilt = build_mask_cache(probe, folder, log=messages.append)
    same_cache(fresh, rebuilt)
    assert len(messages) == 2 and str(folder) in messages[0] and "rebuilding" in messages[0]
    assert build_mask_cache(probe, folder, log=messages.append) is not None and len(messages) == 2  # now reused


def test_damaged_cache_that_cannot_be_removed_is_one_error(tmp_path, monkeypatch):
    probe = random_probe(n=5)
    folder = tmp_path / "masks"
    build_mask_cache(probe, folder)
    _garble_meta(folder)
    monkeypatch.setattr(netdissect.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(DetectorError, match=rf"{folder}: mask cache unusable \(meta.json unreadable.*delete it"):
        build_mask_cache(probe, folder)


def _disk_full_after(calls: int):
    state = {"n": 0}
    real = netdissect._write_array

    def write(f, array):
        state["n"] += 1
        if state["n"] > calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, array)

    return write


def test_full_disk_is_one_error_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    probe = random_probe(n=9)
    monkeypatch.setattr(netdissect, "_write_array", _disk_full_after(3))
    folder = tmp_path / "cache" / "masks"
    with pytest.raises(DetectorError) as info:
        build_mask_cache(probe, folder)
    assert str(info.value) == (f"{folder}: cannot write the probe mask cache (No space left on device); "
                               f"free space there or set cache_dir")
    assert list((tmp_path / "cache").iterdir()) == []


def test_full_disk_in_dissect_is_one_line_exit_1(tmp_path, monkeypatch):
    from conceptmon.probes import register_probe

    register_probe("test-array-cache")(lambda cfg: random_probe(n=6))
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save({"epoch": 0, "state_dict": TinyConv().state_dict()}, ckpts / "epoch_0.pt")
    config = tmp_path / "conceptmon.yaml"
    config.write_text(yaml.safe_dump({"model": {"arch": "tests.fakes:TinyConv"}, "layers": ["conv1"],
                                      "probe": {"name": "test-array-cache"}, "checkpoints": str(ckpts),
                                      "cache_dir": str(tmp_path / "cache")}))
    monkeypatch.setattr(netdissect, "_write_array", _disk_full_after(0))
    result = CliRunner().invoke(main, ["dissect", "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(tmp_path / "cache") in lines[0], result.output
    assert "Traceback" not in result.output
    left = list((tmp_path / "cache").rglob("*"))
    assert not [p for p in left if p.is_file() or p.name.startswith(".tmp")], left  # (the empty masks/ folder may stay)


def test_mask_label_outside_the_concept_set_names_the_image(tmp_path):
    probe = random_probe(n=4, n_concepts=5)
    probe.pixel_maps[2, 1, 3, 3] = 9
    with pytest.raises(DetectorError, match=r"^img002\.png: mask label 9 is outside 0\.\.5 \(0 = unlabelled"):
        build_mask_cache(probe, tmp_path / "masks")
    assert list(tmp_path.iterdir()) == []
