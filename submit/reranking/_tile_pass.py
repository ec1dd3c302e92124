"""The tile pass of `k_reciprocal`: one pass over the upper-triangle distance tiles, shared by worker threads, that
keeps each row's neighbour candidates and near-maximum entries (see `_kreciprocal` for why this is exact)."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from submit.errors import SubmitError
from submit.reranking._distances import _exact_dist, _Rows, _Tiles
from submit.reranking._threads import _in_parts, _on_one_blas_thread


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


def _tile_pass(tiles: _Tiles, need: int, block: int, progress: bool, answer: np.ndarray, threads: int,
               timings: dict[str, float] | None = None) -> _Pass:
    """One pass over the upper-triangle tiles, on `threads` threads (diagonal tiles first, to seed the thresholds).

    Keeps every entry within 4 err of its row's need-th smallest distance (a superset of what the neighbour
    sets can need) and within 2 err of its row's maximum. The query x gallery entries of each tile are written
    into `answer` on the way (no second pass over those pairs). The pivots' time lands in `timings["blocks"]`.
    """
    run = _Running(tiles.x.n, need)
    with _timed(timings, "blocks"):
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
def _timed(timings: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add the wall time of the block to timings[name] (nothing without a dict): k_reciprocal's `timings` hook."""
    if timings is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


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


def _exact_row_max(x: _Rows, sq: np.ndarray, p: _Pass, threads: int = 1) -> np.ndarray:
    """The exact per-row maximum distance (= column maximum, the matrix being symmetric)."""
    exact = _exact_dist(x, sq, p.far_rows, p.far_cols, threads)
    out = np.full(x.n, -np.inf, dtype=np.float32)
    np.maximum.at(out, p.far_rows, exact)
    if not np.all(out > 0):
        raise SubmitError("query_feats/gallery_feats: all feature rows are identical; nothing to re-rank")
    return out
