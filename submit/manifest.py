"""The manifest: one CSV row per crop, the single source of truth every later stage reads.

Columns: path (relative to DATA_DIR), split {train,test,challenge}, role {train,query,gallery},
pid (-1 unknown), seq, frame (-1 unknown), image_id (the id the ranking file uses).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from submit import atomic
from submit.config import require_file
from submit.errors import SubmitError
from submit.layouts import ID_MAX, ID_MIN

COLUMNS = ["path", "split", "role", "pid", "seq", "frame", "image_id"]
INT_COLUMNS = ["pid", "seq", "frame", "image_id"]
SPLITS = ("train", "test", "challenge")
ROLES = ("train", "query", "gallery")
MANIFEST_NAME = "manifest.csv"


def manifest_path(data_dir: str | Path) -> Path:
    """Where the manifest of a prepared data dir lives."""
    return Path(data_dir) / MANIFEST_NAME


def validate(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Check columns, value sets and integer types; return a normalised copy."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise SubmitError(f"{where}: missing column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
    df = df[COLUMNS].copy()
    for col in INT_COLUMNS:
        values = pd.to_numeric(df[col], errors="coerce")
        if values.isna().any() or (values != values.round()).any():
            row = int(values.isna().idxmax()) if values.isna().any() else 0
            raise SubmitError(f"{where}: column {col!r} must hold integers (row {row + 2})")
        out = (values < ID_MIN) | (values > ID_MAX)
        if out.any():
            row = int(out.to_numpy().argmax())
            raise SubmitError(f"{where}: row {row + 2}: {col} {df[col].iloc[row]} is out of range; expected "
                              f"{ID_MIN} <= {col} <= {ID_MAX}")
        df[col] = values.astype("int64")
    for col, allowed in (("split", SPLITS), ("role", ROLES)):
        bad = ~df[col].isin(allowed)
        if bad.any():
            raise SubmitError(f"{where}: column {col!r} has {df[col][bad].iloc[0]!r}; expected one of {allowed}")
    # image_id is the id the ranking file prints. Only challenge ids (file numbers) must be unique: the
    # official toolkit writes the pid as the id of every test image, so test gallery ids repeat (and so
    # do test query ids in Market-style data); rows sharing an id keep their manifest order in `select`.
    _refuse_duplicate_rows(df, where)
    dup = df.duplicated(["split", "role", "image_id"]) & (df["split"] == "challenge")
    if dup.any():
        r = df[dup].iloc[0]
        raise SubmitError(f"{where}: image_id {r.image_id} appears twice in {r.split}/{r.role}")
    return df.reset_index(drop=True)


def _refuse_duplicate_rows(df: pd.DataFrame, where: str) -> None:
    """A crop listed twice (same path and role) would give the ranking file a duplicated row or column."""
    dup = df.duplicated(["path", "split", "role"])
    if dup.any():
        row = int(dup.to_numpy().argmax())
        first = int((df["path"] == df["path"].iloc[row]).to_numpy().argmax())
        raise SubmitError(f"{where}: row {row + 2}: {df['path'].iloc[row]} is listed twice (also row {first + 2}) "
                          f"in {df['split'].iloc[row]}/{df['role'].iloc[row]}; expected each crop once")


def read_manifest(data_dir: str | Path) -> pd.DataFrame:
    """Read and validate DATA_DIR/manifest.csv."""
    path = manifest_path(data_dir)
    if not path.is_file():
        raise SubmitError(f"{path}: no manifest; run `reident-submit prepare SOURCE --out {data_dir}` first")
    return validate(read_csv(path), str(path))


def read_csv(path: str | Path, missing: str = "file not found") -> pd.DataFrame:
    """Read any CSV the toolkit takes as input; one-line errors for a missing or unreadable file."""
    path = require_file(path, "CSV file", missing)
    try:
        return pd.read_csv(path, encoding="utf-8-sig")  # a BOM (Excel's "CSV UTF-8") is not part of a header
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SubmitError(f"{path}: not a readable CSV ({type(exc).__name__})") from None


def write_manifest(df: pd.DataFrame, data_dir: str | Path) -> Path:
    """Validate and write the manifest atomically (temp file + rename)."""
    path = manifest_path(data_dir)
    df = validate(df, str(path))
    with atomic.atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def select(df: pd.DataFrame, split: str, role: str) -> pd.DataFrame:
    """Rows of one split/role, sorted by image_id (ranking-file order); train rows keep file order."""
    rows = df[(df["split"] == split) & (df["role"] == role)]
    if rows.empty:
        raise SubmitError(f"manifest has no {split}/{role} images")
    if role != "train":
        rows = rows.sort_values("image_id", kind="stable")
    return rows.reset_index(drop=True)


def fingerprint(df: pd.DataFrame) -> str:
    """A content hash of manifest rows: caches keyed by it go stale when the manifest changes."""
    text = df[COLUMNS].to_csv(index=False).encode()
    return hashlib.sha256(text).hexdigest()[:16]
