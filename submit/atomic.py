"""One home for atomic writes: a temp beside the target, fsync, os.replace; stale temps of killed runs removed.

Every file or folder the toolkit hands to a user goes through `atomic_file`, `atomic_path` or `atomic_dir`.
A temp is named `.<stem>.<pid>-<start>-<token>.tmp` in the target's folder (`.old` for a replaced folder on
its way out; `start` is the process's start time, so a reused pid, as in containers where every run is pid 1,
is not taken for the killed run). The stem is the target's name, or for a long name (over 128 bytes) its
first bytes and a hash (`short_name`), so that a temp name stays far below the 255-byte limit of a file name
and any legal target name can be written. So that:
- an exception never leaves a half-written target: the temp is removed and the old target kept;
- a kill -9 leaves a temp that the next write of the same target recognises (its process is gone) and
  removes, so garbage never grows;
- an `OSError` while writing (full disk, read-only file system, a folder in the way) becomes one
  `SubmitError` naming the target: `PATH: cannot write (No space left on device)`;
- a temp is created exclusively (`O_CREAT|O_EXCL|O_NOFOLLOW` for a file, `mkdir` for a folder): whatever was
  planted at a temp's name beforehand (a symbolic link to a victim file) is never followed nor written
  through; another token is drawn instead.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import IO, Any, Callable, Iterator, TypeVar

from submit.errors import SubmitError

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)(?:-(?P<start>\d+))?-[0-9a-f]{8}\.(?:tmp|old)$")
_LEGACY_TEMP = re.compile(r"^\.?(?P<name>.+?)(?:\.\d+)?\.(?:tmp|part)$")
FULL_BELOW = 1 << 20  # bytes free under which a failed write is taken to be the full disk's doing
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG})  # the output's file system
READABLE_NAME_MAX = 128  # bytes of a target name kept whole in its temps' and lock's names (a file name: 255)
_SHORT_PREFIX = 32  # bytes of a longer name kept, before its hash, so a user can still tell what a temp is for
_HASHED = re.compile(r"~[0-9a-f]{16}$")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CREATE_TRIES = 16
_T = TypeVar("_T")


def short_name(name: str) -> str:
    """The stem of `name`'s temps and lock: `name` itself up to 128 bytes (a temp adds about 45 bytes to it, a
    file name may have 255), else its first 32 bytes, `~` and a hash of the whole name (at most 49 bytes)."""
    raw = os.fsencode(name)
    if len(raw) <= READABLE_NAME_MAX:
        return name
    prefix = raw[:_SHORT_PREFIX].decode("utf-8", "ignore")  # cut at a character boundary
    return f"{prefix}~{hashlib.sha256(raw).hexdigest()[:16]}"


def temp_for(target: Path, kind: str = "tmp") -> Path:
    """A fresh temp name beside `target` that stands for it and this process (so a rerun can tell it is stale).

    Only a name: `make_temp_file` and `make_temp_dir` create one exclusively."""
    pid = os.getpid()
    return target.with_name(f".{short_name(target.name)}.{pid}-{_start_time(pid) or 0}-{secrets.token_hex(4)}.{kind}")


def make_temp_file(target: Path) -> tuple[Path, int]:
    """A new, empty temp file beside `target`, and its descriptor (open read-write; the caller closes it).

    Created with O_CREAT|O_EXCL|O_NOFOLLOW, so nothing already at the name (a symbolic link planted to a victim
    file) is ever followed or written through: another name is drawn. Mode 0666 minus the umask, as open()'s."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | os.O_CLOEXEC
    return _exclusive(target, lambda tmp: os.open(tmp, flags, 0o666))


def make_temp_dir(target: Path) -> Path:
    """A new, empty temp folder beside `target` (mkdir: a link or anything else at the name is never followed;
    another name is drawn). Mode 0777 minus the umask."""
    return _exclusive(target, os.mkdir)[0]


def _exclusive(target: Path, create: Callable[[Path], _T]) -> tuple[Path, _T]:
    """`create` a fresh temp name of `target`, drawing another token while the name is taken (FileExistsError)."""
    for _ in range(_CREATE_TRIES):
        tmp = temp_for(target)
        try:
            return tmp, create(tmp)
        except FileExistsError:
            continue
    raise SubmitError(f"{target}: cannot write (every temp name tried beside it is taken; expected at most a few "
                      f"stale temps in {target.parent})")


def target_of(path: str | bytes | os.PathLike[str]) -> str:
    """The target a temp path stands for (a temp's own name means nothing to a user); others unchanged.

    A long target's temp holds only a hash of its name: the target is found beside it when it exists. A bytes
    path (as some libraries put in `OSError.filename`) is decoded as the file system does."""
    p = Path(os.fsdecode(path))
    for pattern in (_TEMP, _LEGACY_TEMP):
        m = pattern.match(p.name)
        if m and p.name.startswith("."):
            if pattern is _TEMP and _HASHED.search(m["name"]):
                return str(_hashed_target(p.parent, m["name"]) or p)
            return str(p.with_name(m["name"]))
    return str(p)


def _hashed_target(folder: Path, stem: str) -> Path | None:
    """The entry of `folder` whose `short_name` is `stem`, if any."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name != stem and short_name(name) == stem:
                return folder / name
    return None


def remove_stale(target: Path) -> list[Path]:
    """Remove temps of `target` left by processes that no longer run (a killed earlier run); return them."""
    folder, stem = target.parent, short_name(target.name)
    try:
        candidates = list(folder.glob(f".{glob_escape(stem)}.*"))
    except OSError:
        return []
    removed = []
    for path in candidates:
        m = _TEMP.match(path.name)
        if m and m["name"] == stem and not _alive(int(m["pid"]), int(m["start"] or 0)):
            _remove(path)
            removed.append(path)
    return removed


def glob_escape(name: str) -> str:
    """`name` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def write_error(exc: OSError, target: Path, tmp: Path | None = None) -> SubmitError:
    """The one-line error for an OSError met while writing `target` (the temp's name is never shown)."""
    reason = (exc.strerror or os.strerror(exc.errno)) if exc.errno else str(exc)
    filename = exc.filename
    foreign = filename and tmp is not None and not str(filename).startswith(str(tmp)) and Path(filename) != target
    if foreign and exc.errno not in DISK_ERRNOS:  # e.g. an input the block read: name it, not the output
        return SubmitError(f"{filename}: {reason}")
    return SubmitError(f"{target}: cannot write ({reason})")


def describe(exc: OSError, output: str | None = None, command: str | None = None) -> str:
    """One line for a stray OSError (the CLI's last resort): the file it concerns and the system's reason.

    Without a file name (a write on an open file, a library's bare OSError) a full or read-only disk is the
    command's `output`'s; anything else is said to come from `command`, with no file named by the system.
    """
    reason = exc.strerror or str(exc)
    if exc.filename:
        name = target_of(exc.filename)
    elif exc.errno in DISK_ERRNOS and output:
        name = output
    else:
        return f"{command or 'reident-submit'}: {reason} (the operating system named no file)"
    if exc.errno in DISK_ERRNOS:
        return f"{name}: cannot write ({reason})"
    kind = {errno.EEXIST: "exists and is not a folder; expected a folder path",
            errno.EISDIR: "is a folder; expected a file path",
            errno.ENOTDIR: "a part of the path is a file; expected folders"}.get(exc.errno or 0)
    return f"{name}: {kind}" if kind else f"{name}: {reason}"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], parents: bool = True) -> Iterator[Path]:
    """Yield a temp path beside `target` (an empty file of ours, `make_temp_file`: the block writes it by
    name); on success fsync it and rename it over `target`, else remove it."""
    with _replacing(Path(target), parents) as (tmp, fd):
        os.close(fd)
        yield tmp


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8",
                newline: str | None = None, parents: bool = True) -> Iterator[IO[Any]]:
    """Yield an open temp file beside `target` that replaces it when the block ends without an error."""
    if "b" in mode:
        encoding = None
    with _replacing(Path(target), parents) as (_, fd):
        try:
            fh = os.fdopen(fd, mode, encoding=encoding, newline=newline)
        except BaseException:
            os.close(fd)
            raise
        with fh:
            yield fh


@contextlib.contextmanager
def _replacing(target: Path, parents: bool) -> Iterator[tuple[Path, int]]:
    """The shared body of `atomic_path` and `atomic_file`: a new temp file (path and open descriptor, the
    caller closes it) that replaces `target` when the block succeeds; removed, and one line, when it fails."""
    check_file_target(target, parents)
    remove_stale(target)
    try:
        tmp, fd = make_temp_file(target)
    except OSError as exc:
        raise write_error(exc, target) from None
    try:
        yield tmp, fd
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent)
    except OSError as exc:
        _remove(tmp)
        raise write_error(exc, target, tmp) from None
    except Exception as exc:
        full = not isinstance(exc, SubmitError) and disk_full(target.parent)  # before the temp frees its space
        _remove(tmp)
        if full:  # e.g. torch.save reports a failed write as RuntimeError("unexpected pos ...")
            raise write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), target) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def write_text(target: str | os.PathLike[str], text: str, parents: bool = True) -> Path:
    """Write `text` (UTF-8) to `target` atomically."""
    with atomic_file(target, "w", parents=parents) as fh:
        fh.write(text)
    return Path(target)


def write_bytes(target: str | os.PathLike[str], data: bytes, parents: bool = True) -> Path:
    """Write `data` to `target` atomically."""
    with atomic_file(target, "wb", parents=parents) as fh:
        fh.write(data)
    return Path(target)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new temp folder beside `target` (mode 0777 minus umask); on success swap it in for `target`.

    An existing `target` folder is renamed away first and removed last, so readers see the old or the new
    folder, never a mix. The caller creates `target`'s parent and decides whether replacing is allowed.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise SubmitError(f"{target}: exists and is not a folder; expected a folder path")
    remove_stale(target)
    try:
        tmp = make_temp_dir(target)
    except OSError as exc:
        raise write_error(exc, target) from None
    try:
        yield tmp
        _swap_in(tmp, target)
    except OSError as exc:
        _remove(tmp)
        raise write_error(exc, target, tmp) from None
    except Exception as exc:
        full = not isinstance(exc, SubmitError) and disk_full(target.parent)
        _remove(tmp)
        if full:
            raise write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), target) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an existing `target` is renamed aside first and removed after."""
    old = None
    if target.exists():
        old = temp_for(target, "old")  # a rename replaces whatever is at a name, never following a link there
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    _fsync(target.parent)
    if old is not None:
        _remove(old)


def disk_full(folder: Path) -> bool:
    """Whether the file system holding `folder` has (almost) no space left for this user."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BELOW


def check_file_target(target: Path, parents: bool = False) -> None:
    """Refuse a folder where a file is expected (callable early, before any work); create missing parents if asked."""
    if target.is_dir():
        raise SubmitError(f"{target}: is a folder; expected a file path")
    if target.parent.exists() and not target.parent.is_dir():
        raise SubmitError(f"{target.parent}: is a file; expected a folder to write {target.name} in")
    if parents and not target.parent.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, target) from None


def _fsync(path: Path) -> None:
    """Flush a file's (or folder's) data to disk; best effort where the platform cannot open folders."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # never waits on a FIFO put in its place
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS):
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a temp file or folder, ignoring what is already gone."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _start_time(pid: int) -> int | None:
    """Process `pid`'s start time (clock ticks since boot, /proc/PID/stat field 22); None where unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start: int = 0) -> bool:
    """Whether the process that made a temp still runs (its temp is in use, not stale): the pid, and where
    known its start time, must match, since pids are reused (a container's runs are often all pid 1)."""
    if start:
        now = _start_time(pid)
        if now is not None:
            return now == start
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
