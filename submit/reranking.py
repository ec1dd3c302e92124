"""Post-processing of re-id features: k-reciprocal re-ranking, alpha query expansion and DBA.

`k_reciprocal` gives the distances of the dense algorithm of Zhong et al. (CVPR 2017, "Re-ranking Person
Re-identification with k-reciprocal Encoding") as the public re-id toolkits write it, without ever holding an
(N, N) matrix (N = queries + gallery). The dense form needs ~24 bytes x N^2; this one needs memory linear in N
plus one (block x block) distance tile and the (Q, G) answer.

How it stays exact without the dense matrix:
- One pass over the upper-triangle tiles of the float32 distance matrix (BLAS sgemm) keeps, per row, the
  candidates below a per-row threshold (an upper bound on its k-th neighbour distance, found beforehand from a
  few nearby cells of random pivots) and the candidates near the row maximum. Float32 rounding is bounded
  (`_error_bound`); wherever it could change a neighbour set or the row maximum the pair is recomputed
  exactly, so sets and the column-max normalisation equal the dense algorithm's.
- Only neighbour SETS matter to the algorithm (top k1+1, top round(k1/2)+1, top k2), never the order inside.
- The Jaccard term is computed only for the query x gallery block, from sparse V rows, by summing
  min(V[q, k], V[g, k]) over the shared columns k, query chunk by query chunk.

Distance and tie rule (shared with the dense test oracle `tests/dense_rerank_oracle.py`):
the original distance is d(i, j) = (|x_i|^2 + |x_j|^2) - 2 <x_i, x_j> in float32, where the norms and inner
products are computed in float64 and rounded to float32 (so bitwise-equal rows give bitwise-equal distances
whatever the summation order); each row i is divided by the maximum of column i (the toolkits' column-max
normalisation; the matrix is symmetric); neighbours with equal normalised distance are ranked by ascending
index (queries first, then gallery), i.e. a stable sort. The toolkits use an unstable sort (ties arbitrary) and
float16 for V (results move by ~1e-3); otherwise the results agree to float rounding (1e-5 in the tests).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from submit.errors import SubmitError

__all__ = [
    "k_reciprocal",
    "query_expansion",
    "database_augmentation",
    "postprocess",
    "cosine_distance",
    "estimate_rerank_memory",
    "available_memory",
]

_TRIPLES_PER_CHUNK = 4_000_000  # Jaccard work items (query entry x gallery entry) per query chunk
_ACC_BYTES = 64 << 20  # float64 Jaccard accumulator per query chunk


# ----------------------------------------------------------------------------------------------- checks
def _as_features(x: Any, name: str) -> np.ndarray:
    """A finite, non-empty (n, d) float32 C-contiguous array, or a SubmitError naming the argument."""
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise SubmitError(f"{name}: expected a non-empty (n, d) feature matrix, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise SubmitError(f"{name}: expected numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise SubmitError(f"{name}: contains NaN or infinite values")
    return arr


def _pair(query_feats: Any, gallery_feats: Any) -> tuple[np.ndarray, np.ndarray]:
    q = _as_features(query_feats, "query_feats")
    g = _as_features(gallery_feats, "gallery_feats")
    if q.shape[1] != g.shape[1]:
        raise SubmitError(f"gallery_feats: feature size {g.shape[1]} differs from query_feats' {q.shape[1]}")
    return q, g


def _check_int(value: Any, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise SubmitError(f"{name}: expected an integer >= {low}, got {value!r}")
    return int(value)


def _check_float(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not low <= value <= high:
        raise SubmitError(f"{name}: expected a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------- memory
def available_memory() -> int:
    """Bytes of memory available to a new allocation (psutil when installed, else /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def estimate_rerank_memory(n_query: int, n_gallery: int, dim: int = 1024, k1: int = 20, k2: int = 6,
                           block: int = 2048) -> int:
    """Bytes `k_reciprocal` needs at its peak (an upper estimate for ordinary features; inputs not counted)."""
    n = n_query + n_gallery
    knn = min(n, max(k1 + 1, k2) + 1)
    per_row_v = min(n, 4 * (k1 + 1))  # expanded k-reciprocal set, typically ~2 (k1 + 1)
    per_row_qe = min(n, k2 * per_row_v) if k2 > 1 else per_row_v
    feats = n * dim * 4 + n * 64
    candidates = n * 4 * knn * 28 + n * 8 * 20  # threshold candidates + near-maximum candidates, sorted
    tile = block * block * 12 + n * dim * 4 // max(1, n // block)
    sparse = n * (per_row_v * 16 + per_row_qe * 16) + n * k2 * per_row_v * 32  # V, V_qe + its construction
    jaccard = _ACC_BYTES + _TRIPLES_PER_CHUNK * 48
    answer = n_query * n_gallery * 4
    return int(feats + candidates + tile + sparse + jaccard + answer + (64 << 20))


def _check_memory(n_query: int, n_gallery: int, dim: int, k1: int, k2: int, block: int,
                  memory_limit: int | None) -> None:
    needed = estimate_rerank_memory(n_query, n_gallery, dim, k1, k2, block)
    limit = available_memory() if memory_limit is None else int(memory_limit)
    if needed > limit:
        raise SubmitError(
            f"k_reciprocal: needs about {needed / 2**30:.2f} GiB for {n_query} queries x {n_gallery} gallery "
            f"(block={block}) but only {limit / 2**30:.2f} GiB is available; lower 'block' or re-rank fewer "
            f"queries at a time")


# ----------------------------------------------------------------------------------------------- distances
def _norms(x: np.ndarray) -> np.ndarray:
    """Squared norms computed in float64, rounded to float32 (the oracle does the same)."""
    out = np.empty(x.shape[0], dtype=np.float32)
    for s in range(0, x.shape[0], 65536):
        x64 = x[s:s + 65536].astype(np.float64)
        out[s:s + 65536] = np.einsum("ij,ij->i", x64, x64)
    return out


def _exact_dist(x: np.ndarray, sq: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """d(i, j) for index pairs exactly as the oracle computes them: float64 dots rounded to float32."""
    out = np.empty(len(rows), dtype=np.float32)
    step = max(1, (8 << 20) // (x.shape[1] * 8))
    for s in range(0, len(rows), step):
        r, c = rows[s:s + step], cols[s:s + step]
        dots = np.einsum("ij,ij->i", x[r].astype(np.float64), x[c].astype(np.float64)).astype(np.float32)
        out[s:s + step] = (sq[r] + sq[c]) - np.float32(2.0) * dots
    return out


def _error_bound(x: np.ndarray, sq: np.ndarray) -> float:
    """Margin on |float32 tile distance - exact distance|: 8 (sqrt(d) + 16) u max|x|^2.

    Measured errors of the BLAS tiles are below 1.5 sqrt(d) u max|x|^2 (d = 64..2048), so this is a 5-20x
    margin. The worst-case bound (d u) is ~100x looser at d = 1024 and would flag most rows as ambiguous.
    """
    u = 2.0 ** -24
    return 8.0 * (math.sqrt(x.shape[1]) + 16.0) * u * (float(sq.max()) + 1e-30)


def _tile(x: np.ndarray, sq: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Float32 distance tile rows r0:r1 x cols c0:c1 (one sgemm), within `_error_bound` of the exact values."""
    t = x[r0:r1] @ x[c0:c1].T
    t *= np.float32(-2.0)
    t += sq[r0:r1, None]
    t += sq[None, c0:c1]
    return t


# ----------------------------------------------------------------------------------------------- tile pass
@dataclass
class _Pass:
    """What the tile pass keeps: each row's candidates up to its threshold, and its near-maximum entries."""

    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    far_rows: np.ndarray
    far_cols: np.ndarray
    far_vals: np.ndarray


class _Buffer:
    """Growable (row, col, val) triplets."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.size = 0

    def add(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> None:
        if len(rows):
            self.parts.append((rows.astype(np.int32), cols.astype(np.int32), vals.astype(np.float32)))
            self.size += len(rows)

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.parts:
            return np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.float32)
        out = tuple(np.concatenate(p) for p in zip(*self.parts))
        self.parts, self.size = [], 0
        return out  # type: ignore[return-value]


class _Running:
    """Per row: the `need` smallest tile values seen so far; their maximum bounds the need-th neighbour."""

    def __init__(self, n: int, need: int) -> None:
        self.top = np.full((n, need), np.inf, dtype=np.float32)
        self.tau = np.full(n, np.inf, dtype=np.float32)

    def seed(self, r0: int, t: np.ndarray) -> None:
        """Start rows r0.. from a full tile (their diagonal tile)."""
        need = self.top.shape[1]
        if t.shape[1] > need:
            t = np.partition(t, need - 1, axis=1)[:, :need]
        self.top[r0:r0 + len(t), : t.shape[1]] = t
        self.tau[r0:r0 + len(t)] = self.top[r0:r0 + len(t)].max(axis=1)

    def update(self, rows: np.ndarray, vals: np.ndarray) -> None:
        """Merge new values of some rows (any order, rows may repeat)."""
        keep = vals < self.tau[rows]
        rows, vals = rows[keep], vals[keep]
        if not len(rows):
            return
        need = self.top.shape[1]
        order = np.lexsort((vals, rows))
        rows, vals = rows[order], vals[order]
        uniq, first, counts = np.unique(rows, return_index=True, return_counts=True)
        rank = np.arange(len(rows)) - np.repeat(first, counts)
        sel = rank < need
        pad = np.full((len(uniq), need), np.inf, dtype=np.float32)
        pad[np.repeat(np.arange(len(uniq)), counts)[sel], rank[sel]] = vals[sel]
        merged = np.concatenate([self.top[uniq], pad], axis=1)
        merged.partition(need - 1, axis=1)
        self.top[uniq] = merged[:, :need]
        self.tau[uniq] = merged[:, :need].max(axis=1)


def _side(t: np.ndarray, axis: int, row_off: int, col_off: int, run: _Running, near: _Buffer,
          far: _Buffer, row_max: np.ndarray, margin: float, seeded: bool = False) -> None:
    """Keep, for the rows on one side of a tile, entries below threshold + 2 margin and near the row max.
    axis=1: the tile's rows are those rows; axis=0: its columns are (the matrix is symmetric)."""
    m = t.shape[0] if axis == 1 else t.shape[1]
    lim = run.tau[row_off:row_off + m] + np.float32(2 * margin)
    rmax = t.max(axis=axis)
    np.maximum(row_max[row_off:row_off + m], rmax, out=row_max[row_off:row_off + m])
    hi = rmax - np.float32(margin)
    r, c = np.nonzero(t <= lim[:, None] if axis == 1 else t <= lim[None, :])
    fr, fc = np.nonzero(t >= hi[:, None] if axis == 1 else t >= hi[None, :])
    if axis == 0:
        r, c, fr, fc = c, r, fc, fr
    vals = t[r, c] if axis == 1 else t[c, r]
    near.add(r + row_off, c + col_off, vals)
    far.add(fr + row_off, fc + col_off, t[fr, fc] if axis == 1 else t[fc, fr])
    if not seeded:  # a seeded tile's smallest values are already in the running top
        run.update((r + row_off).astype(np.int64), vals)


def _tile_pass(x: np.ndarray, sq: np.ndarray, need: int, err: float, block: int,
               answer: np.ndarray, n_query: int, progress: bool) -> _Pass:
    """One pass over the upper-triangle tiles (diagonal tiles first, to seed the thresholds).

    Keeps every entry within 4 err of its row's running need-th smallest value (a superset of what the
    neighbour sets can need) and within 2 err of its row's running maximum; copies the query x gallery tile
    values into `answer`.
    """
    n = x.shape[0]
    starts = list(range(0, n, block))
    run, near, far = _Running(n, need), _Buffer(), _Buffer()
    row_max = np.full(n, -np.inf, dtype=np.float32)
    tiles = [(a, a) for a in starts] + [(a, b) for i, a in enumerate(starts) for b in starts[i + 1:]]
    for a, b in _progress(tiles, "re-ranking: distance tiles", progress):
        a1, b1 = min(n, a + block), min(n, b + block)
        t = _tile(x, sq, a, a1, b, b1)
        if a == b:
            run.seed(a, t)
        _side(t, 1, a, b, run, near, far, row_max, 2 * err, seeded=a == b)
        if b != a:
            _side(t, 0, b, a, run, near, far, row_max, 2 * err)
        if a < n_query and b1 > n_query:
            q1, g0 = min(a1, n_query), max(b, n_query)
            answer[a:q1, g0 - n_query:b1 - n_query] = t[: q1 - a, g0 - b:]
        if far.size > 4 * n:
            _compact_far(far, row_max, 2 * err)
    _compact_far(far, row_max, 2 * err)
    rows, cols, vals = near.take()
    keep = vals <= run.tau[rows] + np.float32(4 * err)
    fr, fc, fv = far.take()
    return _Pass(rows[keep], cols[keep], vals[keep], fr, fc, fv)


def _compact_far(far: _Buffer, row_max: np.ndarray, margin: float) -> None:
    fr, fc, fv = far.take()
    keep = fv >= row_max[fr] - np.float32(margin)
    far.add(fr[keep], fc[keep], fv[keep])


def _progress(items: Sequence, label: str, show: bool) -> Iterator:
    if not show:
        yield from items
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


def _exact_row_max(x: np.ndarray, sq: np.ndarray, p: _Pass) -> np.ndarray:
    """The exact per-row maximum distance (= column maximum, the matrix being symmetric)."""
    exact = _exact_dist(x, sq, p.far_rows, p.far_cols)
    out = np.full(x.shape[0], -np.inf, dtype=np.float32)
    np.maximum.at(out, p.far_rows, exact)
    if not np.all(out > 0):
        raise SubmitError("query_feats/gallery_feats: all feature rows are identical; nothing to re-rank")
    return out


# ----------------------------------------------------------------------------------------------- neighbour sets
@dataclass
class _Sorted:
    """Candidates sorted by (row, tile value, col), with each row's start offset."""

    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    start: np.ndarray


def _sort_candidates(p: _Pass, n: int) -> _Sorted:
    order = np.lexsort((p.cols, p.vals, p.rows))
    rows = p.rows[order]
    return _Sorted(rows, p.cols[order], p.vals[order], np.searchsorted(rows, np.arange(n + 1)))


def _neighbour_set(x: np.ndarray, sq: np.ndarray, c: _Sorted, col_max: np.ndarray, width: int,
                   err: float) -> np.ndarray:
    """(N, width) indices of each row's `width` nearest neighbours, as the dense algorithm's stable argsort.

    Rows whose tile values leave the boundary unclear (gap <= 2 err) are settled with exact distances.
    """
    n = len(c.start) - 1
    if width >= n:
        return np.broadcast_to(np.arange(n, dtype=np.int32), (n, n)).copy()
    first = c.start[:-1]
    sets = c.cols[first[:, None] + np.arange(width)[None, :]]
    edge = c.vals[first + width - 1].astype(np.float64)
    amb = np.nonzero(c.vals[first + width] - edge <= 2 * err)[0]
    if len(amb) == 0:
        return sets
    counts = c.start[amb + 1] - c.start[amb]
    pos = _ranges(c.start[amb], counts)
    seg = np.repeat(np.arange(len(amb)), counts)
    v = c.vals[pos]
    lo, hi = edge[amb] - 2 * err, edge[amb] + 2 * err
    certain = v < lo[seg]
    group = ~certain & (v <= hi[seg])
    wanted = width - np.bincount(seg, weights=certain, minlength=len(amb)).astype(np.int64)
    g_pos, g_seg = pos[group], seg[group]
    g_rows = amb[g_seg]
    key = _exact_dist(x, sq, g_rows, c.cols[g_pos]) / col_max[g_rows]
    order = np.lexsort((c.cols[g_pos], key, g_seg))
    g_pos, g_seg = g_pos[order], g_seg[order]
    g_first = np.searchsorted(g_seg, np.arange(len(amb)))
    chosen = (np.arange(len(g_seg)) - g_first[g_seg]) < wanted[g_seg]
    members_seg = np.concatenate([seg[certain], g_seg[chosen]])
    members = np.concatenate([c.cols[pos[certain]], c.cols[g_pos[chosen]]])
    members = members[np.argsort(members_seg, kind="stable")]
    sets[amb] = members.reshape(len(amb), width)
    return sets


# ----------------------------------------------------------------------------------------------- V, Jaccard
def _reciprocal(lists: np.ndarray) -> np.ndarray:
    """Padded (-1) k-reciprocal sets: j among i's nearest (the row of `lists`) and i among j's."""
    n, width = lists.shape
    fwd = lists
    out = np.full_like(fwd, -1)
    step = max(1, (16 << 20) // (width * width * 4))
    for s in range(0, n, step):
        f = fwd[s:s + step]
        back = lists[f]
        mutual = (back == np.arange(s, s + len(f))[:, None, None]).any(axis=2)
        out[s:s + step] = np.where(mutual, f, -1)
    return out


def _expanded_sets(r_sets: np.ndarray, h_sets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr, indices) of R(i) plus every R_half(c), c in R(i), sharing > 2/3 of its members with R(i)."""
    n, a = r_sets.shape
    hb = h_sets.shape[1]
    indptr = np.zeros(n + 1, dtype=np.int64)
    parts = []
    step = max(1, (32 << 20) // (a * hb * a + a * (hb + 1) * 8))
    for s in range(0, n, step):
        rs = r_sets[s:s + step]
        hc = np.where((rs >= 0)[:, :, None], h_sets[np.maximum(rs, 0)], -1)  # (m, a, hb)
        hsize = (hc >= 0).sum(axis=2)
        shared = ((hc[..., None] == rs[:, None, None, :]) & (hc[..., None] >= 0)).any(axis=3).sum(axis=2)
        accept = (rs >= 0) & (shared > 2 / 3 * hsize)
        extra = np.where(accept[:, :, None], hc, -1).reshape(len(rs), a * hb)
        members = np.sort(np.concatenate([rs, extra], axis=1), axis=1)
        first = np.ones_like(members, dtype=bool)
        first[:, 1:] = members[:, 1:] != members[:, :-1]
        first &= members >= 0
        indptr[s + 1:s + 1 + len(rs)] = first.sum(axis=1)
        parts.append(members[first])
    np.cumsum(indptr, out=indptr)
    return indptr, np.concatenate(parts).astype(np.int32)


def _pair_values(x: np.ndarray, sq: np.ndarray, p: _Sorted, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Tile distances for pairs, looked up among the kept candidates or computed when not kept."""
    n = x.shape[0]
    known = p.rows.astype(np.int64) * n + p.cols
    order = np.argsort(known)
    known = known[order]
    want = rows.astype(np.int64) * n + cols
    at = np.minimum(np.searchsorted(known, want), len(known) - 1)
    hit = known[at] == want
    out = np.empty(len(rows), dtype=np.float32)
    out[hit] = p.vals[order[at[hit]]]
    miss = ~hit
    out[miss] = _exact_dist(x, sq, rows[miss], cols[miss])
    return out


def _weights(x: np.ndarray, sq: np.ndarray, p: _Sorted, col_max: np.ndarray, indptr: np.ndarray,
             indices: np.ndarray) -> np.ndarray:
    """V values: exp(-original distance) over each expanded set, normalised to sum 1 per row."""
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    dist = (_pair_values(x, sq, p, rows, indices) / col_max[rows]).astype(np.float32)
    w = np.exp(-dist.astype(np.float64))
    sums = np.bincount(rows, weights=w, minlength=len(indptr) - 1)
    return w / sums[rows]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges [starts[i], starts[i] + lengths[i])."""
    total = int(lengths.sum())
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offsets


def _local_expansion(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                     lists: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """V_qe[i] = mean of V over i's k2 nearest (the row of `lists`), as CSR, chunk by chunk."""
    n = len(indptr) - 1
    k = lists.shape[1]
    out_ptr = np.zeros(n + 1, dtype=np.int64)
    cols_parts, vals_parts = [], []
    nnz_row = np.diff(indptr)
    step = max(1, 2_000_000 // max(1, k * int(nnz_row.mean() if n else 1)))
    for s in range(0, n, step):
        nb = lists[s:s + step].ravel()
        lengths = nnz_row[nb]
        pos = _ranges(indptr[nb], lengths)
        local = np.repeat(np.repeat(np.arange(len(nb) // k), k), lengths)
        code = local.astype(np.int64) * n + indices[pos]
        uniq, inverse = np.unique(code, return_inverse=True)
        sums = np.bincount(inverse, weights=data[pos], minlength=len(uniq)) / k
        urow = uniq // n
        out_ptr[s + 1:s + 1 + len(nb) // k] = np.bincount(urow, minlength=len(nb) // k)
        cols_parts.append((uniq % n).astype(np.int32))
        vals_parts.append(sums)
    np.cumsum(out_ptr, out=out_ptr)
    return out_ptr, np.concatenate(cols_parts), np.concatenate(vals_parts)


def _jaccard_into(answer: np.ndarray, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                  n_query: int, lambda_value: float) -> None:
    """answer = (1 - lambda) * Jaccard + lambda * answer, for queries x gallery only, chunk by chunk."""
    n = len(indptr) - 1
    n_gallery = n - n_query
    g0 = indptr[n_query]
    g_rows = np.repeat(np.arange(n_query, n), np.diff(indptr[n_query:])) - n_query
    g_cols = indices[g0:]
    by_col = np.argsort(g_cols, kind="stable")
    col_ptr = np.searchsorted(g_cols[by_col], np.arange(n + 1))
    col_rows, col_vals = g_rows[by_col], data[g0:][by_col]
    col_len = np.diff(col_ptr)
    q_rows = np.repeat(np.arange(n_query), np.diff(indptr[: n_query + 1]))
    work = np.bincount(q_rows, weights=col_len[indices[: indptr[n_query]]], minlength=n_query)
    max_rows = max(1, _ACC_BYTES // (8 * n_gallery))
    s = 0
    while s < n_query:
        e = s + 1
        budget = work[s]
        while e < n_query and e - s < max_rows and budget + work[e] <= _TRIPLES_PER_CHUNK:
            budget += work[e]
            e += 1
        q_local = np.repeat(np.arange(e - s), np.diff(indptr[s:e + 1]))
        q_cols = indices[indptr[s]:indptr[e]]
        q_vals = data[indptr[s]:indptr[e]]
        lengths = col_len[q_cols]
        pos = _ranges(col_ptr[q_cols], lengths)
        mins = np.minimum(np.repeat(q_vals, lengths), col_vals[pos])
        code = np.repeat(q_local, lengths).astype(np.int64) * n_gallery + col_rows[pos]
        acc = np.bincount(code, weights=mins, minlength=(e - s) * n_gallery).reshape(e - s, n_gallery)
        jac = 1 - acc / (2 - acc)
        answer[s:e] = jac * (1 - lambda_value) + answer[s:e] * lambda_value
        s = e


# ----------------------------------------------------------------------------------------------- public API
def k_reciprocal(query_feats: np.ndarray, gallery_feats: np.ndarray, k1: int = 20, k2: int = 6,
                 lambda_value: float = 0.3, block: int = 2048, memory_limit: int | None = None,
                 progress: bool = False) -> np.ndarray:
    """k-reciprocal re-ranked (Q, G) float32 distances (Zhong et al. 2017), equal to the dense algorithm's.

    Features are normally L2-normalised (any real features work). `block` is the side of the distance tile
    held at a time; `memory_limit` (bytes, default: available memory) makes an oversized job fail early.
    """
    q, g = _pair(query_feats, gallery_feats)
    k1, k2 = _check_int(k1, "k1"), _check_int(k2, "k2")
    lambda_value = _check_float(lambda_value, "lambda_value", 0.0, 1.0)
    block = _check_int(block, "block", 16)
    _check_memory(len(q), len(g), q.shape[1], k1, k2, block, memory_limit)
    n_query, n = len(q), len(q) + len(g)
    x = np.concatenate([q, g])
    del q, g
    sq = _norms(x)
    err = _error_bound(x, sq)
    half = int(np.around(k1 / 2))
    widths = [min(k1 + 1, n), min(half + 1, n)] + ([min(k2, n)] if k2 != 1 else [])
    answer = np.empty((n_query, n - n_query), dtype=np.float32)
    p = _tile_pass(x, sq, min(max(widths) + 1, n), err, block, answer, n_query, progress)
    col_max = _exact_row_max(x, sq, p)
    cand = _sort_candidates(p, n)
    del p
    sets = {w: _neighbour_set(x, sq, cand, col_max, w, err) for w in set(widths)}
    indptr, indices = _expanded_sets(_reciprocal(sets[widths[0]]), _reciprocal(sets[widths[1]]))
    data = _weights(x, sq, cand, col_max, indptr, indices)
    del cand
    if k2 != 1:
        indptr, indices, data = _local_expansion(indptr, indices, data, sets[widths[2]])
    answer /= col_max[:n_query, None]
    _jaccard_into(answer, indptr, indices, data, n_query, lambda_value)
    return answer
