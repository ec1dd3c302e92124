"""How much memory `k_reciprocal` needs, how much there is, and the early refusal of a job that would not fit."""

from __future__ import annotations

import os

from submit.errors import SubmitError


def available_memory() -> int:
    """Bytes of memory available to a new allocation (/proc/meminfo, else psutil when installed)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def estimate_rerank_memory(n_query: int, n_gallery: int, dim: int = 1024, k1: int = 20, k2: int = 6,
                           block: int = 1024, threads: int = 1) -> int:
    """Bytes `k_reciprocal` needs at its peak, inputs not counted: an upper estimate (the measured peak is
    1.5-3x lower on re-id-like features). Dominated by the (Q, G) float32 answer for large jobs."""
    n = n_query + n_gallery
    need = min(n, max(k1 + 1, k2) + 1)
    b = min(block, n)
    per_row = n * (need * 4 + 32)  # running top-need distances, thresholds, maxima, norms, cells
    tile = b * b * 12 + 2 * b * dim * 4  # score tile, its masks and partition copy, two gathered row blocks
    tile += (threads - 1) * (b * b * 8 + 2 * b * dim * 4)  # each further worker's tile and blocks
    candidates = n * 3 * need * 24  # (row, col, distance) kept by the pass, and their sort
    v_row = min(n, 2 * (k1 + 1))  # expanded k-reciprocal set
    qe_row = min(n, k2 * (k1 + 1)) if k2 > 1 else v_row
    sparse = n * (v_row * 16 + qe_row * 24)  # V, V_qe and its column-sorted copy
    chunks = 48 << 20  # fixed-size work chunks (set expansion, local expansion, Jaccard)
    return int(n_query * n_gallery * 4 + per_row + tile + candidates + sparse + chunks)


def _check_memory(n_query: int, n_gallery: int, dim: int, k1: int, k2: int, block: int, threads: int,
                  memory_limit: int | None) -> None:
    needed = estimate_rerank_memory(n_query, n_gallery, dim, k1, k2, block, threads)
    limit = available_memory() if memory_limit is None else int(memory_limit)
    if needed > limit:
        raise SubmitError(
            f"k_reciprocal: needs about {needed / 2**30:.2f} GiB for {n_query} queries x {n_gallery} gallery "
            f"(block={block}) but only {limit / 2**30:.2f} GiB is available; lower 'block' or re-rank fewer "
            f"queries at a time")
