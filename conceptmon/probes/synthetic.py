"""A synthetic probe set in Broden's on-disk format: the offline default and the tests' ground truth.

``generate_synthetic(root, n, size, seed)`` writes a folder that :mod:`.broden` reads
unchanged (index.csv, label.csv, category.csv, c_*.csv, images/ with PNG images and
R + 256 * G label maps at half the image size). What it draws:

* **color** (pixel level, every pixel): every pixel is exactly one of the 11 Broden
  colours in :data:`PALETTE`, so "labelled red" and "is RGB red" are the same pixels.
  Everything is drawn at mask resolution and each mask pixel becomes a 2x2 block.
* Three kinds of image, in a fixed cycle of 20 (:data:`KIND_CYCLE`):

  - **texture** images (30 %): the whole image is one procedural texture named as in
    DTD/Broden (:data:`TEXTURES`) in two or more colours. ``striped``: equal-width
    stripes of two colours, period 8-16 image pixels, horizontal, vertical or diagonal.
    Annotated for color and texture only.
  - **scene** images (35 %): a procedural layout (:data:`SCENES`) whose regions are
    **object**s (sky, sea, sand, grass, road, wall, floor, building), with houses and
    trees (objects with **part**s roof, door, window, trunk, leaves) and one to three
    shapes (circle, square, ...) on top, some with a ``border`` part. Annotated for
    color, object, part and scene.
  - **object** images (35 %): two to four shapes, sometimes a house or a tree, on a plain
    background that carries no object label (Pascal-like). Annotated for color, object
    and part (an image without parts still has an all-zero part map).

Scenes are told apart by **layout, never by colour**: every region of every scene (sky,
sea, walls, leaves, borders, ...) takes a colour drawn per image from all 11, only
neighbouring regions differ. Beach: a straight horizon over a wavy shore; field: hills
and a house; street: a skyline over a road; room: a wall over a floor; forest: many
trees on wavy ground; desert: two rows of wavy dunes.

**What Network Dissection can find here** (default quantile q = 0.005; "ideal unit": 1
on its concept's pixels, 0 elsewhere). Two regimes:

* a *flat* ideal unit (the same value on all its pixels) is active on its whole concept
  under the detector's tie rule, so its IoU is 1.0 for every concept;
* a unit whose values *vary* inside its concept (every trained unit) can make at most a
  share q of all probe pixels active, so its IoU is at most ``q * N / coverage`` (N
  images, coverage in whole images as in label.csv; 1.0 when the concept covers less
  than q).

Scene labels cover whole images, so a scene's ceiling is ``q / (share of images
showing it)``. The first design showed each of 6 scenes in 70 % / 6 = 11.7 % of the
images: ceiling 0.005 / 0.117 = 0.043, too close to the 0.04 threshold for any real unit
(bilinear upsampling and imperfect units lose more). More images per scene would lower
it further; pixel-level scene labels would depart from Broden. So scene images are now
35 % (the 35 % of object images take the rest): 1,000 images show each scene 58-59
times (5.8 %), ceiling 0.085-0.086, twice the threshold. Measured with a numpy
reference at n = 1000, 64 and 112 px (tests/test_probes_synthetic.py):

==========  ==========  =================================================
category    ceiling     notes (varying units)
==========  ==========  =================================================
scene       0.085-0.086 runner-up is the scene's own stuff: room -> wall
                        0.079, street -> road 0.072, beach -> sea 0.059
texture     0.167       30 % / 10 textures = 3 % of the images each
color       0.050-0.060 11 colours share every pixel (each 8-10 %)
object      0.051-0.51  sky 0.051 (in 5 of 6 scenes), sand 0.10, grass 0.12
part        0.21-1.0    border 0.21 (0.35 at 112 px), leaves 0.41, others 1.0
==========  ==========  =================================================

Colours do not explain scenes: the best single-colour unit's IoU with any scene is at
most 0.10 (flat; the scene unit gets 1.0) and 0.008 (varying; the scene unit gets
0.086). The first design's sea was always blue, grass green, floors brown: 0.38 and 0.020
(field / green) against the scene unit's 1.0 and 0.043.

Label numbers are fixed (:data:`VOCABULARY` order, from 1), so runs and tests can rely
on them. Generation is deterministic per seed: same seed, same files byte for byte.
Every 5th image (i % 5 == 4) is in split ``val``, the rest ``train``.

For training code: :func:`scene_of`, :func:`texture_of`, :func:`objects_of` and
:func:`image_level_targets` read labels without decoding images.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .. import store
from ..concepts import ConceptSet, strip_broden_suffix
from ..config import ConfigError, ProbeConfig
from . import register_probe
from .base import ProbeError
from .broden import BrodenProbe

GENERATOR_VERSION = 2
MARKER = "conceptmon_synthetic.json"
MIN_SIZE = 16

PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "blue": (0, 0, 255),
    "brown": (140, 80, 20),
    "green": (0, 160, 0),
    "grey": (128, 128, 128),
    "orange": (255, 140, 0),
    "pink": (255, 160, 200),
    "purple": (130, 0, 170),
    "red": (255, 0, 0),
    "white": (255, 255, 255),
    "yellow": (255, 230, 0),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "heart")
THINGS = ("house", "tree")
STUFF = ("sky", "sea", "sand", "grass", "road", "wall", "floor", "building")
PARTS = ("border", "roof", "door", "window", "trunk", "leaves")
SCENES = ("beach", "field", "street", "room", "forest", "desert")
TEXTURES = (
    "striped", "banded", "lined", "grid", "chequered",
    "dotted", "zigzagged", "honeycombed", "spiralled", "crosshatched",
)
CATEGORIES = ("color", "object", "part", "scene", "texture")

# Broden-style names (colours and scenes carry Broden's suffixes) in label-number order.
VOCABULARY: tuple[tuple[str, str], ...] = (
    tuple((f"{c}-c", "color") for c in COLORS)
    + tuple((o, "object") for o in SHAPES + THINGS + STUFF)
    + tuple((p, "part") for p in PARTS)
    + tuple((f"{s}-s", "scene") for s in SCENES)
    + tuple((t, "texture") for t in TEXTURES)
)
NUMBER = {strip_broden_suffix(name): k + 1 for k, (name, _) in enumerate(VOCABULARY)}
"""Concept name -> Broden label number in generated sets."""

KIND_CYCLE = "SOTSOTSOTSOTSOTSOTSO"
"""Image kinds in a cycle of 20: S scene (35 %), O object (35 %), T texture (30 %)."""
KINDS = {"S": "scene", "O": "object", "T": "texture"}
_RGB = np.asarray([PALETTE[c] for c in COLORS], dtype=np.uint8)
_C = {c: k for k, c in enumerate(COLORS)}

Progress = Callable[[int, int], None]


def synthetic_concepts() -> ConceptSet:
    """The synthetic vocabulary (suffixes dropped) with categories, in label-number order."""
    return ConceptSet(
        tuple(strip_broden_suffix(n) for n, _ in VOCABULARY), tuple(c for _, c in VOCABULARY), "synthetic"
    )


# ----------------------------------------------------------------------------- canvas


class Canvas:
    """One image at mask resolution: palette colour, object and part label numbers per pixel."""

    def __init__(self, m: int):
        self.m = m
        self.color = np.zeros((m, m), dtype=np.int8)
        self.object = np.zeros((m, m), dtype=np.int32)
        self.part = np.zeros((m, m), dtype=np.int32)
        yy, xx = np.mgrid[0:m, 0:m].astype(np.float64) + 0.5
        self.y, self.x = yy, xx

    def paint(self, mask: np.ndarray, color: str, obj: str | None = None, part: str | None = None) -> None:
        """Colour ``mask``; with ``obj`` it becomes that object (clearing older parts under it)."""
        self.color[mask] = _C[color]
        if obj is not None:
            self.object[mask] = NUMBER[obj]
            self.part[mask] = 0
        if part is not None:
            self.part[mask] = NUMBER[part]

    def dominant_color(self, mask: np.ndarray) -> int:
        values = self.color[mask]
        return int(np.bincount(values, minlength=len(COLORS)).argmax()) if values.size else -1

    def under(self, mask: np.ndarray) -> tuple[str, ...]:
        """The colour that ``mask`` would mostly cover (empty when the mask is empty)."""
        k = self.dominant_color(mask)
        return (COLORS[k],) if k >= 0 else ()


def _pick(rng: np.random.Generator, options, avoid=()) -> str:
    allowed = [o for o in options if o not in avoid]
    return allowed[int(rng.integers(len(allowed)))]


def _fill(rng: np.random.Generator, avoid=()) -> str:
    """A region's colour: any palette colour except those of the regions it borders.

    Every region of every scene draws from the same 11 colours, so no scene, object or
    part is told by its colour (a "blue" unit is not a "beach" or "sea" unit).
    """
    return _pick(rng, COLORS, avoid)


def _distinct(rng: np.random.Generator, k: int, avoid=()) -> list[str]:
    allowed = [c for c in COLORS if c not in avoid]
    return [allowed[j] for j in rng.choice(len(allowed), k, replace=False)]


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion; outside the image counts as inside, so clipped edges get no border."""
    p = np.pad(mask, 1, constant_values=True)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


# ----------------------------------------------------------------------------- shapes


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` centred at (cx, cy) with radius r (in pixels)."""
    u, v = (x - cx) / r, (y - cy) / r
    rho = np.hypot(u, v)
    if shape == "circle":
        return rho <= 1.0
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8
    if shape == "diamond":
        return abs(u) + abs(v) <= 1.0
    if shape == "triangle":  # apex up
        return (v <= 0.75) & (abs(u) <= (v + 1.0) / 1.75 * 1.05)
    if shape == "cross":
        return ((abs(u) <= 0.3) & (abs(v) <= 1.0)) | ((abs(v) <= 0.3) & (abs(u) <= 1.0))
    if shape == "ring":
        return (rho <= 1.0) & (rho >= 0.55)
    if shape == "star":  # five points, one straight up
        turn = (np.arctan2(u, -v) / (2 * np.pi) * 5) % 1.0
        point = np.abs(2 * turn - 1)  # 0 at a point's axis, 1 between points
        return rho <= 1.0 - 0.6 * point
    if shape == "heart":
        hx, hy = u * 1.15, -v * 1.15 + 0.25
        return (hx**2 + hy**2 - 1) ** 3 - hx**2 * hy**3 <= 0
    raise ValueError(shape)


def draw_shape(canvas: Canvas, rng: np.random.Generator, shape: str, color: str | None = None) -> None:
    m = canvas.m
    r = max(2.0, m * rng.uniform(0.12, 0.24))
    cx, cy = rng.uniform(r * 0.6, m - r * 0.6), rng.uniform(r * 0.6, m - r * 0.6)
    mask = shape_mask(shape, canvas.x, canvas.y, cx, cy, r)
    if not mask.any():
        return
    under = canvas.under(mask)
    if color is None or color in under:
        color = _fill(rng, avoid=under)
    canvas.paint(mask, color, obj=shape)
    if rng.random() < 0.5:
        border = mask & ~_erode(mask)
        canvas.paint(border, _fill(rng, avoid=(color,)), part="border")


def draw_house(canvas: Canvas, rng: np.random.Generator, ground: float) -> None:
    m, x, y = canvas.m, canvas.x, canvas.y
    w, h = m * rng.uniform(0.25, 0.4), m * rng.uniform(0.18, 0.28)
    left = rng.uniform(0, m - w)
    base = min(m - 1.0, ground + m * rng.uniform(0.05, 0.2))
    top = base - h
    body = (x >= left) & (x < left + w) & (y >= top) & (y < base)
    apex = top - w * rng.uniform(0.35, 0.55)
    mid = left + w / 2
    roof = (y >= apex) & (y < top) & (abs(x - mid) <= (y - apex) / (top - apex) * (w / 2 + 1))
    wall = _fill(rng, avoid=canvas.under(body))
    roof_color = _fill(rng, avoid=(wall,) + canvas.under(roof))
    canvas.paint(body | roof, wall, obj="house")
    canvas.paint(roof, roof_color, part="roof")
    dw, dh = max(1.0, w / 5), h * 0.55
    dx = rng.uniform(left + 1, left + w - dw - 1) if w > dw + 2 else left
    door = (x >= dx) & (x < dx + dw) & (y >= base - dh) & (y < base)
    canvas.paint(door, _fill(rng, avoid=(wall,)), part="door")
    pane = _fill(rng, avoid=(wall,))
    ws = max(1.0, w / 6)
    for wx in (left + w * 0.15, left + w * 0.65):
        window = (x >= wx) & (x < wx + ws) & (y >= top + h * 0.2) & (y < top + h * 0.2 + ws) & ~door
        canvas.paint(window, pane, part="window")


def tree_masks(canvas: Canvas, rng: np.random.Generator, ground: float) -> tuple[np.ndarray, np.ndarray]:
    """(trunk, crown) masks of a tree standing near ``ground``."""
    m, x, y = canvas.m, canvas.x, canvas.y
    tw = max(1.0, m * rng.uniform(0.04, 0.07))
    cx = rng.uniform(0, m)
    base = min(m - 1.0, ground + m * rng.uniform(0.0, 0.2))
    th = m * rng.uniform(0.15, 0.3)
    crown_r = m * rng.uniform(0.09, 0.16)
    trunk = (abs(x - cx) <= tw / 2) & (y >= base - th) & (y < base)
    crown = np.hypot(x - cx, y - (base - th - crown_r * 0.6)) <= crown_r
    return trunk, crown


def draw_tree(canvas: Canvas, rng: np.random.Generator, ground: float,
              trunk_color: str | None = None, leaves_color: str | None = None) -> None:
    trunk, crown = tree_masks(canvas, rng, ground)
    if trunk_color is None:
        trunk_color = _fill(rng, avoid=canvas.under(trunk & ~crown))
    if leaves_color is None:
        leaves_color = _fill(rng, avoid=(trunk_color,) + canvas.under(crown))
    canvas.paint(trunk | crown, trunk_color, obj="tree")
    canvas.paint(trunk & ~crown, trunk_color, part="trunk")
    canvas.paint(crown, leaves_color, part="leaves")


# ----------------------------------------------------------------------------- scenes


def _wavy(canvas: Canvas, rng: np.random.Generator, level: float, amplitude: float) -> np.ndarray:
    """Boolean mask below a wavy horizontal line (one to three waves across the image)."""
    freq, phase = rng.uniform(1.0, 3.0) * 2 * np.pi / canvas.m, rng.uniform(0, 2 * np.pi)
    return canvas.y >= level + amplitude * np.sin(canvas.x * freq + phase)


def draw_scene(canvas: Canvas, rng: np.random.Generator, scene: str) -> float:
    """Paint the scene's layout; returns the ground line (y) where things stand.

    Scenes differ by layout, never by colour: every region takes a colour drawn per image
    from all 11 (only neighbouring regions differ). Beach: straight horizon over a wavy
    shore; field: rolling hills and a house; street: a skyline of buildings over a road;
    room: a wall over a floor, straight; forest: many trees on a wavy ground; desert:
    two rows of wavy dunes.
    """
    m, x, y = canvas.m, canvas.x, canvas.y
    everywhere = np.ones((m, m), dtype=bool)
    horizon = m * rng.uniform(0.3, 0.45)
    if scene == "beach":
        sky, sea, sand = _distinct(rng, 3)
        canvas.paint(everywhere, sky, obj="sky")
        canvas.paint(y >= horizon, sea, obj="sea")
        shore = horizon + m * rng.uniform(0.15, 0.25)
        canvas.paint(_wavy(canvas, rng, shore, m * rng.uniform(0.05, 0.08)), sand, obj="sand")
        return shore
    if scene == "field":
        sky, grass = _distinct(rng, 2)
        canvas.paint(everywhere, sky, obj="sky")
        canvas.paint(_wavy(canvas, rng, horizon, m * rng.uniform(0.06, 0.1)), grass, obj="grass")
        draw_house(canvas, rng, horizon)
        if rng.random() < 0.5:
            draw_tree(canvas, rng, horizon)
        return horizon
    if scene == "street":
        sky, asphalt = _distinct(rng, 2)
        canvas.paint(everywhere, sky, obj="sky")
        road_top = m * rng.uniform(0.6, 0.7)
        edge, facade = 0.0, None
        while edge < m:  # a row of buildings of random widths and heights
            width = m * rng.uniform(0.15, 0.3)
            top = m * rng.uniform(0.1, 0.45)
            block = (x >= edge) & (x < edge + width) & (y >= top) & (y < road_top)
            facade = _fill(rng, avoid=(sky, asphalt, facade))
            canvas.paint(block, facade, obj="building")
            pane = _fill(rng, avoid=(facade,))
            step = max(3.0, m / 10)
            windows = block & ((x - edge) % step >= step / 3) & ((y - top) % step >= step / 2) & (
                x < edge + width - step / 3
            ) & (y < road_top - step / 2)
            canvas.paint(windows, pane, part="window")
            edge += width
        canvas.paint(y >= road_top, asphalt, obj="road")
        lane = (y >= road_top + (m - road_top) * 0.45) & (y < road_top + (m - road_top) * 0.45 + max(1.0, m / 28))
        dashes = lane & ((x + rng.uniform(0, m)) % (m / 4) < m / 8)
        canvas.paint(dashes, _fill(rng, avoid=(asphalt,)))
        return road_top
    if scene == "room":
        wall, floor = _distinct(rng, 2)
        floor_top = m * rng.uniform(0.55, 0.7)
        canvas.paint(everywhere, wall, obj="wall")
        canvas.paint(y >= floor_top, floor, obj="floor")
        return floor_top
    if scene == "forest":
        sky, grass, trunk, leaves = _distinct(rng, 4)
        canvas.paint(everywhere, sky, obj="sky")
        ground = m * rng.uniform(0.7, 0.8)
        canvas.paint(_wavy(canvas, rng, ground, m * rng.uniform(0.03, 0.06)), grass, obj="grass")
        for _ in range(int(rng.integers(4, 8))):
            draw_tree(canvas, rng, ground - m * 0.1, trunk, leaves)
        return ground
    if scene == "desert":
        sky, far, near = _distinct(rng, 3)
        canvas.paint(everywhere, sky, obj="sky")
        canvas.paint(_wavy(canvas, rng, horizon + m * 0.05, m * rng.uniform(0.06, 0.1)), far, obj="sand")
        canvas.paint(_wavy(canvas, rng, horizon + m * 0.3, m * rng.uniform(0.06, 0.1)), near, obj="sand")
        return horizon + m * 0.3
    raise ValueError(scene)


def draw_objects(canvas: Canvas, rng: np.random.Generator, first: str, first_color: str) -> None:
    """An object image: shapes (and sometimes a house or a tree) on a plain, unlabelled background."""
    canvas.color[:] = _C[_fill(rng)]
    if rng.random() < 0.25:
        draw_house(canvas, rng, canvas.m)
    if rng.random() < 0.25:
        draw_tree(canvas, rng, canvas.m)
    draw_shape(canvas, rng, first, color=first_color)
    for _ in range(int(rng.integers(1, 4))):
        draw_shape(canvas, rng, _pick(rng, SHAPES))


# ----------------------------------------------------------------------------- textures


def texture_colors(texture: str, m: int, rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(m, m) palette indices filling the whole image with ``texture``."""
    a, b = rng.choice(len(COLORS), 2, replace=False)
    angle = np.deg2rad(rng.choice([0, 45, 90, 135]))
    u = x * np.cos(angle) + y * np.sin(angle)
    phase = rng.uniform(0, 100)
    if texture == "striped":
        period = rng.uniform(4, 8)
        on = ((u + phase) / period) % 1.0 < 0.5
    elif texture == "lined":
        on = (u + phase) % rng.uniform(4, 7) < 1.0
    elif texture == "grid":
        p = rng.uniform(5, 8)
        on = ((x + phase) % p < 1.0) | ((y + phase) % p < 1.0)
    elif texture == "crosshatched":
        p = rng.uniform(5, 8) * np.sqrt(2)
        on = ((x + y + phase) % p < 1.3) | ((x - y + phase) % p < 1.3)
    elif texture == "chequered":
        s = rng.uniform(4, 8)
        on = (np.floor((x + phase) / s) + np.floor((y + phase) / s)) % 2 == 1
    elif texture == "dotted":
        p, r = rng.uniform(5, 8), rng.uniform(1.0, 1.6)
        dx = (x + phase) % p - p / 2
        dy = (y + phase) % p - p / 2
        on = np.hypot(dx, dy) <= r
    elif texture == "zigzagged":
        p, wavelength, amp = rng.uniform(5, 8), rng.uniform(6, 10), rng.uniform(2, 4)
        along, across = (x, y) if rng.random() < 0.5 else (y, x)
        tri = amp * np.abs(((along + phase) / wavelength) % 1.0 * 2 - 1)
        on = ((across + tri) / p) % 1.0 < 0.5
    elif texture == "honeycombed":
        on = _honeycomb_edges(x, y, rng.uniform(4, 6), phase)
    elif texture == "spiralled":
        cx, cy = rng.uniform(0.35, 0.65, size=2) * m
        theta = np.arctan2(y - cy, x - cx) / (2 * np.pi)
        p = rng.uniform(4, 7)
        on = (np.hypot(x - cx, y - cy) / p - theta) % 1.0 < 0.5
    elif texture == "banded":
        # A few broad bands of different colours, unequal widths, along one axis.
        count = int(rng.integers(3, 6))
        widths = rng.uniform(1, 2, count)
        edges = np.cumsum(widths / widths.sum()) * m
        coord = y if rng.random() < 0.5 else x
        band = np.searchsorted(edges, coord, side="right").clip(0, count - 1)
        colors = [a, b]
        while len(colors) < count:
            colors.append(rng.choice([c for c in range(len(COLORS)) if c != colors[-1]]))
        return np.asarray(colors, dtype=np.int8)[band]
    else:
        raise ValueError(texture)
    return np.where(on, b, a).astype(np.int8)


def _honeycomb_edges(x: np.ndarray, y: np.ndarray, side: float, phase: float) -> np.ndarray:
    """Pixels near the boundary between hexagonal cells (nearest two cell centres nearly tied)."""
    dy, dx = 1.5 * side, np.sqrt(3) * side
    yy, xx = y + phase % (2 * dy), x + phase % dx
    row0, col0 = np.floor(yy / dy), np.floor(xx / dx)
    # The nearest centres of a hexagonal lattice lie within one row and column of the pixel's.
    dist = []
    for dr in (-1, 0, 1, 2):
        row = row0 + dr
        shift = 0.5 * (row % 2)
        for dc in (-1, 0, 1):
            col = col0 + dc
            dist.append(np.hypot(xx - (col + shift) * dx, yy - row * dy))
    nearest2 = np.partition(np.stack(dist), 1, axis=0)[:2]
    return nearest2[1] - nearest2[0] < 1.2


# ----------------------------------------------------------------------------- one image


def kind_of(i: int) -> tuple[str, int]:
    """Image i's kind (scene, object or texture) and its position among images of that kind."""
    cycle, r = divmod(i, len(KIND_CYCLE))
    code = KIND_CYCLE[r]
    return KINDS[code], cycle * KIND_CYCLE.count(code) + KIND_CYCLE[:r].count(code)


def _cycled(seed: int, stream: int, k: int, options: tuple) -> str:
    """The k-th item of a seeded sequence that visits every option once per cycle."""
    return options[_permutation(seed, stream, k // len(options), len(options))[k % len(options)]]


@functools.lru_cache(maxsize=256)
def _permutation(seed: int, stream: int, cycle: int, n: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.random.default_rng([seed, stream, cycle]).permutation(n))


def render_image(i: int, m: int, seed: int) -> tuple[Canvas, str | None, str | None]:
    """Image i of a set: its canvas, and its scene or texture name (both None for an object image)."""
    rng = np.random.default_rng([seed, 0, i])
    canvas = Canvas(m)
    kind, k = kind_of(i)
    if kind == "texture":
        texture = _cycled(seed, 1, k, TEXTURES)
        canvas.color[:] = texture_colors(texture, m, rng, canvas.x, canvas.y)
        return canvas, None, texture
    if kind == "object":
        draw_objects(canvas, rng, _cycled(seed, 5, k, SHAPES), _cycled(seed, 6, k, COLORS))
        return canvas, None, None
    scene = _cycled(seed, 2, k, SCENES)
    draw_scene(canvas, rng, scene)
    first = _cycled(seed, 3, k, SHAPES)
    draw_shape(canvas, rng, first, color=_cycled(seed, 4, k, COLORS))
    for _ in range(int(rng.integers(0, 3))):
        draw_shape(canvas, rng, _pick(rng, SHAPES))
    return canvas, scene, None


def _upsample(a: np.ndarray, size: int) -> np.ndarray:
    """Each mask pixel -> a 2x2 block; an odd size repeats the last row and column."""
    big = a.repeat(2, axis=0).repeat(2, axis=1)
    extra = size - big.shape[0]
    if extra:
        big = np.pad(big, [(0, extra), (0, extra)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    return big


def _label_png(numbers: np.ndarray) -> Image.Image:
    rgb = np.zeros(numbers.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = numbers % 256
    rgb[..., 1] = numbers // 256
    return Image.fromarray(rgb, "RGB")


# ----------------------------------------------------------------------------- the folder


def is_complete(root: str | Path) -> bool:
    """True when ``root`` holds a fully written synthetic set (its marker file is written last)."""
    return (Path(root) / MARKER).is_file()


def read_marker(root: str | Path) -> dict:
    try:
        return json.loads((Path(root) / MARKER).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        raise ProbeError(f"{Path(root) / MARKER}: missing or unreadable; {root} is not a complete synthetic probe set") from None


def _write_set(folder: Path, n: int, size: int, seed: int, progress: Progress | None) -> None:
    m = size // 2
    images = folder / "images" / "synthetic"
    images.mkdir(parents=True)
    n_labels = len(VOCABULARY) + 1
    frequency = {c: np.zeros(n_labels, dtype=np.int64) for c in CATEGORIES}
    coverage = {c: np.zeros(n_labels, dtype=np.float64) for c in CATEGORIES}
    annotated = dict.fromkeys(CATEGORIES, 0)
    rows = []

    def count(category: str, numbers: np.ndarray) -> None:
        area = np.bincount(numbers.reshape(-1), minlength=n_labels)
        area[0] = 0
        frequency[category] += area > 0
        coverage[category] += area / numbers.size
        annotated[category] += 1

    for i in range(n):
        canvas, scene, texture = render_image(i, m, seed)
        stem = f"synthetic/{i:06d}"
        Image.fromarray(_upsample(_RGB[canvas.color], size), "RGB").save(folder / "images" / f"{stem}.png", compress_level=1)
        color_numbers = canvas.color.astype(np.int32) + NUMBER[COLORS[0]]
        _label_png(color_numbers).save(folder / "images" / f"{stem}_color.png", compress_level=1)
        count("color", color_numbers)
        cells = dict.fromkeys(CATEGORIES, "")
        cells["color"] = f"{stem}_color.png"
        if texture is None:  # scene and object images: object and part maps
            for category, numbers in (("object", canvas.object), ("part", canvas.part)):
                _label_png(numbers).save(folder / "images" / f"{stem}_{category}.png", compress_level=1)
                cells[category] = f"{stem}_{category}.png"
                count(category, numbers)
        if scene is not None:
            cells["scene"] = str(NUMBER[scene])
            count("scene", np.asarray([NUMBER[scene]]))
        if texture is not None:
            cells["texture"] = str(NUMBER[texture])
            count("texture", np.asarray([NUMBER[texture]]))
        split = "val" if i % 5 == 4 else "train"
        rows.append(",".join([f"{stem}.png", split, str(size), str(size), str(m), str(m), *cells.values()]))
        if progress is not None:
            progress(i + 1, n)

    header = ",".join(["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES])
    (folder / "index.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    _write_label_tables(folder, frequency, coverage, annotated)
    marker = {"generator": "conceptmon.probes.synthetic", "version": GENERATOR_VERSION, "n": n, "size": size, "seed": seed}
    (folder / MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n", encoding="utf-8")


def _write_label_tables(
    folder: Path, frequency: dict[str, np.ndarray], coverage: dict[str, np.ndarray], annotated: dict[str, int]
) -> None:
    """label.csv, category.csv and c_<category>.csv; coverage is in whole images, as in Broden."""
    label_lines = ["number,name,category,frequency,coverage,syns"]
    category_lines = ["name,first,last,count,frequency"]
    for category in CATEGORIES:
        numbers = [k + 1 for k, (_, c) in enumerate(VOCABULARY) if c == category]
        category_lines.append(f"{category},{numbers[0]},{numbers[-1]},{len(numbers)},{annotated[category]}")
        c_lines = ["code,number,name,frequency,coverage"]
        for code, number in enumerate(numbers, start=1):
            name = VOCABULARY[number - 1][0]
            freq, cov = int(frequency[category][number]), float(coverage[category][number])
            c_lines.append(f"{code},{number},{name},{freq},{cov:.6f}")
        (folder / f"c_{category}.csv").write_text("\n".join(c_lines) + "\n", encoding="utf-8")
    for number, (name, category) in enumerate(VOCABULARY, start=1):
        freq, cov = int(frequency[category][number]), float(coverage[category][number])
        label_lines.append(f"{number},{name},{category}({freq}),{freq},{cov:.6f},")
    (folder / "label.csv").write_text("\n".join(label_lines) + "\n", encoding="utf-8")
    (folder / "category.csv").write_text("\n".join(category_lines) + "\n", encoding="utf-8")


def generate_synthetic(
    root: str | Path, n: int = 1000, size: int = 112, seed: int = 0, progress: Progress | None = None,
    *, overwrite: bool = False,
) -> Path:
    """Write a synthetic Broden-format set of ``n`` images (``size`` px, masks ``size // 2``) at ``root``.

    ``root`` must be missing or empty; with ``overwrite`` an existing *synthetic* set there
    is replaced (never other files). The set is written into a temporary sibling folder
    and renamed into place, so a killed run never leaves a half set under ``root``. If
    another process finishes the same folder first, its set is kept. ``progress(done,
    total)`` is called after each image.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ProbeError(f"n: number of synthetic images must be at least 1, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise ProbeError(f"size: synthetic images must be at least {MIN_SIZE} pixels, got {size!r}")
    root = Path(root).expanduser()
    existing = root.exists() and (not root.is_dir() or any(root.iterdir()))
    if existing and not (overwrite and is_complete(root)):
        what = "holds a synthetic probe set (pass overwrite/--force to replace it)" if is_complete(root) else (
            "is not an empty folder (choose a new or empty folder)"
        )
        raise ProbeError(f"{root}: {what}")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the set should be as readable as any folder
    try:
        _write_set(tmp, n, size, seed, progress)
        if existing:  # overwrite: move the old set aside first, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "set")
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, root)  # also replaces an empty folder
            except OSError:
                if not is_complete(root):
                    raise
                # Another process (e.g. a sibling Slurm task) finished first: same seed, same set.
    except OSError as e:
        raise ProbeError(f"{root}: could not write the synthetic probe set ({e.strerror or e})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def ensure_synthetic(root: str | Path, n: int, size: int, seed: int, progress: Progress | None = None) -> Path:
    """``root`` as is when it already holds a complete set, else generate one there."""
    root = Path(root).expanduser()
    if is_complete(root):
        return root
    return generate_synthetic(root, n=n, size=size, seed=seed, progress=progress)


def default_cache_root(n: int, size: int, seed: int) -> Path:
    """$CONCEPTMON_CACHE (else ~/.cache/conceptmon)/synthetic/n{n}_s{size}_seed{seed}_v{version}.

    The generator version is part of the name, so a changed generator never reuses an old set.
    """
    return store.synthetic_cache_dir(store.user_cache_dir()) / f"n{n}_s{size}_seed{seed}_v{GENERATOR_VERSION}"


# ----------------------------------------------------------------------------- the probe set


class SyntheticProbe(BrodenProbe):
    """A generated set, read with the Broden reader."""

    name = "synthetic"

    def __init__(self, root: str | Path, *, split: str | None = None, limit: int | None = None):
        if not is_complete(root):
            raise ProbeError(
                f"probe.root: {root} holds no complete synthetic probe set (no {MARKER}); "
                f"generate one with `conceptmon probe synthetic {root}` or point probe.root at an empty folder"
            )
        super().__init__(root, split=split, limit=limit)

    def _content_files(self) -> list[tuple[str, str | Path]]:
        return [(MARKER, self.root / MARKER), *super()._content_files()]


@dataclass
class SyntheticOptions:
    n: int = 1000
    """Images to generate when ``root`` holds none yet."""
    seed: int = 0
    """Generator seed."""
    split: str | None = None
    """Keep only rows of this split (train | val); null keeps all."""

    def check(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n: must be at least 1, got {self.n}")


def write_example(folder: Path, name: str = "synthetic") -> dict:
    """A small synthetic set in ``folder`` (for contract tests), read as probe ``name``."""
    return {"name": name, "root": str(generate_synthetic(Path(folder), n=24, size=32, seed=0))}


@register_probe("synthetic", options=SyntheticOptions, vocabulary=lambda argument, probe: synthetic_concepts(),
                example=write_example)
def synthetic_from_config(cfg: ProbeConfig) -> SyntheticProbe:
    """probe.root set: read the set there, or generate one into it when missing or empty
    (n, image_size and seed apply only then); probe.root null: a per-user cache folder."""
    size = cfg.image_size or 112
    if size < MIN_SIZE:
        raise ProbeError(f"probe.image_size: the synthetic probe set needs at least {MIN_SIZE} pixels, got {size}")
    if cfg.n < 1:
        raise ProbeError(f"probe.n: must be at least 1, got {cfg.n}")
    if cfg.root:
        root = Path(cfg.root).expanduser()
        if not is_complete(root):
            if root.exists() and (not root.is_dir() or any(root.iterdir())):
                raise ProbeError(
                    f"probe.root: {root} is neither empty nor a synthetic probe set (no {MARKER}); "
                    f"use an empty folder, or probe.name: broden for a Broden folder"
                )
            generate_synthetic(root, n=cfg.n, size=size, seed=cfg.seed)
    else:
        root = ensure_synthetic(default_cache_root(cfg.n, size, cfg.seed), cfg.n, size, cfg.seed)
    return SyntheticProbe(root, split=cfg.split, limit=cfg.limit)


# ----------------------------------------------------------------------------- targets for training


def scene_of(probe: BrodenProbe, i: int) -> str | None:
    """The scene of image i (None for texture and object images); no image decoding."""
    labels = probe.labels_of(i, "scene")
    return next(iter(labels), None)


def texture_of(probe: BrodenProbe, i: int) -> str | None:
    """The texture of image i (None for scene and object images); no image decoding."""
    labels = probe.labels_of(i, "texture")
    return next(iter(labels), None)


def objects_of(probe: BrodenProbe, i: int) -> dict[str, int]:
    """Objects in image i with their area in mask pixels, largest first (decodes one small PNG).

    Includes background regions (sky, grass, ...); filter with :data:`SHAPES` or
    :data:`THINGS` for the drawn objects.
    """
    return probe.labels_of(i, "object")


def image_level_targets(probe: BrodenProbe, category: str = "scene") -> tuple[np.ndarray, tuple[str, ...]]:
    """Class index per image for an image-level category (-1 where the image has none) and the
    class names, in vocabulary order: ready-made targets for a scene (or texture) classifier."""
    classes = tuple(n for n, c in zip(probe.concepts.names, probe.concepts.categories) if c == category)
    position = {name: k for k, name in enumerate(classes)}
    targets = np.full(len(probe), -1, dtype=np.int64)
    for i in range(len(probe)):
        names = probe.labels_of(i, category) if category in probe.category_names else {}
        first = next(iter(names), None)
        if first in position:
            targets[i] = position[first]
    return targets, classes
