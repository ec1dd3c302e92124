"""Exclusive locks on output folders, so two processes never write one run folder or DATA_DIR at once.

A lock is an `fcntl.flock` on a small lock file: the kernel frees it when its process ends, however it
ends (kill -9 included), so a stale lock is simply taken over and never needs clearing by hand. The file
records its holder (command, pid, host, start time) so that a refused process can name it:
`RUN: in use by train (pid 1234 on host, since 14:03); wait for it or choose another --out`.
- `run_lock`: RUN_DIR/.lock, for `train` (the folder is written in place, file by file);
- `sibling_lock`: .<name>.lock beside the target, for folders swapped in whole (`atomic.atomic_dir`: DATA_DIR).
The lock file is removed on release; a refused process writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from submit.errors import SubmitError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking (the toolkit targets Linux)
    fcntl = None  # type: ignore[assignment]

RUN_LOCK = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike[str], command: str) -> Iterator[Path]:
    """Hold RUN_DIR/.lock while the block runs (creating RUN_DIR; removed again if the run left it empty)."""
    run = Path(run_dir)
    made = _make_dirs(run)
    try:
        with hold(run / RUN_LOCK, run, command):
            yield run
    finally:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only while still empty: a refused or failed-early run leaves nothing


@contextlib.contextmanager
def sibling_lock(target: str | os.PathLike[str], command: str) -> Iterator[Path]:
    """Hold `.<name>.lock` beside `target` while the block runs (the parent folder must exist)."""
    target = Path(target)
    with hold(target.with_name(f".{target.name}.lock"), target, command):
        yield target


@contextlib.contextmanager
def hold(lock_file: Path, target: Path, command: str) -> Iterator[None]:
    """Lock `lock_file` exclusively for `command` writing `target`, or refuse at once naming the holder."""
    if fcntl is None:
        yield
        return
    fd = _acquire(lock_file, target)
    try:
        _record_holder(fd, command)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_file.unlink()  # while still locked: a waiter that opened it re-checks the inode and retries
        fcntl.flock(fd, fcntl.LOCK_UN)  # explicit: forked loader workers share this open file
        os.close(fd)


def _acquire(lock_file: Path, target: Path) -> int:
    """Open and flock `lock_file` (non-blocking); the file must still be the one at that path once locked."""
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            from submit.atomic import write_error

            raise write_error(exc, target) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise SubmitError(f"{target}: in use by {holder}; wait for it or choose another --out") from None
        except OSError:  # a file system without flock (rare): run unlocked rather than not at all
            return fd
        if _same_file(fd, lock_file):
            return fd
        os.close(fd)  # the holder removed it on release between our open and lock: take the new one


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _record_holder(fd: int, command: str) -> None:
    """Write who holds the lock into it (best effort: the lock itself is the flock, not the text)."""
    record = {"command": command, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)


def _holder(fd: int) -> str:
    """`train (pid 1234 on host, since 14:03)` from a held lock file; a vaguer phrase when it says nothing."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.localtime(float(record["since"]))
        when = time.strftime("%H:%M" if since[:3] == time.localtime()[:3] else "%b %d %H:%M", since)
        return f"{record['command']} (pid {int(record['pid'])} on {record['host']}, since {when})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _make_dirs(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return the new ones, outermost first."""
    made = []
    for path in (*reversed(folder.absolute().parents), folder.absolute()):
        if path.is_dir():
            continue
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                raise SubmitError(f"{path}: exists and is not a folder; expected a folder path") from None
            continue  # made by someone else meanwhile: not ours to remove
        except OSError as exc:
            from submit.atomic import write_error

            raise write_error(exc, folder) from None
        made.append(path)
    return made
