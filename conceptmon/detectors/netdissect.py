"""Network Dissection (Bau et al.): IoU between thresholded unit maps and concept masks.

**Which pixels are active.** Per unit, T is the exact (1 - quantile) quantile of all its
activation values over the probe set (linear interpolation, as ``numpy.quantile``) and
``floor`` its minimum. Maps are upsampled bilinearly to the mask resolution (F.interpolate's
weights, align_corners=False, summed in one fixed order: :func:`active_pixels`); an
upsampled value x is *active* when

* ``x >= T - tol`` if ``T - tol > floor``. So a tied top block is active: when more than
  ``quantile`` of a unit's values share its top value (flat regions of the synthetic
  probe's exact palette colours, ReLU6/hardtanh saturation, bf16/--amp quantisation),
  T equals that value and ``x > T`` would be empty, every IoU 0 and the label whatever
  concept sorts first;
* ``x > T + tol`` otherwise: T is the unit's minimum (a ReLU unit that is 0 on more than
  1 - quantile of the positions), so only values above it are active, not the whole map.

``tol = TIE_TOLERANCE * max(|T|, tiny)``. Bilinear interpolation of a flat region returns
its value only up to float32 rounding (measured with F.interpolate: at most 2.2e-7
relative, 3.6 units of 2^-24), so without a tolerance a tied block would flicker in and out of the active region
pixel by pixel, and the floor block of a hardtanh unit could turn active. 1e-5 is ~50x that
error and far below the spacing of any 16-bit float format (bf16 3.9e-3, fp16 9.8e-4), so
distinct quantised levels are never merged. A unit with no active pixel over the whole
probe set is **dead** (a constant unit always is): it gets no concept.

**One pass, exact.** T is only known at the end. Two facts make one forward pass enough:

* the quantile needs only each unit's top ``K = n - floor((1 - q)(n - 1))`` values; the
  K-th largest value seen so far, the *bound* b, is a running lower bound on T;
* with ``m(x) = x - TIE_TOLERANCE * max(|x|, tiny)`` (increasing), the final cut c (the
  value x must reach) is >= m(T). An upsampled pixel is a convex combination of its 2x2
  source block, computed with a relative rounding error far below TIE_TOLERANCE, so it
  can reach c only if one of its sources is >= m(c) >= m(m(T)) >= m(m(b)).

So for maps whose maximum is >= m(m(b)) we keep only the 3x3 neighbourhoods of their
pixels >= m(m(b)), and re-prune stored maps as b rises. An output pixel with a source
>= m(c) has its whole 2x2 block inside a kept neighbourhood and is computed exactly from
kept values; every other output pixel cannot be active and is never computed (scoring
evaluates only the output tiles of blocks with such a source). Memory follows the kept
top values, never all maps.

**Linear cost.** Values above the bound are the only ones that can enter the top K. They
are already among the sparse store's entries; they wait in a *pending* buffer and are
merged into the per-unit top-K (one ``topk`` over [top | pending padded per unit]) only
when some unit has max(K/4, ``min_merge``) of them, refreshing the bound. With values in
random order about K (1 + ln(n / K)) of a unit's n values ever beat its bound, so merging
costs a few K per unit in all. Re-pruning is rolling: each batch re-checks the oldest
stored entries, a tenth as many as it added, instead of re-pruning everything from time to time.
So each batch costs work proportional to its own size, not to the images seen so far.

**Speculative keep cut.** Early in a pass the bound is a low quantile (after 64 of 2,000
images, the top 16 % of a unit's values), so early batches would store many neighbourhoods
that later ones prune. From the top values merged so far, the value of rank
``2 K f + h w`` (f: the share of the probe seen; one image's worth of slack) estimates a cut
below the final T, and the keep cut is the higher of m(m(that)) and m(m(b)). Values below a
speculative cut are dropped, so at the end each unit is checked: if the highest speculative
cut it used lies above its final K-th largest value or above m(c), it may have lost values
that matter and is dissected again, alone, in a second pass over the probe with speculation
off (the engine runs one when an accumulator asks, ``needs_another_pass``). Results are
exact either way; the estimate only decides how often a second pass is needed, which is
why Network Dissection reads the probe in one fixed random order (Broden lists its images
by source data set, so an estimate from its first images would often be too high).

**Two implementations, one result.** On an accelerator every step is tensor ops on the
activations' device. On a CPU those ops were most of dissect's cost (each a separate pass
over millions of values), so there the per-map steps (neighbourhoods, re-pruning, scoring)
run as fused loops (:mod:`.netdissect_cpu`, numba) with the same float32 operations in
the same order: both give the same bits, and the tests run both (``backend``).

**Bootstrap confidence.** With ``ctx.trust.replicates = B > 0``, the scoring step, which
finds per (unit, image) the active area and the per-concept intersection counts, also adds
them, weighted, into replicate sums (units x concepts x B, float64: integer counts times
Poisson weights stay exact, so the sums do not depend on summation order or device); the
mask cache keeps every image's label areas. Replicate b weights image i by the shared
Poisson(1) weight ``w[b, i]`` (:func:`~.base.poisson_weights`) and scores
``IoU_b = sum_i w I_i / (sum_i w A_i + sum_i w L_i - sum_i w I_i)``, with A restricted to
images annotated for the concept's category as in the full IoU. The intersections, active
areas and label areas are resampled; **the threshold T is not** (it stays the one from
all images), so the bootstrap measures how much the label depends on which images the
probe set happens to hold, not the threshold's own noise. Per unit: the share of
replicates whose top-1 is the reported concept and a 90 % interval of the top-1 IoU
(:func:`~.base.bootstrap_summary`); dead units get confidence 0.

Probe masks are decoded once per probe set into a cache folder (see :func:`build_mask_cache`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, DetectorOptions
from .. import store
from ..store import write_json
from . import register_detector
from .base import (Detector, DetectorError, LayerAccumulator, LayerScores, MapExtrema, bootstrap_summary,
                   poisson_weights, rank_concepts)

CACHE_FORMAT = 2
TIE_TOLERANCE = 1e-5
"""Relative tolerance of the active cut (see the module docstring for why this value)."""
_TINY = torch.finfo(torch.float32).tiny
_SCORING_PIXELS = 16 << 20  # output pixels per scoring chunk if every tile were evaluated (~64 MB)
_BOOTSTRAP_VALUES = 1 << 22  # replicate IoUs per bootstrap chunk (B * units * concepts, 16 MB)


# ----------------------------------------------------------------------------- pure maths


def quantile_keep_count(n_values: int, quantile: float) -> int:
    """How many top values determine the (1 - quantile) quantile of n values exactly."""
    lo = math.floor((1.0 - quantile) * (n_values - 1))
    return n_values - lo


def threshold_from_top(top: torch.Tensor, n_values: int, quantile: float) -> torch.Tensor:
    """Exact (1 - quantile) quantile (linear interpolation, as numpy's default) per row of
    ``top`` (U, K): the K = quantile_keep_count(n_values, quantile) largest values, in any order."""
    pos = (1.0 - quantile) * (n_values - 1)
    lo = math.floor(pos)
    frac = pos - lo
    k = n_values - lo
    smallest = top.topk(min(2, k), dim=1, largest=False, sorted=True).values
    v_lo = smallest[:, 0]  # the K-th largest value
    if frac == 0 or k < 2:
        return v_lo.clone()
    v_hi = smallest[:, 1]
    return v_lo + frac * (v_hi - v_lo)


def margin_below(x: torch.Tensor) -> torch.Tensor:
    """``x - TIE_TOLERANCE * max(|x|, tiny)``: increasing in x, -inf stays -inf."""
    return x - TIE_TOLERANCE * x.abs().clamp_min(_TINY)


def active_cut(threshold: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Per unit the value an upsampled pixel must reach (``>=``) to be active.

    ``T - tol`` when that is above the unit's minimum (a tied top block is active), else the
    smallest float above ``T + tol`` (T is the minimum: strictly above it).
    """
    lowered = margin_below(threshold)
    raised = threshold + (threshold - lowered)
    above = torch.nextafter(raised, torch.full_like(raised, math.inf))
    return torch.where(lowered > floor, lowered, above)


def iou_from_counts(
    intersection: torch.Tensor, act_area: torch.Tensor, label_area: torch.Tensor, concept_category: torch.Tensor
) -> torch.Tensor:
    """IoU[..., u, c] = I / (A[..., u, cat(c)] + L[..., c] - I), 0 where the union is empty.

    intersection (..., U, M); act_area (..., U, n_categories); label_area (..., M);
    concept_category (M,) long. Leading dimensions (bootstrap replicates) broadcast.
    """
    union = act_area[..., concept_category] + label_area.unsqueeze(-2) - intersection
    return torch.where(union > 0, intersection / union.clamp_min(1e-12), torch.zeros_like(union))


@dataclass
class CountTable:
    """A sparse (n_rows, n_images) table of per-image counts: entry j adds ``values[j]`` at
    (``rows[j]``, ``images[j]``); repeated cells add up."""

    rows: torch.Tensor
    images: torch.Tensor
    values: torch.Tensor
    n_rows: int


def weighted_image_sums(weights: torch.Tensor, table: CountTable) -> torch.Tensor:
    """(n_rows, B): ``sum_i table[row, i] * weights[b, i]``, one sparse x dense product.

    In float64 with integer counts and Poisson weights every product and sum is an exact
    integer, so the result does not depend on the order of summation: the same on every
    device and every run.
    """
    n_rep, n_images = weights.shape
    if table.values.numel() == 0:
        return torch.zeros(table.n_rows, n_rep, dtype=weights.dtype, device=weights.device)
    index = torch.stack([table.rows.long(), table.images.long()])
    matrix = torch.sparse_coo_tensor(index, table.values.to(weights.dtype), (table.n_rows, n_images),
                                     check_invariants=False)  # rows/images are in range by construction
    return torch.sparse.mm(matrix, weights.t())


def add_weighted_image_sums(total: torch.Tensor, weights: torch.Tensor, table: CountTable) -> None:
    """``total[row] += weighted_image_sums(...)[row]`` for the rows the table touches only."""
    if table.values.numel() == 0:
        return
    rows, local = torch.unique(table.rows, return_inverse=True)
    total.index_add_(0, rows, weighted_image_sums(weights, CountTable(local, table.images, table.values, rows.numel())))


def bootstrap_labels(
    intersection: torch.Tensor, act_area: torch.Tensor, label_area: torch.Tensor,
    concept_category: torch.Tensor, reported: torch.Tensor, interval: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per unit: share of replicates whose top-1 is ``reported``, and the interval of its IoU.

    Replicate sums (from :func:`weighted_image_sums`): intersection (U, M, B), act_area
    (U, n_categories, B) over images annotated for each category, label_area (M, B);
    reported (U,) concept indices.
    """
    ious = iou_from_counts(intersection.permute(2, 0, 1), act_area.permute(2, 0, 1), label_area.t(), concept_category)
    return bootstrap_summary(ious, reported, interval)


# ----------------------------------------------------------------------------- probe masks cache


class _DamagedCache(Exception):
    """A cache folder that cannot be used as it is (rebuilt, never shown as a traceback)."""


_MAPS_FILE = "pixel_maps.bin"


@dataclass
class MaskCache:
    """Every probe image's labels, decoded once.

    Pixel label maps of all images one after the other, (n_maps_total, h, w) memory-mapped:
    image i's maps are ``maps[map_offsets[i]:map_offsets[i + 1]]`` (images differ in how
    many they have; none are padded). Whole-image labels and per-image label areas are CSR.
    """

    maps: np.ndarray
    map_offsets: np.ndarray  # (N + 1,)
    label_offsets: np.ndarray  # CSR over images: image i's whole-image labels are
    label_values: np.ndarray  # label_values[label_offsets[i]:label_offsets[i + 1]]
    categories_present: np.ndarray  # (N, n_categories) bool
    area_offsets: np.ndarray  # CSR over images: image i labels area_pixels[j] pixels
    area_concept: np.ndarray  # of concept area_concept[j] (pixel maps + whole-image labels)
    area_pixels: np.ndarray
    label_area: np.ndarray  # (M,) float64 pixels per concept over the probe set
    mask_size: tuple[int, int]

    def pixel_labels(self, images: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Labels under pixels (images[p], ys[p], xs[p]) in every map of their image:
        (pixel index p, label) per (pixel, map), label 0 = unlabelled."""
        counts = self.map_offsets[images + 1] - self.map_offsets[images]
        pixel = np.repeat(np.arange(len(images)), counts)
        start = np.repeat(self.map_offsets[images] - (np.cumsum(counts) - counts), counts)
        labels = self.maps[start + np.arange(len(pixel)), ys[pixel], xs[pixel]]
        return pixel, labels


def build_mask_cache(probe, folder: Path, log=lambda m: None) -> MaskCache:
    """Decode every annotation of ``probe`` into ``folder`` (reused when complete and valid).

    Built in a private temporary folder and renamed into place, so concurrent shards that
    race to build the same cache never see each other's half-written files. A damaged
    folder (truncated file, bad meta.json, older format) is rebuilt; a full disk is one
    error naming the folder, and leaves no temporary files behind.
    """
    folder = Path(folder)
    if folder.exists():
        try:
            return _open_mask_cache(folder, probe)
        except _DamagedCache as e:
            log(f"{folder}: mask cache unusable ({e}); rebuilding it")
            shutil.rmtree(folder, ignore_errors=True)
            if folder.exists():
                raise DetectorError(f"{folder}: mask cache unusable ({e}) and cannot be removed; delete it") from None
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
        _write_mask_cache(probe, tmp, log)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: use its (identical) cache
            if not (folder / "meta.json").exists():
                raise
    except OSError as e:
        raise DetectorError(
            f"{folder}: cannot write the probe mask cache ({e.strerror or e}); free space there or set cache_dir"
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        return _open_mask_cache(folder, probe)
    except _DamagedCache as e:
        raise DetectorError(f"{folder}: mask cache unusable right after building it ({e})") from None


def _write_array(f, array: np.ndarray) -> None:
    """Append an array's bytes to an open cache file (the one place the maps are written)."""
    f.write(np.ascontiguousarray(array).data)


def _write_mask_cache(probe, folder: Path, log) -> None:
    # The maps are streamed to a plain file, one image at a time: memory stays one image,
    # and a full disk raises OSError from write(). (Writing through a numpy memmap instead
    # would turn a full disk into SIGBUS, which kills the process without a message.)
    n = len(probe)
    h, w = probe.mask_size
    m = len(probe.concepts)
    k = len(probe.category_names)
    dtype = np.int16 if m < 32767 else np.int32
    log(f"decoding masks of {n} probe images (once per probe set) ...")
    map_offsets = np.zeros(n + 1, dtype=np.int64)
    label_offsets = np.zeros(n + 1, dtype=np.int64)
    area_offsets = np.zeros(n + 1, dtype=np.int64)
    label_values, area_concept, area_pixels = [], [], []
    present = np.zeros((n, k), dtype=bool)
    label_area = np.zeros(m, dtype=np.float64)
    with open(folder / _MAPS_FILE, "wb") as f:
        for i in range(n):
            a = probe.load_annotation(i)
            maps = np.asarray(a.pixel_maps)
            n_maps = maps.shape[0] if maps.ndim == 3 else 0
            counts = np.zeros(m, dtype=np.int64)
            if n_maps:
                if maps.shape[1:] != (h, w):
                    raise DetectorError(
                        f"{probe.relpath(i)}: masks are {maps.shape[1:]}, expected {(h, w)} like the rest of the probe set"
                    )
                lo, hi = int(maps.min()), int(maps.max())
                if lo < 0 or hi > m:
                    raise DetectorError(
                        f"{probe.relpath(i)}: mask label {lo if lo < 0 else hi} is outside 0..{m} (0 = unlabelled, "
                        f"1..{m} = the probe's concepts)"
                    )
                _write_array(f, maps.astype(dtype, copy=False))
                counts += np.bincount(maps.reshape(-1), minlength=m + 1)[1:]
            map_offsets[i + 1] = map_offsets[i] + n_maps
            labels = np.unique(np.asarray(a.image_labels, dtype=np.int64))
            if labels.size and (labels[0] < 0 or labels[-1] >= m):
                raise DetectorError(f"{probe.relpath(i)}: whole-image label outside 0..{m - 1}")
            label_values.append(labels)
            label_offsets[i + 1] = label_offsets[i] + len(labels)
            counts[labels] += h * w
            nonzero = np.flatnonzero(counts)
            area_concept.append(nonzero.astype(np.int32))
            area_pixels.append(counts[nonzero].astype(np.int64))
            area_offsets[i + 1] = area_offsets[i] + len(nonzero)
            label_area += counts
            present[i] = a.categories_present
    arrays = {
        "map_offsets": map_offsets,
        "label_offsets": label_offsets,
        "label_values": np.concatenate(label_values) if label_values else np.zeros(0, np.int64),
        "categories_present": present,
        "area_offsets": area_offsets,
        "area_concept": np.concatenate(area_concept) if area_concept else np.zeros(0, np.int32),
        "area_pixels": np.concatenate(area_pixels) if area_pixels else np.zeros(0, np.int64),
        "label_area": label_area,
    }
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
    meta = {"format": CACHE_FORMAT, "n_images": n, "fingerprint": probe.fingerprint(), "mask_size": [h, w],
            "n_maps": int(map_offsets[-1]), "dtype": np.dtype(dtype).name}
    write_json(folder / "meta.json", meta)  # last: a folder without it is incomplete


def _open_mask_cache(folder: Path, probe) -> MaskCache:
    """Open and check a cache folder; raises _DamagedCache saying what is wrong."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _DamagedCache("no meta.json") from None
    except (OSError, ValueError) as e:
        raise _DamagedCache(f"meta.json unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise _DamagedCache(f"format {meta.get('format') if isinstance(meta, dict) else '?'}, expected {CACHE_FORMAT}")
    n, (h, w), m = len(probe), probe.mask_size, len(probe.concepts)
    expected = {"n_images": n, "fingerprint": probe.fingerprint(), "mask_size": [h, w]}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise _DamagedCache(f"meta.json {key} is {meta.get(key)!r}, expected {value!r}")
    arrays = {}
    for name in ("map_offsets", "label_offsets", "label_values", "categories_present", "area_offsets", "area_concept",
                 "area_pixels", "label_area"):
        try:
            arrays[name] = np.load(folder / f"{name}.npy", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise _DamagedCache(f"{name}.npy unreadable: {e}") from None
    shapes = {
        "map_offsets": (n + 1,), "label_offsets": (n + 1,), "area_offsets": (n + 1,),
        "categories_present": (n, len(probe.category_names)), "label_area": (m,),
        "label_values": (int(arrays["label_offsets"][-1]) if n + 1 == arrays["label_offsets"].size else -1,),
        "area_concept": (int(arrays["area_offsets"][-1]) if n + 1 == arrays["area_offsets"].size else -1,),
    }
    shapes["area_pixels"] = shapes["area_concept"]
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            raise _DamagedCache(f"{name}.npy has shape {arrays[name].shape}, expected {shape}")
    n_maps = int(arrays["map_offsets"][-1])
    try:
        dtype = np.dtype(meta.get("dtype"))
    except TypeError:
        raise _DamagedCache(f"meta.json dtype {meta.get('dtype')!r}") from None
    path = folder / _MAPS_FILE
    size = path.stat().st_size if path.exists() else -1
    if meta.get("n_maps") != n_maps or size != n_maps * h * w * dtype.itemsize:
        raise _DamagedCache(f"{_MAPS_FILE} holds {size} bytes, expected {n_maps * h * w * dtype.itemsize}")
    maps = np.memmap(path, dtype=dtype, mode="r", shape=(n_maps, h, w)) if n_maps else np.zeros((0, h, w), dtype)
    return MaskCache(maps=maps, mask_size=(h, w), **arrays)


# ----------------------------------------------------------------------------- the detector


@dataclass
class NetDissectOptions(DetectorOptions):
    quantile: float = 0.005
    """A unit is 'on' above its (1 - quantile) activation quantile over the probe set."""

    def check(self) -> None:
        if not 0 < self.quantile < 1:
            raise ConfigError(f"quantile: must be between 0 and 1, got {self.quantile}")


@register_detector
class NetDissect(Detector):
    """IoU of each unit's top-quantile region with each concept's mask (score = IoU)."""

    name = "netdissect"
    Options = NetDissectOptions
    default_threshold = 0.04  # Bau et al.: a unit is interpretable when its best IoU >= 0.04
    needs_masks = True
    uses_probe_labels = True
    reads_in_random_order = True  # the speculative cut's estimate assumes no order (results never depend on it)

    def __init__(self, options, probe, concepts, ctx):
        super().__init__(options, probe, concepts, ctx)
        self.quantile = self.options.quantile
        self.masks: MaskCache | None = None
        cats = list(probe.category_names)
        self._concept_category = torch.tensor(
            [cats.index(c) if c in cats else 0 for c in probe.concepts.categories], dtype=torch.long
        )
        self._replicates: tuple | None = None  # (key, weights, replicate label areas), shared by all layers

    def prepare(self) -> None:
        folder = store.mask_cache_dir(self.ctx.cache_dir, self.probe.fingerprint())
        self.masks = build_mask_cache(self.probe, folder, self.ctx.log)

    def accumulator(self, layer: str, n_units: int) -> LayerAccumulator:
        return _IoUAccumulator(self, layer, n_units)

    def replicates(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Bootstrap weights (B, N) and replicate label areas (M, B), float64, once per run."""
        trust = self.ctx.trust
        key = (trust.replicates, trust.seed, str(device))
        if self._replicates is None or self._replicates[0] != key:
            masks = self.masks
            weights = poisson_weights(len(self.probe), trust.replicates, trust.seed, device).double()
            counts = np.diff(masks.area_offsets)
            table = CountTable(
                rows=torch.from_numpy(masks.area_concept).to(device),
                images=torch.repeat_interleave(torch.arange(len(counts), device=device),
                                               torch.from_numpy(counts).to(device)),
                values=torch.from_numpy(masks.area_pixels).to(device),
                n_rows=len(self.concepts),
            )
            self._replicates = (key, weights, weighted_image_sums(weights, table))
        return self._replicates[1], self._replicates[2]


_UNKNOWN = -1e30
"""Stands in for activations that were not kept. Scoring never reads one (only blocks next
to a hot source, which lie in kept neighbourhoods); if it ever did, the pixel would land far
below every cut rather than turn active."""


def segment_ids(counts: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """(sum(counts),) long: i repeated counts[i] times, as ``repeat_interleave`` but a cumsum
    (several times faster on CPU for millions of entries)."""
    counts = counts.long()
    total = int(counts.sum()) if total is None else total
    marks = torch.zeros(total + 1, dtype=torch.long, device=counts.device)
    ends = torch.cumsum(counts, 0)[:-1]
    marks.index_add_(0, ends, torch.ones_like(ends))
    return torch.cumsum(marks[:-1], 0)


@dataclass
class _Candidates:
    """Sparse store of the activations that can still produce active pixels.

    Per candidate map (unit, image): its maximum and how many entries it has; entries
    (position y * w + x, value) follow map after map. Indices are int32 (positions int16
    when the map has at most 32767 pixels); values stay float32, as exactness needs.
    """

    units: torch.Tensor  # (S,) int32
    images: torch.Tensor  # (S,) int32
    maxima: torch.Tensor  # (S,) float32
    counts: torch.Tensor  # (S,) int32 entries per map
    entry_pos: torch.Tensor  # (E,) int16 / int32
    entry_val: torch.Tensor  # (E,) float32

    @staticmethod
    def concat(parts: list["_Candidates"]) -> "_Candidates":
        if len(parts) == 1:
            return parts[0]
        return _Candidates(*(torch.cat([getattr(p, f) for p in parts]) for f in
                             ("units", "images", "maxima", "counts", "entry_pos", "entry_val")))

    def entry_maps(self) -> torch.Tensor:
        """(E,) long: the map of every entry."""
        return segment_ids(self.counts, self.entry_val.numel())

    def offsets(self) -> torch.Tensor:
        """(S + 1,) long: map s's entries are entry_*[offsets[s]:offsets[s + 1]]."""
        return torch.cat([self.counts.new_zeros(1, dtype=torch.long), torch.cumsum(self.counts.long(), 0)])

    def select_maps(self, cut: torch.Tensor) -> "_Candidates":
        """The maps whose maximum is >= cut[unit], with their entries."""
        keep = self.maxima >= cut[self.units.long()]
        if bool(keep.all()):
            return self
        entries = keep[self.entry_maps()]
        return _Candidates(self.units[keep], self.images[keep], self.maxima[keep], self.counts[keep],
                           self.entry_pos[entries], self.entry_val[entries])

    def split(self, n_maps: int) -> tuple["_Candidates", "_Candidates"]:
        """The first n_maps maps (with their entries) and the rest."""
        cut = int(self.counts[:n_maps].long().sum())
        maps = ("units", "images", "maxima", "counts")
        head = [getattr(self, f)[:n_maps] for f in maps] + [self.entry_pos[:cut], self.entry_val[:cut]]
        tail = [getattr(self, f)[n_maps:] for f in maps] + [self.entry_pos[cut:], self.entry_val[cut:]]
        return _Candidates(*head), _Candidates(*tail)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.units, self.images, self.maxima, self.counts,
                                                          self.entry_pos, self.entry_val))


def _neighbourhood(hot: torch.Tensor) -> torch.Tensor:
    """(S, h, w) bool -> pixels within one step (8-connected) of a hot pixel.

    A separable dilation with boolean ORs: cheaper than a float 3x3 max-pool.
    """
    rows = hot.clone()
    rows[:, :, 1:] |= hot[:, :, :-1]
    rows[:, :, :-1] |= hot[:, :, 1:]
    out = rows.clone()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def _sparsify(acts: torch.Tensor, cut: torch.Tensor, images: torch.Tensor, pos_dtype,
              maxima: torch.Tensor | None = None) -> tuple[_Candidates, torch.Tensor]:
    """A batch (B, U, h, w) -> the 3x3 neighbourhoods of its pixels >= cut[unit], for the maps
    that have any; also each entry's unit. Maps come in (image, unit) order. ``maxima``:
    the maps' maxima (B, U) where the caller has them already."""
    b, u, h, w = acts.shape
    maxima = acts.amax(dim=(2, 3)) if maxima is None else maxima
    img_i, unit_i = torch.nonzero(maxima >= cut[None, :], as_tuple=True)
    maps = acts[img_i, unit_i]  # only maps that reach the cut: usually a small share
    s = maps.shape[0]
    keep = _neighbourhood(maps >= cut[unit_i][:, None, None]).view(s, h * w)
    entry_map, entry_pos = torch.nonzero(keep, as_tuple=True)
    part = _Candidates(unit_i.to(torch.int32), images[img_i].to(torch.int32), maxima[img_i, unit_i],
                       torch.bincount(entry_map, minlength=s).to(torch.int32), entry_pos.to(pos_dtype),
                       maps.view(s, h * w)[keep])
    return part, unit_i[entry_map]


def _prune_candidates(c: _Candidates, cut: torch.Tensor, shape: tuple[int, int]) -> _Candidates:
    """Keep the entries within one step of an entry >= cut[unit] of the same map, and the maps
    that still have one (a map keeps its maximum while it is >= cut: it is one of its entries).

    The neighbourhoods are dilated on dense bool grids, a bounded number of maps at a time.
    """
    h, w = shape
    hw = h * w
    entry_map = c.entry_maps()
    map_cut = cut[c.units.long()]
    hot = c.entry_val >= map_cut[entry_map]
    near = torch.zeros_like(hot)
    offsets = c.offsets()
    rows = max(1, (16 << 20) // hw)
    n_maps = c.units.numel()
    starts = list(range(0, n_maps, rows))
    edges = offsets[torch.tensor(starts + [n_maps], device=offsets.device)].tolist()
    for first, lo, hi in zip(starts, edges[:-1], edges[1:]):
        if lo == hi:
            continue
        n = min(rows, n_maps - first)
        flat = (entry_map[lo:hi] - first) * hw + c.entry_pos[lo:hi].long()
        grid = torch.zeros(n * hw, dtype=torch.bool, device=hot.device)
        grid[flat] = hot[lo:hi]  # cells are unique: one entry per (map, position)
        near[lo:hi] = _neighbourhood(grid.view(n, h, w)).view(-1)[flat]
    keep_map = c.maxima >= map_cut
    counts = torch.bincount(entry_map[near], minlength=n_maps)[keep_map].to(torch.int32)
    return _Candidates(c.units[keep_map], c.images[keep_map], c.maxima[keep_map], counts,
                       c.entry_pos[near], c.entry_val[near])


@dataclass
class BilinearGrid:
    """Bilinear upsampling from (h, w) to (mh, mw) as ``F.interpolate(..., align_corners=False)``
    computes it. Per output row: first source row y0 and weights wy0 (for y0) and wy1 (for
    y0 + 1, clipped); the same per column. Output rows that share y0 are contiguous; they
    are cut into *groups* of at most ``tile_h`` rows (group g: source row ``gy_src[g]``,
    rows ``gy_start[g]`` + 0..``gy_count[g]``-1), columns likewise, so that every output
    pixel lies in exactly one (row group, column group) tile of one 2x2 source block.
    """

    wy0: torch.Tensor
    wy1: torch.Tensor
    gy_src: torch.Tensor
    gy_start: torch.Tensor
    gy_count: torch.Tensor
    wx0: torch.Tensor
    wx1: torch.Tensor
    gx_src: torch.Tensor
    gx_start: torch.Tensor
    gx_count: torch.Tensor
    tile_h: int
    tile_w: int

    @staticmethod
    def axis(n_in: int, n_out: int, device) -> tuple:
        # PyTorch's recipe (UpSample.h): scale = in / out, source = max(scale * (dst + 0.5) - 0.5, 0)
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        real = (scale * (torch.arange(n_out, dtype=torch.float32) + 0.5) - 0.5).clamp_min(0)
        first = torch.clamp(real.floor().long(), max=n_in - 1)
        lam = (real - first).clamp(0, 1)
        tile = max(1, math.ceil(n_out / n_in))
        # Runs of equal `first`, cut into groups of at most `tile` outputs.
        starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(first[1:] != first[:-1])[:, 0] + 1])
        lengths = torch.diff(torch.cat([starts, torch.tensor([n_out])]))
        pieces = (lengths + tile - 1) // tile
        run = torch.repeat_interleave(torch.arange(len(starts)), pieces)
        offset = (torch.arange(int(pieces.sum())) - torch.repeat_interleave(torch.cumsum(pieces, 0) - pieces, pieces)) * tile
        g_start = starts[run] + offset
        g_count = torch.minimum(lengths[run] - offset, torch.tensor(tile))
        g_src = first[g_start]
        return tuple(t.to(device) for t in (1 - lam, lam, g_src, g_start, g_count)) + (tile,)

    @classmethod
    def of(cls, shape: tuple[int, int], mask_size: tuple[int, int], device) -> "BilinearGrid":
        *ys, tile_h = cls.axis(shape[0], mask_size[0], device)
        *xs, tile_w = cls.axis(shape[1], mask_size[1], device)
        return cls(*ys, *xs, tile_h, tile_w)


def active_pixels(maps: torch.Tensor, cut: torch.Tensor, grid: BilinearGrid) -> tuple[torch.Tensor, ...]:
    """(map, y, x) of the upsampled pixels >= cut[map], without upsampling whole maps.

    Each output pixel interpolates one 2x2 source block, and the blocks' output pixels
    tile the output (:class:`BilinearGrid`). A block can only give an active pixel if one
    of its sources is >= margin_below(cut) (module docstring), so only those tiles are
    evaluated: their four sources are read once, and the interpolation runs on the tile
    with F.interpolate's weights in a fixed order of operations (so CPU and CUDA agree to
    the bit; F.interpolate itself may differ in the last bit, which TIE_TOLERANCE absorbs
    for tied values).
    """
    n, h, w = maps.shape
    hot = maps >= margin_below(cut)[:, None, None]
    block = hot.clone()  # block (y, x) has source rows y, y + 1 and columns x, x + 1 (clipped)
    block[:, :-1] |= hot[:, 1:]
    block[:, :, :-1] |= block[:, :, 1:].clone()
    tiles = block.index_select(1, grid.gy_src).index_select(2, grid.gx_src)  # (n, row groups, column groups)
    m, gy, gx = torch.nonzero(tiles, as_tuple=True)
    by, bx = grid.gy_src[gy], grid.gx_src[gx]
    v = maps.reshape(-1)
    base = m * (h * w)
    row_a, row_b = base + by * w, base + torch.clamp(by + 1, max=h - 1) * w
    col_a, col_b = bx, torch.clamp(bx + 1, max=w - 1)
    v00, v01, v10, v11 = v[row_a + col_a], v[row_a + col_b], v[row_b + col_a], v[row_b + col_b]
    dev = maps.device
    rows = torch.arange(grid.tile_h, device=dev)
    cols = torch.arange(grid.tile_w, device=dev)
    oy = grid.gy_start[gy][:, None] + rows  # (tiles, tile_h), padded where a group is shorter
    ox = grid.gx_start[gx][:, None] + cols
    valid_y = rows < grid.gy_count[gy][:, None]
    valid_x = cols < grid.gx_count[gx][:, None]
    oy_i = torch.clamp(oy, max=grid.wy0.numel() - 1)
    ox_i = torch.clamp(ox, max=grid.wx0.numel() - 1)
    wx0, wx1 = grid.wx0[ox_i], grid.wx1[ox_i]
    top = v00[:, None] * wx0 + v01[:, None] * wx1  # (tiles, tile_w)
    bottom = v10[:, None] * wx0 + v11[:, None] * wx1
    value = top[:, None, :] * grid.wy0[oy_i][:, :, None] + bottom[:, None, :] * grid.wy1[oy_i][:, :, None]
    on = (value >= cut[m][:, None, None]) & valid_y[:, :, None] & valid_x[:, None, :]
    t_i, r_i, c_i = torch.nonzero(on, as_tuple=True)
    return m[t_i], oy[t_i, r_i], ox[t_i, c_i]


def _densify(c: _Candidates, offsets: torch.Tensor, start: int, stop: int, shape: tuple[int, int]) -> torch.Tensor:
    """Maps start..stop-1 as dense (n, h, w), unkept pixels set to _UNKNOWN."""
    lo, hi = int(offsets[start]), int(offsets[stop])
    local = segment_ids(c.counts[start:stop], hi - lo)
    dense = torch.full((stop - start, shape[0] * shape[1]), _UNKNOWN, device=c.entry_val.device)
    dense[local, c.entry_pos[lo:hi].long()] = c.entry_val[lo:hi]
    return dense.view(stop - start, *shape)


class _MapCountsTensor:
    """Per candidate map (unit, image): its active area and the pixels it shares with each
    concept, as (map, concept, count) triplets; tensor ops on any device, a bounded number
    of maps at a time (dense maps of a chunk, then :func:`active_pixels`)."""

    def __init__(self, cand: _Candidates, cut: torch.Tensor, grid: BilinearGrid, masks: MaskCache, n_concepts: int,
                 map_shape: tuple[int, int]):
        self.cand, self.cut, self.grid, self.masks, self.n_concepts = cand, cut, grid, masks, n_concepts
        self.map_shape = map_shape
        self.offsets = cand.offsets()
        dev = cut.device
        self.label_offsets = torch.from_numpy(masks.label_offsets).to(dev)
        self.label_values = torch.from_numpy(masks.label_values).to(dev)

    def chunks(self):
        mh, mw = self.masks.mask_size
        # Chunks bound the evaluated tiles (~64 MB at worst) and the per-map concept counts.
        chunk = max(1, min(_SCORING_PIXELS // (mh * mw), _SCORING_PIXELS // (4 * (self.n_concepts + 1))))
        n_maps = self.cand.units.numel()
        return [(start, min(start + chunk, n_maps)) for start in range(0, n_maps, chunk)]

    def counts(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        cand, dev, m = self.cand, self.cut.device, self.n_concepts
        u_s, img_s = cand.units[start:stop].long(), cand.images[start:stop].long()
        maps = _densify(cand, self.offsets, start, stop, self.map_shape)
        s_idx, ys, xs = active_pixels(maps, self.cut[u_s], self.grid)
        del maps
        n = stop - start
        area = torch.bincount(s_idx, minlength=n).to(torch.float64)
        counts = torch.zeros(n * (m + 1), dtype=torch.float64, device=dev)
        if s_idx.numel():
            pixel, labels = self.masks.pixel_labels(img_s[s_idx].cpu().numpy(), ys.cpu().numpy(), xs.cpu().numpy())
            keys = s_idx[torch.from_numpy(pixel).to(dev)] * (m + 1) + torch.from_numpy(labels.astype(np.int64)).to(dev)
            counts += torch.bincount(keys, minlength=counts.numel()).to(torch.float64)
        # Whole-image labels: every active pixel of the image intersects them.
        lo = self.label_offsets[img_s]
        n_labels = self.label_offsets[img_s + 1] - lo
        if int(n_labels.sum()):
            rep = torch.repeat_interleave(torch.arange(n, device=dev), n_labels)
            block_start = torch.repeat_interleave(torch.cumsum(n_labels, 0) - n_labels, n_labels)
            concept = self.label_values[lo[rep] + torch.arange(rep.numel(), device=dev) - block_start]
            counts.index_add_(0, rep * (m + 1) + concept + 1, area[rep])
        counts = counts.view(n, m + 1)[:, 1:]
        t_map, t_concept = torch.nonzero(counts, as_tuple=True)
        return area, t_map, t_concept, counts[t_map, t_concept]


class _MapCountsFused:
    """:class:`_MapCountsTensor`'s counts from the fused CPU kernel (same numbers)."""

    _ENTRIES = 1 << 22  # entries per kernel call: bounds the triplet buffers

    def __init__(self, cand: _Candidates, cut: torch.Tensor, grid: BilinearGrid, masks: MaskCache, n_concepts: int,
                 map_shape: tuple[int, int]):
        from . import netdissect_cpu

        self.cpu = netdissect_cpu
        self.cand, self.masks, self.n_concepts, self.map_shape = cand, masks, n_concepts, map_shape
        self.cut, self.hot_cut = cut.numpy(), margin_below(cut).numpy()
        self.axes = [
            (*netdissect_cpu.block_groups(src.numpy(), n_src), start.numpy(), count.numpy(), w0.numpy(), w1.numpy())
            for src, start, count, w0, w1, n_src in (
                (grid.gy_src, grid.gy_start, grid.gy_count, grid.wy0, grid.wy1, map_shape[0]),
                (grid.gx_src, grid.gx_start, grid.gx_count, grid.wx0, grid.wx1, map_shape[1]))]
        self.offsets = cand.offsets().numpy()

    def chunks(self):
        bounds = np.searchsorted(self.offsets, np.arange(0, self.offsets[-1], self._ENTRIES), side="right") - 1
        starts = sorted(set(bounds.tolist()) | {0})
        n_maps = self.cand.units.numel()
        return [(a, b) for a, b in zip(starts, starts[1:] + [n_maps]) if b > a]

    def counts(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        c, masks = self.cand, self.masks
        units, images, maxima, counts = (t[start:stop].numpy() for t in (c.units, c.images, c.maxima, c.counts))
        pos, val, offsets = c.entry_pos.numpy(), c.entry_val.numpy(), self.offsets

        def args(lo: int, hi: int) -> tuple:
            e0, e1 = int(offsets[start + lo]), int(offsets[start + hi])
            return (units[lo:hi], images[lo:hi], maxima[lo:hi], counts[lo:hi], pos[e0:e1], val[e0:e1], self.cut,
                    self.hot_cut,
                    *self.map_shape, *self.axes[0], *self.axes[1], masks.maps, masks.map_offsets,
                    masks.label_offsets, masks.label_values, self.n_concepts)

        ranges = self.cpu.split(stop - start, counts)
        parts = self.cpu.run_split(self.cpu.score, ranges, args)
        area = np.concatenate([p[0] for p in parts])
        t_map = np.concatenate([p[1] + lo for p, (lo, _) in zip(parts, ranges)])
        t_concept, t_count = (np.concatenate([p[i] for p in parts]) for i in (2, 3))
        return (torch.from_numpy(area).double(), torch.from_numpy(t_map), torch.from_numpy(t_concept),
                torch.from_numpy(t_count).double())


def _sparsify_fused(acts: torch.Tensor, maxima: torch.Tensor, cut: torch.Tensor, pending_above: torch.Tensor,
                    images: torch.Tensor, pos_dtype) -> tuple[list[_Candidates], torch.Tensor, torch.Tensor]:
    """:func:`_sparsify` on the CPU, given the maps' maxima (B, U): the neighbourhoods of
    the maps that reach the cut in one kernel pass each, as one part per thread (together,
    the maps in order); also the entries > pending_above[unit] (unit int32, value)."""
    from . import netdissect_cpu

    b, u, h, w = acts.shape
    acts = acts.contiguous()
    img_i, unit_i = torch.nonzero(maxima >= cut[None, :], as_tuple=True)
    flat, maps_image, maps_unit = acts.view(b, u, h * w).numpy(), img_i.numpy(), unit_i.numpy()
    cut_np, pending_np = cut.contiguous().numpy(), pending_above.contiguous().numpy()
    pos_like = torch.empty(0, dtype=pos_dtype).numpy()
    ranges = netdissect_cpu.split(len(maps_image))
    results = netdissect_cpu.run_split(netdissect_cpu.sparsify, ranges, lambda lo, hi: (
        flat, maps_image[lo:hi], maps_unit[lo:hi], cut_np, pending_np, h, w, pos_like))
    map_units, map_images, map_maxima = unit_i.to(torch.int32), images[img_i].to(torch.int32), maxima[img_i, unit_i]
    parts = [_Candidates(map_units[lo:hi], map_images[lo:hi], map_maxima[lo:hi], *(torch.from_numpy(a) for a in r[:3]))
             for (lo, hi), r in zip(ranges, results) if hi > lo]
    pend_unit, pend_val = (torch.from_numpy(np.concatenate([r[i] for r in results])) for i in (3, 4))
    return parts, pend_unit, pend_val


def _prune_fused(c: _Candidates, cut: torch.Tensor, shape: tuple[int, int]) -> _Candidates:
    """:func:`_prune_candidates` in one pass per map on the CPU."""
    from . import netdissect_cpu

    keep_map, counts, entry_pos, entry_val = (torch.from_numpy(a) for a in netdissect_cpu.prune(
        c.units.numpy(), c.maxima.numpy(), c.counts.numpy(), c.entry_pos.numpy(), c.entry_val.numpy(),
        cut.contiguous().numpy(), *shape))
    return _Candidates(c.units[keep_map], c.images[keep_map], c.maxima[keep_map], counts[keep_map], entry_pos, entry_val)


class _IoUAccumulator(LayerAccumulator):
    min_merge = 64
    """Pending values per unit that trigger a top-K merge at the least (tests lower it)."""
    prune_share = 0.1
    prune_per_unit = 8
    """Each batch re-prunes ``prune_share`` times the entries it added plus
    ``prune_per_unit`` per unit, oldest first (``_rolling_prune``)."""
    backend = "auto"
    """``auto``: the fused kernels on a CPU, tensor ops elsewhere; ``tensor``: tensor ops
    everywhere (the tests run both; their results are bit-identical)."""
    speculation = 2.0
    speculation_slack_images = 1
    """The speculative keep cut (module docstring): the value of rank ``speculation * K * f
    + speculation_slack_images * h * w`` among the values seen (f: the share of the probe
    seen). 0 turns it off."""

    def __init__(self, det: NetDissect, layer: str, n_units: int):
        self.det = det
        self.layer = layer
        self.n_units = n_units
        self.n_images = len(det.probe)
        self.top: torch.Tensor | None = None  # (U, K) the K largest values merged so far, any order
        self.bound: torch.Tensor | None = None  # (U,) K-th largest merged value (-inf until K were seen)
        self.floor: torch.Tensor | None = None  # (U,) running minimum
        self.k = 0
        self.n_values = 0  # values per unit over the whole probe set
        self.n_seen = 0
        self.pending_units: list[torch.Tensor] = []  # values above the bound, not merged yet
        self.pending_values: list[torch.Tensor] = []
        self.pending_count: torch.Tensor | None = None  # (U,)
        self.parts: list[_Candidates] = []  # the only activations kept between batches
        self.entries = 0
        self.store_bytes = 0  # sum of the parts' nbytes, kept up to date (summing ~1,000 parts per batch was slow)
        self.merged_values = 0  # values that ever entered the top-K merge (the linear-cost claim)
        self.peak = {"top_values": 0, "pending": 0, "candidates": 0}
        self.speculative: torch.Tensor | None = None  # (U,) speculative keep cut now (-inf: none)
        self.speculated: torch.Tensor | None = None  # (U,) the highest speculative cut used
        self.retry: _IoUAccumulator | None = None  # the units whose speculation failed, a second pass
        self.retry_units: torch.Tensor | None = None

    # ------------------------------------------------------------------ streaming

    def _start(self, acts: torch.Tensor) -> None:
        _, u, h, w = acts.shape
        dev = acts.device
        self.n_values = self.n_images * h * w
        self.k = quantile_keep_count(self.n_values, self.det.quantile)
        self.top = torch.full((u, self.k), -math.inf, device=dev)
        self.bound = torch.full((u,), -math.inf, device=dev)
        self.floor = torch.full((u,), math.inf, device=dev)
        self.pending_count = torch.zeros(u, dtype=torch.long, device=dev)
        self.map_shape = (h, w)
        self.pos_dtype = torch.int16 if h * w <= 32767 else torch.int32
        self.merge_at = max(self.k // 4, self.min_merge)
        self.speculative = torch.full((u,), -math.inf, device=dev)
        self.speculated = self.speculative.clone()

    def _fused(self, device: torch.device) -> bool:
        """Whether this accumulator runs the fused CPU kernels (:mod:`.netdissect_cpu`)."""
        if self.backend not in ("auto", "tensor"):
            raise DetectorError(f"netdissect backend {self.backend!r}: expected auto or tensor")
        return device.type == "cpu" and self.backend != "tensor"

    def _keep_cut(self) -> torch.Tensor:
        """Values an entry needs to be worth keeping now: m(m(bound)), or the speculative cut
        where that is higher (module docstring)."""
        return torch.maximum(margin_below(margin_below(self.bound)), self.speculative)

    def _speculate(self) -> None:
        """Refresh the speculative cut from the top values merged so far."""
        h, w = self.map_shape
        rank = math.ceil(self.speculation * self.k * self.n_seen / self.n_values) + self.speculation_slack_images * h * w
        if not self.speculation or rank >= self.k or bool(torch.isinf(self.bound).any()):
            self.speculative.fill_(-math.inf)
            return
        value = self.top.topk(rank, dim=1, sorted=False).values.amin(dim=1)  # the rank-th largest
        self.speculative = margin_below(margin_below(value))
        self.speculated = torch.maximum(self.speculated, self.speculative)

    def needs_another_pass(self) -> bool:
        """Whether a speculative cut was too high for some units; if so, set up their second
        pass (the next ``add`` calls feed it) and say so once."""
        if self.retry is not None or self.top is None:
            return False
        self._merge()
        cut = active_cut(self._own_thresholds(), self.floor)
        failed = (self.speculated > self.bound) | (self.speculated > margin_below(cut))
        if not bool(failed.any()):
            return False
        self.retry_units = torch.nonzero(failed).squeeze(1)
        self.retry = _IoUAccumulator(self.det, self.layer, int(self.retry_units.numel()))
        self.retry.speculation = 0.0
        self.det.ctx.log(f"layer {self.layer}: {self.retry_units.numel()} of {self.n_units} units reached their top "
                         f"values late in the probe order; dissecting them again in a second pass")
        return True

    def add(self, acts: torch.Tensor, index: torch.Tensor) -> None:
        self.add_with_extrema(acts, index, None)

    def add_with_extrema(self, acts: torch.Tensor, index: torch.Tensor, extrema: MapExtrema | None) -> None:
        if acts.dim() == 2:  # a linear unit has no extent: its value covers the whole image
            acts = acts[:, :, None, None]
        if acts.dim() != 4:
            raise DetectorError(
                f"layer {self.layer}: netdissect needs maps (N, C, H, W) or linear outputs (N, C), got shape "
                f"{tuple(acts.shape)}; use detector clip-dissect for this layer"
            )
        acts = acts.float()
        extrema = MapExtrema.of(acts) if extrema is None else extrema
        if self.retry is not None:  # the second pass: only the units that need it
            units = self.retry_units.to(acts.device)
            self.retry.add_with_extrema(acts[:, units], index, MapExtrema(extrema.map_max[:, units],
                                                                          extrema.unit_min[units]))
            return
        b, u, h, w = acts.shape
        if self.top is None:
            self._start(acts)
        elif (u, h, w) != (self.top.shape[0], *self.map_shape):
            raise DetectorError(f"layer {self.layer}: activations changed shape mid-pass to {tuple(acts.shape)}")
        self.n_seen += b * h * w
        if self.n_seen > self.n_values:
            raise DetectorError(f"layer {self.layer}: more activations than the probe set's {self.n_images} images")
        fused = self._fused(acts.device)
        self.floor = torch.minimum(self.floor, extrema.unit_min.float())
        filling = bool(torch.isinf(self.bound).any())
        if filling:  # fewer than K values merged yet: every value counts, merge the batch whole
            self._merge()
            merged = torch.cat([self.top, acts.transpose(0, 1).reshape(u, -1)], dim=1)
            self.top = merged.topk(self.k, dim=1, sorted=False).values
            self.bound = self.top.amin(dim=1)
            self.merged_values += b * h * w * u
            self._speculate()
        # Every value above the bound and >= the speculative cut is >= the keep cut, so among
        # the entries: those are the pending values (none while filling: the batch was merged
        # whole). A value below a speculative cut can only be in the final top K if the
        # speculation fails, and then the unit is redone (needs_another_pass).
        pending_above = torch.maximum(self.bound, torch.nextafter(self.speculative, torch.full_like(
            self.speculative, -math.inf)))
        if filling:
            pending_above = torch.full_like(self.bound, math.inf)
        maxima = extrema.map_max.float()
        if fused:
            parts, pending_units, pending_values = _sparsify_fused(
                acts, maxima, self._keep_cut(), pending_above, index, self.pos_dtype)
        else:
            part, entry_unit = _sparsify(acts, self._keep_cut(), index.to(acts.device), self.pos_dtype, maxima)
            above = part.entry_val > pending_above[entry_unit]
            pending_units, pending_values, parts = entry_unit[above].to(torch.int32), part.entry_val[above], [part]
        parts = [part for part in parts if part.units.numel()]
        self.parts += parts
        added = sum(part.entry_val.numel() for part in parts)
        self.entries += added
        self.store_bytes += sum(part.nbytes() for part in parts)
        if pending_values.numel():
            self.pending_units.append(pending_units)
            self.pending_values.append(pending_values)
            self.pending_count += torch.bincount(pending_units.long(), minlength=u)
        self._note_peak()
        if int(self.pending_count.max()) >= self.merge_at:
            self._merge()
        self._rolling_prune(int(added * self.prune_share) + self.n_units * self.prune_per_unit, fresh=len(parts))

    def _merge(self) -> None:
        """Fold the pending values into the per-unit top K and raise the bound."""
        if not self.pending_values:
            return
        units = torch.cat(self.pending_units)
        values = torch.cat(self.pending_values)
        self.pending_units, self.pending_values = [], []
        counts, self.pending_count = self.pending_count, torch.zeros_like(self.pending_count)
        if values.numel() == 0:
            return
        self.merged_values += values.numel()
        block = torch.empty((self.top.shape[0], self.k + int(counts.max())), device=self.top.device)
        block[:, : self.k] = self.top
        block[:, self.k:] = -math.inf
        if self._fused(block.device):  # each unit's values after its top K, in one pass
            from . import netdissect_cpu

            netdissect_cpu.append_rows(block.numpy(), self.k, units.numpy(), values.numpy())
        else:
            order = torch.argsort(units.long(), stable=True)
            units, values = units[order].long(), values[order]
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(units.numel(), device=units.device) - starts[units]
            block[units, self.k + slot] = values
        self.top = block.topk(self.k, dim=1, sorted=False).values
        self.bound = self.top.amin(dim=1)
        self._speculate()

    def _rolling_prune(self, budget: int, fresh: int) -> None:
        """Re-prune the oldest ``budget`` stored entries against the current keep cut (not
        the ``fresh`` parts this batch just added).

        The parts form a queue of maps, oldest first; pruned maps go to the back. Each batch
        thus re-checks a share of what it added (``prune_share``, plus ``prune_per_unit``
        per unit): work per batch stays proportional to the batch (no full re-prune whose
        cost grows with the images seen). With the speculative cut, stored entries were
        mostly kept at a cut close to the final one, so re-checking finds little to drop.
        Measured in one session (scripts/bench_netdissect.py): on the wide CNN at 8,000
        images, 15 % of the re-checked entries were dropped, and re-checking 0.5x (+64 per
        unit) against 0.1x (+8) of the added entries took dissect from 1.64x to 1.75x of the
        bare pass; on ResNet-18 layers 2-4 shaped activations at 16,000 images, the peak
        store grew from 695 to 764 MB (833 MB with no re-pruning) at the same CPU time.
        """
        taken, left = [], budget
        while left > 0 and len(self.parts) > fresh:  # the newest parts were just built with this cut
            first = self.parts[0]
            size = first.entry_val.numel()
            if size <= left:
                taken.append(self.parts.pop(0))
                left -= size
            else:
                n_maps = int(torch.searchsorted(first.offsets(), left)) or 1
                head, self.parts[0] = first.split(n_maps)
                taken.append(head)
                left = 0
        if taken:
            before = sum(p.entry_val.numel() for p in taken)
            prune = _prune_fused if self._fused(self.top.device) else _prune_candidates
            pruned = prune(_Candidates.concat(taken), self._keep_cut(), self.map_shape)
            self.parts.append(pruned)
            self.entries += pruned.entry_val.numel() - before
            self.store_bytes += pruned.nbytes() - sum(p.nbytes() for p in taken)

    def _note_peak(self) -> None:
        for key, value in self._state().items():
            self.peak[key] = max(self.peak[key], value)

    def _state(self) -> dict:
        top = self.top.numel() * self.top.element_size() if self.top is not None else 0
        pending = sum(t.numel() * t.element_size() for t in self.pending_units + self.pending_values)
        return {"top_values": top, "pending": pending, "candidates": self.store_bytes}

    def state_bytes(self) -> dict:
        """Memory held between batches now (top-K values, pending values, sparse candidates),
        its peak so far (``peak_*``), K, the candidate value count and how many values ever
        entered the top-K merge."""
        now = self._state()
        return {**now, "total": sum(now.values()), **{f"peak_{k}": v for k, v in self.peak.items()},
                "k": self.k, "candidate_values": self.entries, "merged_values": self.merged_values,
                "pending_values": sum(t.numel() for t in self.pending_values)}

    def thresholds(self) -> torch.Tensor:
        """Exact per-unit T from every value added so far (second-pass units from that pass)."""
        own = self._own_thresholds()
        if self.retry is not None:
            own[self.retry_units.to(own.device)] = self.retry.thresholds()
        return own

    def _own_thresholds(self) -> torch.Tensor:
        self._merge()
        top = self.top
        k_seen = quantile_keep_count(self.n_seen, self.det.quantile)
        if k_seen < self.k:  # fewer images than the probe set (only when called directly)
            top = top.topk(k_seen, dim=1, sorted=False).values
        return threshold_from_top(top, self.n_seen, self.det.quantile)

    # ------------------------------------------------------------------ scoring

    def scores(self) -> LayerScores:
        if self.top is None:
            raise DetectorError(f"layer {self.layer}: no activations were recorded")
        if self.retry is None and self.needs_another_pass():
            raise DetectorError(f"layer {self.layer}: {self.retry_units.numel()} units need a second pass over the "
                                f"probe set before scoring (feed the same batches to add() again)")
        own = self._own_scores()
        if self.retry is None:
            return own
        units, again = self.retry_units.to(own.scores.device), self.retry.scores()
        rows = {}
        for field in dataclasses.fields(LayerScores):
            mine, theirs = getattr(own, field.name), getattr(again, field.name)
            if mine is not None and theirs is not None:
                mine = mine.clone()
                mine[units] = theirs.to(mine.dtype)
            rows[field.name] = mine
        return LayerScores(**rows)

    def _own_scores(self) -> LayerScores:
        det = self.det
        if det.masks is None:
            det.prepare()
        masks = det.masks
        n_concepts = len(det.concepts)
        n_cat = max(len(det.probe.category_names), 1)
        replicates = det.ctx.trust.replicates
        dev = self.top.device
        cut = active_cut(self._own_thresholds(), self.floor)
        # No final entry-level prune: active_pixels reads only blocks next to a source >=
        # margin_below(cut), whose neighbourhoods the store kept (every keep cut so far was
        # below that). Maps whose maximum is below that cannot give an active pixel: drop them.
        # (The fused kernel skips such maps as cheaply as select_maps would find them.)
        fused = self._fused(dev)
        if self.parts:
            cand = _Candidates.concat(self.parts)
            self.parts = [cand if fused else cand.select_maps(margin_below(cut))]
            self.store_bytes = self.parts[0].nbytes()
        inter = torch.zeros(self.n_units, n_concepts, dtype=torch.float64, device=dev)
        act_area = torch.zeros(self.n_units, n_cat, dtype=torch.float64, device=dev)
        total_area = torch.zeros(self.n_units, dtype=torch.float64, device=dev)
        if replicates:  # replicate sums, exact in float64: (U * M, B) and (U * n_cat, B)
            weights, label_rep = det.replicates(dev)
            rep_inter = torch.zeros(self.n_units * n_concepts, replicates, dtype=torch.float64, device=dev)
            rep_area = torch.zeros(self.n_units * n_cat, replicates, dtype=torch.float64, device=dev)
        if self.parts:
            cand = self.parts[0]
            present = torch.from_numpy(masks.categories_present).to(dev).to(torch.float64)
            count_maps = _MapCountsFused if fused else _MapCountsTensor
            counter = count_maps(cand, cut, BilinearGrid.of(self.map_shape, masks.mask_size, dev), masks, n_concepts,
                                 self.map_shape)
            for start, stop in counter.chunks():
                u_s, img_s = cand.units[start:stop].long(), cand.images[start:stop].long()
                area, t_map, t_concept, t_count = counter.counts(start, stop)
                cell = u_s[t_map] * n_concepts + t_concept
                inter.view(-1).index_add_(0, cell, t_count)
                total_area.index_add_(0, u_s, area)
                by_cat = area[:, None] * present[img_s]  # areas where the category is annotated
                act_area.index_add_(0, u_s, by_cat)
                if replicates:
                    add_weighted_image_sums(rep_inter, weights, CountTable(
                        cell, img_s[t_map], t_count, rep_inter.shape[0]))
                    m_i, k_i = torch.nonzero(by_cat, as_tuple=True)
                    add_weighted_image_sums(rep_area, weights, CountTable(
                        u_s[m_i] * n_cat + k_i, img_s[m_i], by_cat[m_i, k_i], rep_area.shape[0]))
        label_area = torch.from_numpy(masks.label_area).to(dev)
        iou = iou_from_counts(inter, act_area, label_area, det._concept_category.to(dev)).float()
        dead = total_area == 0
        if not replicates:
            return LayerScores(scores=iou, dead=dead)
        reported = rank_concepts(iou, 1)[1][:, 0]
        rep_inter = rep_inter.view(self.n_units, n_concepts, replicates)
        rep_area = rep_area.view(self.n_units, n_cat, replicates)
        category = det._concept_category.to(dev)
        confidence, low, high = (torch.zeros(self.n_units, device=dev) for _ in range(3))
        per_chunk = max(1, _BOOTSTRAP_VALUES // (replicates * n_concepts))  # bounds B x units x M
        for u0 in range(0, self.n_units, per_chunk):
            u1 = min(u0 + per_chunk, self.n_units)
            confidence[u0:u1], low[u0:u1], high[u0:u1] = bootstrap_labels(
                rep_inter[u0:u1], rep_area[u0:u1], label_rep, category, reported[u0:u1])
        zero = torch.zeros_like(confidence)
        return LayerScores(scores=iou, dead=dead, confidence=torch.where(dead, zero, confidence),
                           score_low=torch.where(dead, zero, low), score_high=torch.where(dead, zero, high))
