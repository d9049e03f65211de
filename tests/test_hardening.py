import pytest
from PIL import Image

from conceptmon.probes.base import ProbeError, open_rgb


def test_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (9000, 9000)).save(path)  # 81 M pixels: PIL itself would only warn
    with pytest.raises(ProbeError, match=r"huge\.png: image too large"):
        open_rgb(path)


def test_truncated_image_names_the_file(tmp_path):
    path = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ProbeError, match=r"cut\.png: unreadable image"):
        open_rgb(path)


def test_mixed_image_sizes_without_image_size_is_one_clear_error(tmp_path):
    from conceptmon.engine import ImageDataset
    from conceptmon.probes.folder import FolderProbe

    for i, size in enumerate([(32, 32), (32, 32), (40, 24)]):
        Image.new("RGB", size, (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    probe = FolderProbe(tmp_path)
    dataset = ImageDataset(probe, image_size=None)
    assert dataset[1][0].shape == (3, 32, 32)
    with pytest.raises(ProbeError, match=r"2\.png: image is 40x24, the first is 32x32; set probe\.image_size"):
        dataset[2]
    assert ImageDataset(probe, image_size=16)[2][0].shape == (3, 16, 16)
