"""Exclusive locks on output folders, so two processes never write one run folder or DATA_DIR at once.

A lock is an `fcntl.flock` on a small lock file: the kernel frees it when its process ends, however it
ends (kill -9 included), so a stale lock is simply taken over and never needs clearing by hand. The file
records its holder (command, pid, host, start time) so that a refused process can name it:
`RUN: in use by train (pid 1234 on host, since 14:03); wait for it or choose another --out`.
- `run_lock`: RUN_DIR/.lock, for `train` (the folder is written in place, file by file);
- `sibling_lock`: .<name>.lock beside the target, for folders swapped in whole (`atomic.atomic_dir`: DATA_DIR;
  a name over 128 bytes is shortened to a hash, `atomic.short_name`, so any legal folder name can be locked).
The lock file is removed on release; a refused process writes nothing.

A lock file is opened with O_NOFOLLOW (created with mode 0644) and must be a plain file of this user's with
no other hard link: a symbolic link (to a victim file the holder record would overwrite), a folder, a FIFO or
a file of another user at the lock's path is refused in one line naming the lock, and left as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Iterator

from submit.atomic import short_name, write_error
from submit.errors import SubmitError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking (the toolkit targets Linux)
    fcntl = None  # type: ignore[assignment]

RUN_LOCK = ".lock"
LOCK_MODE = 0o644  # others may read who holds it; only its owner writes it
_OPEN_FLAGS = (os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC | os.O_NONBLOCK
               | getattr(os, "O_NOCTTY", 0))
_EXPECTED = "expected nothing or a plain lock file of yours there: remove it, or choose another --out"


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
    with hold(sibling_lock_path(target), target, command):
        yield target


def sibling_lock_path(target: str | os.PathLike[str]) -> Path:
    """`.<name>.lock` beside `target` (a long name shortened as its temps' are, `atomic.short_name`)."""
    target = Path(target)
    return target.with_name(f".{short_name(target.name)}.lock")


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
        fd = _open(lock_file, target)
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


def _open(lock_file: Path, target: Path) -> int:
    """Open (or create) `lock_file` without following a link; refuse anything there but a plain file of ours."""
    try:
        fd = os.open(lock_file, _OPEN_FLAGS, LOCK_MODE)
    except OSError as exc:
        try:
            what = _not_a_lock(os.lstat(lock_file), lock_file)
        except OSError:
            what = None
        if what:
            raise SubmitError(f"{lock_file}: {what}; {_EXPECTED}") from None
        raise write_error(exc, target) from None  # e.g. a read-only or full disk: the output's fault
    try:
        what = _not_a_lock(os.fstat(fd), lock_file)
    except OSError as exc:
        os.close(fd)
        raise write_error(exc, target) from None
    if what:
        os.close(fd)
        raise SubmitError(f"{lock_file}: {what}; {_EXPECTED}")
    return fd


def _not_a_lock(st: os.stat_result, path: Path) -> str | None:
    """What makes the file `st` (as lstat or fstat sees it) no lock file of ours, or None when it is one."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        try:
            return f"is a symbolic link (to {os.readlink(path)})"
        except OSError:
            return "is a symbolic link"
    if not stat.S_ISREG(mode):
        kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                 (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
        return "is " + next((name for test, name in kinds if test(mode)), "not a plain file")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"belongs to another user (uid {st.st_uid}, you are uid {os.geteuid()})"
    if st.st_nlink > 1:
        return f"has {st.st_nlink} hard links (another name for the same file)"
    return None


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (itself, not through a link)."""
    try:
        st = os.lstat(path)
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
            raise write_error(exc, folder) from None
        made.append(path)
    return made
