"""Network Dissection's per-pixel loops, fused for the CPU (numba).

The tensor implementation in :mod:`.netdissect` runs on any device; on a CPU each of its
steps is a separate pass over millions of values (compare, dilate, gather, index), and
those passes, not the arithmetic, were most of dissect's cost. These kernels do the same
work in one loop per map, with the same float32 operations in the same order, so both
paths give bit-identical results (the tests run both against the brute-force reference
and against each other). numba is already installed with umap-learn; it is imported only
when a CPU dissection first needs a kernel (this module is imported lazily). Work is split
over torch's thread count; torch's own OpenMP threads would spin on the same cores right
after each forward op, which is why the ``conceptmon`` command caps their busy-wait
(:data:`conceptmon.entry.OPENMP_DEFAULTS`).
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

_UNKNOWN = np.float32(-1e30)  # as netdissect._UNKNOWN: stands in for values that were not kept

# Compiled on first call and cached beside this file (or in numba's user cache where that
# is not writable); nogil lets other threads run meanwhile.
_jit = numba.njit(cache=True, nogil=True)


@_jit
def grow(array, need):
    if need <= array.shape[0]:
        return array
    out = np.empty(max(need, 2 * array.shape[0]), array.dtype)
    out[: array.shape[0]] = array
    return out


@_jit
def mark_neighbourhood(mark, p, h, w, value):
    y = p // w
    x = p - y * w
    for yy in range(max(y - 1, 0), min(y + 2, h)):
        for xx in range(max(x - 1, 0), min(x + 2, w)):
            mark[yy * w + xx] = value

_DEBRUIJN = np.uint64(0x03F79D71B4CB0A89)
_DEBRUIJN_BIT = np.zeros(64, np.int64)
for _bit in range(64):
    _DEBRUIJN_BIT[((1 << _bit) * 0x03F79D71B4CB0A89 % 2**64) >> 58] = _bit


@_jit
def lowest_bit(m):
    """The index of the lowest set bit of m > 0 (uint64), by a de Bruijn sequence."""
    return _DEBRUIJN_BIT[((m & (~m + np.uint64(1))) * _DEBRUIJN) >> np.uint64(58)]


@_jit
def sparsify(acts, map_image, map_unit, keep_cut, pending_above, h, w, pos_like):
    """For maps (map_image[s], map_unit[s]) of acts (B, U, h * w): the 3x3 neighbourhoods of
    their pixels >= keep_cut[unit] in position order (count per map, positions of
    pos_like's dtype, values), and the kept values > pending_above[unit] (unit, value).

    Each row's hot pixels are a bit mask (64 pixels a word), dilated along the row by
    shifts and across rows by ORs; the entries are read off the set bits, so the work per
    map is a compare per pixel plus a few operations per word and per entry (no pass over
    the pixels that are not kept)."""
    hw = h * w
    n_words = (w + 63) // 64
    n_maps = map_image.shape[0]
    one = np.uint64(1)
    top_bit = np.uint64(63)
    last = np.uint64(0xFFFFFFFFFFFFFFFF) if w % 64 == 0 else (one << np.uint64(w % 64)) - one  # the last word's pixels
    rows = np.zeros((h + 2, n_words), np.uint64)  # row y + 1: row y's hot pixels dilated along x; rows 0, h + 1 stay 0
    hot = np.zeros(n_words, np.uint64)
    counts = np.empty(n_maps, np.int32)
    entry_pos = np.empty(max(1024, n_maps * hw // 8), pos_like.dtype)
    entry_val = np.empty(entry_pos.shape[0], np.float32)
    pend_unit = np.empty(1024, np.int32)
    pend_val = np.empty(1024, np.float32)
    n_entries = 0
    n_pending = 0
    for s in range(n_maps):
        u = map_unit[s]
        row = acts[map_image[s], u]
        cut = keep_cut[u]
        for y in range(h):
            o = y * w
            if n_words == 1:  # (maps up to 64 wide: the usual case, kept branch-free)
                m = np.uint64(0)
                for x in range(w):
                    m |= np.uint64(row[o + x] >= cut) << np.uint64(x)
                rows[y + 1, 0] = (m | (m << one) | (m >> one)) & last
                continue
            for j in range(n_words):
                m = np.uint64(0)
                x0 = 64 * j
                for x in range(x0, min(x0 + 64, w)):
                    m |= np.uint64(row[o + x] >= cut) << np.uint64(x - x0)
                hot[j] = m
            for j in range(n_words):  # neighbours across word boundaries come from the next words' end bits
                m = hot[j]
                d = m | (m << one) | (m >> one)
                if j > 0:
                    d |= hot[j - 1] >> top_bit
                if j + 1 < n_words:
                    d |= hot[j + 1] << top_bit
                else:
                    d &= last
                rows[y + 1, j] = d
        if n_entries + hw > entry_pos.shape[0]:  # (growing only when needed keeps the loops fast)
            entry_pos = grow(entry_pos, n_entries + hw)
            entry_val = grow(entry_val, n_entries + hw)
        if n_pending + hw > pend_unit.shape[0]:
            pend_unit = grow(pend_unit, n_pending + hw)
            pend_val = grow(pend_val, n_pending + hw)
        start = n_entries
        above = pending_above[u]
        for y in range(h):
            o = y * w
            for j in range(n_words):
                near = rows[y, j] | rows[y + 1, j] | rows[y + 2, j]
                while near:
                    x = 64 * j + lowest_bit(near)
                    near &= near - one
                    v = row[o + x]
                    entry_pos[n_entries] = o + x
                    entry_val[n_entries] = v
                    n_entries += 1
                    if v > above:
                        pend_unit[n_pending] = u
                        pend_val[n_pending] = v
                        n_pending += 1
        counts[s] = n_entries - start
    # copies, not views: a view would keep the whole over-allocated buffer alive in the store
    return (counts, entry_pos[:n_entries].copy(), entry_val[:n_entries].copy(), pend_unit[:n_pending].copy(),
            pend_val[:n_pending].copy())


@_jit
def append_rows(block, start, units, values):
    """block[units[i], start + j] = values[i], j counting the earlier values of the same
    unit: each unit's values in their order after column ``start``."""
    cursor = np.full(block.shape[0], start, np.int64)
    for i in range(units.shape[0]):
        u = units[i]
        block[u, cursor[u]] = values[i]
        cursor[u] += 1


@_jit
def prune(units, maxima, counts, entry_pos, entry_val, cut, h, w):
    """The maps to keep (maximum >= cut[unit]), their new entry counts, and their entries
    within one step of an entry >= cut of the same map (positions, values; order kept)."""
    n_maps = units.shape[0]
    keep_map = np.zeros(n_maps, np.bool_)
    new_count = np.zeros(n_maps, np.int32)
    new_pos = np.empty_like(entry_pos)
    new_val = np.empty_like(entry_val)
    mark = np.zeros(h * w, np.bool_)
    n_kept = 0
    lo = 0
    for s in range(n_maps):
        hi = lo + counts[s]
        c = cut[units[s]]
        if maxima[s] >= c:
            keep_map[s] = True
            for j in range(lo, hi):
                if entry_val[j] >= c:
                    mark_neighbourhood(mark, entry_pos[j], h, w, True)
            start = n_kept
            for j in range(lo, hi):
                if mark[entry_pos[j]]:
                    new_pos[n_kept] = entry_pos[j]
                    new_val[n_kept] = entry_val[j]
                    n_kept += 1
            new_count[s] = n_kept - start
            for j in range(lo, hi):
                if entry_val[j] >= c:
                    mark_neighbourhood(mark, entry_pos[j], h, w, False)
        lo = hi
    return keep_map, new_count, new_pos[:n_kept].copy(), new_val[:n_kept].copy()  # compact, as in sparsify


@_jit
def score(units, images, maxima, counts, entry_pos, entry_val, cut, hot_cut, h, w,
          y_first, y_groups, y_start, y_count, wy0, wy1,
          x_first, x_groups, x_start, x_count, wx0, wx1,
          masks, map_offsets, label_offsets, label_values, n_concepts):
    """Per map: its active area (upsampled pixels >= cut[unit]) and, for every concept it
    intersects, the pixel count (map, concept, count); whole-image labels count the
    whole active area. Only tiles of 2x2 source blocks with a source >= hot_cut[unit]
    are evaluated, with the tensor path's float32 operations in its order."""
    n_maps = units.shape[0]
    dense = np.full(h * w, _UNKNOWN, np.float32)
    cols = np.empty(wx0.shape[0], np.int64)
    tops = np.empty(wx0.shape[0], np.float32)
    bottoms = np.empty(wx0.shape[0], np.float32)
    marked = np.zeros(h * w, np.bool_)
    blocks = np.empty(h * w, np.int64)
    concept_count = np.zeros(n_concepts, np.int64)
    touched = np.empty(n_concepts, np.int64)
    area = np.zeros(n_maps, np.int64)
    cap = max(1024, 4 * n_maps)
    t_map = np.empty(cap, np.int64)
    t_concept = np.empty(cap, np.int64)
    t_count = np.empty(cap, np.int64)
    n_triplets = 0
    lo = 0
    for s in range(n_maps):
        hi = lo + counts[s]
        u = units[s]
        image = images[s]
        c = cut[u]
        hc = hot_cut[u]
        if not maxima[s] >= hc:  # no source can make a pixel active (a stale map): area 0
            lo = hi
            continue
        for j in range(lo, hi):
            dense[entry_pos[j]] = entry_val[j]
        n_blocks = 0
        for j in range(lo, hi):  # blocks (by, bx) hold sources by..by+1, bx..bx+1 (clipped)
            if entry_val[j] >= hc:
                p = entry_pos[j]
                y = p // w
                x = p - y * w
                for by in range(max(y - 1, 0), y + 1):
                    for bx in range(max(x - 1, 0), x + 1):
                        q = by * w + bx
                        if not marked[q]:
                            marked[q] = True
                            blocks[n_blocks] = q
                            n_blocks += 1
        m0 = map_offsets[image]
        m1 = map_offsets[image + 1]
        n_touched = 0
        active = 0
        for ib in range(n_blocks):
            q = blocks[ib]
            marked[q] = False
            by = q // w
            bx = q - by * w
            by1 = min(by + 1, h - 1)
            bx1 = min(bx + 1, w - 1)
            v00 = dense[by * w + bx]
            v01 = dense[by * w + bx1]
            v10 = dense[by1 * w + bx]
            v11 = dense[by1 * w + bx1]
            n_x = 0  # the block's output columns, with their row-wise interpolations (same for every row)
            for gx in range(x_first[bx], x_first[bx] + x_groups[bx]):
                for k in range(x_count[gx]):
                    ox = x_start[gx] + k
                    cols[n_x] = ox
                    tops[n_x] = v00 * wx0[ox] + v01 * wx1[ox]
                    bottoms[n_x] = v10 * wx0[ox] + v11 * wx1[ox]
                    n_x += 1
            for gy in range(y_first[by], y_first[by] + y_groups[by]):
                for r in range(y_count[gy]):
                    oy = y_start[gy] + r
                    a = wy0[oy]
                    b = wy1[oy]
                    for i in range(n_x):
                        value = tops[i] * a + bottoms[i] * b
                        if value >= c:
                            ox = cols[i]
                            active += 1
                            for mi in range(m0, m1):
                                label = masks[mi, oy, ox]
                                if label > 0:
                                    if concept_count[label - 1] == 0:
                                        touched[n_touched] = label - 1
                                        n_touched += 1
                                    concept_count[label - 1] += 1
        for j in range(lo, hi):
            dense[entry_pos[j]] = _UNKNOWN
        area[s] = active
        if active > 0:
            for li in range(label_offsets[image], label_offsets[image + 1]):
                concept = label_values[li]
                if concept_count[concept] == 0:
                    touched[n_touched] = concept
                    n_touched += 1
                concept_count[concept] += active
        if n_triplets + n_touched > t_map.shape[0]:
            t_map = grow(t_map, n_triplets + n_touched)
            t_concept = grow(t_concept, n_triplets + n_touched)
            t_count = grow(t_count, n_triplets + n_touched)
        for i in range(n_touched):
            concept = touched[i]
            t_map[n_triplets] = s
            t_concept[n_triplets] = concept
            t_count[n_triplets] = concept_count[concept]
            n_triplets += 1
            concept_count[concept] = 0
        lo = hi
    return area, t_map[:n_triplets], t_concept[:n_triplets], t_count[:n_triplets]



def block_groups(group_src: np.ndarray, n_src: int) -> tuple[np.ndarray, np.ndarray]:
    """Per source row (column): its first output group and how many groups it has
    (groups of one source are contiguous, :class:`~.netdissect.BilinearGrid`)."""
    src = np.arange(n_src)
    first = np.searchsorted(group_src, src, side="left")
    return first.astype(np.int64), (np.searchsorted(group_src, src, side="right") - first).astype(np.int64)


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="conceptmon-netdissect")


MIN_SPLIT = 256
"""Fewest maps per thread: below that, a thread costs more than it saves (tests lower it)."""


def threads() -> int:
    """CPU threads the kernels may use: torch's (``torch.set_num_threads`` sets both)."""
    return torch.get_num_threads()


def split(n: int, weights: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Items 0..n-1 as contiguous ranges, one per thread (balanced by ``weights``'
    cumulative sum when given, else by count), none smaller than MIN_SPLIT."""
    parts = max(1, min(threads(), n // max(MIN_SPLIT, 1)))
    if parts == 1:
        return [(0, n)]
    if weights is None:
        bounds = np.linspace(0, n, parts + 1).astype(np.int64)
    else:
        total = np.cumsum(weights)
        bounds = np.concatenate([[0], np.searchsorted(total, total[-1] * np.arange(1, parts) / parts), [n]])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def run_split(kernel, ranges: list[tuple[int, int]], args_of) -> list:
    """``kernel(*args_of(lo, hi))`` for each range, on threads (the kernels release the GIL),
    results in range order: the same as one call over everything, concatenated."""
    if len(ranges) == 1:
        return [kernel(*args_of(*ranges[0]))]
    # the calling thread takes the first range itself rather than waiting idle
    others = [_pool(len(ranges) - 1).submit(kernel, *args_of(*r)) for r in ranges[1:]]
    first = kernel(*args_of(*ranges[0]))
    return [first] + [f.result() for f in others]
