"""The runtime of a sandbox-runtime child process, and the names processors may import.

This package imports neither ``redis`` nor ``bullmq``. Every Redis write a processor requests goes
through the supervisor over the pipe. Processors may import the names below.
"""

from .abort import AbortError, AbortSignal
from .errors import JobTerminated, UnrecoverableError

__all__ = ["AbortError", "AbortSignal", "JobTerminated", "UnrecoverableError"]
