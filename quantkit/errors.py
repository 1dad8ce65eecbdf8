"""The one error type for problems a user can fix: bad input, bad usage, a full disk."""

from __future__ import annotations


class QuantkitError(Exception):
    """A user-facing problem. `message` names the file or tensor; `hint` says what to do."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InternalError(Exception):
    """A broken invariant: quantkit's own bug, never the user's input. It keeps its traceback."""
