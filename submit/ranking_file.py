"""The challenge's ranking file: a CSV distance matrix (lower = more similar), written and validated.

Layout ((Q+1) x (G+1)): first line `0,<gallery ids>`, then one line per query `<query id>,<G distances>`;
queries and gallery in ascending id order. Ids are integers and may repeat: the official toolkit
writes the pid as the id of every test image, so several test gallery columns share an id (a stable
sort keeps their given order).

Distances are written as `%.5f`, without the official writer's padding to 10 characters (`%10.5f`):
both parse to the same numbers (leading spaces are ignored by float parsers), the unpadded file is
smaller, and its fields are plain numbers for strict CSV readers. The reader accepts both.

The reader is bounded: given the largest a ranking file for the data can be (`size_limit`: its rows x
columns x `CELL_BYTES`), a larger file is refused before a byte is read, and a pipe (a FIFO, `/dev/fd/N` of
a shell's process substitution) or a character device is read as a stream of at most that many bytes.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from submit import atomic
from submit.errors import SubmitError

_INT = re.compile(r"\s*[+-]?\d+\s*")
CELL_BYTES = 32  # a generous bound on one value and its comma: ids have at most 16 digits, '%10.5f' 10 characters
WHAT = "ranking file (CSV)"


@dataclass(frozen=True)
class SizeLimit:
    """The most bytes a ranking file may have, and what that bound is computed from (for the refusal)."""

    max_bytes: int
    basis: str  # e.g. "12 queries x 40 gallery images (the test split)"


def size_limit(queries: int, gallery: int, basis: str | None = None) -> SizeLimit:
    """The largest a ranking file of `queries` x `gallery` values can be: every value (the ids too) `CELL_BYTES`,
    lines ending in CRLF, a byte-order mark."""
    max_bytes = (queries + 1) * ((gallery + 1) * CELL_BYTES + 2) + 3
    return SizeLimit(max_bytes, basis or f"{queries} queries x {gallery} gallery images")


def manifest_size_limit(manifest: pd.DataFrame, split: str | None = None) -> SizeLimit | None:
    """The size limit of a ranking file for a manifest's `split` (without one: for its largest ranked split);
    None when there is no such split with both query and gallery rows."""
    best = None
    for name in [split] if split else RANKED_SPLITS:
        rows = manifest[manifest["split"] == name]
        q, g = int((rows["role"] == "query").sum()), int((rows["role"] == "gallery").sum())
        if q and g:
            limit = size_limit(q, g, f"{q} queries x {g} gallery images (the {name} split)")
            best = limit if best is None or limit.max_bytes > best.max_bytes else best
    return best


def write_ranking(path: str | Path, dist: np.ndarray, query_ids: Sequence[int] | np.ndarray,
                  gallery_ids: Sequence[int] | np.ndarray) -> Path:
    """Write a (Q, G) distance matrix as a ranking file, rows/columns sorted by id (stable); atomic."""
    path = Path(path)
    d = np.asarray(dist, dtype=np.float64)
    q = _int_ids(query_ids, "query", path)
    g = _int_ids(gallery_ids, "gallery", path)
    if d.ndim != 2 or d.shape != (q.size, g.size) or d.size == 0:
        raise SubmitError(f"{path}: distance matrix has shape {d.shape}; expected ({q.size}, {g.size}) "
                          f"for {q.size} query and {g.size} gallery ids (both non-empty)")
    bad = ~np.isfinite(d)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise SubmitError(f"{path}: distance {d[r, c]} for query id {q[r]} (row {r}), gallery column {c} "
                          f"is not finite; refusing to write")
    q_order = np.argsort(q, kind="stable")
    g_order = np.argsort(g, kind="stable")
    d = d[q_order][:, g_order]
    row_fmt = ",".join(["%.5f"] * g.size)
    with atomic.atomic_file(path, "w", newline="\n") as f:
        f.write("0," + ",".join(str(i) for i in g[g_order]) + "\n")
        for qid, row in zip(q[q_order].tolist(), d):
            f.write(f"{qid}," + row_fmt % tuple(row.tolist()) + "\n")
    return path


def read_ranking(path: str | Path, expect_queries: Iterable[int] | None = None,
                 expect_gallery: Iterable[int] | None = None,
                 limit: SizeLimit | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and read a ranking file -> (dist (Q, G) float64, query_ids, gallery_ids).

    Checks the header (`0` then integer gallery ids), that every line has the header's length, integer
    query ids, ascending ids, finite numbers, and (optionally) the id multisets expected from a manifest.
    Each failure is a one-line SubmitError naming the file, line and column. `limit` (by default the bound for
    the expected ids, when both are given) bounds what is read: a larger file is refused before reading.
    """
    path = Path(path)
    if expect_queries is not None:
        expect_queries = list(expect_queries)
    if expect_gallery is not None:
        expect_gallery = list(expect_gallery)
    if limit is None and expect_queries is not None and expect_gallery is not None:
        limit = size_limit(len(expect_queries), len(expect_gallery))
    lines = _lines(path, limit)
    header = lines[0].split(",")
    if not _INT.fullmatch(header[0]) or int(header[0]) != 0:
        raise SubmitError(f"{path}: line 1, column 1 is {header[0]!r}; the header must start with 0")
    if len(header) < 2:
        raise SubmitError(f"{path}: line 1 has no gallery ids; expected '0,<gallery ids>'")
    gallery_ids = np.array([_int_field(path, 1, k + 1, v, "gallery id") for k, v in enumerate(header)][1:])
    if len(lines) < 2:
        raise SubmitError(f"{path}: no query lines after the header")
    query_ids = np.array([_query_id(path, n, line, len(header)) for n, line in enumerate(lines[1:], start=2)])
    _check_ascending(path, gallery_ids, "gallery", lambda k: f"line 1, column {k + 2}")
    _check_ascending(path, query_ids, "query", lambda k: f"line {k + 2}, column 1")
    dist = _values(path, lines)
    for kind, found, expected in (("query", query_ids, expect_queries), ("gallery", gallery_ids, expect_gallery)):
        if expected is not None:
            problem = id_mismatch(kind, found, expected)
            if problem:
                raise SubmitError(f"{path}: {problem}")
    return dist, query_ids, gallery_ids


def id_mismatch(kind: str, found: Iterable[int], expected: Iterable[int]) -> str | None:
    """Describe how two id multisets differ ("3 missing (e.g. 17), 1 unexpected (e.g. 99)"), or None."""
    have, want = Counter(int(i) for i in found), Counter(int(i) for i in expected)
    if have == want:
        return None
    missing, extra = want - have, have - want
    parts = []
    if missing:
        parts.append(f"{sum(missing.values())} missing (e.g. {_examples(missing)})")
    if extra:
        parts.append(f"{sum(extra.values())} not expected (e.g. {_examples(extra)})")
    return (f"{kind} ids differ from the manifest's ({sum(have.values())} in the file, "
            f"{sum(want.values())} expected): " + ", ".join(parts))


RANKED_SPLITS = ("test", "challenge")  # the manifest splits a ranking file can rank


@dataclass(frozen=True)
class SplitMatch:
    """Which ranked split a ranking file's ids belong to (`detect_split`)."""

    split: str | None  # the exact fit; else the same-sized split sharing most ids; None when neither exists
    exact: bool  # the split's query and gallery id multisets equal the file's
    ambiguous: bool  # the ids fit both splits exactly
    problem: str | None  # for an inexact match: how the split's ids differ from the file's (`id_mismatch`)
    sizes: dict[str, tuple[int, int]]  # (queries, gallery) of each ranked split that has both roles


def detect_split(manifest: pd.DataFrame, q_ids: np.ndarray, g_ids: np.ndarray) -> SplitMatch:
    """The one rule for `--split auto` (evaluate, report): the ranked split whose query and gallery id multisets
    equal the file's; when none does, the same-sized split sharing most of the file's ids (at least one)."""
    def ids(split: str, role: str) -> np.ndarray:
        return manifest.loc[(manifest["split"] == split) & (manifest["role"] == role), "image_id"].to_numpy()

    rows = {s: (ids(s, "query"), ids(s, "gallery")) for s in RANKED_SPLITS}
    sizes = {s: (len(q), len(g)) for s, (q, g) in rows.items() if len(q) and len(g)}

    def problem(s: str) -> str | None:
        return id_mismatch("query", q_ids, rows[s][0]) or id_mismatch("gallery", g_ids, rows[s][1])

    fits = [s for s in sizes if problem(s) is None]
    if fits:
        return SplitMatch(fits[0], True, len(fits) > 1, None, sizes)
    shared = {s: int(np.isin(q_ids, rows[s][0]).sum() + np.isin(g_ids, rows[s][1]).sum())
              for s in sizes if sizes[s] == (len(q_ids), len(g_ids))}
    if shared and max(shared.values()) > 0:
        closest = max(shared, key=lambda s: shared[s])
        return SplitMatch(closest, False, False, problem(closest), sizes)
    return SplitMatch(None, False, False, None, sizes)


def _examples(ids: Counter) -> str:
    """Up to three ids, smallest first."""
    return ", ".join(str(i) for i in sorted(ids)[:3])


def _int_ids(ids: Sequence[int] | np.ndarray, kind: str, path: Path) -> np.ndarray:
    """Ids as int64; refuse non-integers (a float id would print wrongly)."""
    a = np.asarray(ids).reshape(-1)
    if a.dtype.kind in "iu":
        return a.astype(np.int64)
    try:
        f = a.astype(np.float64)
    except (TypeError, ValueError):
        raise SubmitError(f"{path}: {kind} ids must be integers, got {a.dtype}") from None
    bad = ~np.isfinite(f) | (f != np.round(f))
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise SubmitError(f"{path}: {kind} id {a.tolist()[k]!r} at position {k} is not an integer")
    return f.astype(np.int64)


def _lines(path: Path, limit: SizeLimit | None = None) -> list[str]:
    """Non-empty text lines (a trailing newline is fine); unreadable or empty files are errors."""
    lines = read_bounded(path, limit).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise SubmitError(f"{path}: empty file; expected a header line '0,<gallery ids>'")
    return lines


def read_bounded(path: Path, limit: SizeLimit | None = None) -> str:
    """The text of a ranking file, a pipe (FIFO, /dev/fd/N) or a character device, read as UTF-8 (a byte-order
    mark dropped); at most `limit` bytes: a larger file is refused before reading, a longer stream once read
    that far. A folder, socket or block device, or nothing at `path`, is refused saying which."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise SubmitError(f"{path}: no such ranking file") from None
    except OSError as exc:
        raise SubmitError(f"{path}: cannot read ({exc.strerror or exc})") from None
    mode = st.st_mode
    regular = stat.S_ISREG(mode)
    if not (regular or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        kind = "a folder" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) else \
            "a block device" if stat.S_ISBLK(mode) else "not a file"
        raise SubmitError(f"{path}: is {kind}; expected a {WHAT} or a pipe")
    if regular and limit is not None and st.st_size > limit.max_bytes:
        raise SubmitError(f"{path}: {st.st_size} bytes, more than a ranking file for {limit.basis} can be (at most "
                          f"{limit.max_bytes} bytes); expected the ranking file of this data (wrong --data?)")
    try:
        with open(path, "rb") as fh:
            data = fh.read() if limit is None else fh.read(limit.max_bytes + 1)
    except IsADirectoryError:
        raise SubmitError(f"{path}: is a folder; expected a {WHAT}") from None
    except OSError as exc:
        raise SubmitError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if limit is not None and len(data) > limit.max_bytes:
        source = "a file that grew while read" if regular else \
            "a pipe" if stat.S_ISFIFO(mode) else "a character device"
        raise SubmitError(f"{path}: {source} giving more than {limit.max_bytes} bytes, more than a ranking file for "
                          f"{limit.basis} can be; expected the ranking file of this data (wrong --data?)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SubmitError(f"{path}: not a text CSV file (not UTF-8 text)") from None


def _int_field(path: Path, line: int, col: int, text: str, what: str) -> int:
    """Parse an integer id field strictly (no decimals, no underscores)."""
    if not _INT.fullmatch(text):
        raise SubmitError(f"{path}: line {line}, column {col}: {what} {text!r} is not an integer")
    return int(text)


def _query_id(path: Path, n: int, line: str, width: int) -> int:
    """Check a query line's field count and return its integer id."""
    fields = line.count(",") + 1
    if fields != width:
        raise SubmitError(f"{path}: line {n} has {fields} fields; expected {width} like the header "
                          f"(query id + {width - 1} distances)")
    return _int_field(path, n, 1, line[:line.index(",")], "query id")


def _check_ascending(path: Path, ids: np.ndarray, kind: str, where: Callable[[int], str]) -> None:
    """Ids must not decrease (repeats allowed); `where(k)` names the k-th id's line and column."""
    drops = np.flatnonzero(np.diff(ids) < 0)
    if drops.size:
        k = int(drops[0]) + 1
        raise SubmitError(f"{path}: {where(k)}: {kind} id {ids[k]} comes after {ids[k - 1]}; "
                          f"{kind} ids must be in ascending order")


def _values(path: Path, lines: list[str]) -> np.ndarray:
    """The distance block as float64 (fast C parser); on failure, find and name the bad cell."""
    try:
        frame = pd.read_csv(io.StringIO("\n".join(lines[1:])), header=None, dtype=np.float64,
                            skip_blank_lines=False, low_memory=False)
        dist = frame.to_numpy()[:, 1:]
    except (ValueError, pd.errors.ParserError):
        raise SubmitError(_first_bad_cell(path, lines, lambda s: not _is_float(s), "is not a number")) from None
    bad = ~np.isfinite(dist)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        text = lines[r + 1].split(",")[c + 1]
        raise SubmitError(f"{path}: line {r + 2}, column {c + 2}: distance {text.strip()!r} is not a finite number")
    return np.ascontiguousarray(dist)


def _is_float(text: str) -> bool:
    """Whether Python can read `text` as a number."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _first_bad_cell(path: Path, lines: list[str], bad: Callable[[str], bool], what: str) -> str:
    """Slow scan (error path only) for the first distance field where `bad` holds."""
    for n, line in enumerate(lines[1:], start=2):
        for k, field in enumerate(line.split(",")[1:], start=2):
            if bad(field):
                return f"{path}: line {n}, column {k}: distance {field!r} {what}"
    return f"{path}: distances could not be parsed as numbers"
