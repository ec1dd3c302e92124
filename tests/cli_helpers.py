"""CLI helpers shared by the fault-campaign tests: run a command in-process, read its one-line refusal."""

from __future__ import annotations

from click.testing import CliRunner

from submit.cli import main


def invoke(args: list) -> tuple[int, str]:
    """Run the CLI in-process; return (exit status, stderr); a traceback would be an uncaught exception."""
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), \
        f"uncaught {type(res.exception).__name__}: {res.exception}\n{res.output}"
    return res.exit_code, res.stderr


def one_error_line(stderr: str) -> str:
    """The refusal: the last stderr line, the only one starting with `error:`, and no traceback."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]
