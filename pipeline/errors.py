"""User-facing errors: one line, no traceback.

Raise ``UserError`` for anything a user can fix (a bad path, key, value or
row). The entry point prints its message as a single line and exits with
status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, reported as one line naming what was wrong."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # force a single line

