"""Errors a user can act on. `engine.loop.launch` prints them as one message (the path, key or value and
what was expected) and exits with status 1, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's data, run directory or run; the message says what to do."""


class DataError(UserError):
    """A problem with the dataset on disk; the message names the path."""


class RunDirError(UserError):
    """The run directory holds another run, or this run cannot continue in it."""


class Diverged(UserError):
    """The training loss became non-finite or exploded; the last good checkpoint is kept."""


class Preempted(SystemExit):
    """Raised after a preemption checkpoint was written; the process exits with 128 + signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.signum, self.message = signum, message
