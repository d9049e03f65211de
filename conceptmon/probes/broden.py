"""Reader for Broden's on-disk format (netdissect's broden1_224 / broden1_227).

A Broden folder holds::

    index.csv       image,split,ih,iw,sh,sw,<one column per category>
    label.csv       number,name,category,frequency,coverage,syns
    category.csv    name,first,last,count,frequency
    c_<cat>.csv     code,number,name,frequency,coverage
    images/...      the images, and label maps as PNGs (label = R + 256 * G)

A category cell lists ``;``-separated entries: PNG paths (relative to ``images/``) of
pixel-level label maps at the segmentation size ``sh x sw``, or integer label numbers
that cover the whole image (scenes, textures). An empty cell means the image is not
annotated for that category.

Every Broden label becomes one concept (its position in ``probe.concepts``), named
without Broden's one-letter suffix (``red-c`` -> ``red``) and filed under its primary
category: the one where it has the largest coverage.

Label numbers are at most :data:`MAX_LABEL_NUMBER` (65535, the largest R + 256 * G of an
8-bit label map); larger ones in label.csv or index.csv are refused, as are segmentation
sizes over ``Image.MAX_IMAGE_PIXELS``. Label maps may be stored as

* 8-bit RGB or RGBA (alpha ignored): label = R + 256 * G, Broden's own encoding;
* palette (P, PA): the palette colours are the RGB encoding above (what PNG optimisers
  make of an RGB label map);
* 16 bits per channel RGB or RGBA: the same map with every 8-bit sample scaled to 16
  bits (v * 257, what image tools write when they convert) or stored unscaled (every
  sample below 256); anything else is refused;
* greyscale L, I;16 or I (32-bit, non-negative): the label number itself.

Other modes (LA, F, CMYK, ...) are refused with one line naming the file.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ..concepts import OTHER, ConceptError, ConceptSet, strip_broden_suffix
from ..config import ProbeConfig
from . import register_probe
from .base import Annotation, ProbeError, ProbeSet, open_rgb

INDEX_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
MAX_LABEL_NUMBER = 65535
"""The largest label number an 8-bit R + 256 * G label map can hold."""
SIZE_COLUMNS = ("ih", "iw", "sh", "sw")
DOWNLOAD_HINT = (
    "download Broden with netdissect's script/dlbroden.sh (broden1_224) and point probe.root at it, "
    "or use probe: synthetic"
)

_INTEGER = re.compile(r"^\d+$")
_CATEGORY_COUNT = re.compile(r"^\s*([^()]+?)\s*(?:\((\d+)\))?\s*$")


@dataclass(frozen=True, eq=False)
class BrodenLabels:
    """label.csv (and c_*.csv) digested: concepts plus label-number -> concept-index lookup."""

    concepts: ConceptSet
    raw_names: tuple[str, ...]
    """Broden's names with suffixes, in concept order (``red-c``)."""
    numbers: np.ndarray
    """(n_concepts,) int64 Broden label number of each concept."""
    lookup: np.ndarray
    """(max_number + 1,) int32: label number -> concept index + 1; 0 for 'none', -1 for unknown."""

    def index_plus_one(self, raw: np.ndarray, where: Path) -> np.ndarray:
        """Map a raw label-number array to concept index + 1, refusing numbers not in label.csv."""
        top = int(raw.max(initial=0))
        if top >= len(self.lookup):
            raise ProbeError(f"{where}: label number {top} not in label.csv (largest is {len(self.lookup) - 1})")
        mapped = self.lookup[raw]
        if (mapped < 0).any():
            bad = int(raw[mapped < 0].flat[0])
            raise ProbeError(f"{where}: label number {bad} not in label.csv")
        return mapped


@dataclass(frozen=True)
class IndexRow:
    image: str
    split: str
    mask_size: tuple[int, int]
    line: int
    maps: tuple[str, ...]
    """PNG paths relative to images/, all pixel categories in column order."""
    labels: tuple[tuple[int, int], ...]
    """(category position, Broden label number) of every image-level label."""
    present: tuple[bool, ...]


# ----------------------------------------------------------------------------- CSV reading


def _read_csv(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, fields) rows; every row must have the header's width."""
    try:
        handle = open(path, newline="", encoding="utf-8")
    except FileNotFoundError:
        raise ProbeError(f"{path}: not found (a Broden folder needs index.csv and label.csv)") from None
    with handle:
        reader = csv.reader(handle)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ProbeError(f"{path}: empty file (expected a header with {', '.join(required)})") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise ProbeError(f"{path}: line 1: unreadable CSV ({e})") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise ProbeError(
                f"{path}: line 1: missing column {missing[0]!r} (header must include {', '.join(required)})"
            )
        rows = []
        try:
            for fields in reader:
                if not fields or all(not f.strip() for f in fields):
                    continue
                if len(fields) != len(header):
                    raise ProbeError(
                        f"{path}: line {reader.line_num}: {len(fields)} fields, expected {len(header)} ({','.join(header)})"
                    )
                rows.append((reader.line_num, fields))
        except (csv.Error, UnicodeDecodeError) as e:
            raise ProbeError(f"{path}: line {reader.line_num}: unreadable CSV ({e})") from None
    return header, rows


def _parse_int(value: str, path: Path, line: int, column: str) -> int:
    value = value.strip()
    if not _INTEGER.match(value):
        raise ProbeError(f"{path}: line {line}, column {column}: expected a non-negative integer, got {value!r}")
    return int(value)


def _parse_float(value: str, path: Path, line: int, column: str) -> float:
    try:
        return float(value) if value.strip() else 0.0
    except ValueError:
        raise ProbeError(f"{path}: line {line}, column {column}: expected a number, got {value!r}") from None


def _category_counts(cell: str, path: Path, line: int) -> dict[str, int]:
    """``object(2652);part(1)`` -> {"object": 2652, "part": 1}; a bare name counts 0."""
    counts: dict[str, int] = {}
    for item in cell.split(";"):
        if not item.strip() or item.strip() == "-":
            continue
        m = _CATEGORY_COUNT.match(item)
        if not m:
            raise ProbeError(
                f"{path}: line {line}, column category: expected entries like object(12), got {item!r}"
            )
        counts[m.group(1)] = int(m.group(2) or 0)
    return counts


def _check_label_number(number: int, path: Path, line: int, column: str) -> int:
    if number > MAX_LABEL_NUMBER:
        raise ProbeError(
            f"{path}: line {line}, column {column}: label number {number} is too large "
            f"(at most {MAX_LABEL_NUMBER}, the largest R + 256 * G of an 8-bit label map)"
        )
    return number


def _check_inside(relpath: str, path: Path, line: int, column: str) -> None:
    """Paths in index.csv are relative to images/ and must not climb out of the probe folder."""
    p = PurePosixPath(relpath.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", relpath):
        raise ProbeError(
            f"{path}: line {line}, column {column}: {relpath!r} must be a path relative to images/ inside the probe folder"
        )


# ----------------------------------------------------------------------------- label.csv


def _read_coverage(root: Path, categories: list[str]) -> dict[str, dict[int, float]]:
    """category -> {label number: coverage} from whichever c_<category>.csv files exist."""
    coverage: dict[str, dict[int, float]] = {}
    for cat in categories:
        path = root / f"c_{cat}.csv"
        if not path.exists():
            continue
        header, rows = _read_csv(path, ("number", "coverage"))
        col = {h: k for k, h in enumerate(header)}
        table = coverage.setdefault(cat, {})
        for line, fields in rows:
            number = _parse_int(fields[col["number"]], path, line, "number")
            if number:
                table[number] = _parse_float(fields[col["coverage"]], path, line, "coverage")
    return coverage


def primary_category(
    number: int, coverage: dict[str, dict[int, float]], counts: dict[str, int], order: list[str]
) -> str:
    """The category with the largest coverage (c_*.csv), else the largest count (label.csv), else other.

    Ties go to the category listed first in ``order``.
    """
    ranked = [(coverage[c][number], -k, c) for k, c in enumerate(order) if number in coverage.get(c, {})]
    if not ranked:
        ranked = [(n, -order.index(c) if c in order else -len(order), c) for c, n in counts.items()]
    return max(ranked)[2] if ranked else OTHER


def read_labels(root: Path, categories: list[str]) -> BrodenLabels:
    """Digest label.csv (+ c_*.csv): one concept per Broden label, in label.csv order."""
    path = Path(root) / "label.csv"
    header, rows = _read_csv(path, ("number", "name"))
    col = {h: k for k, h in enumerate(header)}
    numbers: list[int] = []
    raw_names: list[str] = []
    counts: list[dict[str, int]] = []
    first_line: dict[int, int] = {}
    for line, fields in rows:
        number = _parse_int(fields[col["number"]], path, line, "number")
        name = fields[col["name"]].strip()
        if number == 0:  # Broden's "-" row stands for "no label"
            continue
        _check_label_number(number, path, line, "number")
        if not name:
            raise ProbeError(f"{path}: line {line}, column name: empty label name for number {number}")
        if number in first_line:
            raise ProbeError(
                f"{path}: line {line}, column number: label number {number} already used on line {first_line[number]}"
            )
        first_line[number] = line
        numbers.append(number)
        raw_names.append(name)
        counts.append(_category_counts(fields[col["category"]], path, line) if "category" in col else {})
    if not numbers:
        raise ProbeError(f"{path}: no labels (expected rows like 1,red-c,color(12),...)")
    order = list(categories) + sorted({c for cs in counts for c in cs} - set(categories))
    coverage = _read_coverage(Path(root), order)
    cats = tuple(primary_category(n, coverage, cs, order) for n, cs in zip(numbers, counts))
    lookup = np.full(max(numbers) + 1, -1, dtype=np.int32)
    lookup[0] = 0
    lookup[np.asarray(numbers)] = np.arange(1, len(numbers) + 1, dtype=np.int32)
    concepts = ConceptSet(tuple(strip_broden_suffix(n) for n in raw_names), cats, str(path))
    return BrodenLabels(concepts, tuple(raw_names), np.asarray(numbers, dtype=np.int64), lookup)


def read_broden_concepts(root: str | Path) -> ConceptSet:
    """Broden's vocabulary for CLIP-Dissect: suffixes dropped, duplicate names merged."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ProbeError(f"concepts: broden: {root} not found; {DOWNLOAD_HINT}")
    return read_labels(root, _index_categories(root / "index.csv")).concepts.merged()


# ----------------------------------------------------------------------------- index.csv


def _index_categories(path: Path) -> list[str]:
    """Category columns of index.csv, read from its header only."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
    except FileNotFoundError:
        raise ProbeError(f"{path}: not found (a Broden folder needs index.csv and label.csv)") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise ProbeError(f"{path}: line 1: unreadable CSV ({e})") from None
    return [h.strip() for h in header if h.strip() not in INDEX_COLUMNS]


def read_index(path: Path) -> tuple[list[str], list[IndexRow]]:
    """Category names and every row of index.csv, with cells split into maps and image labels."""
    header, raw_rows = _read_csv(path, INDEX_COLUMNS)
    col = {h: k for k, h in enumerate(header)}
    categories = [h for h in header if h not in INDEX_COLUMNS]
    rows = []
    for line, fields in raw_rows:
        image = fields[col["image"]].strip()
        if not image:
            raise ProbeError(f"{path}: line {line}, column image: empty image path")
        _check_inside(image, path, line, "image")
        sizes = {c: _parse_int(fields[col[c]], path, line, c) for c in SIZE_COLUMNS}
        if sizes["sh"] == 0 or sizes["sw"] == 0:
            raise ProbeError(f"{path}: line {line}, columns sh/sw: segmentation size must be positive")
        if sizes["sh"] * sizes["sw"] > Image.MAX_IMAGE_PIXELS:
            raise ProbeError(
                f"{path}: line {line}, columns sh/sw: segmentation size {sizes['sh']}x{sizes['sw']} is too large "
                f"(at most {Image.MAX_IMAGE_PIXELS} pixels)"
            )
        maps: list[tuple[int, str]] = []
        labels: list[tuple[int, int]] = []
        present = []
        for k, cat in enumerate(categories):
            items = [s.strip() for s in fields[col[cat]].split(";") if s.strip()]
            present.append(bool(items))
            for item in items:
                if _INTEGER.match(item):
                    labels.append((k, _check_label_number(int(item), path, line, cat)))
                else:
                    _check_inside(item, path, line, cat)
                    maps.append((k, item))
        rows.append(
            IndexRow(
                image=image,
                split=fields[col["split"]].strip(),
                mask_size=(sizes["sh"], sizes["sw"]),
                line=line,
                maps=tuple(maps),
                labels=tuple(labels),
                present=tuple(present),
            )
        )
    return categories, rows


def select_rows(rows: list[IndexRow], path: Path, split: str | None, limit: int | None) -> list[IndexRow]:
    """Rows of ``split`` (all when None), first ``limit`` of them; an empty result is an error."""
    if split is not None:
        kept = [r for r in rows if r.split == split]
        if not kept:
            splits = sorted({r.split for r in rows})
            raise ProbeError(f"probe.split: no rows of split {split!r} in {path}; splits there: {', '.join(splits) or 'none'}")
        rows = kept
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ProbeError(f"{path}: no images listed")
    return rows


def common_mask_size(rows: list[IndexRow], path: Path) -> tuple[int, int]:
    first = rows[0]
    for r in rows:
        if r.mask_size != first.mask_size:
            raise ProbeError(
                f"{path}: line {r.line}: segmentation size sh x sw = {r.mask_size[0]}x{r.mask_size[1]} differs from "
                f"{first.mask_size[0]}x{first.mask_size[1]} on line {first.line}; all rows need one sh x sw"
            )
    return first.mask_size


# ----------------------------------------------------------------------------- label maps

_BYTE_SWAP = {"RGB;16B": "RGB;16L", "RGB;16L": "RGB;16B", "RGBA;16B": "RGBA;16L", "RGBA;16L": "RGBA;16B"}
"""16-bit-per-channel layouts, and the layout that reads the other byte of every sample."""


def read_label_numbers(path: Path) -> np.ndarray:
    """Raw Broden label numbers (int64, 2-D) of one label-map image in any supported encoding.

    Raises ProbeError (naming ``path``) for encodings that would be guessed, never zeros.
    """
    with Image.open(path) as im:
        rawmodes = {_rawmode(tile) for tile in getattr(im, "tile", None) or []}
        sixteen = {r for r in rawmodes if r and ";16" in r}
        if sixteen and im.mode in ("RGB", "RGBA"):
            return _sixteen_bit_numbers(path, im, sixteen)
        im.load()
        mode = im.mode
        if mode in ("P", "PA"):
            im = im.convert("RGB")
        arr = np.asarray(im)
    if mode in ("RGB", "RGBA", "P", "PA"):
        return arr[..., 0].astype(np.int64) + 256 * arr[..., 1].astype(np.int64)
    if mode in ("L", "I;16", "I;16B", "I;16L", "I", "1"):
        numbers = arr.astype(np.int64)
        if numbers.size and numbers.min() < 0:
            raise ProbeError(f"{path}: label map holds negative numbers (mode {mode}); label numbers are 0 or more")
        return numbers
    raise ProbeError(
        f"{path}: unsupported label-map mode {mode} (use RGB with label = R + 256 * G, "
        f"or greyscale L / I;16 holding the label number)"
    )


def _rawmode(tile) -> str | None:
    """The pixel layout a decoder tile reads: PNG tiles name it, TIFF tiles lead with it."""
    args = getattr(tile, "args", None)
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return args if isinstance(args, str) else None


def _with_rawmode(tile, rawmode: str):
    args = tile.args
    return tile._replace(args=(rawmode, *args[1:]) if isinstance(args, tuple) else rawmode)


def _sixteen_bit_numbers(path: Path, im: Image.Image, rawmodes: set[str]) -> np.ndarray:
    """A 16-bit-per-channel RGB(A) map. Pillow decodes those to 8 bits by keeping each
    sample's high byte, which reads unscaled maps (samples below 256) as zeros; decoding
    the same data again with the byte order swapped yields the low bytes."""
    if len(rawmodes) != 1 or next(iter(rawmodes)) not in _BYTE_SWAP:
        raise ProbeError(f"{path}: 16-bit label map in an unsupported layout ({', '.join(sorted(rawmodes))}); "
                         f"save label maps as 8-bit RGB (label = R + 256 * G)")
    im.load()
    high = np.asarray(im)[..., :2].astype(np.int64)
    with Image.open(path) as again:
        again.tile = [_with_rawmode(t, _BYTE_SWAP[_rawmode(t)]) for t in again.tile]
        again.load()
        low = np.asarray(again)[..., :2].astype(np.int64)
    if (high == low).all():  # every sample is an 8-bit value v scaled to v * 257
        samples = high
    elif (high == 0).all():  # 8-bit values stored as they are
        samples = low
    else:
        raise ProbeError(
            f"{path}: 16-bit-per-channel label map whose samples are neither 8-bit values scaled by 257 nor below "
            f"256; save label maps as 8-bit RGB (label = R + 256 * G)"
        )
    return samples[..., 0] + 256 * samples[..., 1]


# ----------------------------------------------------------------------------- the probe set


class BrodenProbe(ProbeSet):
    """A Broden-format folder as a :class:`ProbeSet` (also the synthetic set's reader)."""

    name = "broden"

    def __init__(self, root: str | Path, *, split: str | None = None, limit: int | None = None):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ProbeError(f"probe.root: {root} not found; {DOWNLOAD_HINT}")
        self.root = root
        self.index_path = root / "index.csv"
        categories, rows = read_index(self.index_path)
        self.labels = read_labels(root, categories)
        rows = select_rows(rows, self.index_path, split, limit)
        self.mask_size = common_mask_size(rows, self.index_path)
        self.category_names = tuple(categories)
        self.concepts = self.labels.concepts
        self._rows = rows
        self._image_labels = [self._concept_indices(r) for r in rows]

    def _concept_indices(self, row: IndexRow) -> np.ndarray:
        """Concept indices of a row's image-level labels; numbers not in label.csv are an error."""
        numbers = np.asarray([n for _, n in row.labels], dtype=np.int64)
        if not len(numbers):
            return numbers
        lookup = self.labels.lookup
        known = (numbers < len(lookup)) & (lookup[np.minimum(numbers, len(lookup) - 1)] > 0)
        if not known.all():
            k = int(np.argmin(known))
            column = self.category_names[row.labels[k][0]]
            raise ProbeError(
                f"{self.index_path}: line {row.line}, column {column}: label number {int(numbers[k])} not in label.csv"
            )
        return (lookup[numbers] - 1).astype(np.int64)

    def __len__(self) -> int:
        return len(self._rows)

    def relpath(self, i: int) -> str:
        return f"images/{self._rows[i].image}"

    def split_of(self, i: int) -> str:
        return self._rows[i].split

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self.root / "images" / self._rows[i].image)

    def load_annotation(self, i: int) -> Annotation:
        row = self._rows[i]
        h, w = self.mask_size
        if row.maps:
            maps = np.stack([self._decode_map(rel, row) for _, rel in row.maps])
        else:
            maps = np.zeros((0, h, w), dtype=np.int32)
        return Annotation(
            pixel_maps=maps,
            image_labels=self._image_labels[i].copy(),
            categories_present=np.asarray(row.present, dtype=bool),
        )

    def _decode_map(self, rel: str, row: IndexRow) -> np.ndarray:
        """One label-map image as concept index + 1 (see the module docstring for the encodings)."""
        path = self.root / "images" / rel
        try:
            raw = read_label_numbers(path)
        except FileNotFoundError:
            raise ProbeError(f"{path}: label map not found (listed in {self.index_path} line {row.line})") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise ProbeError(f"{path}: unreadable label map ({e})") from None
        if raw.shape != self.mask_size:
            raise ProbeError(
                f"{path}: label map is {raw.shape[0]}x{raw.shape[1]}, expected {self.mask_size[0]}x{self.mask_size[1]} "
                f"(sh x sw on {self.index_path} line {row.line})"
            )
        return self.labels.index_plus_one(raw, path)

    def labels_of(self, i: int, category: str) -> dict[str, int]:
        """Concept name -> pixels (at mask size) of image i in one category; image-level labels
        count every pixel. Decodes only that category's maps; empty when not annotated."""
        if category not in self.category_names:
            raise ProbeError(f"category {category!r} not in {self.index_path} (has {', '.join(self.category_names)})")
        k = self.category_names.index(category)
        row = self._rows[i]
        h, w = self.mask_size
        area = np.zeros(len(self.concepts) + 1, dtype=np.int64)
        for cat, rel in row.maps:
            if cat == k:
                area += np.bincount(self._decode_map(rel, row).reshape(-1), minlength=len(area))
        for (cat, _), index in zip(row.labels, self._image_labels[i]):
            if cat == k:
                area[index + 1] += h * w
        hits = np.flatnonzero(area[1:])
        order = hits[np.argsort(-area[1:][hits], kind="stable")]
        return {self.concepts.names[j]: int(area[j + 1]) for j in order}

    def _content_files(self) -> list[tuple[str, str | Path]]:
        """The tables, then every listed image and label map of the selected rows, in index order."""
        tables = [self.index_path, self.root / "label.csv", self.root / "category.csv"]
        tables += sorted(self.root.glob("c_*.csv"))
        files: list[tuple[str, str | Path]] = [(p.name, p) for p in tables if p.exists()]
        images = os.path.join(self.root, "images")  # plain strings: 60k rows through pathlib is slow
        for row in self._rows:
            for rel in (row.image, *(m for _, m in row.maps)):
                files.append((f"images/{rel}", os.path.join(images, rel)))
        return files


@dataclass
class BrodenOptions:
    split: str | None = None
    """Keep only rows of this split (e.g. train, val); null keeps all."""


def broden_vocabulary(argument: str | None, probe) -> ConceptSet:
    """``concepts: broden`` (the probe folder's label.csv) or ``concepts: broden:/path/to/broden``."""
    if argument:
        return read_broden_concepts(Path(argument).expanduser())
    root = getattr(probe, "root", None)
    if root is not None and (Path(root) / "label.csv").is_file():
        return read_broden_concepts(Path(root))
    raise ConceptError(
        f"concepts: broden reads label.csv from the probe folder, but probe {getattr(probe, 'name', None)!r} "
        f"has none; write concepts: broden:/path/to/broden1_224"
    )


def write_example(folder: Path) -> dict:
    """A small Broden-format folder (the synthetic generator writes that format)."""
    from .synthetic import write_example as synthetic_example

    return synthetic_example(folder, name="broden")


@register_probe("broden", options=BrodenOptions, vocabulary=broden_vocabulary, example=write_example)
def broden_from_config(cfg: ProbeConfig) -> BrodenProbe:
    if not cfg.root:
        raise ProbeError(f"probe.root: required for probe broden (the folder holding index.csv); {DOWNLOAD_HINT}")
    return BrodenProbe(cfg.root, split=cfg.split, limit=cfg.limit)
