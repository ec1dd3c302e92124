"""Post-processing of re-id features: k-reciprocal re-ranking, alpha query expansion and DBA.

`k_reciprocal` gives the distances of the dense algorithm of Zhong et al. (CVPR 2017, "Re-ranking Person
Re-identification with k-reciprocal Encoding") as the public re-id toolkits write it, without ever holding an
(N, N) matrix (N = queries + gallery). The dense form needs ~24 bytes x N^2; this one needs memory linear in N
plus one (block x block) distance tile per thread and the (Q, G) answer.

How it stays exact without the dense matrix:
- One pass over the upper-triangle tiles of the float32 distance matrix (BLAS sgemm, syrk on the diagonal; each
  tile serves its rows and, transposed, its columns) keeps, per row, the entries within a margin of its running
  k-th smallest distance and of its running maximum. Rows are grouped into blocks by nearest random pivot, and
  tiles are visited diagonal first, then by distance from the diagonal, so thresholds are tight early and most
  rows of a tile are skipped after one reduction. Float32 tile error is bounded by a margin (`_Tiles.build`);
  wherever it could change a neighbour set or the row maximum, the pairs are recomputed exactly, so the sets
  and the column-max normalisation equal the dense algorithm's.
- Two (or more) threads share the tiles, each with one BLAS thread; the running thresholds and maxima only
  tighten, tiles are scanned against a snapshot of them and merged under a lock, and the kept entries are
  filtered with the final values, so the result is the same bit for bit whatever the thread count or order.
  The row-wise steps after the pass are split between the threads as well.
- Only neighbour SETS matter to the algorithm (top k1+1, top round(k1/2)+1, top k2), never the order inside.
- The Jaccard term is computed only for the query x gallery block, from sparse V rows, by summing
  min(V[q, k], V[g, k]) over the shared columns k, query chunk by query chunk; the original-distance term of
  that block is copied out of the same tiles during the pass (no second sgemm).

Public API: `k_reciprocal`, `query_expansion`, `database_augmentation`, `cosine_distance`, `postprocess`
(a chain of those), `estimate_rerank_memory`, `available_memory`.

Distance and tie rule (shared with the dense test oracle `tests/dense_rerank_oracle.py`):
the original distance is d(i, j) = (|x_i|^2 + |x_j|^2) - 2 <x_i, x_j> in float32, where the norms and inner
products are computed in float64 and rounded to float32 (so bitwise-equal rows give bitwise-equal distances
whatever the summation order); each row i is divided by the maximum of column i (the toolkits' column-max
normalisation; the matrix is symmetric); neighbours with equal normalised distance are ranked by ascending
index (queries first, then gallery), i.e. a stable sort. The toolkits use an unstable sort (ties arbitrary) and
float16 for V (results move by ~1e-3); otherwise the results agree to float rounding (1e-5 in the tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from submit.device import usable_cores
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

_TRIPLES_PER_CHUNK = 1_000_000  # Jaccard work items (query entry x gallery entry) per query chunk


# ----------------------------------------------------------------------------------------------- checks
def _as_features(x: Any, name: str) -> np.ndarray:
    """A finite, non-empty (n, d) float32 C-contiguous array, or a SubmitError naming the argument."""
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise SubmitError(f"{name}: expected a non-empty (n, d) feature matrix, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise SubmitError(f"{name}: expected numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    step = max(1, (1 << 20) // arr.shape[1])  # small temporaries: fresh pages are slow to fault in on some VMs
    if not all(np.isfinite(arr[s:s + step]).all() for s in range(0, len(arr), step)):
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
    """Bytes of memory available to a new allocation (/proc/meminfo, else psutil when installed)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def estimate_rerank_memory(n_query: int, n_gallery: int, dim: int = 1024, k1: int = 20, k2: int = 6,
                           block: int = 1024, threads: int = 1) -> int:
    """Bytes `k_reciprocal` needs at its peak, inputs not counted: an upper estimate (the measured peak is
    1.5-3x lower on re-id-like features). Dominated by the (Q, G) float32 answer for large jobs."""
    n = n_query + n_gallery
    need = min(n, max(k1 + 1, k2) + 1)
    b = min(block, n)
    per_row = n * (need * 4 + 32)  # running top-need distances, thresholds, maxima, norms, cells
    tile = b * b * 12 + 2 * b * dim * 4  # score tile, its masks and partition copy, two gathered row blocks
    tile += (threads - 1) * (b * b * 8 + 2 * b * dim * 4)  # each further worker's tile and blocks
    candidates = n * 3 * need * 24  # (row, col, distance) kept by the pass, and their sort
    v_row = min(n, 2 * (k1 + 1))  # expanded k-reciprocal set
    qe_row = min(n, k2 * (k1 + 1)) if k2 > 1 else v_row
    sparse = n * (v_row * 16 + qe_row * 24)  # V, V_qe and its column-sorted copy
    chunks = 48 << 20  # fixed-size work chunks (set expansion, local expansion, Jaccard)
    return int(n_query * n_gallery * 4 + per_row + tile + candidates + sparse + chunks)


def _check_memory(n_query: int, n_gallery: int, dim: int, k1: int, k2: int, block: int, threads: int,
                  memory_limit: int | None) -> None:
    needed = estimate_rerank_memory(n_query, n_gallery, dim, k1, k2, block, threads)
    limit = available_memory() if memory_limit is None else int(memory_limit)
    if needed > limit:
        raise SubmitError(
            f"k_reciprocal: needs about {needed / 2**30:.2f} GiB for {n_query} queries x {n_gallery} gallery "
            f"(block={block}) but only {limit / 2**30:.2f} GiB is available; lower 'block' or re-rank fewer "
            f"queries at a time")


# ----------------------------------------------------------------------------------------------- distances
class _Rows:
    """The stacked [queries; gallery] features, read without copying them into one array."""

    def __init__(self, q: np.ndarray, g: np.ndarray) -> None:
        self.q, self.g, self.n_query = q, g, len(q)
        self.n, self.dim = len(q) + len(g), q.shape[1]

    def block(self, a: int, b: int) -> np.ndarray:
        """Rows a:b (a view when they lie on one side of the query/gallery boundary)."""
        nq = self.n_query
        if b <= nq:
            return self.q[a:b]
        if a >= nq:
            return self.g[a - nq:b - nq]
        return np.concatenate([self.q[a:], self.g[:b - nq]])

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows at arbitrary indices."""
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        in_q = idx < self.n_query
        out[in_q] = self.q[idx[in_q]]
        out[~in_q] = self.g[idx[~in_q] - self.n_query]
        return out

    def take_sorted(self, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows at ascending indices (queries first), gathered with two np.take calls (into `out` if given).
        mode="clip": the indices are valid, and take buffers `out` (a ~3x slower copy) in its default mode."""
        out = np.empty((len(idx), self.dim), dtype=np.float32) if out is None else out
        k = int(np.searchsorted(idx, self.n_query))
        np.take(self.q, idx[:k], axis=0, out=out[:k], mode="clip")
        np.take(self.g, idx[k:] - self.n_query, axis=0, out=out[k:], mode="clip")
        return out

    def starts(self, block: int) -> list[int]:
        """Tile starts: `block`-sized, never straddling the query/gallery boundary."""
        return list(range(0, self.n_query, block)) + list(range(self.n_query, self.n, block))


def _norms(x: _Rows, threads: int = 1) -> np.ndarray:
    """Squared norms computed in float64, rounded to float32 (the oracle does the same)."""
    out = np.empty(x.n, dtype=np.float32)
    step = max(1, (2 << 20) // (8 * x.dim))  # 2 MB float64 copies
    chunks = [(s, min(s + step, x.n, x.n_query if s < x.n_query else x.n)) for s in x.starts(step)]

    def fill(a: int, b: int) -> None:
        for s, e in chunks[a:b]:
            x64 = x.block(s, e).astype(np.float64)
            out[s:e] = np.einsum("ij,ij->i", x64, x64)

    _in_parts(fill, len(chunks), threads, grain=4)
    return out


def _exact_dist(x: _Rows, sq: np.ndarray, rows: np.ndarray, cols: np.ndarray, threads: int = 1) -> np.ndarray:
    """d(i, j) for index pairs exactly as the oracle computes them: float64 dots rounded to float32."""
    out = np.empty(len(rows), dtype=np.float32)
    step = max(1, (1 << 20) // (x.dim * 8))  # 1 MB float64 copies

    def fill(a: int, b: int) -> None:
        for s in range(a, b, step):
            r, c = rows[s:min(s + step, b)], cols[s:min(s + step, b)]
            dots = np.einsum("ij,ij->i", x.take(r).astype(np.float64), x.take(c).astype(np.float64))
            out[s:s + len(r)] = (sq[r] + sq[c]) - np.float32(2.0) * dots.astype(np.float32)

    _in_parts(fill, len(rows), threads, grain=256)
    return out


@dataclass
class _Tiles:
    """How tiles are computed: d(i, j) ~ offset - 2 S(i, j) with S = x_i.x_j - (|x_i|^2 + |x_j|^2) / 2, or,
    when all squared norms are equal to within the error margin (unit features), S = x_i.x_j and offset =
    the mean squared-norm sum (saving two passes per tile). `err` bounds |offset - 2 S - exact d|."""

    x: _Rows
    sq: np.ndarray
    half_sq: np.ndarray | None
    offset: np.float32
    err: float

    @classmethod
    def build(cls, x: _Rows, sq: np.ndarray) -> "_Tiles":
        u = 2.0 ** -24
        # Measured BLAS tile errors stay below 1.5 sqrt(d) u max|x|^2 for d = 64..2048: a 5-20x margin.
        # The worst-case bound (d u) is ~100x looser at d = 1024 and would flag most rows as ambiguous.
        err = 8.0 * (math.sqrt(x.dim) + 16.0) * u * (float(sq.max()) + 1e-30)
        spread = float(sq.max()) - float(sq.min())
        if spread <= err:
            return cls(x, sq, None, np.float32(float(sq.max()) + float(sq.min())), err + spread)
        return cls(x, sq, (sq / np.float32(2.0)).astype(np.float32), np.float32(0.0), err)

    def scores(self, rows: np.ndarray, cols: np.ndarray, x_rows: np.ndarray, x_cols: np.ndarray,
               out: np.ndarray | None = None) -> np.ndarray:
        """S for the given row and column indices, whose features are x_rows, x_cols (one sgemm, plus two
        passes for features of unequal norms), into `out` if given."""
        s = np.matmul(x_rows, x_cols.T, out=out)
        if self.half_sq is not None:
            s -= self.half_sq[rows, None]
            s -= self.half_sq[None, cols]
        return s

    def square_scores(self, rows: np.ndarray, x_rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """S of a row block against itself. numpy runs x @ x.T as one BLAS syrk (half the products, the other
        triangle mirrored): ~0.66 of the time of a general tile."""
        s = np.matmul(x_rows, x_rows.T, out=out)
        if self.half_sq is not None:
            s -= self.half_sq[rows, None]
            s -= self.half_sq[None, rows]
        return s

    def dist(self, s: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """offset - 2 S (into `out` if given: the same two roundings)."""
        if out is None:
            return self.offset - np.float32(2.0) * s
        np.multiply(s, np.float32(2.0), out=out)
        return np.subtract(self.offset, out, out=out)

    def score_limit(self, d: np.ndarray) -> np.ndarray:
        """The score below which d(i, j) would exceed d."""
        return (self.offset - d) / np.float32(2.0)


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
    """Per row: the `need` smallest tile distances seen so far (their max, tau, bounds the need-th neighbour), and
    the largest one. tau only falls and max only rises, so an earlier snapshot of either is a looser bound."""

    def __init__(self, n: int, need: int) -> None:
        self.top = np.full((n, need), np.inf, dtype=np.float32)
        self.tau = np.full(n, np.inf, dtype=np.float32)
        self.max = np.full(n, -np.inf, dtype=np.float32)

    def start(self, rows: np.ndarray, top: np.ndarray) -> None:
        """Start `rows` from their smallest distances in their diagonal tile (`_smallest`)."""
        self.top[rows] = top
        self.tau[rows] = top.max(axis=1)

    def update(self, rows: np.ndarray, vals: np.ndarray) -> None:
        """Merge new distances of some rows (any order, rows may repeat, never values seen before)."""
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


def _smallest(tiles: _Tiles, s: np.ndarray, need: int, groups: int = 8) -> np.ndarray:
    """The `need` smallest distances of each row of score tile s (any order), padded with inf when s is narrower.

    Each row's best scores in `groups` column groups give a bound that at least `need` entries reach; only the
    entries reaching it (typically 2-4 need) are partitioned: ~3.5x faster than partitioning whole rows.
    """
    n, width = s.shape
    k = width // groups
    if k < need:
        top = np.full((n, need), np.inf, dtype=np.float32)
        d = tiles.dist(s)
        if width > need:
            d.partition(need - 1, axis=1)
        top[:, : min(need, width)] = d[:, :need]
        return top
    best = s[:, :k].copy()
    for g in range(1, groups):
        np.maximum(best, s[:, g * k:(g + 1) * k], out=best)
    bound = np.partition(best, k - need, axis=1)[:, k - need]
    r, c = np.divmod(np.flatnonzero(s >= bound[:, None]), width)
    counts = np.bincount(r, minlength=n)
    pad = np.full((n, int(counts.max())), -np.inf, dtype=np.float32)
    pad[r, np.arange(len(r)) - np.repeat(np.cumsum(counts) - counts, counts)] = s[r, c]
    if pad.shape[1] > need:
        pad.partition(pad.shape[1] - need, axis=1)
    return tiles.dist(pad[:, pad.shape[1] - need:])


def _near_limit(tau: np.ndarray, err: float) -> np.ndarray:
    """Largest distance kept as a neighbour candidate: the row's threshold + 4 err. The per-tile test and the
    final filter use this one expression, so the kept set does not depend on the order of the tiles."""
    return tau + np.float32(4 * err)


def _far_limit(row_max: np.ndarray, err: float) -> np.ndarray:
    """Smallest distance kept as a candidate for the row maximum: the running maximum - 2 err."""
    return row_max - np.float32(2 * err)


Triplets = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class _Side:
    """What one side of a tile (its rows, or its columns) found: entries within `_near_limit` (near), the
    rows' largest tile distances, and entries within `_far_limit` of the new maxima (far)."""

    rows: np.ndarray
    tile_max: np.ndarray
    near: Triplets
    far: Triplets


def _side(tiles: _Tiles, s: np.ndarray, axis: int, rows: np.ndarray, cols: np.ndarray, tau: np.ndarray,
          old_max: np.ndarray) -> _Side:
    """Scan one side of a score tile against a snapshot (tau, old_max) of its rows' running state. axis=1: the
    tile's rows are `rows`; axis=0: its columns are. Only rows whose best (worst) tile entry qualifies are
    scanned entry by entry; that score test is looser by err than the distance test, covering its rounding."""
    err = np.float32(tiles.err)
    near_lim = _near_limit(tau, tiles.err)
    lim = tiles.score_limit(near_lim + err)
    live, c, v = _scan(tiles, s, axis, np.nonzero(s.max(axis=axis) >= lim)[0], lim, above=True)
    keep = v <= near_lim[live]
    near = rows[live[keep]], cols[c[keep]], v[keep]
    tile_max = tiles.dist(s.min(axis=axis))
    far_lim = _far_limit(np.maximum(old_max, tile_max), tiles.err)
    lim = tiles.score_limit(far_lim - err)
    live, c, v = _scan(tiles, s, axis, np.nonzero(tile_max >= far_lim)[0], lim, above=False)
    keep = v >= far_lim[live]
    return _Side(rows, tile_max, near, (rows[live[keep]], cols[c[keep]], v[keep]))


def _scan(tiles: _Tiles, s: np.ndarray, axis: int, live: np.ndarray, lim: np.ndarray,
          above: bool) -> Triplets:
    """(index into the side's rows, column, distance) of the entries of the `live` rows whose score is >= (above)
    or <= their row's limit."""
    parts = []
    for chunk in np.array_split(live, max(1, len(live) // 256)):  # 256 rows at a time (>= 1 chunk)
        sub = s[chunk] if axis == 1 else np.take(s, chunk, axis=1, mode="clip").T  # ~5x faster than s[:, chunk]
        # flatnonzero + divmod: ~10x faster than the 2-D np.nonzero on a mostly-False mask
        r, c = np.divmod(np.flatnonzero(sub >= lim[chunk][:, None] if above else sub <= lim[chunk][:, None]),
                         sub.shape[1])
        parts.append((chunk[r], c, tiles.dist(sub[r, c])))
    return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]


def _blocks(x: _Rows, tiles: "_Tiles", block: int, run: "_Running", threads: int = 1,
            seed: int = 0) -> list[np.ndarray]:
    """Row blocks of the tile pass: rows grouped by their nearest random pivot, pivots chained nearest to
    nearest, so that a row's neighbours tend to sit in its own or adjacent blocks (its threshold gets tight
    early and later tiles are mostly skipped row by row). Also seeds each row's running maximum with its
    largest distance to a pivot. More pivots for small d, where the per-entry passes cost more than sgemm."""
    if x.n <= block:
        return [np.arange(x.n)]
    rng = np.random.default_rng(seed)
    piv = np.sort(rng.choice(x.n, min(2048, max(2, x.n // max(16, x.dim // 16))), replace=False))
    p = x.take(piv)
    cell = np.empty(x.n, dtype=np.int64)
    chunks = [(s, min(s + 2048, x.n, x.n_query if s < x.n_query else x.n)) for s in x.starts(2048)]

    def assign(a: int, b: int) -> None:
        for s, e in chunks[a:b]:
            score = tiles.scores(np.arange(s, e), piv, x.block(s, e), p)
            cell[s:e] = np.argmax(score, axis=1)
            run.max[s:e] = tiles.dist(score.min(axis=1))

    _in_parts(assign, len(chunks), threads, grain=1)
    rank = np.empty(len(piv), dtype=np.int64)
    rank[_chain(tiles.scores(piv, piv, p, p))] = np.arange(len(piv))
    order = np.argsort(rank[cell], kind="stable")
    return [np.sort(order[s:s + block]) for s in range(0, x.n, block)]


def _chain(score: np.ndarray) -> np.ndarray:
    """Greedy path through all items, each step to the best-scoring unvisited item (score[i, j])."""
    score = score.copy()
    path = [0]
    score[:, 0] = -np.inf
    for _ in range(len(score) - 1):
        nxt = int(np.argmax(score[path[-1]]))
        path.append(nxt)
        score[:, nxt] = -np.inf
    return np.array(path)


class _Workspace:
    """One worker's reusable buffers: a score tile and two gathered row blocks. Reusing them instead of
    allocating per tile keeps the memory of several threads low (no allocator churn across threads)."""

    def __init__(self, block: int, dim: int) -> None:
        self.dim = dim
        self.scores = np.empty(block * block, dtype=np.float32)
        self.held: dict[int, tuple[np.ndarray, np.ndarray | None]] = {
            -1: (np.empty(block * dim, dtype=np.float32), None), -2: (np.empty(block * dim, dtype=np.float32), None)}

    def tile(self, rows: int, cols: int) -> np.ndarray:
        """The score tile buffer viewed as a C-contiguous (rows, cols) array."""
        return self.scores[: rows * cols].reshape(rows, cols)

    def features(self, x: _Rows, blocks: list[np.ndarray], i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """The gathered features of row blocks i and j, reusing a block gathered for the previous tile."""
        keep = {b: self.held.pop(b) for b in (i, j) if b in self.held}
        spare = [buf for buf, _ in self.held.values()]
        for b in (i, j):
            if b not in keep:
                buf = spare.pop()
                keep[b] = buf, x.take_sorted(blocks[b], out=buf[: len(blocks[b]) * self.dim].reshape(-1, self.dim))
        self.held = {**keep, **{-1 - k: (buf, None) for k, buf in enumerate(spare)}}
        return keep[i][1], keep[j][1]  # type: ignore[return-value]


Tile = tuple[int, int, int, int]  # (row block i, column block j, first row, end row within block i)


class _TilePass:
    """The tile pass's shared running state and kept entries. Workers compute their tiles and scan them against
    a snapshot of the state, and merge what they found under one lock; the kept sets (after the final filters)
    and so the results do not depend on the order in which tiles are merged. An off-diagonal tile waits until
    the diagonal tiles of its two blocks have started their rows' state (no barrier between the two phases)."""

    def __init__(self, tiles: _Tiles, blocks: list[np.ndarray], run: _Running, answer: _QueryGallery) -> None:
        self.tiles, self.blocks, self.run, self.answer = tiles, blocks, run, answer
        self.near, self.far = _Buffer(), _Buffer()
        self.lock = threading.Lock()
        self.started = [threading.Event() for _ in blocks]  # block i's rows have their running state
        self.spaces: dict[int, _Workspace] = {}  # worker number -> workspace

    def visit(self, items: list[Tile], threads: int, advance: Callable[[], None]) -> None:
        """Visit the tiles of `items` (diagonal ones first), handed out in order to `threads` threads with one
        BLAS thread each (threads=1: in this thread, BLAS as configured)."""
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for item in items:
            todo.put(item)
        if threads == 1:
            self._work(todo, advance, 0)
            return
        with ThreadPoolExecutor(threads, thread_name_prefix="rerank") as pool:
            for job in [pool.submit(_on_one_blas_thread, self._work, todo, advance, k) for k in range(threads)]:
                job.result()

    def _work(self, todo: queue.SimpleQueue, advance: Callable[[], None], worker: int) -> None:
        """Take tiles until none is left, in the worker's workspace."""
        if worker not in self.spaces:
            self.spaces[worker] = _Workspace(max(len(b) for b in self.blocks), self.tiles.x.dim)
        space = self.spaces[worker]
        while True:
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            self._tile(item, space)
            advance()

    def _tile(self, item: Tile, space: _Workspace) -> None:
        """Compute tile (i, j) over rows lo:hi of block i, store its query x gallery part, scan both sides,
        merge. A diagonal tile (always whole) starts its rows' running state."""
        i, j, lo, hi = item
        tiles, rows, cols = self.tiles, self.blocks[i][lo:hi], self.blocks[j]
        x_rows, x_cols = space.features(tiles.x, self.blocks, i, j)
        diagonal = i == j
        s = space.tile(len(rows), len(cols))
        if diagonal:
            tiles.square_scores(rows, x_rows, out=s)
        else:
            tiles.scores(rows, cols, x_rows[lo:hi], x_cols, out=s)
        self.answer.store(tiles, s, rows, j)
        sides = [(1, rows, cols)]
        if diagonal:
            top = _smallest(tiles, s, self.run.top.shape[1])
        else:
            self.answer.store(tiles, s.T, cols, i, lo)
            sides.append((0, cols, rows))
            self.started[i].wait()
            self.started[j].wait()
        with self.lock:
            if diagonal:
                self.run.start(rows, top)
                self.started[i].set()
            snapshots = [(self.run.tau[r], self.run.max[r]) for _, r, _ in sides]
        found = [_side(tiles, s, axis, r, c, tau, mx) for (axis, r, c), (tau, mx) in zip(sides, snapshots)]
        with self.lock:
            for side in found:
                self._merge(side, seeded=diagonal)

    def _merge(self, side: _Side, seeded: bool) -> None:
        """Add one side's findings to the running state (call with the lock held)."""
        self.near.add(*side.near)
        if not seeded:  # a seeded tile's smallest values are already in the running top
            self.run.update(side.near[0].astype(np.int64), side.near[2])
        self.run.max[side.rows] = np.maximum(self.run.max[side.rows], side.tile_max)
        self.far.add(*side.far)
        if self.far.size > 4 * len(self.run.max):
            _compact_far(self.far, self.run.max, self.tiles.err)

    def result(self) -> _Pass:
        """The kept entries, filtered with the final thresholds and maxima."""
        self.spaces.clear()
        _compact_far(self.far, self.run.max, self.tiles.err)
        rows, cols, vals = self.near.take()
        keep = vals <= _near_limit(self.run.tau[rows], self.tiles.err)
        return _Pass(rows[keep], cols[keep], vals[keep], *self.far.take())


def _tile_pass(tiles: _Tiles, need: int, block: int, progress: bool, answer: np.ndarray, threads: int) -> _Pass:
    """One pass over the upper-triangle tiles, on `threads` threads (diagonal tiles first, to seed the thresholds).

    Keeps every entry within 4 err of its row's need-th smallest distance (a superset of what the neighbour
    sets can need) and within 2 err of its row's maximum. The query x gallery entries of each tile are written
    into `answer` on the way (no second pass over those pairs).
    """
    run = _Running(tiles.x.n, need)
    blocks = _blocks(tiles.x, tiles, block, run, threads)
    items = _tile_order([len(b) for b in blocks], threads)
    held = _QueryGallery(answer, blocks, tiles.x.n_query)
    state = _TilePass(tiles, blocks, run, held)
    with _progress(len(items), "re-ranking: distance tiles", progress) as advance:
        state.visit(items, max(1, min(threads, len(items))), advance)
    held.finish(threads)
    return state.result()


def _tile_order(sizes: list[int], threads: int = 1) -> list[Tile]:
    """The diagonal tiles; then the first off-diagonal band (each block meets its neighbours early, so thresholds
    are tight), then the rest row block by row block in a snake order, so that each tile reuses one or both
    gathered blocks of the previous one. With several threads the last 2 x threads tiles are cut into row halves,
    so that no thread waits long for the last one."""
    n = len(sizes)
    pairs = [(i, i + 1) for i in range(n - 1)]
    for i in range(n - 2):
        cols = range(i + 2, n)
        pairs += [(i, j) for j in (cols if i % 2 == 0 else reversed(cols))]
    cut = len(pairs) - 2 * threads if threads > 1 and len(pairs) > 2 * threads else len(pairs)
    rest = [(i, j, 0, sizes[i]) for i, j in pairs[:cut]]
    for i, j in pairs[cut:]:
        h = sizes[i] // 2
        rest += [(i, j, 0, h), (i, j, h, sizes[i])] if h else [(i, j, 0, sizes[i])]  # no empty halves
    return [(i, i, 0, sizes[i]) for i in range(n)] + rest


class _QueryGallery:
    """The (query, gallery) distances, written tile by tile into `answer`. Its gallery columns are held in the
    tile pass's block order, so that a tile writes whole row segments (~20x faster than a scattered np.ix_
    write); `finish` puts them back in gallery order."""

    def __init__(self, answer: np.ndarray, blocks: list[np.ndarray], n_query: int) -> None:
        self.answer, self.n_query = answer, n_query
        gallery = [b[np.searchsorted(b, n_query):] - n_query for b in blocks]
        self.start = np.cumsum([0] + [len(cols) for cols in gallery])  # block j's columns: start[j]:start[j + 1]
        self.order = np.concatenate(gallery)  # held column k is gallery item order[k]
        self.queries = [len(b) - len(cols) for b, cols in zip(blocks, gallery)]  # block j's queries come first

    def store(self, tiles: _Tiles, s: np.ndarray, rows: np.ndarray, j: int, lo: int = 0) -> None:
        """Write the (query row, gallery column) part of tile s, whose columns are rows lo:lo + width of block j;
        rows and block j are ascending, so the queries are a prefix of rows and the gallery a suffix of block j."""
        a, queries = int(np.searchsorted(rows, self.n_query)), self.queries[j]
        first, end = max(lo, queries), lo + s.shape[1]
        if a and end > first:
            cols = slice(self.start[j] + first - queries, self.start[j] + end - queries)
            self.answer[rows[:a], cols] = tiles.dist(s[:a, first - lo:])

    def finish(self, threads: int) -> None:
        """Put the columns back in gallery order, 64 rows at a time."""
        inverse = np.argsort(self.order).astype(np.intp)

        def part(a: int, b: int) -> None:
            for s in range(a, b, 64):
                rows = self.answer[s:min(s + 64, b)]
                rows[...] = np.take(rows, inverse, axis=1, mode="clip")

        _in_parts(part, len(self.answer), threads, grain=64)


def _compact_far(far: _Buffer, row_max: np.ndarray, err: float) -> None:
    fr, fc, fv = far.take()
    keep = fv >= _far_limit(row_max[fr], err)
    far.add(fr[keep], fc[keep], fv[keep])


@contextlib.contextmanager
def _progress(total: int, label: str, show: bool) -> Iterator[Callable[[], None]]:
    """A function to call once per finished item (thread-safe), advancing a rich progress bar when `show`."""
    if not show:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run the calling thread's BLAS calls on one thread, so that worker threads use one core each (OpenBLAS's
    per-thread setting, >= 0.3.27; other threads keep theirs). A no-op where numpy's BLAS has no such setting."""
    setter = _openblas_thread_setter()
    if setter is None:
        yield
        return
    previous = setter(1)
    try:
        yield
    finally:
        setter(previous)


def _on_one_blas_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) with this thread's BLAS calls on one thread (for worker threads)."""
    with _one_blas_thread():
        return fn(*args)


@functools.lru_cache(maxsize=1)
def _openblas_thread_setter() -> Callable[[int], int] | None:
    """`openblas_set_num_threads_local` of the OpenBLAS library this process loaded (numpy's), or None."""
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({line.split()[-1] for line in fh if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            setter = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
        return setter
    return None


def _in_parts(fn: Callable[[int, int], Any], n: int, threads: int, grain: int = 128) -> list[Any]:
    """[fn(a, b) for contiguous ranges a:b splitting range(n)], one range per thread (at most `threads`, at
    least `grain` items each; one BLAS thread each). For item-wise work whose results do not depend on the split."""
    parts = max(1, min(threads, n // max(1, grain)))
    if parts == 1:
        return [fn(0, n)]
    bounds = [n * i // parts for i in range(parts + 1)]
    with ThreadPoolExecutor(parts, thread_name_prefix="rerank") as pool:
        return list(pool.map(functools.partial(_on_one_blas_thread, fn), bounds[:-1], bounds[1:]))


def _exact_row_max(x: _Rows, sq: np.ndarray, p: _Pass, threads: int = 1) -> np.ndarray:
    """The exact per-row maximum distance (= column maximum, the matrix being symmetric)."""
    exact = _exact_dist(x, sq, p.far_rows, p.far_cols, threads)
    out = np.full(x.n, -np.inf, dtype=np.float32)
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


def _sort_candidates(p: _Pass, n: int, threads: int = 1) -> _Sorted:
    """Sort the kept candidates; (row, col) pairs are unique, so the order is too, however the rows are split."""

    def part(a: int, b: int) -> np.ndarray:
        if (a, b) == (0, n):
            return _row_value_col_order(p.rows, p.vals, p.cols, n)
        sel = np.flatnonzero((p.rows >= a) & (p.rows < b))
        return sel[_row_value_col_order(p.rows[sel], p.vals[sel], p.cols[sel], n)]

    order = np.concatenate(_in_parts(part, n, threads))
    rows = p.rows[order]
    return _Sorted(rows, p.cols[order], p.vals[order], np.searchsorted(rows, np.arange(n + 1)))


def _row_value_col_order(rows: np.ndarray, vals: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """np.lexsort((cols, vals, rows)) for indices below n and float32 vals; when (row, value bits, col) fit in
    one uint64 (n <= 65,536), an argsort of that key instead (~4x faster; the keys are unique, so the same order)."""
    bits = max(1, (n - 1).bit_length())
    if 2 * bits + 32 > 64:
        return np.lexsort((cols, vals, rows))
    u = (vals.astype(np.float32) + np.float32(0.0)).view(np.uint32).astype(np.uint64)  # + 0: -0.0 -> +0.0
    ordered = np.where(u >> np.uint64(31), u ^ np.uint64(0xFFFFFFFF), u | np.uint64(0x80000000))  # IEEE order
    key = (rows.astype(np.uint64) << np.uint64(32 + bits)) | (ordered << np.uint64(bits)) | cols.astype(np.uint64)
    return np.argsort(key)


def _group(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(code, return_inverse=True) with a stable argsort (~2x faster on the run-sorted codes built here)."""
    order = np.argsort(code, kind="stable")
    ordered = code[order]
    new = np.empty(len(ordered), dtype=bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    inverse = np.empty(len(ordered), dtype=np.intp)
    inverse[order] = np.cumsum(new) - 1
    return ordered[new], inverse


def _neighbour_set(x: _Rows, sq: np.ndarray, c: _Sorted, col_max: np.ndarray, width: int,
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
def _reciprocal(lists: np.ndarray, threads: int = 1) -> np.ndarray:
    """Padded (-1) k-reciprocal sets: j among i's nearest (the row of `lists`) and i among j's."""
    n, width = lists.shape
    out = np.full_like(lists, -1)
    step = max(1, (4 << 20) // (width * width * 4))

    def fill(a: int, b: int) -> None:
        for s in range(a, b, step):
            f = lists[s:min(s + step, b)]
            mutual = (lists[f] == np.arange(s, s + len(f))[:, None, None]).any(axis=2)
            out[s:s + len(f)] = np.where(mutual, f, -1)

    _in_parts(fill, n, threads)
    return out


def _csr(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Join row-range parts (entries per row, then per-entry arrays) into one CSR (indptr, per-entry arrays)."""
    counts = np.concatenate([p[0] for p in parts])
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return (indptr,) + tuple(np.concatenate([p[k] for p in parts]) for k in range(1, len(parts[0])))


def _expanded_sets(r_sets: np.ndarray, h_sets: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr, indices) of R(i) plus every R_half(c), c in R(i), sharing > 2/3 of its members with R(i)."""
    parts = _in_parts(lambda a, b: _expanded_rows(r_sets, h_sets, a, b), len(r_sets), threads)
    indptr, indices = _csr(parts)
    return indptr, indices.astype(np.int32)


def _expanded_rows(r_sets: np.ndarray, h_sets: np.ndarray, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(set size per row, members) of the expanded sets of rows a:b, chunk by chunk."""
    n, width = r_sets.shape
    hb = h_sets.shape[1]
    counts, parts = [], []
    step = max(1, min(b - a, (4 << 20) // n))
    marker = np.zeros(step * n, dtype=bool)  # marker[i * n + j]: j in R(i), for one chunk of rows (flat: 1-D takes)
    for s in range(a, b, step):
        rs = r_sets[s:min(s + step, b)]
        m = len(rs)
        inset = rs >= 0
        base = (np.arange(m) * n)[:, None]
        hit = (base + rs)[inset]
        marker[hit] = True
        hc = h_sets[np.maximum(rs, 0)]  # (m, width, hb)
        hc[~inset] = -1
        valid = hc >= 0
        shared = (np.take(marker, base[:, :, None] + np.maximum(hc, 0), mode="clip") & valid).sum(axis=2)
        marker[hit] = False
        accept = inset & (shared > 2 / 3 * valid.sum(axis=2))
        extra = np.where(accept[:, :, None], hc, -1).reshape(m, width * hb)
        members = np.sort(np.concatenate([rs, extra], axis=1), axis=1)
        first = np.ones_like(members, dtype=bool)
        first[:, 1:] = members[:, 1:] != members[:, :-1]
        first &= members >= 0
        counts.append(first.sum(axis=1))
        parts.append(members[first])
    return np.concatenate(counts), np.concatenate(parts)


def _pair_values(x: _Rows, sq: np.ndarray, p: _Sorted, rows: np.ndarray, cols: np.ndarray, a: int,
                 b: int) -> np.ndarray:
    """Tile distances for pairs of rows in a:b, looked up among those rows' kept candidates (a contiguous run
    of the sorted candidates) or computed when not kept."""
    seg = slice(p.start[a], p.start[b])
    known = p.rows[seg].astype(np.int64) * x.n + p.cols[seg]
    order = np.argsort(known)
    known = known[order]
    want = rows.astype(np.int64) * x.n + cols
    at = np.minimum(np.searchsorted(known, want), max(0, len(known) - 1))
    hit = known[at] == want if len(known) else np.zeros(len(want), dtype=bool)
    out = np.empty(len(rows), dtype=np.float32)
    out[hit] = p.vals[seg][order[at[hit]]]
    miss = ~hit
    out[miss] = _exact_dist(x, sq, rows[miss], cols[miss])
    return out


def _weights(x: _Rows, sq: np.ndarray, p: _Sorted, col_max: np.ndarray, indptr: np.ndarray,
             indices: np.ndarray, threads: int = 1) -> np.ndarray:
    """V values: exp(-original distance) over each expanded set, normalised to sum 1 per row."""

    def part(a: int, b: int) -> np.ndarray:
        rows = np.repeat(np.arange(a, b), np.diff(indptr[a:b + 1]))
        dist = (_pair_values(x, sq, p, rows, indices[indptr[a]:indptr[b]], a, b) / col_max[rows]).astype(np.float32)
        w = np.exp(-dist.astype(np.float64))
        sums = np.bincount(rows - a, weights=w, minlength=b - a)
        return w / sums[rows - a]

    return np.concatenate(_in_parts(part, len(indptr) - 1, threads))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges [starts[i], starts[i] + lengths[i])."""
    total = int(lengths.sum())
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offsets


def _local_expansion(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, lists: np.ndarray,
                     threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """V_qe[i] = mean of V over i's k2 nearest (the row of `lists`), as CSR (indptr, columns, values)."""
    n = len(indptr) - 1
    nnz_row = np.diff(indptr)
    step = max(1, 100_000 // max(1, lists.shape[1] * int(nnz_row.mean() if n else 1)))
    parts = _in_parts(lambda a, b: [_local_rows(indptr, indices, data, lists, s, min(s + step, b))
                                    for s in range(a, b, step)], n, threads)
    return _csr([chunk for part in parts for chunk in part])  # type: ignore[return-value]


def _local_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, lists: np.ndarray, a: int,
                b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(entries per row, columns, values) of V_qe for rows a:b."""
    n, k = len(indptr) - 1, lists.shape[1]
    nb = lists[a:b].ravel()
    lengths = np.diff(indptr)[nb]
    pos = _ranges(indptr[nb], lengths)
    local = np.repeat(np.repeat(np.arange(b - a), k), lengths)
    code = local.astype(np.int64) * n + indices[pos]
    uniq, inverse = _group(code)
    sums = np.bincount(inverse, weights=data[pos], minlength=len(uniq)) / k
    return np.bincount(uniq // n, minlength=b - a), (uniq % n).astype(np.int32), sums


@dataclass
class _GalleryColumns:
    """The gallery rows of V, transposed: for each column k, the gallery rows with V[g, k] > 0 and the values."""

    ptr: np.ndarray
    rows: np.ndarray
    vals: np.ndarray

    @classmethod
    def build(cls, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_query: int) -> "_GalleryColumns":
        n = len(indptr) - 1
        g0 = indptr[n_query]
        g_rows = (np.repeat(np.arange(n_query, n), np.diff(indptr[n_query:])) - n_query).astype(np.int32)
        by_col = np.argsort(indices[g0:], kind="stable")
        ptr = np.searchsorted(indices[g0:][by_col], np.arange(n + 1))
        return cls(ptr, g_rows[by_col], data[g0:][by_col])


def _jaccard_into(answer: np.ndarray, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                  col_max: np.ndarray, lambda_value: float, threads: int = 1) -> None:
    """answer = (1 - lambda) * Jaccard distance + lambda * answer / col_max, for queries x gallery only.

    Jaccard = 1 - t / (2 - t) with t = sum_k min(V[q, k], V[g, k]); t is 0 (Jaccard 1) except where q and g
    share a column of V, so the dense part is one fused update and the overlaps are summed sparsely, over
    (query entry, gallery entry in the same column) pairs, query chunk by query chunk.
    """
    n_query = len(answer)
    cols = _GalleryColumns.build(indptr, indices, data, n_query)
    q_rows = np.repeat(np.arange(n_query), np.diff(indptr[: n_query + 1]))
    work = np.bincount(q_rows, weights=np.diff(cols.ptr)[indices[: indptr[n_query]]], minlength=n_query)

    def rows(a: int, b: int) -> None:
        answer[a:b] /= col_max[a:b, None]
        answer[a:b] *= np.float32(lambda_value)
        answer[a:b] += np.float32(1 - lambda_value)
        s = a
        while s < b:
            e = min(b, _chunk_end(work, s))
            _jaccard_chunk(answer, indptr, indices, data, cols, s, e, lambda_value)
            s = e

    _in_parts(rows, n_query, threads, grain=16)


def _jaccard_chunk(answer: np.ndarray, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                   cols: _GalleryColumns, s: int, e: int, lambda_value: float) -> None:
    """Subtract (1 - lambda) t / (2 - t) from the answer rows s:e where the query shares V columns."""
    n_gallery = answer.shape[1]
    q_local = np.repeat(np.arange(e - s), np.diff(indptr[s:e + 1]))
    q_cols = indices[indptr[s]:indptr[e]]
    lengths = np.diff(cols.ptr)[q_cols]
    pos = _ranges(cols.ptr[q_cols], lengths)
    mins = np.minimum(np.repeat(data[indptr[s]:indptr[e]], lengths), cols.vals[pos])
    code = np.repeat(q_local, lengths).astype(np.int64) * n_gallery + cols.rows[pos]
    del pos, lengths
    uniq, inverse = _group(code)
    t = np.bincount(inverse, weights=mins, minlength=len(uniq))
    answer[s + uniq // n_gallery, uniq % n_gallery] -= ((1 - lambda_value) * t / (2 - t)).astype(np.float32)


def _chunk_end(work: np.ndarray, s: int) -> int:
    """End of the query chunk starting at s: as many queries as fit in _TRIPLES_PER_CHUNK work items."""
    total = np.cumsum(work[s:])
    return s + max(1, int(np.searchsorted(total, _TRIPLES_PER_CHUNK, side="right")))


# ----------------------------------------------------------------------------------------------- public API
def k_reciprocal(query_feats: np.ndarray, gallery_feats: np.ndarray, k1: int = 20, k2: int = 6,
                 lambda_value: float = 0.3, block: int = 1024, memory_limit: int | None = None,
                 progress: bool = False, threads: int | None = None) -> np.ndarray:
    """k-reciprocal re-ranked (Q, G) float32 distances (Zhong et al. 2017), equal to the dense algorithm's.

    Features are normally L2-normalised (any real features work). `block` is the side of the distance tile
    held at a time; `memory_limit` (bytes, default: available memory) makes a job that would not fit fail
    early with a SubmitError; `progress` shows a progress bar over the distance tiles. `threads` (default: the
    cores this process may use) share the distance tiles, one BLAS thread each; 1 runs them in this thread
    with BLAS as configured. The result does not depend on it.
    """
    q, g = _pair(query_feats, gallery_feats)
    k1, k2 = _check_int(k1, "k1"), _check_int(k2, "k2")
    lambda_value = _check_float(lambda_value, "lambda_value", 0.0, 1.0)
    block = _check_int(block, "block", 16)
    threads = usable_cores() if threads is None else _check_int(threads, "threads")
    _check_memory(len(q), len(g), q.shape[1], k1, k2, block, threads, memory_limit)
    x = _Rows(q, g)
    n, n_query = x.n, x.n_query
    tiles = _Tiles.build(x, _norms(x, threads))
    half = int(np.around(k1 / 2))
    widths = [min(k1 + 1, n), min(half + 1, n)] + ([min(k2, n)] if k2 != 1 else [])
    answer = np.empty((n_query, n - n_query), dtype=np.float32)
    p = _tile_pass(tiles, min(max(widths) + 1, n), block, progress, answer, threads)
    col_max = _exact_row_max(x, tiles.sq, p, threads)
    cand = _sort_candidates(p, n, threads)
    del p
    sets = {w: _neighbour_set(x, tiles.sq, cand, col_max, w, tiles.err) for w in set(widths)}
    r_sets, h_sets = _reciprocal(sets[widths[0]], threads), _reciprocal(sets[widths[1]], threads)
    indptr, indices = _expanded_sets(r_sets, h_sets, threads)
    data = _weights(x, tiles.sq, cand, col_max, indptr, indices, threads)
    del cand
    if k2 != 1:
        indptr, indices, data = _local_expansion(indptr, indices, data, sets[widths[2]], threads)
    _jaccard_into(answer, indptr, indices, data, col_max, lambda_value, threads)
    return answer


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def _top_k(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of unit `queries` among unit `base` rows (faiss flat index)."""
    import faiss

    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    sims, idx = index.search(queries, k)
    return sims, idx


def _weighted_mean(feats: np.ndarray, sims: np.ndarray, idx: np.ndarray, alpha: float) -> np.ndarray:
    """Sum of neighbour features weighted by max(sim, 0)^alpha (alpha = 0: plain sum), per row, in chunks."""
    w = np.maximum(sims, 0.0) ** alpha if alpha > 0 else np.ones_like(sims)
    out = np.empty((len(idx), feats.shape[1]), dtype=np.float32)
    step = max(1, (32 << 20) // (4 * feats.shape[1] * max(1, idx.shape[1])))
    for s in range(0, len(idx), step):
        out[s:s + step] = np.einsum("nk,nkd->nd", w[s:s + step], feats[idx[s:s + step]])
    return out


def query_expansion(query_feats: np.ndarray, gallery_feats: np.ndarray, k: int = 1,
                    alpha: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Alpha query expansion (Radenovic et al.): each query becomes the unit-normalised sum of itself and its
    k nearest gallery features weighted by cosine^alpha (alpha=0: plain average). Returns (queries, gallery)."""
    q, g = _pair(query_feats, gallery_feats)
    k = _check_int(k, "k")
    alpha = _check_float(alpha, "alpha", 0.0, 100.0)
    if k > len(g):
        raise SubmitError(f"k: {k} is more than the {len(g)} gallery features")
    q, g = _unit(q), _unit(g)
    sims, idx = _top_k(g, q, k)
    return _unit(q + _weighted_mean(g, sims, idx, alpha)), g


def database_augmentation(query_feats: np.ndarray, gallery_feats: np.ndarray, k: int = 5,
                          alpha: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Database-side augmentation (DBA): each gallery feature becomes the unit-normalised mean of its k nearest
    gallery features (itself included) weighted by cosine^alpha (alpha=0: plain mean). Queries are unchanged."""
    q, g = _pair(query_feats, gallery_feats)
    k = _check_int(k, "k")
    alpha = _check_float(alpha, "alpha", 0.0, 100.0)
    if k > len(g):
        raise SubmitError(f"k: {k} is more than the {len(g)} gallery features")
    q, g = _unit(q), _unit(g)
    sims, idx = _top_k(g, g, k)
    return q, _unit(_weighted_mean(g, sims, idx, alpha))


def cosine_distance(query_feats: np.ndarray, gallery_feats: np.ndarray) -> np.ndarray:
    """(Q, G) float32 cosine distances 1 - cos(q, g), in [0, 2]."""
    q, g = _pair(query_feats, gallery_feats)
    return (1.0 - _unit(q) @ _unit(g).T).astype(np.float32)


_STEPS = {"qe": query_expansion, "query_expansion": query_expansion,
          "dba": database_augmentation, "database_augmentation": database_augmentation,
          "rerank": k_reciprocal, "k_reciprocal": k_reciprocal}


def postprocess(query_feats: np.ndarray, gallery_feats: np.ndarray,
                steps: Sequence[dict[str, dict[str, Any]]] = ()) -> np.ndarray:
    """Run a chain of steps and return (Q, G) float32 distances.

    Each step is a one-key dict: ``{"dba": {"k": 5}}``, ``{"qe": {"k": 1, "alpha": 3}}`` or
    ``{"rerank": {"k1": 20, "k2": 6, "lambda": 0.3}}`` (long names and ``lambda_value`` work too). Features
    are L2-normalised first; "rerank" must come last; without it the result is the cosine distance.
    """
    q, g = _pair(query_feats, gallery_feats)
    q, g = _unit(q), _unit(g)
    for i, step in enumerate(steps):
        name, params = _parse_step(step, i)
        fn = _STEPS[name]
        if fn is k_reciprocal:
            if i != len(steps) - 1:
                raise SubmitError(f"steps[{i}]: {name!r} returns distances, so it must be the last step")
            return k_reciprocal(q, g, **params)
        q, g = fn(q, g, **params)
    return cosine_distance(q, g)


def _parse_step(step: Any, i: int) -> tuple[str, dict[str, Any]]:
    """Validate one chain step: a one-key mapping from a known step name to its keyword parameters."""
    import inspect

    if not isinstance(step, dict) or len(step) != 1:
        raise SubmitError(f"steps[{i}]: expected a one-key mapping like {{'rerank': {{'k1': 20}}}}, got {step!r}")
    (name, params), = step.items()
    if name not in _STEPS:
        raise SubmitError(f"steps[{i}]: unknown step {name!r} (known: {', '.join(_STEPS)})")
    if params is not None and not isinstance(params, dict):
        raise SubmitError(f"steps[{i}].{name}: expected a mapping of parameters, got {params!r}")
    params = dict(params or {})
    if "lambda" in params:
        params["lambda_value"] = params.pop("lambda")
    allowed = list(inspect.signature(_STEPS[name]).parameters)[2:]
    for key in params:
        if key not in allowed:
            raise SubmitError(f"steps[{i}].{name}.{key}: not a parameter of {name} (allowed: {', '.join(allowed)})")
    return name, params
