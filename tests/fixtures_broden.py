"""A hand-made tiny Broden folder in the real on-disk format, for tests of any module.

``write_tiny_broden(root)`` writes four 8x8 JPEG images with 4x4 label maps:

====  ==================  =====  ===============================================
row   image               split  annotations
====  ==================  =====  ===============================================
0     ade/img0.jpg        train  color PNG, object PNG, part: two PNGs in one cell
1     ade/img1.jpg        train  color PNG, object PNG, scene 6 (street-s)
2     dtd/striped_1.jpg   val    color PNG (holds label 300 = R 44 + 256 * G 1), texture 8
3     ade/img3.jpg        val    color PNG only
====  ==================  =====  ===============================================

Labels: 1 red-c, 2 blue-c (color); 3 dog (object, also a rare part); 4 leg (part);
5 wheel (counted mostly as object in label.csv, but with more *coverage* as a part in
c_part.csv, so its primary category is part); 6 street-s (scene); 7 street (object;
same name as the scene once the suffix is dropped); 8 striped (texture); 300 purple-c
(color; a number above 255 so that decoding must use G).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = ("color", "object", "part", "material", "scene", "texture")
IMAGE_SIZE = 8
MASK_SIZE = 4

# number, Broden name, label.csv category cell
LABELS = [
    (1, "red-c", "color(3)"),
    (2, "blue-c", "color(2)"),
    (3, "dog", "object(2);part(1)"),
    (4, "leg", "part(1)"),
    (5, "wheel", "object(3);part(1)"),
    (6, "street-s", "scene(1)"),
    (7, "street", "object(1)"),
    (8, "striped", "texture(1)"),
    (300, "purple-c", "color(1)"),
]
# Expected concepts, in label.csv order: (name without suffix, primary category).
EXPECTED_CONCEPTS = [
    ("red", "color"),
    ("blue", "color"),
    ("dog", "object"),
    ("leg", "part"),
    ("wheel", "part"),
    ("street", "scene"),
    ("street", "object"),
    ("striped", "texture"),
    ("purple", "color"),
]
# c_<category>.csv rows: (number, coverage). wheel: 0.01 as object < 0.3 as part.
COVERAGE = {
    "color": [(1, 0.5), (2, 0.3), (300, 0.2)],
    "object": [(3, 0.2), (5, 0.01), (7, 0.6)],
    "part": [(3, 0.01), (4, 0.1), (5, 0.3)],
    "scene": [(6, 1.0)],
    "texture": [(8, 1.0)],
}


def _maps() -> dict[str, np.ndarray]:
    """Raw Broden label numbers of every label-map PNG (4x4)."""
    z = np.zeros((MASK_SIZE, MASK_SIZE), dtype=np.int64)
    color0 = z.copy()
    color0[:2] = 1
    color0[2:] = 2
    object0 = z.copy()
    object0[1:3, 1:3] = 3
    part0_1 = z.copy()
    part0_1[2, 1:3] = 4
    part0_2 = z.copy()
    part0_2[3, :] = 5
    color1 = np.full_like(z, 2)
    object1 = z.copy()
    object1[2:, :] = 7
    color2 = np.full_like(z, 300)
    color2[0, 0] = 1
    color3 = np.full_like(z, 1)
    return {
        "ade/img0_color.png": color0,
        "ade/img0_object.png": object0,
        "ade/img0_part_1.png": part0_1,
        "ade/img0_part_2.png": part0_2,
        "ade/img1_color.png": color1,
        "ade/img1_object.png": object1,
        "dtd/striped_1_color.png": color2,
        "ade/img3_color.png": color3,
    }


# image, split, {category: cell}
ROWS = [
    ("ade/img0.jpg", "train", {"color": "ade/img0_color.png", "object": "ade/img0_object.png",
                               "part": "ade/img0_part_1.png;ade/img0_part_2.png"}),
    ("ade/img1.jpg", "train", {"color": "ade/img1_color.png", "object": "ade/img1_object.png", "scene": "6"}),
    ("dtd/striped_1.jpg", "val", {"color": "dtd/striped_1_color.png", "texture": "8"}),
    ("ade/img3.jpg", "val", {"color": "ade/img3_color.png"}),
]


@dataclass
class TinyBroden:
    root: Path
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    """PNG path relative to images/ -> raw Broden label numbers written into it."""


def write_label_png(path: Path, numbers: np.ndarray) -> None:
    """Encode label numbers the Broden way: R = number % 256, G = number // 256."""
    numbers = np.asarray(numbers, dtype=np.int64)
    rgb = np.zeros(numbers.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = numbers % 256
    rgb[..., 1] = numbers // 256
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, "RGB").save(path)


def write_tiny_broden(root: str | Path, *, zero_row: bool = True, c_files: bool = True) -> TinyBroden:
    """Write the folder described in this module's docstring and return what was planted.

    zero_row: include Broden's ``0,-`` row in label.csv; c_files: write c_<category>.csv
    (without them the primary category falls back to label.csv's counts, so wheel is an object).
    """
    root = Path(root)
    images = root / "images"
    rng = np.random.default_rng(0)
    for image, _, _ in ROWS:
        p = images / image
        p.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(p, quality=95)
    maps = _maps()
    for rel, numbers in maps.items():
        write_label_png(images / rel, numbers)

    header = ["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES]
    lines = [",".join(header)]
    for image, split, cells in ROWS:
        sizes = [IMAGE_SIZE, IMAGE_SIZE, MASK_SIZE, MASK_SIZE]
        lines.append(",".join([image, split, *map(str, sizes), *(cells.get(c, "") for c in CATEGORIES)]))
    (root / "index.csv").write_text("\n".join(lines) + "\n")

    label_lines = ["number,name,category,frequency,coverage,syns"]
    if zero_row:
        label_lines.append("0,-,-,0,0.0,")
    for number, name, cat in LABELS:
        label_lines.append(f"{number},{name},{cat},1,0.1,")
    (root / "label.csv").write_text("\n".join(label_lines) + "\n")

    names = {n: name for n, name, _ in LABELS}
    cat_lines = ["name,first,last,count,frequency"]
    for cat, rows in COVERAGE.items():
        nums = [n for n, _ in rows]
        cat_lines.append(f"{cat},{min(nums)},{max(nums)},{len(nums)},{len(rows)}")
        if c_files:
            c_lines = ["code,number,name,frequency,coverage", "0,0,-,0,0.0"]
            c_lines += [f"{code},{n},{names[n]},1,{cov}" for code, (n, cov) in enumerate(rows, start=1)]
            (root / f"c_{cat}.csv").write_text("\n".join(c_lines) + "\n")
    (root / "category.csv").write_text("\n".join(cat_lines) + "\n")
    return TinyBroden(root=root, maps=maps)
