"""The one exception type users see: a one-line message naming the file/key and what was expected."""


class SubmitError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits with status 2."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (at most 200 characters), for one-line messages."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
