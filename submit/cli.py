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


@main.command()
@click.argument("source", type=click.Path(path_type=str))
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="DATA_DIR to create.")
@click.option("--layout", type=click.Choice(["auto", "official", "market", "folders"]), default="auto",
              show_default=True, help="Source layout; auto detects it.")
@click.option("--download", "fetch", is_flag=True, help="Fetch the official zip to SOURCE if it is missing.")
@click.option("--test-fraction", "--query-fraction", "test_fraction", type=float, default=0.2, show_default=True,
              help="folders layout: share of identities held out as test (one query each, the rest gallery).")
@click.option("--seed", type=int, default=0, show_default=True, help="folders layout: seed of the identity split.")
@click.option("--force", is_flag=True, help="Replace a non-empty DATA_DIR.")
def prepare(source: str, out: str, layout: str, fetch: bool, test_fraction: float, seed: int, force: bool) -> None:
    """Check SOURCE (zip or folder) and write DATA_DIR with images/ and manifest.csv."""
    from rich.console import Console
    from rich.table import Table

    from submit.prepare import prepare as run_prepare

    result = run_prepare(source, out, layout=layout, fetch=fetch, test_fraction=test_fraction, seed=seed,
                         force=force)
    table = Table(title=f"{result.layout} layout")
    for col in ("split", "role", "images", "identities"):
        table.add_column(col, justify="left" if col in ("split", "role") else "right")
    for row in result.summary:
        ids = "-" if row.identities is None else f"{row.identities:,}"
        table.add_row(row.split, row.role, f"{row.images:,}", ids)
    console = Console()
    console.print(table)
    for line in ([result.release] if result.release else []) + result.notes:
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"wrote {result.manifest}", highlight=False, soft_wrap=True)


@main.command()
@click.argument("ranking", type=click.Path(path_type=str))
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str), help="DATA_DIR (from prepare).")
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="Report folder to (re)write.")
@click.option("--top-k", type=int, default=10, show_default=True, help="Gallery crops shown per query.")
@click.option("--per-page", type=int, default=50, show_default=True, help="Queries per HTML page.")
@click.option("--split", type=click.Choice(["auto", "test", "challenge"]), default="auto", show_default=True,
              help="Which split the ranking file is for; auto matches its ids against the manifest.")
def report(ranking: str, data_dir: str, out: str, top_k: int, per_page: int, split: str) -> None:
    """Write a static HTML report of RANKING (top-k crops per query, scores, CMC and AP plots)."""
    from submit.report import make_report

    index = make_report(ranking, data_dir, out, top_k=top_k, per_page=per_page, split=split)
    click.echo(f"wrote {index}")
