"""Held-out identities: a tuning split made of TRAIN identities, never the real test or challenge split.

Settings (re-ranking, fusion weights, epochs...) are chosen on identities that no run trains on, never on
the real test split (the reported figure) nor the challenge split (no ground truth). The construction
follows the real test split, whose query and matches come from different sequences (race locations):

- candidates are the train identities (pid >= 0) seen in two or more sequences;
- `n_ids` of them are drawn with `numpy.random.default_rng(seed).choice` (without replacement);
- for each drawn identity the query is the first frame of its last sequence (`split=test`, `role=query`)
  and the gallery holds its images from the other sequences (`role=gallery`); `image_id` is the pid;
- every other train row keeps training; the source's test and challenge rows are dropped.

`holdout_folds` draws `n_ids * k` candidates at once and cuts them into K disjoint held-out sets (fold 0 of
k=1 is `holdout_split`). `write_holdout` writes one split as a derived DATA_DIR:

    OUT/manifest.csv   the split above (validated like any manifest)
    OUT/images         a symlink to the source's images folder (nothing copied)
    OUT/numbers.csv    copied from the source when it has one (shirt-number ground truth, paths under images/)
    OUT/holdout.json   the provenance record (`HoldoutRecord`, format below)

`holdout.json` is a JSON object: `format` ("reident-submit holdout 1"), `source` (the source DATA_DIR,
resolved absolute path), `source_fingerprint` (`manifest.fingerprint` of the source manifest),
`manifest_fingerprint` (the fingerprint of OUT/manifest.csv as written), `n_ids`, `seed`, `fold`, `folds`
(integers) and `held_out` (the held-out pids, sorted). A folder is a valid tuning folder only when it
carries this record and its manifest still has the recorded fingerprint (`check_tuning_dir`): a prepared
DATA_DIR has none, so its test split, the real one, can never be mistaken for a held-out split.
`held_out_ids` tells which identities were held out; `tune` refuses a member that did not train on the fold's
own manifest (its fingerprint), which holds none of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import pandas as pd

from submit import atomic
from submit.config import read_text
from submit.errors import SubmitError
from submit.manifest import fingerprint, manifest_path, read_manifest, write_manifest

RECORD_NAME = "holdout.json"
FORMAT = "reident-submit holdout 1"
EXTRAS = ("numbers.csv",)  # source files a derived DATA_DIR carries over (copied)


@dataclass(frozen=True)
class HoldoutRecord:
    """The provenance of a derived held-out DATA_DIR (the content of its `holdout.json`)."""

    source: str  # the source DATA_DIR, resolved absolute path
    source_fingerprint: str  # manifest.fingerprint of the source manifest
    manifest_fingerprint: str  # manifest.fingerprint of the derived manifest as written
    n_ids: int
    seed: int
    fold: int
    folds: int
    held_out: tuple[int, ...]  # the held-out pids, sorted
    format: str = FORMAT

    def to_json(self) -> str:
        """The record as the text of `holdout.json`: one key a line, `format` first, the held-out ids on one line."""
        data = {"format": self.format, **dataclasses.asdict(self), "held_out": list(self.held_out)}
        return "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items()) + "\n}\n"

    def arguments(self) -> str:
        """The arguments that made the split, in the words of the options (for one-line messages)."""
        return (f"{self.source} (manifest {self.source_fingerprint}) --holdout {self.n_ids} "
                f"--holdout-seed {self.seed} fold {self.fold} of --folds {self.folds}")

    def same_split(self, other: HoldoutRecord) -> bool:
        """Whether `other` was made from the same source manifest with the same arguments."""
        keys = ("source", "source_fingerprint", "n_ids", "seed", "fold", "folds")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


# ---- the split --------------------------------------------------------------------------------------


def candidates(df: pd.DataFrame) -> np.ndarray:
    """The sorted train identities (pid >= 0) with images in two or more sequences: those that can be held out."""
    train = df[(df["split"] == "train") & (df["pid"] >= 0)]
    seqs = train.groupby("pid")["seq"].nunique()
    return np.sort(seqs[seqs >= 2].index.to_numpy())


def holdout_split(df: pd.DataFrame, n_ids: int, seed: int) -> pd.DataFrame:
    """Train rows of manifest `df` with `n_ids` multi-sequence identities moved to a cross-sequence test split.

    One query (first frame of the identity's last sequence) and its gallery (its other sequences) per held-out
    identity; the source's test and challenge rows are dropped. Refuses (naming --holdout) n_ids < 1 or fewer
    than n_ids candidates.
    """
    return holdout_folds(df, n_ids, 1, seed)[0]


def holdout_folds(df: pd.DataFrame, n_ids: int, k: int, seed: int) -> list[pd.DataFrame]:
    """K `holdout_split`-style splits of `df` whose held-out identity sets are disjoint (grouped by identity).

    `n_ids * k` candidates are drawn at once and cut into K consecutive sets; fold 0 of k=1 is
    `holdout_split(df, n_ids, seed)`. Refuses (naming --holdout / --folds) when the candidates cannot give
    K disjoint sets of n_ids.
    """
    chosen = _draw(df, n_ids, k, seed)
    return [_split(df, set(chosen[i * n_ids:(i + 1) * n_ids].tolist())) for i in range(k)]


def held_out_of(split: pd.DataFrame) -> list[int]:
    """The sorted held-out pids of a split made by `holdout_split` / `holdout_folds` (its test identities)."""
    return sorted(int(p) for p in split.loc[split["split"] == "test", "pid"].unique())


def _draw(df: pd.DataFrame, n_ids: int, k: int, seed: int) -> np.ndarray:
    """`n_ids * k` distinct candidates in the generator's order (one-line refusals naming the options)."""
    _check_count(n_ids, "--holdout", "identities")
    _check_count(k, "--folds", "folds")
    if not _is_int(seed) or seed < 0:
        raise SubmitError(f"--holdout-seed {seed}: expected a whole number >= 0")
    pool = candidates(df)
    if len(pool) < n_ids * k:
        folds = f" --folds {k}" if k > 1 else ""
        need = f"{n_ids} x {k} = {n_ids * k}" if k > 1 else f"{n_ids}"
        raise SubmitError(f"--holdout {n_ids}{folds}: only {len(pool)} train identities have images in 2+ sequences; "
                          f"expected at least {need} (a held-out query and its gallery come from different "
                          "sequences): lower --holdout" + (" or --folds" if k > 1 else ""))
    return np.random.default_rng(seed).choice(pool, size=n_ids * k, replace=False)


def _check_count(value: Any, option: str, what: str) -> None:
    """Refuse a count that is not a whole number >= 1, naming its option."""
    if not _is_int(value) or value < 1:
        raise SubmitError(f"{option} {value}: expected a whole number of {what} >= 1")


def _split(df: pd.DataFrame, held: set[int]) -> pd.DataFrame:
    """Train rows of `df` with the identities in `held` moved to test (query from their last sequence)."""
    train = df[df["split"] == "train"].copy()
    rows = [train[~train["pid"].isin(held)]]
    for pid in sorted(held):
        own = train[train["pid"] == pid].sort_values(["seq", "frame"])
        last = own["seq"].max()
        query = own[own["seq"] == last].head(1).assign(role="query")
        gallery = own[own["seq"] != last].assign(role="gallery")
        rows += [query.assign(split="test", image_id=pid), gallery.assign(split="test", image_id=pid)]
    return pd.concat(rows, ignore_index=True)


# ---- the derived folder -----------------------------------------------------------------------------


def write_holdout(data_dir: str | Path, out_dir: str | Path, n_ids: int, seed: int, fold: int = 0,
                  folds: int = 1) -> Path:
    """Write fold `fold` of `holdout_folds(read_manifest(data_dir), n_ids, folds, seed)` as DATA_DIR `out_dir`.

    The folder is built beside `out_dir` and swapped in (atomic): manifest.csv, images/ (a symlink to the
    source's images), numbers.csv when the source has one, and holdout.json (`HoldoutRecord`). A folder already
    holding the same split (same source manifest and arguments) is reused untouched (its caches kept); one
    holding another split, a non-empty folder without holdout.json, or an edited manifest is refused in one line.
    Returns `out_dir`.
    """
    source, out = Path(data_dir), Path(out_dir)
    _check_count(folds, "--folds", "folds")
    if not _is_int(fold) or not 0 <= fold < folds:
        raise SubmitError(f"--fold {fold}: expected a whole number with 0 <= fold < --folds ({folds})")
    df = read_manifest(source)
    split = holdout_folds(df, n_ids, folds, seed)[fold]
    images = (source / "images").resolve()
    if not images.is_dir():
        raise SubmitError(f"{source / 'images'}: no images folder; expected a DATA_DIR made by "
                          "`reident-submit prepare`")
    record = HoldoutRecord(source=str(source.resolve()), source_fingerprint=fingerprint(df),
                           manifest_fingerprint=fingerprint(split), n_ids=int(n_ids), seed=int(seed),
                           fold=int(fold), folds=int(folds), held_out=tuple(held_out_of(split)))
    if _reusable(out, record):
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise atomic.write_error(exc, out) from None
    try:
        with atomic.atomic_dir(out) as tmp:
            write_manifest(split, tmp)
            os.symlink(images, tmp / "images")
            for name in EXTRAS:
                if (source / name).is_file():
                    shutil.copyfile(source / name, tmp / name)
            atomic.write_text(tmp / RECORD_NAME, record.to_json())
            if _reusable(out, record):  # another process wrote the same split meanwhile: keep its folder
                raise _AlreadyWritten
    except _AlreadyWritten:
        pass
    return out


class _AlreadyWritten(Exception):
    """Raised inside `atomic_dir` to drop the temp folder when the same split appeared meanwhile."""


def _reusable(out: Path, record: HoldoutRecord) -> bool:
    """True when `out` already holds `record`'s split intact; False when it is absent or an empty folder;
    otherwise (another split, a foreign folder, an edited manifest) a one-line refusal."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise SubmitError(f"{out}: exists and is not a folder; expected a folder path for the held-out split")
    old = holdout_record(out)
    if old is None:
        if any(out.iterdir()):
            raise SubmitError(f"{out}: exists and is not a held-out data folder (no {RECORD_NAME}); expected a new "
                              "or empty folder")
        return False
    if not old.same_split(record):
        raise SubmitError(f"{out / RECORD_NAME}: holds the held-out split of {old.arguments()}; expected "
                          f"{record.arguments()}: choose another folder or remove this one")
    check_tuning_dir(out)
    return True


def write_holdout_folds(data_dir: str | Path, root: str | Path, n_ids: int, seed: int, folds: int = 1) -> list[Path]:
    """`write_holdout` for every fold, into `root/holdout-{n_ids}-seed{seed}-fold{i}of{folds}`; returns the folders."""
    _check_count(folds, "--folds", "folds")
    return [write_holdout(data_dir, Path(root) / fold_name(n_ids, seed, i, folds), n_ids, seed, i, folds)
            for i in range(folds)]


def fold_name(n_ids: int, seed: int, fold: int, folds: int) -> str:
    """The folder name `write_holdout_folds` gives one fold."""
    return f"holdout-{n_ids}-seed{seed}-fold{fold}of{folds}"


# ---- reading the provenance back --------------------------------------------------------------------


def record_path(data_dir: str | Path) -> Path:
    """Where a derived held-out DATA_DIR keeps its provenance record."""
    return Path(data_dir) / RECORD_NAME


def holdout_record(data_dir: str | Path) -> HoldoutRecord | None:
    """The validated `holdout.json` of `data_dir`; None when it has none (not a derived held-out folder).

    A malformed record is refused in one line naming the file and the field.
    """
    path = record_path(data_dir)
    if not path.exists() and not path.is_symlink():
        return None
    text = read_text(path, "held-out provenance record (JSON)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SubmitError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); expected the record "
                          "write_holdout writes") from None
    return _parse_record(data, path)


def _parse_record(data: Any, path: Path) -> HoldoutRecord:
    """Check every field of a parsed `holdout.json`; one-line errors naming the file and the field."""
    if not isinstance(data, dict):
        raise SubmitError(f"{path}: expected a JSON object, found {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise SubmitError(f"{path}: format {data.get('format')!r}; expected {FORMAT!r}")
    fields = {f.name for f in dataclasses.fields(HoldoutRecord)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise SubmitError(f"{path}: unknown field {unknown[0]!r}; expected only {', '.join(sorted(fields))}")
    for key in ("source", "source_fingerprint", "manifest_fingerprint"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise SubmitError(f"{path}: field {key!r} is {data.get(key)!r}; expected a non-empty string")
    for key, low in (("n_ids", 1), ("seed", 0), ("fold", 0), ("folds", 1)):
        value = data.get(key)
        if not _is_int(value) or value < low:
            raise SubmitError(f"{path}: field {key!r} is {value!r}; expected an integer >= {low}")
    if data["fold"] >= data["folds"]:
        raise SubmitError(f"{path}: field 'fold' is {data['fold']}; expected fold < folds ({data['folds']})")
    held = data.get("held_out")
    if not isinstance(held, list) or not all(_is_int(p) and p >= 0 for p in held):
        raise SubmitError(f"{path}: field 'held_out' is not a list of pids >= 0; expected the held-out identities")
    if len(held) != data["n_ids"] or sorted(set(held)) != held:
        raise SubmitError(f"{path}: field 'held_out' has {len(held)} ids; expected {data['n_ids']} distinct "
                          "pids (n_ids), sorted")
    return HoldoutRecord(**{**data, "held_out": tuple(held)})


def _is_int(value: Any) -> TypeGuard[int]:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def held_out_ids(data_dir: str | Path) -> set[int] | None:
    """The held-out pids recorded in `data_dir`'s holdout.json; None when it is not a derived held-out folder."""
    record = holdout_record(data_dir)
    return None if record is None else set(record.held_out)


def check_tuning_dir(data_dir: str | Path) -> HoldoutRecord:
    """`data_dir`'s record if it is a valid tuning folder: it carries holdout.json and its manifest is the one
    written with it (so its test split is held-out train identities). Else one line: a prepared DATA_DIR, whose
    test or challenge split is the real one, is refused; so is a derived manifest edited since."""
    record = holdout_record(data_dir)
    if record is None:
        raise SubmitError(f"{data_dir}: no {RECORD_NAME}, so its test split is the real test or challenge split; "
                          "expected a held-out folder of TRAIN identities (write_holdout / --holdout N)")
    path = manifest_path(data_dir)
    df = read_manifest(data_dir)
    now = fingerprint(df)
    if now != record.manifest_fingerprint:
        raise SubmitError(f"{path}: changed since {RECORD_NAME} was written (fingerprint {now}, recorded "
                          f"{record.manifest_fingerprint}); expected the held-out manifest: remove the folder and "
                          "write the split again")
    return record
