"""Network Dissection (Bau et al.): IoU between thresholded unit maps and concept masks.

Exact and single-pass. The per-unit threshold T is the exact (1 - quantile) quantile of
all the unit's activation values over the probe set, which is only known at the end.
Two facts make one forward pass enough:

* the quantile needs only each unit's top ``K = n - floor((1 - q)(n - 1))`` values, kept
  in a streaming top-K buffer; its smallest entry is a running *lower bound* on T;
* a bilinearly upsampled pixel is a convex combination of source activations, so a map
  whose maximum is <= T has no active pixel at all.

So during the pass we keep, for maps whose maximum exceeds the running bound, only the
3x3 neighbourhoods of their above-bound pixels (pruned as the bound rises), and compute
the IoUs once T is exact. Memory stays proportional to the kept top values, never to all
activation maps.
Probe masks are decoded once per probe set into a memory-mapped cache.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError, DetectorOptions
from .. import store
from ..store import write_json
from . import register_detector
from .base import Detector, DetectorError, LayerAccumulator

CACHE_FORMAT = 1


# ----------------------------------------------------------------------------- pure maths


def quantile_keep_count(n_values: int, quantile: float) -> int:
    """How many top values determine the (1 - quantile) quantile of n values exactly."""
    lo = math.floor((1.0 - quantile) * (n_values - 1))
    return n_values - lo


def threshold_from_top(top_desc: torch.Tensor, n_values: int, quantile: float) -> torch.Tensor:
    """Exact (1 - quantile) quantile (linear interpolation, as numpy's default) per row of the
    descending top-K values ``top_desc`` (U, K) with K = quantile_keep_count(n_values, quantile)."""
    pos = (1.0 - quantile) * (n_values - 1)
    lo = math.floor(pos)
    frac = pos - lo
    k = n_values - lo
    v_lo = top_desc[:, k - 1]
    if frac == 0 or k < 2:
        return v_lo.clone()
    v_hi = top_desc[:, k - 2]
    return v_lo + frac * (v_hi - v_lo)


def iou_from_counts(
    intersection: torch.Tensor, act_area: torch.Tensor, label_area: torch.Tensor, concept_category: torch.Tensor
) -> torch.Tensor:
    """IoU[u, c] = I / (A[u, cat(c)] + L[c] - I), 0 where the union is empty.

    intersection (U, M); act_area (U, n_categories); label_area (M,); concept_category (M,) long.
    """
    union = act_area[:, concept_category] + label_area[None, :] - intersection
    return torch.where(union > 0, intersection / union.clamp_min(1e-12), torch.zeros_like(union))


# ----------------------------------------------------------------------------- probe masks cache


@dataclass
class MaskCache:
    """Every probe image's labels, decoded once: pixel maps (N, n_maps, h, w) memory-mapped."""

    pixel_maps: np.ndarray
    label_offsets: np.ndarray  # CSR over images: image i's whole-image labels are
    label_values: np.ndarray  # label_values[label_offsets[i]:label_offsets[i + 1]]
    categories_present: np.ndarray  # (N, n_categories) bool
    label_area: np.ndarray  # (M,) float64 pixels per concept over the probe set

    @property
    def mask_size(self) -> tuple[int, int]:
        return tuple(self.pixel_maps.shape[2:])


def build_mask_cache(probe, folder: Path, log=lambda m: None) -> MaskCache:
    """Decode every annotation of ``probe`` into ``folder`` (reused when complete).

    Built in a private temporary folder and renamed into place, so concurrent shards
    that race to build the same cache never see each other's half-written files.
    """
    folder = Path(folder)
    if (folder / "meta.json").exists():
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") == CACHE_FORMAT:
            return _open_mask_cache(folder, meta)
        shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        meta = _write_mask_cache(probe, tmp, log)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: use its (identical) cache
            if not (folder / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _open_mask_cache(folder, meta)


def _write_mask_cache(probe, folder: Path, log) -> dict:
    n = len(probe)
    h, w = probe.mask_size
    m = len(probe.concepts)
    k = len(probe.category_names)
    log(f"decoding masks of {n} probe images (once per probe set) ...")
    annotations = []
    n_maps = 0
    # All annotations first: the widest stack of maps sizes the memmap.
    for i in range(n):
        a = probe.load_annotation(i)
        if a.pixel_maps.shape[1:] != (h, w) and a.pixel_maps.shape[0] > 0:
            raise DetectorError(
                f"{probe.relpath(i)}: masks are {a.pixel_maps.shape[1:]}, expected {(h, w)} like the rest of the probe set"
            )
        n_maps = max(n_maps, a.pixel_maps.shape[0])
        annotations.append(a)
    dtype = np.int16 if m < 32767 else np.int32
    arr = np.lib.format.open_memmap(folder / "pixel_maps.npy", mode="w+", dtype=dtype, shape=(n, max(n_maps, 1), h, w))
    label_area = np.zeros(m + 1, dtype=np.float64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    values, present = [], np.zeros((n, k), dtype=bool)
    for i, a in enumerate(annotations):
        arr[i] = 0
        if a.pixel_maps.shape[0]:
            arr[i, : a.pixel_maps.shape[0]] = a.pixel_maps
            label_area += np.bincount(a.pixel_maps.reshape(-1), minlength=m + 1)[: m + 1]
        labels = np.unique(np.asarray(a.image_labels, dtype=np.int64))
        values.append(labels)
        offsets[i + 1] = offsets[i] + len(labels)
        np.add.at(label_area, labels + 1, float(h * w))
        present[i] = a.categories_present
    arr.flush()
    del arr
    np.save(folder / "label_offsets.npy", offsets)
    np.save(folder / "label_values.npy", np.concatenate(values) if values else np.zeros(0, np.int64))
    np.save(folder / "categories_present.npy", present)
    np.save(folder / "label_area.npy", label_area[1:])
    meta = {"format": CACHE_FORMAT, "n_images": n, "fingerprint": probe.fingerprint()}
    write_json(folder / "meta.json", meta)
    return meta


def _open_mask_cache(folder: Path, meta: dict) -> MaskCache:
    return MaskCache(
        pixel_maps=np.load(folder / "pixel_maps.npy", mmap_mode="r"),
        label_offsets=np.load(folder / "label_offsets.npy"),
        label_values=np.load(folder / "label_values.npy"),
        categories_present=np.load(folder / "categories_present.npy"),
        label_area=np.load(folder / "label_area.npy"),
    )


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

    def __init__(self, options, probe, concepts, ctx):
        super().__init__(options, probe, concepts, ctx)
        self.quantile = self.options.quantile
        self.masks: MaskCache | None = None
        cats = list(probe.category_names)
        self._concept_category = torch.tensor(
            [cats.index(c) if c in cats else 0 for c in probe.concepts.categories], dtype=torch.long
        )


    def prepare(self) -> None:
        folder = store.mask_cache_dir(self.ctx.cache_dir, self.probe.fingerprint())
        self.masks = build_mask_cache(self.probe, folder, self.ctx.log)

    def accumulator(self, layer: str, n_units: int) -> LayerAccumulator:
        if self.masks is None:
            self.prepare()
        return _IoUAccumulator(self, layer, n_units)


_UNKNOWN = -1e30
"""Stands in for activations that were not kept; any interpolation that gives it weight
lands far below every threshold (see _Candidates)."""


@dataclass
class _Candidates:
    """Sparse store of the activations that can still produce active pixels.

    Per candidate map (unit, image) we keep only the 3x3 neighbourhoods of its source
    pixels above the running bound. That is enough for an exact upsampling: an output
    pixel's bilinear sources form a 2x2 block, so if one of them exceeds the final
    threshold (which is >= every earlier bound) all four lie in that pixel's kept
    neighbourhood; an output pixel with no such source cannot be active, and if it
    touches an unkept source its value falls to ~_UNKNOWN. Entries are ordered by map.
    """

    units: torch.Tensor  # (S,) per map
    images: torch.Tensor  # (S,)
    maxima: torch.Tensor  # (S,)
    entry_map: torch.Tensor  # (E,) index into the maps, non-decreasing
    entry_pos: torch.Tensor  # (E,) y * w + x
    entry_val: torch.Tensor  # (E,)

    @staticmethod
    def concat(parts: list["_Candidates"]) -> "_Candidates":
        offsets, total = [], 0
        for part in parts:
            offsets.append(total)
            total += part.units.numel()
        return _Candidates(
            torch.cat([p.units for p in parts]),
            torch.cat([p.images for p in parts]),
            torch.cat([p.maxima for p in parts]),
            torch.cat([p.entry_map + o for p, o in zip(parts, offsets)]),
            torch.cat([p.entry_pos for p in parts]),
            torch.cat([p.entry_val for p in parts]),
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.units, self.images, self.maxima, self.entry_map,
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


def _sparsify(maps: torch.Tensor, bound: torch.Tensor, units, images, maxima) -> _Candidates:
    s = maps.shape[0]
    keep = _neighbourhood(maps > bound[:, None, None]).view(s, -1)
    entry_map, entry_pos = torch.nonzero(keep, as_tuple=True)
    return _Candidates(units, images, maxima, entry_map, entry_pos.to(torch.int32),
                       maps.view(s, -1)[entry_map, entry_pos])


def _densify(c: _Candidates, start: int, stop: int, shape: tuple[int, int]) -> torch.Tensor:
    """Maps start..stop-1 as dense (n, h, w), unkept pixels set to _UNKNOWN."""
    lo, hi = torch.searchsorted(c.entry_map, torch.tensor([start, stop], device=c.entry_map.device)).tolist()
    dense = torch.full((stop - start, shape[0] * shape[1]), _UNKNOWN, device=c.entry_val.device)
    dense[c.entry_map[lo:hi] - start, c.entry_pos[lo:hi].long()] = c.entry_val[lo:hi]
    return dense.view(stop - start, *shape)


class _IoUAccumulator(LayerAccumulator):
    def __init__(self, det: NetDissect, layer: str, n_units: int):
        self.det = det
        self.layer = layer
        self.n_units = n_units
        self.device = det.ctx.device
        self.n_images = len(det.probe)
        self.top: torch.Tensor | None = None  # (U, K) descending
        self.k = 0
        self.n_values = 0
        self.parts: list[_Candidates] = []  # the only activations kept between batches
        self.entries = 0
        self.entries_at_prune = 0

    def _bound(self) -> torch.Tensor:
        """Running lower bound on each unit's final threshold (-inf until K values were seen)."""
        return self.top[:, self.k - 1]

    def add(self, acts: torch.Tensor, index: torch.Tensor) -> None:
        if acts.dim() == 2:  # a linear unit has no extent: its value covers the whole image
            acts = acts[:, :, None, None]
        if acts.dim() != 4:
            raise DetectorError(
                f"layer {self.layer}: netdissect needs maps (N, C, H, W) or linear outputs (N, C), got shape "
                f"{tuple(acts.shape)}; use detector clip-dissect for this layer"
            )
        acts = acts.float()
        b, u, h, w = acts.shape
        if self.top is None:
            self.n_values = self.n_images * h * w
            self.k = quantile_keep_count(self.n_values, self.det.quantile)
            self.top = torch.full((u, self.k), -math.inf, device=acts.device)
            self.map_shape = (h, w)
        flat = acts.permute(1, 0, 2, 3).reshape(u, b * h * w)
        merged = torch.cat([self.top, flat], dim=1)
        self.top = merged.topk(min(self.k, merged.shape[1]), dim=1, sorted=True).values
        if self.top.shape[1] < self.k:  # fewer values seen than K so far
            pad = torch.full((u, self.k - self.top.shape[1]), -math.inf, device=acts.device)
            self.top = torch.cat([self.top, pad], dim=1)

        bound = self._bound()
        maxima = acts.amax(dim=(2, 3))  # (B, U)
        img_i, unit_i = torch.nonzero(maxima > bound[None, :], as_tuple=True)
        if img_i.numel():
            part = _sparsify(acts[img_i, unit_i], bound[unit_i], unit_i, index.to(acts.device)[img_i],
                             maxima[img_i, unit_i])
            self.parts.append(part)
            self.entries += part.entry_val.numel()
        if self.entries > 2 * max(self.entries_at_prune, self.n_units * 64):
            self._prune(bound)

    def _prune(self, bound: torch.Tensor) -> None:
        """Drop maps whose maximum no longer beats the bound, and pixels no longer near a hot one."""
        if not self.parts:
            return
        c = _Candidates.concat(self.parts)
        keep_map = c.maxima > bound[c.units]
        new_index = torch.cumsum(keep_map, 0) - 1
        hot_entry = c.entry_val > bound[c.units[c.entry_map]]
        # Neighbourhoods of the still-hot pixels, per map, on a dense bool grid.
        h, w = self.map_shape
        hot = torch.zeros(c.units.numel(), h * w, dtype=torch.bool, device=c.units.device)
        hot[c.entry_map[hot_entry], c.entry_pos[hot_entry].long()] = True
        near = _neighbourhood(hot.view(-1, h, w)).view(-1, h * w)
        keep_entry = keep_map[c.entry_map] & near[c.entry_map, c.entry_pos.long()]
        self.parts = [_Candidates(
            c.units[keep_map], c.images[keep_map], c.maxima[keep_map],
            new_index[c.entry_map[keep_entry]], c.entry_pos[keep_entry], c.entry_val[keep_entry],
        )]
        self.entries = self.entries_at_prune = int(keep_entry.sum())

    def state_bytes(self) -> dict:
        """Memory held between batches: the top-K buffer and the sparse candidates."""
        top = self.top.numel() * self.top.element_size() if self.top is not None else 0
        cand = sum(p.nbytes() for p in self.parts)
        return {"top_values": top, "candidates": cand, "k": self.k, "candidate_values": self.entries}

    def thresholds(self) -> torch.Tensor:
        return threshold_from_top(self.top, self.n_values, self.det.quantile)

    def scores(self) -> torch.Tensor:
        det, masks = self.det, self.det.masks
        n_concepts = len(det.concepts)
        n_cat = max(len(det.probe.category_names), 1)
        dev = self.device
        if self.top is None:
            raise DetectorError(f"layer {self.layer}: no activations were recorded")
        thresh = self.thresholds()
        self._prune(thresh)  # maps whose maximum is <= T cannot have an active pixel
        inter = torch.zeros(self.n_units * (n_concepts + 1), dtype=torch.float64, device=dev)
        act_area = torch.zeros(self.n_units, n_cat, dtype=torch.float64, device=dev)
        if self.parts:
            cand = self.parts[0]
            units, images = cand.units, cand.images
            mh, mw = masks.mask_size
            present = torch.from_numpy(masks.categories_present).to(dev)
            offsets = torch.from_numpy(masks.label_offsets).to(dev)
            values = torch.from_numpy(masks.label_values).to(dev)
            # Chunks bound the memory of the upsampled maps (~64 MB of floats each).
            chunk = max(1, (16 << 20) // (mh * mw))
            for start in range(0, units.numel(), chunk):
                stop = min(start + chunk, units.numel())
                u_s, img_s = units[start:stop], images[start:stop]
                maps = _densify(cand, start, stop, self.map_shape)
                up = F.interpolate(maps[:, None], size=(mh, mw), mode="bilinear", align_corners=False)[:, 0]
                del maps
                # Only the few active pixels matter from here on: work on their coordinates.
                s_idx, ys, xs = torch.nonzero(up > thresh[u_s][:, None, None], as_tuple=True)
                del up
                area = torch.bincount(s_idx, minlength=u_s.numel()).to(torch.float64)
                act_area.index_add_(0, u_s, area[:, None] * present[img_s].to(torch.float64))
                if s_idx.numel():
                    labels = masks.pixel_maps[img_s[s_idx].cpu().numpy(), :, ys.cpu().numpy(), xs.cpu().numpy()]
                    labels = torch.from_numpy(labels.astype(np.int64)).to(dev)  # (n_active, n_maps)
                    bins = (u_s[s_idx] * (n_concepts + 1))[:, None] + labels
                    inter += torch.bincount(bins[labels > 0], minlength=inter.numel()).to(torch.float64)
                # Whole-image labels: every active pixel of the image intersects them.
                counts = offsets[img_s + 1] - offsets[img_s]
                if int(counts.sum()):
                    rep = torch.repeat_interleave(torch.arange(u_s.numel(), device=dev), counts)
                    block_start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
                    concept = values[offsets[img_s][rep] + torch.arange(rep.numel(), device=dev) - block_start]
                    inter.index_add_(0, u_s[rep] * (n_concepts + 1) + concept + 1, area[rep])
        inter = inter.view(self.n_units, n_concepts + 1)[:, 1:]
        label_area = torch.from_numpy(masks.label_area).to(dev)
        iou = iou_from_counts(inter, act_area, label_area, det._concept_category.to(dev))
        return iou.float()
