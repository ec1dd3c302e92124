"""The stacked [queries; gallery] rows and their distances: exact pairs (float64 dots, as the dense oracle) and
the float32 tile arithmetic with its error bound."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from submit.reranking._threads import _in_parts


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
