"""The held-out split of TRAIN identities (submit.holdout): construction, folds, refusals, the derived folder."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from submit import atomic, holdout
from submit.errors import SubmitError
from submit.holdout import (
    RECORD_NAME,
    check_tuning_dir,
    held_out_ids,
    holdout_folds,
    holdout_record,
    holdout_split,
    write_holdout,
    write_holdout_folds,
)
from submit.manifest import COLUMNS, fingerprint, read_manifest, write_manifest


def oracle(df: pd.DataFrame, n_ids: int, seed: int) -> pd.DataFrame:
    """scripts/real_holdout.py's `holdout` as it was before it moved into the library (copied verbatim)."""
    train = df[df["split"] == "train"].copy()
    seqs = train.groupby("pid")["seq"].nunique()
    candidates = np.sort(seqs[seqs >= 2].index.to_numpy())
    held = set(np.random.default_rng(seed).choice(candidates, size=n_ids, replace=False).tolist())
    rows = [train[~train["pid"].isin(held)]]
    for pid in sorted(held):
        own = train[train["pid"] == pid].sort_values(["seq", "frame"])
        last = own["seq"].max()
        query = own[own["seq"] == last].head(1).assign(role="query")
        gallery = own[own["seq"] != last].assign(role="gallery")
        rows += [query.assign(split="test", image_id=pid), gallery.assign(split="test", image_id=pid)]
    return pd.concat(rows, ignore_index=True)


def manifest(train_ids: int = 24, seed: int = 3) -> pd.DataFrame:
    """Train identities with 1-3 sequences (seq numbers not in order, frames shuffled) plus real test and
    challenge rows, as a prepared manifest has them."""
    rng = np.random.default_rng(seed)
    rows = []
    for pid in range(train_ids):
        seqs = rng.choice(np.arange(10, 20), size=int(rng.integers(1, 4)), replace=False)
        for seq in seqs:
            for frame in rng.permutation(int(rng.integers(1, 5))):
                rows.append(("train", "train", pid, int(seq), int(frame), pid))
    for pid in range(100, 104):  # the real test split: must never reach a held-out folder
        rows.append(("test", "query", pid, 1, 0, pid))
        rows += [("test", "gallery", pid, 2, f, pid) for f in range(2)]
    rows += [("challenge", role, -1, -1, -1, i) for i, role in enumerate(["query", "gallery", "gallery"])]
    df = pd.DataFrame(rows, columns=["split", "role", "pid", "seq", "frame", "image_id"])
    df.insert(0, "path", [f"images/x/{i}.jpeg" for i in range(len(df))])
    df = df.iloc[rng.permutation(len(df))].reset_index(drop=True)  # train rows in no particular order
    return df[COLUMNS]


def multi_seq(df: pd.DataFrame) -> set[int]:
    train = df[df["split"] == "train"]
    counts = train.groupby("pid")["seq"].nunique()
    return {int(p) for p in counts[counts >= 2].index}


@pytest.fixture()
def df() -> pd.DataFrame:
    frame = manifest()
    assert len(multi_seq(frame)) == 15  # of 24: both kinds of identity (the refusals below rely on 15 < 20)
    return frame


@pytest.fixture()
def src(tmp_path: Path, df: pd.DataFrame) -> Path:
    """A prepared-looking DATA_DIR: manifest.csv, images/, numbers.csv."""
    folder = tmp_path / "data"
    (folder / "images" / "x").mkdir(parents=True)
    write_manifest(df, folder)
    (folder / "numbers.csv").write_text("path,number\nx/0.jpeg,7\n")
    return folder


# ---- the split --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_ids,seed", [(1, 0), (5, 0), (5, 1), (9, 7)])
def test_split_is_the_old_scripts_construction(df, n_ids, seed):
    pd.testing.assert_frame_equal(holdout_split(df, n_ids, seed), oracle(df, n_ids, seed))


def test_no_identity_is_both_trained_on_and_held_out(df):
    out = holdout_split(df, 6, 0)
    test, train = out[out["split"] == "test"], out[out["split"] == "train"]
    held = set(test["pid"])
    assert len(held) == 6 and held <= multi_seq(df)
    assert held.isdisjoint(train["pid"])
    assert set(out["split"]) == {"train", "test"}  # the real test and challenge rows are dropped
    assert not set(test["pid"]) & set(range(100, 104))
    # every other train row keeps training; each row at most once, all from the source's train split
    source = df[df["split"] == "train"]
    assert sorted(train["path"]) == sorted(source.loc[~source["pid"].isin(held), "path"])
    assert not out["path"].duplicated().any() and set(out["path"]) <= set(source["path"])
    assert (train["role"] == "train").all()


def test_each_held_out_identity_has_one_query_from_another_sequence(df):
    out = holdout_split(df, 8, 2)
    test = out[out["split"] == "test"]
    for pid, own in test.groupby("pid"):
        query, gallery = own[own["role"] == "query"], own[own["role"] == "gallery"]
        assert len(query) == 1 and len(gallery) >= 1
        assert int(query["seq"].iloc[0]) not in set(gallery["seq"])
        source = df[(df["split"] == "train") & (df["pid"] == pid)]
        last = source["seq"].max()
        assert int(query["seq"].iloc[0]) == last  # the first frame of the last sequence
        assert int(query["frame"].iloc[0]) == source.loc[source["seq"] == last, "frame"].min()
        assert sorted(gallery["path"]) == sorted(source.loc[source["seq"] != last, "path"])  # all its other sequences
        assert (own["image_id"] == pid).all()


def test_deterministic_for_a_seed_and_different_for_another(df):
    a, b = holdout_split(df, 6, 0), holdout_split(df, 6, 0)
    pd.testing.assert_frame_equal(a, b)
    held = [set(holdout_split(df, 6, s).query("split == 'test'")["pid"]) for s in range(4)]
    assert any(h != held[0] for h in held[1:])


def test_folds_have_disjoint_held_out_sets(df):
    folds = holdout_folds(df, 4, 3, seed=5)
    assert len(folds) == 3
    held = [set(f.loc[f["split"] == "test", "pid"]) for f in folds]
    assert all(len(h) == 4 for h in held)
    assert not (held[0] & held[1]) and not (held[0] & held[2]) and not (held[1] & held[2])
    for fold, h in zip(folds, held):
        assert h.isdisjoint(fold.loc[fold["split"] == "train", "pid"])
        assert set(fold.loc[fold["split"] == "train", "pid"]) == set(df.loc[df["split"] == "train", "pid"]) - h


def test_fold_zero_of_one_fold_is_the_split(df):
    pd.testing.assert_frame_equal(holdout_folds(df, 5, 1, seed=4)[0], holdout_split(df, 5, 4))


def test_identities_with_one_sequence_or_unknown_pid_are_never_held_out(df):
    extra = pd.DataFrame([["images/u/0.jpeg", "train", "train", -1, 1, 0, 9000],
                          ["images/u/1.jpeg", "train", "train", -1, 2, 0, 9001]], columns=COLUMNS)
    with_unknown = pd.concat([df, extra], ignore_index=True)
    n = len(multi_seq(df))
    assert set(holdout_split(with_unknown, n, 0).query("split == 'test'")["pid"]) == multi_seq(df)
    with pytest.raises(SubmitError, match=r"--holdout"):
        holdout_split(with_unknown, n + 1, 0)


@pytest.mark.parametrize("call,option", [
    (lambda d: holdout_split(d, 24, 0), "--holdout 24"),
    (lambda d: holdout_split(d, 0, 0), "--holdout 0"),
    (lambda d: holdout_folds(d, 5, 4, 0), "--holdout 5 --folds 4"),
    (lambda d: holdout_folds(d, 5, 0, 0), "--folds 0"),
    (lambda d: holdout_split(d, 2, -1), "--holdout-seed -1"),
])
def test_refusals_name_the_option(df, call, option):
    with pytest.raises(SubmitError, match=f"^{option}: ") as info:
        call(df)
    assert "\n" not in str(info.value)


def test_too_many_folds_says_how_many_candidates(df):
    n = len(multi_seq(df))
    holdout_folds(df, n // 2, 2, 0)  # fits
    with pytest.raises(SubmitError, match=f"only {n} train identities"):
        holdout_folds(df, n // 2 + 1, 2, 0)


# ---- the derived folder -----------------------------------------------------------------------------


def test_write_holdout_round_trips_with_held_out_ids(src, df, tmp_path):
    out = write_holdout(src, tmp_path / "tune" / "h", n_ids=5, seed=1)
    written = read_manifest(out)
    split = holdout_split(df, 5, 1)
    pd.testing.assert_frame_equal(written, read_manifest_like(split))
    held = held_out_ids(out)
    assert held == set(written.loc[written["split"] == "test", "pid"]) and len(held) == 5
    record = holdout_record(out)
    assert record is not None
    assert record.source == str(src.resolve()) and record.source_fingerprint == fingerprint(read_manifest(src))
    assert record.manifest_fingerprint == fingerprint(written)
    assert (record.n_ids, record.seed, record.fold, record.folds) == (5, 1, 0, 1)
    assert list(record.held_out) == sorted(held)
    assert os.path.islink(out / "images") and (out / "images").resolve() == (src / "images").resolve()
    assert (out / "numbers.csv").read_text() == (src / "numbers.csv").read_text()
    data = json.loads((out / RECORD_NAME).read_text())
    assert data["format"] == holdout.FORMAT and data["held_out"] == sorted(held)
    assert check_tuning_dir(out) == record
    assert holdout_record(out) is not None and holdout_record(src) is None
    assert held_out_ids(src) is None and holdout_record(src) is None
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left beside it


def read_manifest_like(split: pd.DataFrame) -> pd.DataFrame:
    """A split as read back from disk (validated, index reset)."""
    from submit.manifest import validate

    return validate(split, "split")


def test_the_real_test_split_is_refused_for_tuning(src):
    with pytest.raises(SubmitError, match=f"{re.escape(str(src))}: no {RECORD_NAME}.*real test or challenge split"):
        check_tuning_dir(src)


def test_rerun_reuses_the_folder_and_other_arguments_are_refused(src, tmp_path):
    out = write_holdout(src, tmp_path / "h", 5, 1)
    cache = out / ".cache" / "features"
    cache.mkdir(parents=True)
    (cache / "k.npy").write_bytes(b"x")
    before = (out / RECORD_NAME).stat().st_mtime_ns, (out / "manifest.csv").read_bytes()
    assert write_holdout(src, out, 5, 1) == out
    assert (cache / "k.npy").is_file()  # reused untouched: caches kept
    assert ((out / RECORD_NAME).stat().st_mtime_ns, (out / "manifest.csv").read_bytes()) == before
    for args in [(6, 1, 0, 1), (5, 2, 0, 1), (5, 1, 1, 2)]:
        n_ids, seed, fold, folds = args
        held_by = "holds the held-out split of .*--holdout 5 --holdout-seed 1 fold 0 of --folds 1; expected"
        with pytest.raises(SubmitError, match=f"^{re.escape(str(out / RECORD_NAME))}: {held_by}"):
            write_holdout(src, out, n_ids, seed, fold, folds)
    assert (cache / "k.npy").is_file()


def test_a_changed_source_manifest_is_other_arguments(src, df, tmp_path):
    out = write_holdout(src, tmp_path / "h", 3, 0)
    write_manifest(df.iloc[1:], src)
    with pytest.raises(SubmitError, match="holds the held-out split of"):
        write_holdout(src, out, 3, 0)


def test_an_edited_derived_manifest_is_refused(src, tmp_path):
    out = write_holdout(src, tmp_path / "h", 3, 0)
    written = read_manifest(out)
    write_manifest(written.iloc[1:], out)
    for call in (lambda: check_tuning_dir(out), lambda: write_holdout(src, out, 3, 0)):
        with pytest.raises(SubmitError, match=f"^{re.escape(str(out / 'manifest.csv'))}: changed since {RECORD_NAME}"):
            call()


def test_a_foreign_folder_is_refused_and_an_empty_one_filled(src, tmp_path):
    with pytest.raises(SubmitError, match=f"{re.escape(str(src))}: exists and is not a held-out data folder"):
        write_holdout(src, src, 3, 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert held_out_ids(write_holdout(src, empty, 3, 0)) is not None
    (tmp_path / "file").write_text("")
    with pytest.raises(SubmitError, match="exists and is not a folder"):
        write_holdout(src, tmp_path / "file", 3, 0)


def test_write_refuses_bad_fold_and_folds(src, tmp_path):
    with pytest.raises(SubmitError, match=r"^--fold 2: expected .* < --folds \(2\)"):
        write_holdout(src, tmp_path / "h", 3, 0, fold=2, folds=2)
    with pytest.raises(SubmitError, match=r"^--folds 0: "):
        write_holdout(src, tmp_path / "h", 3, 0, fold=0, folds=0)
    with pytest.raises(SubmitError, match=r"^--holdout 99: only"):
        write_holdout(src, tmp_path / "h", 99, 0)
    assert not (tmp_path / "h").exists()


def test_write_holdout_folds(src, df, tmp_path):
    outs = write_holdout_folds(src, tmp_path / "folds", 4, 2, folds=3)
    assert [p.name for p in outs] == [f"holdout-4-seed2-fold{i}of3" for i in range(3)]
    expected = holdout_folds(df, 4, 3, 2)
    held = []
    for out, split in zip(outs, expected):
        pd.testing.assert_frame_equal(read_manifest(out), read_manifest_like(split))
        held.append(held_out_ids(out))
    assert all(h is not None and len(h) == 4 for h in held)
    assert not (held[0] & held[1]) and not (held[0] & held[2]) and not (held[1] & held[2])


def test_a_split_written_meanwhile_by_another_process_is_kept(src, tmp_path, monkeypatch):
    out = tmp_path / "h"
    real = atomic.write_text
    calls = []

    def racing(target, text, parents=True):
        real(target, text, parents)
        if not calls:  # the other process finishes first, and its folder gets a cache
            calls.append(target)
            write_holdout(src, out, 3, 0)
            (out / ".cache").mkdir()
        return Path(target)

    monkeypatch.setattr(atomic, "write_text", racing)
    assert write_holdout(src, out, 3, 0) == out
    assert calls and (out / ".cache").is_dir()  # not replaced by the second writer
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".h.")) == []


@pytest.mark.parametrize("text,field", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (None, "format"),
])
def test_a_corrupt_record_names_the_file(src, tmp_path, text, field):
    out = write_holdout(src, tmp_path / "h", 3, 0)
    path = out / RECORD_NAME
    path.write_text(text if text is not None else json.dumps({**json.loads(path.read_text()), "format": "x"}))
    for call in (held_out_ids, holdout_record, check_tuning_dir):
        with pytest.raises(SubmitError, match=f"^{re.escape(str(path))}: .*{field}"):
            call(out)


@pytest.mark.parametrize("key,value", [
    ("n_ids", "3"), ("seed", 1.5), ("fold", -1), ("folds", 0), ("fold", 1), ("source", ""),
    ("manifest_fingerprint", None), ("held_out", [1, "2", 3]), ("held_out", [3, 2, 1]), ("held_out", [1, 2]),
    ("extra", 1),
])
def test_a_wrong_field_is_named(src, tmp_path, key, value):
    out = write_holdout(src, tmp_path / "h", 3, 0)
    path = out / RECORD_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(SubmitError, match=f"^{re.escape(str(path))}: .*'{key}'"):
        held_out_ids(out)


def test_a_missing_field_is_named(src, tmp_path):
    out = write_holdout(src, tmp_path / "h", 3, 0)
    path = out / RECORD_NAME
    data = json.loads(path.read_text())
    del data["seed"]
    path.write_text(json.dumps(data))
    with pytest.raises(SubmitError, match=f"^{re.escape(str(path))}: field 'seed' is None"):
        holdout_record(out)


def test_synthetic_data_dir(data_dir, tmp_path):
    df = read_manifest(data_dir)
    train_ids = set(df.loc[df["split"] == "train", "pid"])
    assert len(multi_seq(df)) == len(train_ids) == 18  # 18 train identities x 2 sequences x 3 frames
    out = write_holdout(data_dir, tmp_path / "h", 5, 0)
    written = read_manifest(out)
    held = held_out_ids(out)
    assert held is not None and len(held) == 5
    assert held.isdisjoint(written.loc[written["split"] == "train", "pid"])
    test = written[written["split"] == "test"]
    assert (test["role"] == "query").sum() == 5 and (test["role"] == "gallery").sum() == 5 * 3
    assert set(written.loc[written["split"] == "train", "pid"]) == train_ids - held
    assert (out / "images" / test["path"].iloc[0].removeprefix("images/")).is_file()  # images resolve via the link
    assert (out / "numbers.csv").is_file() == (data_dir / "numbers.csv").is_file()
    pd.testing.assert_frame_equal(written, read_manifest_like(oracle(df, 5, 0)))
    holdout_folds(df, 6, 3, 0)  # 18 candidates: exactly three disjoint sets of 6
    with pytest.raises(SubmitError, match="^--holdout 7 --folds 3: only 18"):
        holdout_folds(df, 7, 3, 0)
