"""Fault campaign, round 3 (issue 23, class 4): TensorBoard's event writer on a full or read-only disk.

The run never crashes from its curves: whatever point the event writer fails at (its opening, the first scalar,
a flush, its closing, or its background thread mid-run), `train` goes on without events, says so in one line
naming RUN/tb and the system's reason, and metrics.json, metrics.csv and the checkpoints are written as before;
no traceback, not even the writer thread's. One table patches the write layer (tensorboard's EventFileWriter
and the local file system under it); where the tests run as root and may mount, a second table uses real disks:
a small tmpfs that fills mid-run and a read-only bind mount (from the start, and remounted read-only mid-run).
W&B goes through the same guard.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from cli_helpers import TINY, invoke

from submit import reporting, training

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")]

# 18 training identities, 8 pairs per batch: 13 steps per epoch, 26 in two epochs; last.pt every 2 steps.
FAST = ["data.workers=0", "train.pairs_per_batch=8", "train.checkpoint_every=2", "train.epochs=2"]
NOTE = "cannot write TensorBoard events"


def train_cli(data_dir: Path, out: Path, *extra: str) -> tuple[int, str]:
    """`train` tiny through the CLI in-process; (exit status, stderr)."""
    args: list = ["train", TINY, "--data", data_dir, "--out", out]
    for item in FAST:
        args += ["--set", item]
    return invoke([*args, *extra])


@contextlib.contextmanager
def thread_errors() -> Iterator[list]:
    """Every error a thread would print as a traceback (`threading.excepthook`) while the block runs."""
    seen: list = []
    before = threading.excepthook
    threading.excepthook = lambda args: seen.append(args.exc_value)
    try:
        yield seen
    finally:
        threading.excepthook = before


def read_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def check_went_on(out: Path, code: int, stderr: str, errors: list, reason: str) -> None:
    """Exit 0, one line naming RUN/tb and the reason, no traceback, and the run's own files complete."""
    assert code == 0, stderr
    assert "Traceback" not in stderr and "Exception in thread" not in stderr, stderr
    assert errors == []  # the writer thread's error was not printed either
    notes = [line for line in stderr.splitlines() if NOTE in line]
    assert notes == [f"{out / 'tb'}: {NOTE} ({reason}); training goes on without curves"], stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in metrics["history"]] == [13, 26]
    assert all(r["mAP"] is not None for r in metrics["history"])
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 3  # header + two epochs
    assert torch.load(out / "last.pt", weights_only=True)["state"]["step"] == 26
    assert (out / "best.pt").is_file()


def disk_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


# ---------------------------------------------------------------- the write layer patched at each failure point


def _event_writer():
    from tensorboard.summary.writer import event_file_writer

    return event_file_writer.EventFileWriter


def _local_fs():
    from tensorboard.compat.tensorflow_stub.io import gfile

    return gfile.LocalFileSystem


def fail_at_open(monkeypatch, code):
    """The disk is full or read-only from the start: the file's first record fails in the writer's thread."""
    def write(self, filename, content, mode):
        raise OSError(code, os.strerror(code), filename)  # as io.open says it: the (bytes) file name included

    monkeypatch.setattr(_local_fs(), "_write", write)


def fail_at_first_scalar(monkeypatch, code):
    """add_scalar raises on the first training scalar."""
    cls = _event_writer()
    add_event = cls.add_event

    def patched(self, event):
        if any(v.tag.startswith("train/") for v in event.summary.value):
            raise disk_error(code)
        return add_event(self, event)

    monkeypatch.setattr(cls, "add_event", patched)


def fail_at_flush(monkeypatch, code):
    """The first flush after the writer's opening (the one before the first checkpoint) raises."""
    cls = _event_writer()
    flush = cls.flush

    def patched(self):
        self._flushes = getattr(self, "_flushes", 0) + 1
        if self._flushes > 1:  # the first is the writer's own, in its __init__
            raise disk_error(code)
        return flush(self)

    monkeypatch.setattr(cls, "flush", patched)


def fail_at_close(monkeypatch, code):
    """Closing the event file raises (its thread stopped, the last write refused)."""
    cls = _event_writer()
    close = cls.close

    def patched(self):
        close(self)
        raise disk_error(code)

    monkeypatch.setattr(cls, "close", patched)


def fail_mid_run_in_the_thread(monkeypatch, code):
    """The disk fills after 40 records: the background thread's write fails and the thread dies; the error
    surfaces at the writer's next call, wherever that is."""
    cls = _local_fs()
    write = cls._write
    calls = {"n": 0}

    def patched(self, filename, content, mode):
        calls["n"] += 1
        if calls["n"] > 40:
            raise disk_error(code)
        return write(self, filename, content, mode)

    monkeypatch.setattr(cls, "_write", patched)


PATCHED: list[tuple[str, Callable, int]] = [
    ("open", fail_at_open, errno.EROFS),
    ("open", fail_at_open, errno.ENOSPC),
    ("first-scalar", fail_at_first_scalar, errno.ENOSPC),
    ("flush", fail_at_flush, errno.ENOSPC),
    ("flush", fail_at_flush, errno.EROFS),
    ("close", fail_at_close, errno.ENOSPC),
    ("mid-run-thread", fail_mid_run_in_the_thread, errno.ENOSPC),
]


@pytest.mark.parametrize("point, arm, code", PATCHED, ids=[f"{p}-{errno.errorcode[c]}" for p, _, c in PATCHED])
def test_a_failing_event_writer_is_dropped_once_and_the_run_goes_on(data_dir, tmp_path, monkeypatch, point, arm,
                                                                     code):
    arm(monkeypatch, code)
    out = tmp_path / "run"
    hook = threading.excepthook
    with thread_errors() as errors:
        status, stderr = train_cli(data_dir, out)
    check_went_on(out, status, stderr, errors, os.strerror(code))
    assert threading.excepthook is hook  # the quiet hook is given back when the writer is
    if point == "close":  # every record was written before the close failed
        steps = [e.step for e in read_events(out / "tb").Scalars("train/loss")]
        assert steps == list(range(1, 27))


def test_the_guard_reports_once_releases_the_writer_and_ignores_the_rest(caplog, tmp_path):
    """The Reporter layer alone: a writer that fails is named once, abandoned once, then never called again."""
    calls: list[str] = []

    class Failing:
        folder, records, without = tmp_path / "tb", "TensorBoard events", "curves"

        def step(self, step, values):
            calls.append(f"step {step}")
            if step == 2:
                raise disk_error(errno.ENOSPC)

        def validation(self, row):
            calls.append("validation")

        def flush(self):
            calls.append("flush")

        def close(self):
            calls.append("close")

        def abandon(self):
            calls.append("abandon")

    guarded = reporting._Guarded(Failing())
    with caplog.at_level("INFO", logger="submit"):
        for step in (1, 2, 3):
            guarded.step(step, {"loss": 1.0})
        guarded.validation({"step": 3, "mAP": 0.5})
        guarded.flush()
        guarded.close()
    assert calls == ["step 1", "step 2", "abandon"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'tb'}: {NOTE} (No space left on device); training goes on without curves"]


def test_a_failing_wandb_run_is_dropped_the_same_way_and_tensorboard_goes_on(data_dir, tmp_path, monkeypatch):
    finished: list[bool] = []

    class FullDiskRun:
        def log(self, values, step):
            if step >= 3:
                raise disk_error(errno.ENOSPC)

        def finish(self):
            finished.append(True)

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: FullDiskRun()  # type: ignore[attr-defined]
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    status, stderr = train_cli(data_dir, out, "--report-to", "tensorboard,wandb")
    assert status == 0 and "Traceback" not in stderr, stderr
    notes = [line for line in stderr.splitlines() if "cannot write" in line]
    assert notes == [f"{out / 'wandb'}: cannot write W&B records (No space left on device); "
                     "training goes on without W&B"], stderr
    assert finished == [True]  # released once, when it failed
    assert [e.step for e in read_events(out / "tb").Scalars("train/loss")] == list(range(1, 27))
    assert [r["step"] for r in json.loads((out / "metrics.json").read_text())["history"]] == [13, 26]


# ---------------------------------------------------------------- real disks: a full tmpfs, a read-only bind


def _mount(*args: str) -> None:
    run = subprocess.run(["mount", *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise OSError(f"mount {' '.join(args)}: {run.stderr.strip() or run.returncode}")


@pytest.fixture()
def mounts() -> Iterator[Callable[..., None]]:
    """`mount` for this test; skipped with a reason where mounting is not permitted; unmounted afterwards."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("real full / read-only disks need root to mount a tmpfs and a bind (the patched table runs)")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount/umount command here (the patched table runs)")
    mounted: list[str] = []

    def mount(*args: str) -> None:
        try:
            _mount(*args)
        except OSError as exc:
            if not mounted:
                pytest.skip(f"mounting is not permitted here ({exc}); the patched table runs")
            raise
        if not any("remount" in a for a in args):  # a remount adds nothing to unmount
            mounted.append(args[-1])

    yield mount
    for target in reversed(mounted):
        if subprocess.run(["umount", target], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", target], capture_output=True)


def full_tmpfs(mount, tb: Path, tmp_path: Path, monkeypatch) -> None:
    """One page of tmpfs: the event file outgrows it mid-run (No space left on device)."""
    mount("-t", "tmpfs", "-o", "size=4k", "tmpfs", str(tb))


def read_only_bind(mount, tb: Path, tmp_path: Path, monkeypatch) -> None:
    """RUN/tb is a read-only bind of an empty folder from the start (Read-only file system)."""
    source = tmp_path / "tb-source"
    source.mkdir()
    mount("--bind", str(source), str(tb))
    mount("-o", "remount,bind,ro", str(tb))


def read_only_mid_run(mount, tb: Path, tmp_path: Path, monkeypatch) -> None:
    """RUN/tb is a writable bind until step 5, then remounted read-only."""
    source = tmp_path / "tb-source"
    source.mkdir()
    mount("--bind", str(source), str(tb))
    on_step = training._Trainer.on_step

    def remount_at_5(self, step):
        if step == 5:
            _mount("-o", "remount,bind,ro", str(tb))
        return on_step(self, step)

    monkeypatch.setattr(training._Trainer, "on_step", remount_at_5)


REAL: list[tuple[str, Callable, int]] = [
    ("full-tmpfs-mid-run", full_tmpfs, errno.ENOSPC),
    ("read-only-bind", read_only_bind, errno.EROFS),
    ("read-only-bind-mid-run", read_only_mid_run, errno.EROFS),
]


@pytest.mark.parametrize("case, arm, code", REAL, ids=[c for c, _, _ in REAL])
def test_a_real_full_or_read_only_disk_under_tb(data_dir, tmp_path, monkeypatch, mounts, case, arm, code):
    out = tmp_path / "run"
    tb = out / "tb"
    tb.mkdir(parents=True)
    arm(mounts, tb, tmp_path, monkeypatch)
    with thread_errors() as errors:
        status, stderr = train_cli(data_dir, out)
    check_went_on(out, status, stderr, errors, os.strerror(code))
    if case == "read-only-bind-mid-run":  # what was written before the disk turned read-only is kept
        steps = [e.step for e in read_events(tb).Scalars("train/loss")]
        assert steps[:4] == [1, 2, 3, 4]
