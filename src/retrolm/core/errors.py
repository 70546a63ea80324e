"""The one exception type the CLI turns into a single-line error message."""

from __future__ import annotations


class RetrolmError(Exception):
    """A user-facing error: bad input, a mismatched database, a corrupt file.

    The message must stand on its own in one line and name the file (or option) and what is wrong;
    the CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """
