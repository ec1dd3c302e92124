"""Dense k-reciprocal re-ranking (Zhong et al., CVPR 2017), written the way the reference re-id toolkits do it.

This is the slow test oracle for `submit.reranking.k_reciprocal`: it builds every (N, N) matrix
(N = queries + gallery) and loops over rows in Python, exactly like the public toolkits' `re_ranking`.
Two deliberate differences from those toolkits, both documented in `submit/reranking/_kreciprocal.py`:
- pairwise inner products are computed in float64 and rounded to float32, so bitwise-equal rows give
  bitwise-equal distances whatever the summation order, and neighbour ties are broken by the lower
  index (stable argsort) instead of by whatever the unstable sort happens to do;
- the Jaccard overlaps are summed in float64 and V is float32 by default (the toolkits use float16 to
  save memory, which changes the result by about 1e-3; pass ``v_dtype=np.float16`` to mimic them).
``toolkit=True`` runs the toolkits' own choices instead (float32 matmul distances, default unstable argsort,
float16 V): the speed and memory reference of the benchmark, not an oracle (ties and ~1e-3 differ).
"""

from __future__ import annotations

import numpy as np


def toolkit_distances(feats: np.ndarray) -> np.ndarray:
    """Dense (N, N) float32 squared distances the toolkits' way: one float32 matmul, norms broadcast."""
    x = np.asarray(feats, dtype=np.float32)
    sq = (x * x).sum(axis=1)
    dist = x @ x.T
    dist *= -2
    dist += sq[:, None]
    dist += sq[None, :]
    return dist


def squared_distances(feats: np.ndarray, block: int = 1024) -> np.ndarray:
    """Dense (N, N) float32 squared Euclidean distances: |x|^2 + |y|^2 - 2 x.y, dots rounded to float32."""
    x64 = np.asarray(feats, dtype=np.float64)
    n = x64.shape[0]
    sq = np.einsum("ij,ij->i", x64, x64).astype(np.float32)
    dist = np.empty((n, n), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        dots = (x64[start:stop] @ x64.T).astype(np.float32)
        dist[start:stop] = sq[start:stop, None] + sq[None, :] - np.float32(2.0) * dots
    return dist


def _reciprocal(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
    """Members of i's top-(k+1) list that also have i in their own top-(k+1) list, in rank order."""
    forward = initial_rank[i, : k + 1]
    backward = initial_rank[forward, : k + 1]
    rows = np.where(backward == i)[0]
    return forward[rows]


def dense_k_reciprocal(
    query_feats: np.ndarray,
    gallery_feats: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    v_dtype: type = np.float32,
    toolkit: bool = False,
) -> np.ndarray:
    """Re-ranked (Q, G) float32 distances, computed with dense (N, N) matrices and Python loops."""
    query_num = query_feats.shape[0]
    feats = np.concatenate([query_feats, gallery_feats], axis=0)
    all_num = feats.shape[0]
    original_dist = toolkit_distances(feats) if toolkit else squared_distances(feats)
    # Column-max normalisation, then transpose: row i ends up divided by the max of column i.
    original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
    initial_rank = np.argsort(original_dist, axis=1, kind=None if toolkit else "stable").astype(np.int32)
    v_dtype = np.float16 if toolkit else v_dtype
    V = np.zeros((all_num, all_num), dtype=v_dtype)
    half = int(np.around(k1 / 2))

    for i in range(all_num):
        k_reciprocal_index = _reciprocal(initial_rank, i, k1)
        expansion = k_reciprocal_index
        for candidate in k_reciprocal_index:
            candidate_index = _reciprocal(initial_rank, int(candidate), half)
            overlap = len(np.intersect1d(candidate_index, k_reciprocal_index))
            if overlap > 2 / 3 * len(candidate_index):
                expansion = np.append(expansion, candidate_index)
        expansion = np.unique(expansion)
        weight = np.exp(-original_dist[i, expansion])
        V[i, expansion] = weight / np.sum(weight)

    original_dist = original_dist[:query_num]
    if k2 != 1:
        V_qe = np.zeros_like(V)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    del initial_rank

    inv_index = [np.where(V[:, j] != 0)[0] for j in range(all_num)]
    jaccard_dist = np.zeros((query_num, all_num), dtype=np.float64)
    for i in range(query_num):
        temp_min = np.zeros(all_num, dtype=np.float64)
        nonzero = np.where(V[i, :] != 0)[0]
        for k in nonzero:
            rows = inv_index[k]
            temp_min[rows] += np.minimum(V[i, k], V[rows, k]).astype(np.float64)
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)

    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:, query_num:].astype(np.float32)
