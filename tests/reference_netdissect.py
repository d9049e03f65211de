"""Brute-force Network Dissection with everything in memory, for the tests to compare with.

The same rule as :mod:`conceptmon.detectors.netdissect`, written the obvious way: numpy's
quantile and minimum over all values of a unit, full bilinear upsampling of every map,
loops over units and images, float64 sums. No streaming, no sparse store, no bound.

Rule: T = (1 - q) quantile, floor = minimum, tol = TIE_TOLERANCE * max(|T|, tiny);
active = up >= T - tol when T - tol > floor, else up > T + tol; dead = no active pixel.

``up`` is bilinear upsampling with F.interpolate's weights (align_corners=False), summed in
the detector's fixed order: (v00 wx0 + v01 wx1) wy0 + (v10 wx0 + v11 wx1) wy1 in float32.
F.interpolate itself rounds some sums differently in the last bit (see
test_reference_upsampling_is_bilinear), which would make exact comparisons flaky.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conceptmon.detectors.netdissect import TIE_TOLERANCE

TINY = float(np.finfo(np.float32).tiny)


@dataclass
class ReferenceCounts:
    """Per-image counts: inter (U, N, M), area (U, N), labels (N, M), present (N, n_cat)."""

    inter: np.ndarray
    area: np.ndarray
    labels: np.ndarray
    present: np.ndarray
    concept_category: np.ndarray
    thresholds: np.ndarray
    floors: np.ndarray


def bilinear_axis(n_in: int, n_out: int):
    """First source index, second (clipped) and their weights per output index (float32)."""
    scale = np.float32(n_in / n_out)
    real = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    first = np.minimum(np.floor(real).astype(np.int64), n_in - 1)
    lam = np.clip(real - first.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    second = np.where(first < n_in - 1, first + 1, first)
    return first, second, (np.float32(1) - lam).astype(np.float32), lam


def upsample(maps: np.ndarray, size) -> np.ndarray:
    """(N, h, w) float32 -> (N, mh, mw), every output pixel of every map."""
    y0, y1, wy0, wy1 = bilinear_axis(maps.shape[1], size[0])
    x0, x1, wx0, wx1 = bilinear_axis(maps.shape[2], size[1])
    maps = maps.astype(np.float32)
    top = maps[:, y0][:, :, x0] * wx0 + maps[:, y0][:, :, x1] * wx1
    bottom = maps[:, y1][:, :, x0] * wx0 + maps[:, y1][:, :, x1] * wx1
    return top * wy0[:, None] + bottom * wy1[:, None]


def active_maps(acts: np.ndarray, quantile: float, mask_size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, N, mh, mw) bool active pixels, thresholds (U,), floors (U,)."""
    n, u, h, w = acts.shape
    active = np.zeros((u, n, *mask_size), dtype=bool)
    thresholds, floors = np.zeros(u), np.zeros(u)
    for unit in range(u):
        values = acts[:, unit].reshape(-1)
        t = float(np.quantile(values, 1 - quantile))
        floor = float(values.min())
        tol = TIE_TOLERANCE * max(abs(t), TINY)
        up = upsample(acts[:, unit], mask_size)
        active[unit] = up >= t - tol if t - tol > floor else up > t + tol
        thresholds[unit], floors[unit] = t, floor
    return active, thresholds, floors


def reference_counts(acts: np.ndarray, probe, quantile: float) -> ReferenceCounts:
    n, u = acts.shape[:2]
    m = len(probe.concepts)
    mh, mw = probe.mask_size
    cats = list(probe.category_names)
    active, thresholds, floors = active_maps(acts, quantile, (mh, mw))
    inter = np.zeros((u, n, m))
    area = active.reshape(u, n, -1).sum(axis=2).astype(np.float64)
    labels = np.zeros((n, m))
    present = np.zeros((n, len(cats)), dtype=bool)
    for i in range(n):
        ann = probe.load_annotation(i)
        present[i] = ann.categories_present
        image_labels = set(int(c) for c in ann.image_labels)
        for c in range(m):
            labels[i, c] = sum(float((mp == c + 1).sum()) for mp in ann.pixel_maps) + (mh * mw if c in image_labels else 0)
        for unit in range(u):
            for mp in ann.pixel_maps:
                for c in range(m):
                    inter[unit, i, c] += float((active[unit, i] & (mp == c + 1)).sum())
            for c in image_labels:
                inter[unit, i, c] += area[unit, i]
    concept_category = np.array([cats.index(c) for c in probe.concepts.categories])
    return ReferenceCounts(inter, area, labels, present, concept_category, thresholds, floors)


def iou_of(counts: ReferenceCounts, weights: np.ndarray) -> np.ndarray:
    """(U, M) IoU with per-image weights (N,): all ones for the plain IoU."""
    inter = np.einsum("unm,n->um", counts.inter, weights)
    act = np.einsum("un,nk,n->uk", counts.area, counts.present.astype(np.float64), weights)
    lab = np.einsum("nm,n->m", counts.labels, weights)
    union = act[:, counts.concept_category] + lab[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def reference_netdissect(acts: np.ndarray, probe, quantile: float) -> tuple[np.ndarray, np.ndarray, ReferenceCounts]:
    """IoU (U, M), dead (U,) and the per-image counts behind them."""
    counts = reference_counts(acts, probe, quantile)
    iou = iou_of(counts, np.ones(acts.shape[0]))
    return iou, counts.area.sum(axis=1) == 0, counts


def top1(scores: np.ndarray) -> np.ndarray:
    """Highest score per row, the lower concept index on ties."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., 0]


def reference_bootstrap(counts: ReferenceCounts, weights: np.ndarray, interval: float = 0.9):
    """Confidence, low, high (U,) from replicate weights (B, N), one replicate at a time."""
    reported = top1(iou_of(counts, np.ones(weights.shape[1])))
    own, hits = [], []
    for w in weights:
        iou = iou_of(counts, w)
        hits.append(top1(iou) == reported)
        own.append(iou[np.arange(len(reported)), reported])
    own = np.array(own)
    tail = (1 - interval) / 2
    return np.mean(hits, axis=0), np.quantile(own, tail, axis=0), np.quantile(own, 1 - tail, axis=0)
