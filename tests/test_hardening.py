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
