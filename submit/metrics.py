"""Re-id metrics on a distance matrix: mAP (exactly the official scorer's), CMC rank-k and mINP.

Vectorised with numpy over chunks of query rows, no per-item Python loop and no compiled extension.

Definitions (per query; queries with no positive in the gallery are skipped, as the official scorer does):
- AP is `sklearn.metrics.average_precision_score(is_match, -distance)`, ties included: sklearn groups
  tied scores into one threshold, which is the same as
  AP = mean over positives p of  #(positives with d <= d_p) / #(gallery items with d <= d_p),
  so no tie-breaking is involved at all.
- CMC rank-k: the query counts if its first positive is within the top k of a STABLE sort by distance,
  i.e. tied distances keep gallery column order (ascending image_id in a ranking file).
- mINP (Ye et al., AGW): #positives / (1-based position of the hardest positive in that stable sort).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from submit.errors import SubmitError

# Distance-matrix elements per block of query rows: bounds the temporaries (~100 bytes per candidate in
# the worst case, when every item of a row is at or below its hardest positive).
METRIC_KEYS = ("mAP", "rank1", "rank5", "rank10", "mINP")  # the scores every table, row and curve reports
METRIC_LABELS = {"mAP": "mAP", "rank1": "rank-1", "rank5": "rank-5", "rank10": "rank-10", "mINP": "mINP"}

BLOCK_ELEMENTS = 2_000_000
# Elements per padded group of candidates: small groups of rows with similar candidate counts keep the
# padding waste low (the comparison path sub-blocks rows x positives x candidates by the same budget).
GROUP_ELEMENTS = 16_000
# Rows with at most this many positives count by comparison (cost ~ P x candidates, vectorised);
# rows with more use a stable sort (cost ~ candidates x log candidates).
MAX_COMPARE_POSITIVES = 64


def evaluate_distances(dist: np.ndarray, q_pids: Sequence[int] | np.ndarray, g_pids: Sequence[int] | np.ndarray,
                       ranks: Sequence[int] = (1, 5, 10)) -> dict:
    """mAP, CMC rank-k and mINP of a (Q, G) distance matrix (lower = more similar), all in [0, 1].

    Returns keys mAP, rank{k} for each k in `ranks`, mINP, num_valid_queries, num_queries.
    """
    d = _as_distances(dist)
    q = np.asarray(q_pids).reshape(-1)
    g = np.asarray(g_pids).reshape(-1)
    if d.shape != (q.size, g.size):
        raise SubmitError(f"distance matrix is {d.shape[0]}x{d.shape[1]} but there are {q.size} query and "
                          f"{g.size} gallery ids")
    npos = _positive_counts(q, g)
    ap, first, last = _scores(d, npos, lambda rows: q[rows, None] == g[None, :])
    return _summary(ap, first, last, npos, ranks)


def average_precision(dist: np.ndarray, matches: np.ndarray) -> np.ndarray:
    """Per-query AP (sklearn's definition, ties grouped) of a (Q, G) distance matrix; NaN where no positive."""
    d = _as_distances(dist)
    m = np.asarray(matches, dtype=bool)
    if m.shape != d.shape:
        raise SubmitError(f"matches are {m.shape[0]}x{m.shape[1]} but distances are {d.shape[0]}x{d.shape[1]}")
    npos = np.count_nonzero(m, axis=1)
    return _scores(d, npos, lambda rows: m[rows])[0]


def _as_distances(dist: np.ndarray) -> np.ndarray:
    """A 2-D float array view of `dist` (float32 kept as is: comparisons stay exact)."""
    d = np.asarray(dist)
    if d.ndim != 2:
        raise SubmitError(f"distance matrix must be 2-D (queries x gallery), got shape {d.shape}")
    if not np.issubdtype(d.dtype, np.floating):
        d = d.astype(np.float64)
    return d


def _positive_counts(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Number of gallery items sharing each query's id, without a (Q, G) temporary."""
    if g.size == 0:
        return np.zeros(q.size, dtype=np.int64)
    ids, counts = np.unique(g, return_counts=True)
    pos = np.searchsorted(ids, q)
    pos_c = np.minimum(pos, ids.size - 1)
    found = (pos < ids.size) & (ids[pos_c] == q)
    return np.where(found, counts[pos_c], 0)


def _summary(ap: np.ndarray, first: np.ndarray, last: np.ndarray, npos: np.ndarray,
             ranks: Sequence[int]) -> dict:
    """Average per-query results over the valid queries into the public dict."""
    valid = npos > 0
    if not valid.any():
        raise SubmitError(f"no query has a match in the gallery ({npos.size} queries); nothing to score")
    out: dict = {"mAP": float(ap[valid].mean())}
    for k in ranks:
        out[f"rank{int(k)}"] = float(np.mean(first[valid] <= k))
    out["mINP"] = float(np.mean(npos[valid] / last[valid]))
    out["num_valid_queries"] = int(valid.sum())
    out["num_queries"] = int(npos.size)
    return out


def _scores(d: np.ndarray, npos: np.ndarray, match_rows: Callable[[slice], np.ndarray]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-query AP and 1-based stable ranks of the first and the hardest positive (NaN / 0 if none)."""
    n_q, n_g = d.shape
    ap = np.full(n_q, np.nan)
    first = np.zeros(n_q, dtype=np.int64)
    last = np.zeros(n_q, dtype=np.int64)
    step = max(1, BLOCK_ELEMENTS // max(n_g, 1))
    for start in range(0, n_q, step):
        rows = slice(start, min(start + step, n_q))
        if not npos[rows].any():
            continue
        block = d[rows]
        _check_finite(block, start)
        ap[rows], first[rows], last[rows] = _block_scores(block, match_rows(rows))
    return ap, first, last


def _check_finite(block: np.ndarray, row0: int) -> None:
    """Refuse NaN/inf (sklearn does too); name the first offending cell. min/max propagate NaN: cheap."""
    if block.size == 0 or (np.isfinite(block.min()) and np.isfinite(block.max())):
        return
    r, c = np.argwhere(~np.isfinite(block))[0]
    raise SubmitError(f"distance matrix has a non-finite value {block[r, c]} at query row {row0 + int(r)}, "
                      f"gallery column {int(c)}")


def _block_scores(d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AP, first and hardest positive ranks for a block of rows, looking only at "candidates".

    Candidates are the items at or below the row's hardest positive: nothing farther changes AP, CMC
    or mINP. They keep column order, so a stable sort of them is the stable sort of the row. Rows are
    then handled in groups of similar candidate counts, padded with +inf.
    """
    n_rows, n_g = d.shape
    d_flat = np.ascontiguousarray(d).reshape(-1)
    hits = np.flatnonzero(m)  # flat indices of positives (1-D nonzero: much faster than 2-D)
    pr = hits // n_g
    npos = np.bincount(pr, minlength=n_rows)
    has = npos > 0
    t_max = np.full(n_rows, -np.inf, dtype=d.dtype)
    t_max[has] = np.maximum.reduceat(d_flat[hits], (np.cumsum(npos) - npos)[has])
    cand = np.flatnonzero(d <= t_max[:, None])  # row-major: by row, then column
    values = d_flat[cand]
    is_pos = np.zeros(cand.size, dtype=bool)
    is_pos[np.searchsorted(cand, hits)] = True  # every positive is a candidate
    counts = np.diff(np.searchsorted(cand, np.arange(n_rows + 1) * n_g))
    offsets = np.cumsum(counts) - counts
    ap = np.full(n_rows, np.nan)
    first = np.zeros(n_rows, dtype=np.int64)
    last = np.zeros(n_rows, dtype=np.int64)
    rows = np.flatnonzero(has)
    rows = rows[np.argsort(counts[rows], kind="stable")]
    for group in _groups(counts[rows], GROUP_ELEMENTS):
        idx = rows[group]
        pad, pad_pos = _padded(values, is_pos, offsets[idx], counts[idx])
        fn = _compare_scores if npos[idx].max() <= MAX_COMPARE_POSITIVES else _sort_scores
        ap[idx], first[idx], last[idx] = fn(pad, pad_pos)
    return ap, first, last


def _groups(sorted_counts: np.ndarray, budget: int) -> list[slice]:
    """Consecutive slices of rows (sorted by candidate count) with rows x widest count <= budget."""
    out, i, n = [], 0, sorted_counts.size
    while i < n:
        ahead = sorted_counts[i:i + budget]  # every row has a candidate: never more rows than budget
        cost = np.arange(1, ahead.size + 1) * ahead
        j = i + max(1, int(np.searchsorted(cost, budget, side="right")))
        out.append(slice(i, j))
        i = j
    return out


def _padded(values: np.ndarray, is_pos: np.ndarray, offsets: np.ndarray, counts: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Gather rows' flat candidate segments into (rows, widest) arrays padded with +inf / False."""
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    row = np.repeat(np.arange(counts.size), counts)
    slot = np.arange(total) - starts[row]
    take = offsets[row] + slot
    cand = np.full((counts.size, int(counts.max())), np.inf, dtype=values.dtype)
    cand_pos = np.zeros(cand.shape, dtype=bool)
    cand[row, slot] = values[take]
    cand_pos[row, slot] = is_pos[take]
    return cand, cand_pos


def _compare_scores(d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Few positives per row: count items at or below each positive's distance with broadcast compares."""
    n_rows, n_g = d.shape
    hits = np.flatnonzero(m)  # row-major: columns ascending within a row
    r, c = hits // n_g, hits % n_g
    npos = np.bincount(r, minlength=n_rows)
    width = int(npos.max())
    slot = np.arange(r.size) - (np.cumsum(npos) - npos)[r]
    real = np.zeros((n_rows, width), dtype=bool)
    real[r, slot] = True
    t = np.full((n_rows, width), -np.inf, dtype=d.dtype)  # positives' distances, padded
    t[r, slot] = d.reshape(-1)[hits]
    cols = np.full((n_rows, width), -1, dtype=np.int64)
    cols[r, slot] = c
    le_all = _count_at_or_below(d, t)
    le_pos = np.count_nonzero(t[:, None, :] <= t[:, :, None], axis=2)  # padding (-inf) counts: remove it
    le_pos -= width - npos[:, None]
    ap = np.where(real, le_pos / np.maximum(le_all, 1), 0.0).sum(axis=1) / npos
    # First positive: smallest distance, lowest column among ties; hardest: largest distance, highest column.
    at = np.arange(n_rows)
    k_min = np.argmin(np.where(real, t, np.inf), axis=1)  # first slot = lowest column among ties
    t_min = t[at, k_min]
    t_max = t.max(axis=1)
    k_max = np.where(real & (t == t_max[:, None]), cols, -1).argmax(axis=1)  # cols ascend: highest column
    # Stable position = items at or below its distance, minus tied items in later columns.
    first = le_all[at, k_min] - _tied_after(d, t_min, cols[at, k_min])
    last = le_all[at, k_max] - _tied_after(d, t_max, cols[at, k_max])
    return ap, first, last


def _count_at_or_below(d: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(rows, P): number of items in each row of `d` with distance <= each threshold of that row."""
    out = np.empty(t.shape, dtype=np.int64)
    step = max(1, GROUP_ELEMENTS // max(t.shape[1] * d.shape[1], 1))
    for s in range(0, d.shape[0], step):
        below = d[s:s + step, None, :] <= t[s:s + step, :, None]
        out[s:s + step] = below.view(np.uint8).sum(axis=2, dtype=np.int64)
    return out


def _tied_after(d: np.ndarray, value: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Per row: items with distance == value[row] in a column after col[row] (ties a stable sort puts later)."""
    after = np.arange(d.shape[1])[None, :] > col[:, None]
    return np.count_nonzero((d == value[:, None]) & after, axis=1)


def _sort_scores(d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Many positives per row: one stable argsort; tied items share the precision at their group's end."""
    n_rows, n_g = d.shape
    order = np.argsort(d, axis=1, kind="stable")
    ds = np.take_along_axis(d, order, axis=1)
    ms = np.take_along_axis(m, order, axis=1)
    npos = np.count_nonzero(ms, axis=1)
    group_end = np.ones((n_rows, n_g), dtype=bool)
    group_end[:, :-1] = ds[:, 1:] != ds[:, :-1]
    end = np.where(group_end, np.arange(n_g), n_g)
    end = np.minimum.accumulate(end[:, ::-1], axis=1)[:, ::-1]  # end of each item's tie group
    precision = np.take_along_axis(np.cumsum(ms, axis=1), end, axis=1) / (end + 1)
    ap = np.where(ms, precision, 0.0).sum(axis=1) / npos
    first = np.argmax(ms, axis=1) + 1
    last = n_g - np.argmax(ms[:, ::-1], axis=1)
    return ap, first, last
