"""Argument checks shared by the re-ranking steps: feature matrices and parameters, one-line SubmitErrors."""

from __future__ import annotations

from typing import Any

import numpy as np

from submit.errors import SubmitError


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


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)
