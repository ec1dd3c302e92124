"""Ensembles: a spec YAML naming member models, how their distances are fused and what post-processing runs.

Fusion rules (all take member distance matrices (Q, G), lower = closer, and member weights):
- `mean`: the weighted mean of distances (the 2022 winners' ensemble).
- `rank`: the weighted mean of each member's per-query gallery ranks (ties get their average rank),
  divided by G - 1 so it lies in [0, 1]. Robust to members whose distance scales differ.
- `reliability`: the 2023 winners' per-query weighting: member m's weight for query q is its spec weight
  times its agreement, the mean over the other members of |top-k(m) & top-k(n)| / k (k = `reliability_k`,
  15), normalised over members; a query where no member agrees with another falls back to the spec weights.
- `mean+reliability`: the mean of the `mean` and `reliability` results, as the 2023 winners submitted.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from submit.errors import SubmitError

FUSIONS = ("mean", "rank", "reliability", "mean+reliability")


def fuse(dists: Sequence[np.ndarray], weights: Sequence[float], rule: str = "mean", k: int = 15) -> np.ndarray:
    """Fuse member distance matrices with one of `FUSIONS`; returns a float32 (Q, G) matrix."""
    mats, w = _check(dists, weights)
    if rule == "mean":
        out = fuse_mean(mats, w)
    elif rule == "rank":
        out = fuse_rank(mats, w)
    elif rule == "reliability":
        out = fuse_reliability(mats, w, k)
    elif rule == "mean+reliability":
        out = 0.5 * (fuse_mean(mats, w) + fuse_reliability(mats, w, k))
    else:
        raise SubmitError(f"unknown fusion {rule!r}; expected one of {list(FUSIONS)}")
    return out.astype(np.float32)


def fuse_mean(dists: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of distance matrices."""
    w = np.asarray(weights, dtype=np.float64)
    return sum(wi * np.asarray(d, dtype=np.float64) for wi, d in zip(w, dists)) / w.sum()


def fuse_rank(dists: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of per-query gallery ranks (0 = nearest), scaled to [0, 1]."""
    w = np.asarray(weights, dtype=np.float64)
    g = np.asarray(dists[0]).shape[1]
    total = sum(wi * average_ranks(np.asarray(d)) for wi, d in zip(w, dists)) / w.sum()
    return total / max(g - 1, 1)


def fuse_reliability(dists: Sequence[np.ndarray], weights: Sequence[float], k: int = 15) -> np.ndarray:
    """Per-query weighted mean, each member weighted by how well its top-k agrees with the others'."""
    mats = [np.asarray(d, dtype=np.float64) for d in dists]
    qw = reliability_weights(mats, weights, k)  # (M, Q)
    return sum(qw[m][:, None] * mats[m] for m in range(len(mats)))


def reliability_weights(dists: Sequence[np.ndarray], weights: Sequence[float], k: int = 15) -> np.ndarray:
    """(M, Q) per-query member weights summing to 1 over members: spec weight x top-k agreement."""
    w = np.asarray(weights, dtype=np.float64)
    m_count = len(dists)
    q, g = np.asarray(dists[0]).shape
    if m_count == 1:
        return np.ones((1, q))
    k = max(1, min(k, g))
    tops = [top_k_mask(np.asarray(d), k) for d in dists]
    agree = np.zeros((m_count, q))
    for a in range(m_count):
        for b in range(m_count):
            if a != b:
                agree[a] += (tops[a] & tops[b]).sum(axis=1) / k
    agree /= m_count - 1
    raw = w[:, None] * agree
    total = raw.sum(axis=0)
    fallback = np.broadcast_to((w / w.sum())[:, None], raw.shape)
    return np.where(total > 0, raw / np.where(total > 0, total, 1.0), fallback)


def top_k_mask(dist: np.ndarray, k: int) -> np.ndarray:
    """(Q, G) boolean mask of each query's k nearest gallery items."""
    idx = np.argpartition(dist, k - 1, axis=1)[:, :k]
    mask = np.zeros(dist.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def average_ranks(dist: np.ndarray) -> np.ndarray:
    """Per-row ranks of `dist` (0 = smallest); tied values share the mean of their positions."""
    order = np.argsort(dist, axis=1, kind="stable")
    srt = np.take_along_axis(dist, order, axis=1)
    q, g = dist.shape
    pos = np.broadcast_to(np.arange(g), (q, g))
    starts = np.ones((q, g), dtype=bool)
    starts[:, 1:] = srt[:, 1:] != srt[:, :-1]
    ends = np.ones((q, g), dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, pos, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, pos, g - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty((q, g), dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0, axis=1)
    return ranks


def _check(dists: Sequence[np.ndarray], weights: Sequence[float]) -> tuple[list[np.ndarray], list[float]]:
    """Members must share one (Q, G) shape and have non-negative weights with a positive sum."""
    if not dists:
        raise SubmitError("an ensemble needs at least one member")
    if len(weights) != len(dists):
        raise SubmitError(f"{len(dists)} member matrices but {len(weights)} weights")
    mats = [np.asarray(d) for d in dists]
    shapes = {m.shape for m in mats}
    if len(shapes) != 1 or mats[0].ndim != 2:
        raise SubmitError(f"member distance matrices disagree in shape: {sorted(shapes)}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise SubmitError(f"member weights must be >= 0 with a positive sum, got {list(weights)}")
    return mats, [float(w) for w in weights]
