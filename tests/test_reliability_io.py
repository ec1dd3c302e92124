"""Fault campaign, round 3 (issue 23), classes 1, 4 and 7: what the toolkit's writes and reads do on odd paths.

- class 1: a lock file (RUN_DIR/.lock, `.<DATA_DIR>.lock`) that is a symbolic link, a folder, a FIFO, another
  name of a file (hard link) or another user's file is refused in one line naming the lock, and nothing is
  written through it; a link planted at a temp's name (`atomic`) is never followed.
- class 4: the ranking-file reader is bounded by what a ranking file for the data can be (rows x columns x
  `CELL_BYTES`): a huge sparse file is refused before reading; a FIFO or /dev/fd/N is read as a stream.
- class 7: a legal long output name (240 or 255 bytes) is written: temp and lock names stay short (a hash),
  and the temps of a killed write of such a target are still removed by the next write.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from cli_helpers import KILLED_WRITE, invoke, one_error_line, tiny_world
from click.testing import CliRunner

from submit import atomic, locks, ranking_file
from submit.cli import main
from submit.errors import SubmitError
from submit.manifest import read_manifest, select
from submit.ranking_file import read_ranking, write_ranking

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"
VICTIM = b"a file the user never named: it must stay as it is\n"
OTHER_UID = 12345


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A synthetic source and DATA_DIR, a one-step tiny run with a spec naming it, a test-split ranking file."""
    root = tmp_path_factory.mktemp("io-reliability")
    src, data, _ = tiny_world(root)
    spec = root / "spec.yaml"
    spec.write_text(f"members: [{{run: '{root / 'runs' / 'tiny'}'}}]\nfusion: mean\n")
    df = read_manifest(data)
    q, g = select(df, "test", "query"), select(df, "test", "gallery")
    ranking = write_ranking(root / "test.csv", np.random.default_rng(0).random((len(q), len(g))),
                            q["image_id"], g["image_id"])
    return {"root": root, "src": src, "data": data, "spec": spec, "ranking": ranking,
            "test_size": (len(q), len(g))}


def _everything_below(folder: Path) -> list[str]:
    """Every entry below `folder` (hidden ones and links included, links not followed), relative, sorted."""
    return sorted(str(Path(dirpath, name).relative_to(folder))
                  for dirpath, dirs, files in os.walk(folder) for name in dirs + files)


# ---------------------------------------------------------------- class 1: locks are never written through


def _plant(kind: str, lock: Path, victim: Path) -> None:
    """Put `kind` at the lock's path: a link to the victim, a folder, a FIFO, a hard link, another's file."""
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "dangling symlink":
        lock.symlink_to(victim.with_name("not-yet-there"))
    elif kind == "folder":
        lock.mkdir()
    elif kind == "fifo":
        os.mkfifo(lock)
    elif kind == "hard link":
        os.link(victim, lock)
    else:  # "other owner": a lock file another user's run left
        lock.write_bytes(VICTIM)
        os.chown(lock, OTHER_UID, OTHER_UID)


LOCK_PLANTS = [
    ("symlink", "is a symbolic link (to "),
    ("dangling symlink", "is a symbolic link (to "),
    ("folder", "is a folder"),
    ("fifo", "is a FIFO"),
    ("hard link", "has 2 hard links"),
    pytest.param("other owner", f"belongs to another user (uid {OTHER_UID}",
                 marks=pytest.mark.skipif(os.geteuid() != 0, reason="os.chown to another user needs root")),
]


@pytest.mark.parametrize("command", ["train", "prepare", "prepare --force"])
@pytest.mark.parametrize("kind,says", LOCK_PLANTS)
def test_a_lock_path_that_is_no_lock_file_of_ours_is_refused_naming_the_lock(world, tmp_path, command, kind,
                                                                              says) -> None:
    """`train`'s RUN_DIR/.lock and `prepare`'s `.<DATA_DIR>.lock`: one line naming the lock, nothing written
    through it (the victim stays byte-identical), the planted entry left as it was, no output made."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    if command == "train":
        out = tmp_path / "run"
        out.mkdir()
        lock = out / locks.RUN_LOCK
        args = ["train", TINY, "--data", world["data"], "--out", out, "--max-steps", "1", "--device", "cpu",
                "--set", "data.workers=0"]
    else:
        out = tmp_path / "data"
        lock = locks.sibling_lock_path(out)
        assert lock == tmp_path / ".data.lock"
        args = ["prepare", world["src"], "--out", out, *command.split()[1:]]
        if command == "prepare --force":
            shutil.copytree(world["data"], out)  # an existing DATA_DIR that --force would replace
    _plant(kind, lock, victim)
    before = _everything_below(tmp_path)
    planted = os.lstat(lock)
    code, stderr = invoke(args)
    assert code == 2, stderr
    line = one_error_line(stderr)
    assert line.startswith(f"error: {lock}: {says}"), line
    assert "expected nothing or a plain lock file of yours there" in line, line
    assert victim.read_bytes() == VICTIM
    assert not victim.with_name("not-yet-there").exists()
    after = os.lstat(lock)
    assert (stat.S_IFMT(after.st_mode), after.st_ino, after.st_uid) == \
        (stat.S_IFMT(planted.st_mode), planted.st_ino, planted.st_uid)
    assert _everything_below(tmp_path) == before
    if command == "prepare --force":
        assert (out / "manifest.csv").read_bytes() == (world["data"] / "manifest.csv").read_bytes()


@pytest.mark.parametrize("kind", ["run", "sibling"])
def test_a_lock_file_a_killed_holder_left_is_still_taken_over(tmp_path, kind) -> None:
    """The checks refuse only what is no lock file of ours: a stale one of ours is taken over, then removed."""
    target = tmp_path / "out"
    if kind == "run":
        target.mkdir()
        lock, take = target / locks.RUN_LOCK, locks.run_lock
    else:
        lock, take = locks.sibling_lock_path(target), locks.sibling_lock
    lock.write_text('{"command": "train", "pid": 1}')
    with take(target, "train"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert stat.S_IMODE(lock.stat().st_mode) & 0o022 == 0  # only its owner writes it
    assert not lock.exists()


def test_a_new_lock_file_is_a_plain_file_with_a_sane_mode(tmp_path) -> None:
    old = os.umask(0)
    try:
        with locks.run_lock(tmp_path / "run", "train"):
            st = os.lstat(tmp_path / "run" / locks.RUN_LOCK)
    finally:
        os.umask(old)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == locks.LOCK_MODE == 0o644


class _Tokens:
    """Stands in for `secrets.token_hex` in `atomic`: the given tokens in turn, then the last one forever."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)

    def __call__(self, nbytes: int | None = None) -> str:
        return self.tokens.pop(0) if len(self.tokens) > 1 else self.tokens[0]


def _write(writer: str, target: Path) -> None:
    """Write `target` through one of the atomic layer's entry points (as the commands do)."""
    if writer == "atomic_file":
        atomic.write_text(target, "new")
    elif writer == "atomic_path":
        with atomic.atomic_path(target) as tmp:
            torch.save({"x": 1}, tmp)  # a library that writes by name (torch.save, onnx.save, savefig)
    elif writer == "ranking":
        write_ranking(target, np.array([[0.5]]), [1], [1])
    else:
        with atomic.atomic_dir(target) as tmp:
            (tmp / "index.html").write_text("new")


@pytest.mark.parametrize("planted", ["symlink", "dangling symlink", "folder"])
@pytest.mark.parametrize("writer", ["atomic_file", "atomic_path", "ranking", "atomic_dir"])
def test_a_link_planted_at_a_temp_name_is_never_followed(tmp_path, monkeypatch, writer, planted) -> None:
    """The first temp name drawn is taken by what was planted there: it is left alone (never opened, written
    or removed: it is not ours) and another name is drawn; the target is written, the victim untouched."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    target = tmp_path / ("out" if writer == "atomic_dir" else "out.bin")
    monkeypatch.setattr(atomic.secrets, "token_hex", _Tokens("deadbeef", "0badf00d"))
    trap = atomic.temp_for(target)
    assert trap.name.endswith("-deadbeef.tmp")
    monkeypatch.setattr(atomic.secrets, "token_hex", _Tokens("deadbeef", "0badf00d"))
    if planted == "folder":
        trap.mkdir()
    else:
        trap.symlink_to(victim if planted == "symlink" else tmp_path / "not-yet-there")
    _write(writer, target)
    assert victim.read_bytes() == VICTIM
    assert not (tmp_path / "not-yet-there").exists()
    assert target.is_dir() if writer == "atomic_dir" else target.is_file() and not target.is_symlink()
    assert trap.is_symlink() == (planted != "folder") and (planted != "folder" or trap.is_dir())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([victim.name, target.name, trap.name])


def test_when_every_temp_name_is_taken_the_write_is_refused_in_one_line(tmp_path, monkeypatch) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    target = tmp_path / "r.csv"
    monkeypatch.setattr(atomic.secrets, "token_hex", _Tokens("deadbeef"))
    atomic.temp_for(target).symlink_to(victim)
    with pytest.raises(SubmitError, match=rf"^{target}: cannot write \(every temp name tried beside it is taken"):
        atomic.write_text(target, "new")
    assert victim.read_bytes() == VICTIM and not target.exists()


def test_a_temp_file_is_created_with_the_mode_open_gives(tmp_path) -> None:
    old = os.umask(0o027)
    try:
        atomic.write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640


# ---------------------------------------------------------------- class 7: long legal names


def _long_name(length: int, suffix: str = "") -> str:
    return "n" * (length - len(suffix)) + suffix


@pytest.mark.parametrize("length", [240, 255])
@pytest.mark.parametrize("command", ["predict", "prepare", "report"])
def test_a_long_legal_out_name_is_written(world, tmp_path, command, length) -> None:
    """A temp named after the whole target (and prepare's `.<DATA_DIR>.lock`) would pass the 255-byte limit."""
    out = tmp_path / _long_name(length, ".csv" if command == "predict" else "")
    assert len(out.name.encode()) == length
    args = {"predict": ["predict", "--ensemble", world["spec"], "--data", world["data"], "--split", "test",
                        "--out", out, "--device", "cpu", "--workers", "0"],
            "prepare": ["prepare", world["src"], "--out", out],
            "report": ["report", world["ranking"], "--data", world["data"], "--out", out]}[command]
    code, stderr = invoke(args)
    assert code == 0, stderr
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp, no lock left
    if command == "predict":
        assert read_ranking(out)[0].shape == world["test_size"]
    else:
        assert (out / ("manifest.csv" if command == "prepare" else "index.html")).is_file()


def test_short_names_are_the_name_up_to_128_bytes_else_a_readable_prefix_and_a_hash() -> None:
    assert atomic.short_name("r.csv") == "r.csv"
    assert atomic.short_name("x" * 128) == "x" * 128
    a, b = "x" * 200 + "a.csv", "x" * 200 + "b.csv"
    assert atomic.short_name(a) != atomic.short_name(b)  # the hash covers the whole name, not the prefix
    assert atomic.short_name(a) == atomic.short_name(a) and atomic.short_name(a).startswith("x" * 32 + "~")
    assert len(atomic.short_name(a)) == 49
    accented = "é" * 120  # 240 bytes: the prefix is cut at a character boundary
    assert atomic.short_name(accented).startswith("é" * 16 + "~")
    for name in (a, accented, "x" * 255):
        temp = atomic.temp_for(Path("/o") / name)
        assert len(os.fsencode(temp.name)) <= 100, temp.name
        assert atomic.target_of(temp) == str(temp)  # no such target beside it: the temp itself is named


def test_the_target_of_a_long_names_temp_is_found_beside_it(tmp_path) -> None:
    target = tmp_path / _long_name(240, ".csv")
    target.write_text("old")
    (tmp_path / _long_name(240, ".txt")).write_text("another long name with the same prefix")
    assert atomic.target_of(atomic.temp_for(target)) == str(target)
    assert atomic.target_of(atomic.temp_for(target, "old")) == str(target)


@pytest.mark.parametrize("length", [20, 240, 255])
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_rerun_removes_the_temps_a_killed_write_of_a_long_name_left(tmp_path, kind, length) -> None:
    out = tmp_path / _long_name(length)
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, kind, str(out)], cwd=REPO)
    assert killed.returncode == -9
    left = [p for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(f".{atomic.short_name(out.name)}.") and not out.exists()
    assert atomic.target_of(left[0]) == (str(out) if length <= 128 else str(left[0]))
    live = atomic.temp_for(out)  # this very process's: in use, not stale
    live.write_text("in use")
    other = atomic.temp_for(tmp_path / _long_name(length, "2"))  # another target's temp
    other.write_text("not this target's")
    if kind == "file":
        atomic.write_text(out, "done")
    else:
        with atomic.atomic_dir(out) as tmp:
            (tmp / "x").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name, other.name])


# ---------------------------------------------------------------- class 4: bounded ranking-file reads


def test_a_huge_sparse_ranking_file_is_refused_before_reading(world, tmp_path) -> None:
    """2 GB (sparse: no disk used), far more than a ranking file of the data can be: one line, at once."""
    huge = tmp_path / "huge.csv"
    with open(huge, "wb") as fh:
        fh.truncate(2 << 30)
    q, g = world["test_size"]
    limit = ranking_file.size_limit(q, g).max_bytes
    start = time.monotonic()
    code, stderr = invoke(["evaluate", huge, "--data", world["data"]])
    assert time.monotonic() - start < 10
    assert code == 2
    line = one_error_line(stderr)
    assert line == (f"error: {huge}: {2 << 30} bytes, more than a ranking file for {q} queries x {g} gallery "
                    f"images (the test split) can be (at most {limit} bytes); expected the ranking file of this "
                    f"data (wrong --data?)"), line


@pytest.mark.parametrize("split", [None, "test"])
def test_the_size_check_comes_before_any_read(world, tmp_path, monkeypatch, split) -> None:
    big = tmp_path / "big.csv"
    q, g = world["test_size"]
    with open(big, "wb") as fh:
        fh.truncate(ranking_file.size_limit(q, g).max_bytes + 1)

    def no_read(*args, **kwargs):
        raise AssertionError(f"opened {args[0]}")

    monkeypatch.setattr(ranking_file, "open", no_read, raising=False)
    from submit.evaluation import evaluate_file

    with pytest.raises(SubmitError, match=r"big\.csv: \d+ bytes, more than a ranking file for"):
        evaluate_file(big, world["data"], split)


def test_a_file_at_the_size_limit_is_still_read(tmp_path) -> None:
    """The bound is generous: every value padded to CELL_BYTES - 1 characters, CRLF lines and a BOM pass."""
    q_ids, g_ids = [2 ** 52 + 1, 2 ** 52 + 2], [10 ** 15, 10 ** 15 + 1, 10 ** 15 + 2]
    width = ranking_file.CELL_BYTES - 1
    rows = [["0", *map(str, g_ids)]] + [[str(i), *["0.5"] * len(g_ids)] for i in q_ids]
    text = "\r\n".join(",".join(field.rjust(width) for field in row) for row in rows) + "\r\n"
    path = tmp_path / "padded.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    limit = ranking_file.size_limit(len(q_ids), len(g_ids))
    assert path.stat().st_size <= limit.max_bytes
    dist, q, g = read_ranking(path, limit=limit)
    assert dist.shape == (2, 3) and q.tolist() == q_ids and g.tolist() == g_ids
    read_ranking(path, expect_queries=q_ids, expect_gallery=g_ids)  # the same bound from the expected ids


def test_the_expected_ids_bound_a_read_back(tmp_path) -> None:
    path = write_ranking(tmp_path / "r.csv", np.zeros((1, 400)), [1], list(range(400)))
    with pytest.raises(SubmitError, match=r"r\.csv: \d+ bytes, more than a ranking file for 1 queries x 1 gallery"):
        read_ranking(path, expect_queries=[1], expect_gallery=[1])


def _feed(data: bytes, open_writer) -> threading.Thread:
    """Write `data` in a daemon thread into what `open_writer()` opens (a FIFO blocks until read); a reader
    that stops early (EPIPE) is fine."""
    def run() -> None:
        try:
            with open_writer() as fh:
                fh.write(data)
        except BrokenPipeError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def _stream(kind: str, tmp_path: Path, data: bytes) -> Iterator[Path]:
    """A FIFO or a /dev/fd/N pipe (as `<(cat file)` gives) that yields `data` while the block runs."""
    if kind == "fifo":
        path = tmp_path / "ranking.fifo"
        os.mkfifo(path)
        writer = _feed(data, lambda: open(path, "wb"))
        yield path
    else:
        read_end, write_end = os.pipe()
        writer = _feed(data, lambda: os.fdopen(write_end, "wb"))
        try:
            yield Path(f"/dev/fd/{read_end}")
        finally:
            os.close(read_end)
    writer.join(timeout=60)
    assert not writer.is_alive()


def _evaluate_json(path: Path, data: Path) -> dict:
    """`evaluate PATH --data DATA --json`'s result, the file's name left out."""
    res = CliRunner().invoke(main, ["evaluate", str(path), "--data", str(data), "--json"])
    assert res.exit_code == 0, res.stderr
    result = json.loads(res.stdout)
    assert result.pop("file") == str(path)
    result["message"] = result["message"].replace(str(path), "FILE")
    return result


@pytest.mark.parametrize("kind", ["fifo", "/dev/fd/N"])
def test_a_pipe_is_read_as_a_stream(world, tmp_path, kind) -> None:
    """`evaluate <(cat r.csv)` or a FIFO: the same result as the file (not "no such ranking file")."""
    with _stream(kind, tmp_path, world["ranking"].read_bytes()) as path:
        got = _evaluate_json(path, world["data"])
    expected = _evaluate_json(world["ranking"], world["data"])
    assert got == expected and got["scored"]


@pytest.mark.parametrize("kind", ["fifo", "/dev/fd/N"])
def test_a_pipe_giving_more_than_a_ranking_file_can_be_is_refused(world, tmp_path, kind) -> None:
    q, g = world["test_size"]
    limit = ranking_file.size_limit(q, g).max_bytes
    with _stream(kind, tmp_path, b"0," * (limit // 2 + 4096)) as path:
        code, stderr = invoke(["evaluate", path, "--data", world["data"]])
    assert code == 2
    line = one_error_line(stderr)
    assert line.startswith(f"error: {path}: a pipe giving more than {limit} bytes, more than a ranking file for "
                           f"{q} queries x {g} gallery images (the test split) can be"), line


@pytest.mark.parametrize("kind,says", [("socket", "is a socket; expected a ranking file (CSV) or a pipe"),
                                       ("folder", "is a folder; expected a ranking file (CSV) or a pipe"),
                                       ("missing", "no such ranking file"),
                                       ("dangling symlink", "no such ranking file")])
def test_what_is_no_ranking_file_is_named(world, tmp_path, kind, says) -> None:
    path = tmp_path / "ranking.csv"
    server = None
    if kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    elif kind == "folder":
        path.mkdir()
    elif kind == "dangling symlink":
        path.symlink_to(tmp_path / "gone.csv")
    try:
        code, stderr = invoke(["evaluate", path, "--data", world["data"]])
    finally:
        if server is not None:
            server.close()
    assert code == 2
    assert one_error_line(stderr) == f"error: {path}: {says}"
