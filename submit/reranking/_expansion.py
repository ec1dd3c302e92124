"""The simple feature-space steps: alpha query expansion, database-side augmentation (faiss top-k), cosine distance."""

from __future__ import annotations

import numpy as np

from submit.errors import SubmitError
from submit.reranking._checks import _check_float, _check_int, _pair, _unit


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


def _expansion_inputs(query_feats: np.ndarray, gallery_feats: np.ndarray, k: int,
                      alpha: float) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Checked QE/DBA arguments: unit query and gallery rows, k (at most the gallery size) and alpha."""
    q, g = _pair(query_feats, gallery_feats)
    k = _check_int(k, "k")
    alpha = _check_float(alpha, "alpha", 0.0, 100.0)
    if k > len(g):
        raise SubmitError(f"k: {k} is more than the {len(g)} gallery features")
    return _unit(q), _unit(g), k, alpha


def query_expansion(query_feats: np.ndarray, gallery_feats: np.ndarray, k: int = 1,
                    alpha: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Alpha query expansion (Radenovic et al.): each query becomes the unit-normalised sum of itself and its
    k nearest gallery features weighted by cosine^alpha (alpha=0: plain average). Returns (queries, gallery)."""
    q, g, k, alpha = _expansion_inputs(query_feats, gallery_feats, k, alpha)
    sims, idx = _top_k(g, q, k)
    return _unit(q + _weighted_mean(g, sims, idx, alpha)), g


def database_augmentation(query_feats: np.ndarray, gallery_feats: np.ndarray, k: int = 5,
                          alpha: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Database-side augmentation (DBA): each gallery feature becomes the unit-normalised mean of its k nearest
    gallery features (itself included) weighted by cosine^alpha (alpha=0: plain mean). Queries are unchanged."""
    q, g, k, alpha = _expansion_inputs(query_feats, gallery_feats, k, alpha)
    sims, idx = _top_k(g, g, k)
    return q, _unit(_weighted_mean(g, sims, idx, alpha))


def cosine_distance(query_feats: np.ndarray, gallery_feats: np.ndarray) -> np.ndarray:
    """(Q, G) float32 cosine distances 1 - cos(q, g), in [0, 2]."""
    q, g = _pair(query_feats, gallery_feats)
    return (1.0 - _unit(q) @ _unit(g).T).astype(np.float32)
