"""The one exception type the CLI turns into a single-line error message."""

from __future__ import annotations


class RetrolmError(Exception):
    """A user-facing error: bad input, a mismatched database, a corrupt file.

    The message must stand on its own in one line and name the file (or option) and what is wrong;
    the CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a one-line error quotes."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__
