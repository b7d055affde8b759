"""The one exception type for user mistakes: the CLI prints it as a single line and exits non-zero."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A problem the user can fix (bad path, bad value, wrong checkpoint): never shown as a traceback."""


class Interrupted(UserError):
    """Training stopped by SIGINT or SIGTERM after saving a consistent checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def show(value: Any, limit: int = 60) -> str:
    """A value for an error message: repr, one line, shortened (and safe for 10**5000)."""
    try:
        text = repr(value)
    except ValueError:  # int too large to print (Python's digit limit)
        return "a very large integer"
    return text if len(text) <= limit else text[: limit - 3] + "..."
