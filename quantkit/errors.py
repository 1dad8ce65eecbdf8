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


_received: list[int] = []  # signals the CLI's handler turned into Interrupted, whether or not they got through


def interrupt(signum: int) -> None:
    """Raise Interrupted for a signal, remembering it: code that swallows the exception (a finalizer, a
    compiler that wraps what it catches) cannot make the run carry on as if nothing had happened."""
    _received.append(signum)
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    """Before a run makes its output final: an interrupt that was swallowed on the way stops it here."""
    if _received:
        raise Interrupted(_received[0])


def interrupted() -> int:
    """The first signal received so far, or 0."""
    return _received[0] if _received else 0


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (the CLI turns both into this): the run stops, its temporary output is
    removed on the way out, and the process exits 128 + the signal's number. A KeyboardInterrupt, so that
    whatever cleans up after Ctrl-C cleans up after SIGTERM too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
