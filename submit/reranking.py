"""Post-processing of re-id features: k-reciprocal re-ranking, alpha query expansion and DBA.

`k_reciprocal` gives the distances of the dense algorithm of Zhong et al. (CVPR 2017, "Re-ranking Person
Re-identification with k-reciprocal Encoding") as the public re-id toolkits write it, without ever holding an
(N, N) matrix (N = queries + gallery). The dense form needs ~24 bytes x N^2; this one needs memory linear in N
plus one (block x block) distance tile and the (Q, G) answer.

How it stays exact without the dense matrix:
- One pass over the upper-triangle tiles of the float32 distance matrix (BLAS sgemm; each tile serves its rows
  and, transposed, its columns) keeps, per row, the entries within a margin of its running k-th smallest
  distance and of its running maximum. Rows are grouped into blocks by nearest random pivot, and tiles are
  visited diagonal first, then by distance from the diagonal, so thresholds are tight early and most rows of
  a tile are skipped after one reduction. Float32 tile error is bounded by a margin (`_Tiles.build`);
  wherever it could change a neighbour set or the row maximum, the pairs are recomputed exactly, so the sets
  and the column-max normalisation equal the dense algorithm's.
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
                           block: int = 1024) -> int:
    """Bytes `k_reciprocal` needs at its peak, inputs not counted: an upper estimate (the measured peak is
    1.5-3x lower on re-id-like features). Dominated by the (Q, G) float32 answer for large jobs."""
    n = n_query + n_gallery
    need = min(n, max(k1 + 1, k2) + 1)
    b = min(block, n)
    per_row = n * (need * 4 + 32)  # running top-need distances, thresholds, maxima, norms, cells
    tile = b * b * 12 + 2 * b * dim * 4  # score tile, its masks and partition copy, two gathered row blocks
    candidates = n * 3 * need * 24  # (row, col, distance) kept by the pass, and their sort
    v_row = min(n, 2 * (k1 + 1))  # expanded k-reciprocal set
    qe_row = min(n, k2 * (k1 + 1)) if k2 > 1 else v_row
    sparse = n * (v_row * 16 + qe_row * 24)  # V, V_qe and its column-sorted copy
    chunks = 48 << 20  # fixed-size work chunks (set expansion, local expansion, Jaccard)
    return int(n_query * n_gallery * 4 + per_row + tile + candidates + sparse + chunks)


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

    def take_sorted(self, idx: np.ndarray) -> np.ndarray:
        """Rows at ascending indices (queries first), gathered with two np.take calls."""
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        k = int(np.searchsorted(idx, self.n_query))
        np.take(self.q, idx[:k], axis=0, out=out[:k])
        np.take(self.g, idx[k:] - self.n_query, axis=0, out=out[k:])
        return out

    def starts(self, block: int) -> list[int]:
        """Tile starts: `block`-sized, never straddling the query/gallery boundary."""
        return list(range(0, self.n_query, block)) + list(range(self.n_query, self.n, block))


def _norms(x: _Rows) -> np.ndarray:
    """Squared norms computed in float64, rounded to float32 (the oracle does the same)."""
    out = np.empty(x.n, dtype=np.float32)
    for s in x.starts(2048):
        e = min(s + 2048, x.n, x.n_query if s < x.n_query else x.n)
        x64 = x.block(s, e).astype(np.float64)
        out[s:e] = np.einsum("ij,ij->i", x64, x64)
    return out


def _exact_dist(x: _Rows, sq: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """d(i, j) for index pairs exactly as the oracle computes them: float64 dots rounded to float32."""
    out = np.empty(len(rows), dtype=np.float32)
    step = max(1, (4 << 20) // (x.dim * 8))
    for s in range(0, len(rows), step):
        r, c = rows[s:s + step], cols[s:s + step]
        dots = np.einsum("ij,ij->i", x.take(r).astype(np.float64), x.take(c).astype(np.float64))
        out[s:s + step] = (sq[r] + sq[c]) - np.float32(2.0) * dots.astype(np.float32)
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

    def scores(self, rows: np.ndarray, cols: np.ndarray, x_rows: np.ndarray, x_cols: np.ndarray) -> np.ndarray:
        """S for the given row and column indices, whose features are x_rows, x_cols (one sgemm, plus two
        passes for features of unequal norms)."""
        s = x_rows @ x_cols.T
        if self.half_sq is not None:
            s -= self.half_sq[rows, None]
            s -= self.half_sq[None, cols]
        return s

    def square_scores(self, rows: np.ndarray, x_rows: np.ndarray) -> np.ndarray:
        """S of a row block against itself: three quarters of the sgemm, the lower-left quarter mirrored from
        the upper-right one (S is symmetric up to rounding, which `err` covers)."""
        b, h = len(rows), len(rows) // 2
        s = np.empty((b, b), dtype=np.float32)
        np.matmul(x_rows[:h], x_rows.T, out=s[:h])
        np.matmul(x_rows[h:], x_rows[h:].T, out=s[h:, h:])
        s[h:, :h] = s[:h, h:].T
        if self.half_sq is not None:
            s -= self.half_sq[rows, None]
            s -= self.half_sq[None, rows]
        return s

    def dist(self, s: np.ndarray) -> np.ndarray:
        return self.offset - np.float32(2.0) * s

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
    """Per row: the `need` smallest tile distances seen so far (their max bounds the need-th neighbour), and
    the largest one."""

    def __init__(self, n: int, need: int) -> None:
        self.top = np.full((n, need), np.inf, dtype=np.float32)
        self.tau = np.full(n, np.inf, dtype=np.float32)
        self.max = np.full(n, -np.inf, dtype=np.float32)

    def seed(self, rows: np.ndarray, d: np.ndarray) -> None:
        """Start `rows` from the distances of a full tile (their diagonal tile)."""
        need = self.top.shape[1]
        if d.shape[1] > need:
            d = np.partition(d, need - 1, axis=1)[:, :need]
        top = np.full((len(rows), need), np.inf, dtype=np.float32)
        top[:, : d.shape[1]] = d
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


def _side(tiles: _Tiles, s: np.ndarray, axis: int, rows: np.ndarray, cols: np.ndarray, run: _Running,
          near: _Buffer, far: _Buffer, seeded: bool = False) -> None:
    """For the rows on one side of a score tile, keep entries within 4 err of the row's running threshold
    and within 2 err of its running maximum. axis=1: the tile's rows are `rows`; axis=0: its columns are.
    Only rows whose best (worst) tile entry qualifies are scanned entry by entry."""
    err = np.float32(tiles.err)
    lim = tiles.score_limit(run.tau[rows] + 4 * err)
    live = np.nonzero(s.max(axis=axis) >= lim)[0]
    if len(live):
        sub = s[live] if axis == 1 else s[:, live].T
        r, c = np.nonzero(sub >= lim[live][:, None])
        found, vals = rows[live[r]], tiles.dist(sub[r, c])
        near.add(found, cols[c], vals)
        if not seeded:  # a seeded tile's smallest values are already in the running top
            run.update(found.astype(np.int64), vals)
    tile_max = tiles.dist(s.min(axis=axis))
    old_max = run.max[rows]
    live = np.nonzero(tile_max >= old_max - 2 * err)[0]
    new_max = np.maximum(old_max, tile_max)
    run.max[rows] = new_max
    if len(live):
        sub = s[live] if axis == 1 else s[:, live].T
        r, c = np.nonzero(sub <= tiles.score_limit(new_max[live] - 2 * err)[:, None])
        far.add(rows[live[r]], cols[c], tiles.dist(sub[r, c]))


def _blocks(x: _Rows, tiles: "_Tiles", block: int, run: "_Running", seed: int = 0) -> list[np.ndarray]:
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
    for s in x.starts(2048):
        e = min(s + 2048, x.n, x.n_query if s < x.n_query else x.n)
        score = tiles.scores(np.arange(s, e), piv, x.block(s, e), p)
        cell[s:e] = np.argmax(score, axis=1)
        run.max[s:e] = tiles.dist(score.min(axis=1))
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


def _tile_pass(tiles: _Tiles, need: int, block: int, progress: bool, answer: np.ndarray) -> _Pass:
    """One pass over the upper-triangle tiles (diagonal tiles first, to seed the thresholds).

    Keeps every entry within 4 err of its row's running need-th smallest distance (a superset of what the
    neighbour sets can need) and within 2 err of its row's running maximum. The query x gallery entries of
    each tile are written into `answer` on the way (no second pass over those pairs).
    """
    x = tiles.x
    run, near, far = _Running(x.n, need), _Buffer(), _Buffer()
    blocks = _blocks(x, tiles, block, run)
    pairs = _tile_order(len(blocks))
    feats: dict[int, np.ndarray] = {}
    for i, j in _progress(pairs, "re-ranking: distance tiles", progress):
        feats = {b: feats[b] if b in feats else x.take_sorted(blocks[b]) for b in (i, j)}
        rows, cols = blocks[i], blocks[j]
        s = tiles.square_scores(rows, feats[i]) if i == j else tiles.scores(rows, cols, feats[i], feats[j])
        _store_query_gallery(tiles, s, rows, cols, answer)
        if i != j:
            _store_query_gallery(tiles, s.T, cols, rows, answer)
        if i == j:
            run.seed(rows, tiles.dist(s))
        _side(tiles, s, 1, rows, cols, run, near, far, seeded=i == j)
        if i != j:
            _side(tiles, s, 0, cols, rows, run, near, far)
        if far.size > 4 * x.n:
            _compact_far(far, run.max, 2 * tiles.err)
    _compact_far(far, run.max, 2 * tiles.err)
    rows, cols, vals = near.take()
    keep = vals <= run.tau[rows] + np.float32(4 * tiles.err)
    fr, fc, fv = far.take()
    return _Pass(rows[keep], cols[keep], vals[keep], fr, fc, fv)


def _tile_order(n_blocks: int) -> list[tuple[int, int]]:
    """Diagonal tiles, then the first off-diagonal band (each block meets its neighbours early, so thresholds
    are tight), then the rest row block by row block in a snake order, so that each tile reuses one or both
    gathered blocks of the previous one."""
    pairs = [(i, i) for i in range(n_blocks)] + [(i, i + 1) for i in range(n_blocks - 1)]
    for i in range(n_blocks - 2):
        cols = range(i + 2, n_blocks)
        pairs += [(i, j) for j in (cols if i % 2 == 0 else reversed(cols))]
    return pairs


def _store_query_gallery(tiles: _Tiles, s: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                         answer: np.ndarray) -> None:
    """Write the tile's (query row, gallery column) distances into answer; rows and cols are ascending, so the
    queries are a prefix of rows and the gallery a suffix of cols."""
    nq = tiles.x.n_query
    a, b = int(np.searchsorted(rows, nq)), int(np.searchsorted(cols, nq))
    if a and b < len(cols):
        answer[np.ix_(rows[:a], cols[b:] - nq)] = tiles.dist(s[:a, b:])


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


def _exact_row_max(x: _Rows, sq: np.ndarray, p: _Pass) -> np.ndarray:
    """The exact per-row maximum distance (= column maximum, the matrix being symmetric)."""
    exact = _exact_dist(x, sq, p.far_rows, p.far_cols)
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


def _sort_candidates(p: _Pass, n: int) -> _Sorted:
    order = np.lexsort((p.cols, p.vals, p.rows))
    rows = p.rows[order]
    return _Sorted(rows, p.cols[order], p.vals[order], np.searchsorted(rows, np.arange(n + 1)))


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
def _reciprocal(lists: np.ndarray) -> np.ndarray:
    """Padded (-1) k-reciprocal sets: j among i's nearest (the row of `lists`) and i among j's."""
    n, width = lists.shape
    fwd = lists
    out = np.full_like(fwd, -1)
    step = max(1, (4 << 20) // (width * width * 4))
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
    step = max(1, min(n, (4 << 20) // n))
    marker = np.zeros((step, n), dtype=bool)  # marker[i, j]: j in R(i), for one chunk of rows
    for s in range(0, n, step):
        rs = r_sets[s:s + step]
        m = len(rs)
        loc, pos = np.nonzero(rs >= 0)
        marker[loc, rs[loc, pos]] = True
        hc = np.where((rs >= 0)[:, :, None], h_sets[np.maximum(rs, 0)], -1)  # (m, a, hb)
        valid = hc >= 0
        shared = (marker[np.arange(m)[:, None, None], np.maximum(hc, 0)] & valid).sum(axis=2)
        marker[loc, rs[loc, pos]] = False
        accept = (rs >= 0) & (shared > 2 / 3 * valid.sum(axis=2))
        extra = np.where(accept[:, :, None], hc, -1).reshape(m, a * hb)
        members = np.sort(np.concatenate([rs, extra], axis=1), axis=1)
        first = np.ones_like(members, dtype=bool)
        first[:, 1:] = members[:, 1:] != members[:, :-1]
        first &= members >= 0
        indptr[s + 1:s + 1 + m] = first.sum(axis=1)
        parts.append(members[first])
    np.cumsum(indptr, out=indptr)
    return indptr, np.concatenate(parts).astype(np.int32)


def _pair_values(x: _Rows, sq: np.ndarray, p: _Sorted, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Tile distances for pairs, looked up among the kept candidates or computed when not kept."""
    n = x.n
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


def _weights(x: _Rows, sq: np.ndarray, p: _Sorted, col_max: np.ndarray, indptr: np.ndarray,
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
    step = max(1, 100_000 // max(1, k * int(nnz_row.mean() if n else 1)))
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
    """answer = (1 - lambda) * Jaccard distance + lambda * answer, for queries x gallery only.

    Jaccard = 1 - t / (2 - t) with t = sum_k min(V[q, k], V[g, k]); t is 0 (Jaccard 1) except where q and g
    share a column of V, so the dense part is one fused update and the overlaps are summed sparsely, over
    (query entry, gallery entry in the same column) pairs, query chunk by query chunk.
    """
    n = len(indptr) - 1
    n_gallery = n - n_query
    g0 = indptr[n_query]
    g_rows = (np.repeat(np.arange(n_query, n), np.diff(indptr[n_query:])) - n_query).astype(np.int32)
    g_cols = indices[g0:]
    by_col = np.argsort(g_cols, kind="stable")
    col_ptr = np.searchsorted(g_cols[by_col], np.arange(n + 1))
    col_rows, col_vals = g_rows[by_col], data[g0:][by_col]
    del g_rows, g_cols, by_col
    col_len = np.diff(col_ptr)
    q_rows = np.repeat(np.arange(n_query), np.diff(indptr[: n_query + 1]))
    work = np.bincount(q_rows, weights=col_len[indices[: indptr[n_query]]], minlength=n_query)
    answer *= np.float32(lambda_value)
    answer += np.float32(1 - lambda_value)
    s = 0
    while s < n_query:
        e = _chunk_end(work, s)
        q_local = np.repeat(np.arange(e - s), np.diff(indptr[s:e + 1]))
        q_cols = indices[indptr[s]:indptr[e]]
        lengths = col_len[q_cols]
        pos = _ranges(col_ptr[q_cols], lengths)
        mins = np.minimum(np.repeat(data[indptr[s]:indptr[e]], lengths), col_vals[pos])
        code = np.repeat(q_local, lengths).astype(np.int64) * n_gallery + col_rows[pos]
        del pos, lengths
        uniq, inverse = np.unique(code, return_inverse=True)
        t = np.bincount(inverse, weights=mins, minlength=len(uniq))
        answer[s + uniq // n_gallery, uniq % n_gallery] -= ((1 - lambda_value) * t / (2 - t)).astype(np.float32)
        s = e


def _chunk_end(work: np.ndarray, s: int) -> int:
    """End of the query chunk starting at s: as many queries as fit in _TRIPLES_PER_CHUNK work items."""
    total = np.cumsum(work[s:])
    return s + max(1, int(np.searchsorted(total, _TRIPLES_PER_CHUNK, side="right")))


# ----------------------------------------------------------------------------------------------- public API
def k_reciprocal(query_feats: np.ndarray, gallery_feats: np.ndarray, k1: int = 20, k2: int = 6,
                 lambda_value: float = 0.3, block: int = 1024, memory_limit: int | None = None,
                 progress: bool = False) -> np.ndarray:
    """k-reciprocal re-ranked (Q, G) float32 distances (Zhong et al. 2017), equal to the dense algorithm's.

    Features are normally L2-normalised (any real features work). `block` is the side of the distance tile
    held at a time; `memory_limit` (bytes, default: available memory) makes a job that would not fit fail
    early with a SubmitError; `progress` shows a progress bar over the distance tiles.
    """
    q, g = _pair(query_feats, gallery_feats)
    k1, k2 = _check_int(k1, "k1"), _check_int(k2, "k2")
    lambda_value = _check_float(lambda_value, "lambda_value", 0.0, 1.0)
    block = _check_int(block, "block", 16)
    _check_memory(len(q), len(g), q.shape[1], k1, k2, block, memory_limit)
    x = _Rows(q, g)
    n, n_query = x.n, x.n_query
    tiles = _Tiles.build(x, _norms(x))
    half = int(np.around(k1 / 2))
    widths = [min(k1 + 1, n), min(half + 1, n)] + ([min(k2, n)] if k2 != 1 else [])
    answer = np.empty((n_query, n - n_query), dtype=np.float32)
    p = _tile_pass(tiles, min(max(widths) + 1, n), block, progress, answer)
    col_max = _exact_row_max(x, tiles.sq, p)
    cand = _sort_candidates(p, n)
    del p
    sets = {w: _neighbour_set(x, tiles.sq, cand, col_max, w, tiles.err) for w in set(widths)}
    indptr, indices = _expanded_sets(_reciprocal(sets[widths[0]]), _reciprocal(sets[widths[1]]))
    data = _weights(x, tiles.sq, cand, col_max, indptr, indices)
    del cand
    if k2 != 1:
        indptr, indices, data = _local_expansion(indptr, indices, data, sets[widths[2]])
    answer /= col_max[:n_query, None]
    _jaccard_into(answer, indptr, indices, data, n_query, lambda_value)
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
