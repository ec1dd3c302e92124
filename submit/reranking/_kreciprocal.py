"""k-reciprocal re-ranking: the algorithm, its neighbour sets, the expanded sets V and the Jaccard term.

`k_reciprocal` gives the distances of the dense algorithm of Zhong et al. (CVPR 2017, "Re-ranking Person
Re-identification with k-reciprocal Encoding") as the public re-id toolkits write it, without ever holding an
(N, N) matrix (N = queries + gallery). The dense form needs ~24 bytes x N^2; this one needs memory linear in N
plus one (block x block) distance tile per thread and the (Q, G) answer.

How it stays exact without the dense matrix:
- One pass over the upper-triangle tiles of the float32 distance matrix (`_tile_pass`; BLAS sgemm, syrk on the
  diagonal; each tile serves its rows and, transposed, its columns) keeps, per row, the entries within a margin of
  its running k-th smallest distance and of its running maximum. Rows are grouped into blocks by nearest random
  pivot, and tiles are visited diagonal first, then by distance from the diagonal, so thresholds are tight early
  and most rows of a tile are skipped after one reduction. Float32 tile error is bounded by a margin
  (`_Tiles.build`); wherever it could change a neighbour set or the row maximum, the pairs are recomputed exactly,
  so the sets and the column-max normalisation equal the dense algorithm's.
- Two (or more) threads share the tiles, each with one BLAS thread; the running thresholds and maxima only
  tighten, tiles are scanned against a snapshot of them and merged under a lock, and the kept entries are
  filtered with the final values, so the result is the same bit for bit whatever the thread count or order.
  The row-wise steps after the pass are split between the threads as well.
- Only neighbour SETS matter to the algorithm (top k1+1, top round(k1/2)+1, top k2), never the order inside.
- The Jaccard term is computed only for the query x gallery block, from sparse V rows, by summing
  min(V[q, k], V[g, k]) over the shared columns k, query chunk by query chunk; the original-distance term of
  that block is copied out of the same tiles during the pass (no second sgemm).

Distance and tie rule (shared with the dense test oracle `tests/dense_rerank_oracle.py`):
the original distance is d(i, j) = (|x_i|^2 + |x_j|^2) - 2 <x_i, x_j> in float32, where the norms and inner
products are computed in float64 and rounded to float32 (so bitwise-equal rows give bitwise-equal distances
whatever the summation order); each row i is divided by the maximum of column i (the toolkits' column-max
normalisation; the matrix is symmetric); neighbours with equal normalised distance are ranked by ascending
index (queries first, then gallery), i.e. a stable sort. The toolkits use an unstable sort (ties arbitrary) and
float16 for V (results move by ~1e-3); otherwise the results agree to float rounding (1e-5 in the tests).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from submit.device import usable_cores
from submit.reranking._checks import _check_float, _check_int, _pair
from submit.reranking._distances import _exact_dist, _norms, _Rows, _Tiles
from submit.reranking._memory import _check_memory
from submit.reranking._threads import _in_parts
from submit.reranking._tile_pass import _exact_row_max, _Pass, _tile_pass, _timed

_TRIPLES_PER_CHUNK = 1_000_000  # Jaccard work items (query entry x gallery entry) per query chunk


def k_reciprocal(query_feats: np.ndarray, gallery_feats: np.ndarray, k1: int = 20, k2: int = 6,
                 lambda_value: float = 0.3, block: int = 1024, memory_limit: int | None = None,
                 progress: bool = False, threads: int | None = None,
                 timings: dict[str, float] | None = None) -> np.ndarray:
    """k-reciprocal re-ranked (Q, G) float32 distances (Zhong et al. 2017), equal to the dense algorithm's.

    Features are normally L2-normalised (any real features work). `block` is the side of the distance tile
    held at a time; `memory_limit` (bytes, default: available memory) makes a job that would not fit fail
    early with a SubmitError; `progress` shows a progress bar over the distance tiles. `threads` (default: the
    cores this process may use) share the distance tiles, one BLAS thread each; 1 runs them in this thread
    with BLAS as configured. The result does not depend on it. `timings`, when given, gets the wall time of each
    step added under the step's name (a diagnostic: `scripts/bench_reranking.py --steps`).
    """
    q, g = _pair(query_feats, gallery_feats)
    k1, k2 = _check_int(k1, "k1"), _check_int(k2, "k2")
    lambda_value = _check_float(lambda_value, "lambda_value", 0.0, 1.0)
    block = _check_int(block, "block", 16)
    threads = usable_cores() if threads is None else _check_int(threads, "threads")
    _check_memory(len(q), len(g), q.shape[1], k1, k2, block, threads, memory_limit)
    clock = functools.partial(_timed, timings)
    x = _Rows(q, g)
    n, n_query = x.n, x.n_query
    with clock("norms"):
        tiles = _Tiles.build(x, _norms(x, threads))
    half = int(np.around(k1 / 2))
    widths = [min(k1 + 1, n), min(half + 1, n)] + ([min(k2, n)] if k2 != 1 else [])
    answer = np.empty((n_query, n - n_query), dtype=np.float32)
    with clock("tile_pass"):
        p = _tile_pass(tiles, min(max(widths) + 1, n), block, progress, answer, threads, timings)
    with clock("exact_row_max"):
        col_max = _exact_row_max(x, tiles.sq, p, threads)
    with clock("sort_candidates"):
        cand = _sort_candidates(p, n, threads)
    del p
    with clock("neighbour_set"):
        sets = {w: _neighbour_set(x, tiles.sq, cand, col_max, w, tiles.err) for w in set(widths)}
    with clock("reciprocal"):
        r_sets, h_sets = _reciprocal(sets[widths[0]], threads), _reciprocal(sets[widths[1]], threads)
    with clock("expanded_sets"):
        indptr, indices = _expanded_sets(r_sets, h_sets, threads)
    with clock("weights"):
        data = _weights(x, tiles.sq, cand, col_max, indptr, indices, threads)
    del cand
    if k2 != 1:
        with clock("local_expansion"):
            indptr, indices, data = _local_expansion(indptr, indices, data, sets[widths[2]], threads)
    with clock("jaccard_into"):
        _jaccard_into(answer, indptr, indices, data, col_max, lambda_value, threads)
    return answer


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
