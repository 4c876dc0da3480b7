"""Exceptions a processor meets inside a child process."""

from __future__ import annotations


class JobTerminated(BaseException):
    """Raised in the processor when the supervisor sends SIGTERM to stop the job.

    It derives from BaseException so that ``except Exception`` in user code cannot swallow it, and
    ``finally`` blocks still run. Nothing the processor returns after it is written to the job.
    """


class UnrecoverableError(Exception):
    """Raise this to fail the job without retries, as BullMQ's ``UnrecoverableError`` does.

    The supervisor recognises the class by name, so BullMQ's own class works the same way.
    """
