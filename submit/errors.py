"""The one exception type users see: a one-line message naming the file/key and what was expected."""


class SubmitError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits with status 2."""
