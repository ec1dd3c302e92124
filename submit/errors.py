"""The one exception type users see: a one-line message naming the file/key and what was expected."""

from __future__ import annotations

import contextlib
import re
from typing import Iterator


class SubmitError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits with status 2."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (at most 200 characters), for one-line messages."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


_WORKER = re.compile(r"Caught \w+ in (?:DataLoader worker process \d+|pin memory thread[^.]*)\.")
_DIED = re.compile(r"DataLoader worker \(pid\(s\) (?P<pids>[\d, ]+)\) exited unexpectedly")
_OS_ERROR = re.compile(r"\[Errno \d+\] (?P<reason>.+?): '(?P<file>.+)'")


def worker_message(exc: BaseException) -> str | None:
    """The one-line message of an error from a DataLoader worker (torch re-raises it with the worker's whole
    traceback as its text; a killed worker is a RuntimeError), or None when `exc` did not come from one."""
    text = str(exc)
    died = _DIED.search(text)
    if died:
        return (f"data-loader worker (pid {died['pids']}) exited unexpectedly (out of memory, or killed?); "
                "expected it to finish: retry with fewer workers (data.workers, --workers)")
    if not _WORKER.match(text):
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    kind, _, message = lines[-1].partition(": ")
    if kind.rpartition(".")[2] == SubmitError.__name__:
        return message
    os_error = _OS_ERROR.fullmatch(message)
    if os_error:
        return f"{os_error['file']}: {os_error['reason']}"
    return f"{lines[-1]} (raised in a data-loader worker)"


@contextlib.contextmanager
def loader_errors() -> Iterator[None]:
    """Around a DataLoader loop: an error a worker raised becomes its one-line SubmitError, not a traceback."""
    try:
        yield
    except Exception as exc:
        message = worker_message(exc)
        if message is None:
            raise
        raise SubmitError(message) from (None if isinstance(exc, SubmitError) else exc)
