"""The `reident-submit` command: a thin click layer over library functions that take plain arguments.

Each command parses options, calls one library function and prints its result; a `SubmitError` from
anywhere below becomes a one-line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from submit.errors import SubmitError


class _Group(click.Group):
    """Turns SubmitError (and a few OS errors) into one-line messages instead of tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SubmitError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="reident-submit")
def main() -> None:
    """CLIP-ReIdent player re-identification: prepare data, train, predict, evaluate."""


# Commands are registered below, one per pipeline stage, each calling a library function.
