"""Worker threads of the re-ranking steps: contiguous row ranges per thread, one BLAS thread each."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run the calling thread's BLAS calls on one thread, so that worker threads use one core each (OpenBLAS's
    per-thread setting, >= 0.3.27; other threads keep theirs). A no-op where numpy's BLAS has no such setting."""
    setter = _openblas_thread_setter()
    if setter is None:
        yield
        return
    previous = setter(1)
    try:
        yield
    finally:
        setter(previous)


def _on_one_blas_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) with this thread's BLAS calls on one thread (for worker threads)."""
    with _one_blas_thread():
        return fn(*args)


@functools.lru_cache(maxsize=1)
def _openblas_thread_setter() -> Callable[[int], int] | None:
    """`openblas_set_num_threads_local` of the OpenBLAS library this process loaded (numpy's), or None."""
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({line.split()[-1] for line in fh if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            setter = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
        return setter
    return None


def _in_parts(fn: Callable[[int, int], Any], n: int, threads: int, grain: int = 128) -> list[Any]:
    """[fn(a, b) for contiguous ranges a:b splitting range(n)], one range per thread (at most `threads`, at
    least `grain` items each; one BLAS thread each). For item-wise work whose results do not depend on the split."""
    parts = max(1, min(threads, n // max(1, grain)))
    if parts == 1:
        return [fn(0, n)]
    bounds = [n * i // parts for i in range(parts + 1)]
    with ThreadPoolExecutor(parts, thread_name_prefix="rerank") as pool:
        return list(pool.map(functools.partial(_on_one_blas_thread, fn), bounds[:-1], bounds[1:]))
