"""The one progress-bar builder: a rich bar (description, bar, done / total, optional unit text, time left).

Library stages take `progress: bool` and build their bar here; a disabled bar renders nothing, so a library
caller or a notebook runs every stage silently.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn


def progress_bar(enabled: bool = True, unit: str | None = None, counter: ProgressColumn | None = None,
                 bold: bool = True, stderr: bool = False, tty_only: bool = False) -> Progress:
    """A progress bar: `unit` is text after the counter (rich field markup allowed), `counter` replaces done/total
    (e.g. a download's bytes), `stderr` draws on stderr instead of rich's default console, and `tty_only` keeps
    it silent unless stderr is a terminal."""
    columns: list[str | ProgressColumn] = [TextColumn("[bold]{task.description}" if bold else "{task.description}"),
                                           BarColumn(), counter or MofNCompleteColumn()]
    if unit is not None:
        columns.append(TextColumn(unit))
    columns.append(TimeRemainingColumn())
    disable = not (enabled and (sys.stderr.isatty() if tty_only else True))
    return Progress(*columns, console=Console(stderr=True) if stderr else None, disable=disable)
