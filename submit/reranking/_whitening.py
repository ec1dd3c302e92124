"""PCA whitening of features, fitted on the training split or on the query + gallery features themselves.

The 2023 runner-up reduced ViT-L/14 and EVA02-L features to 560 dimensions with whitening before DBA and query
expansion: decorrelating the dimensions and equalising their variance makes cosine similarity weigh every
direction of variation of re-id features alike instead of letting a few dominant ones (lighting, team colour)
decide the ranking.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from submit.errors import SubmitError
from submit.reranking._checks import _as_features, _check_float, _check_int, _pair, _unit

FIT_ON = ("train", "query+gallery")

TrainFeatures = Any  # an (n, d) array, or a zero-argument function returning one (called only when needed)


def pca_whitening(query_feats: np.ndarray, gallery_feats: np.ndarray, dim: int | None = None,
                  fit_on: str = "query+gallery", eps: float = 1e-6,
                  train_feats: TrainFeatures = None) -> tuple[np.ndarray, np.ndarray]:
    """PCA-whitened, unit-normalised (queries, gallery): centred features projected on the top `dim` principal
    axes of the fitted features (default: all, up to their rank), each divided by sqrt(its variance + eps).

    `fit_on` "query+gallery" fits on the features being ranked; "train" on `train_feats`, the training split's
    features of the same model (an array, or a function returning them, called only here, so a caller can embed
    them lazily). The covariance is (X - mean)^T (X - mean) / n of the fitted rows X.
    """
    q, g = _pair(query_feats, gallery_feats)
    dim = None if dim is None else _check_int(dim, "dim")
    eps = _check_float(eps, "eps", 0.0, 1.0)
    fit = _fit_rows(q, g, fit_on, train_feats)
    mean, axes, scale = _pca(fit, dim, eps, fit_on)
    return _project(q, mean, axes, scale), _project(g, mean, axes, scale)


def _fit_rows(q: np.ndarray, g: np.ndarray, fit_on: str, train_feats: TrainFeatures) -> np.ndarray:
    """The rows the whitening is fitted on, as float64."""
    if fit_on not in FIT_ON:
        raise SubmitError(f"fit_on: expected one of {list(FIT_ON)}, got {fit_on!r}")
    if fit_on == "query+gallery":
        return np.concatenate([q, g]).astype(np.float64)
    if train_feats is None:
        raise SubmitError("fit_on: 'train' needs the training split's features (train_feats), which were not given")
    loaded = train_feats() if callable(train_feats) else train_feats
    train = _as_features(loaded, "train_feats")
    if train.shape[1] != q.shape[1]:
        raise SubmitError(f"train_feats: feature size {train.shape[1]} differs from query_feats' {q.shape[1]}")
    return train.astype(np.float64)


def _pca(x: np.ndarray, dim: int | None, eps: float, fit_on: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, (d, dim) principal axes by decreasing variance, 1 / sqrt(variance + eps)) of rows x."""
    mean = x.mean(axis=0)
    centred = x - mean
    variance, axes = np.linalg.eigh(centred.T @ centred / len(x))
    variance, axes = variance[::-1], axes[:, ::-1]
    rank = int((variance > max(variance[0], 0.0) * x.shape[1] * np.finfo(np.float64).eps).sum())
    if rank == 0:
        raise SubmitError(f"fit_on: the {fit_on} features are all identical; there is nothing to whiten")
    if dim is not None and dim > rank:
        raise SubmitError(f"dim: {dim} is more than the {rank} principal components of the {fit_on} features "
                          f"({len(x)} rows, {x.shape[1]}-d)")
    keep = rank if dim is None else dim
    axes = axes[:, :keep] * _signs(axes[:, :keep])
    return mean, axes, 1.0 / np.sqrt(variance[:keep] + eps)


def _signs(axes: np.ndarray) -> np.ndarray:
    """+1 or -1 per axis, so that each axis's largest-magnitude loading is positive (a reproducible orientation)."""
    largest = axes[np.abs(axes).argmax(axis=0), np.arange(axes.shape[1])]
    return np.where(largest < 0, -1.0, 1.0)


def _project(x: np.ndarray, mean: np.ndarray, axes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Whitened, unit rows of x (float32)."""
    return _unit(((x.astype(np.float64) - mean) @ axes) * scale)
