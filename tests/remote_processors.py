"""Processors for the end-to-end remote cancellation tests.

Each one reports what it did through files named in ``job.data``, so a test can tell which child ran
a job and whether user code ran at all.
"""

from __future__ import annotations

import os
from pathlib import Path

POLL_INTERVAL_S = 0.02


def write_pid(path: str) -> int:
    """Write this process's pid to ``path`` atomically, so a reader never sees an empty file, and return the pid."""
    pid = os.getpid()
    partial = Path(f"{path}.partial")
    partial.write_text(str(pid))
    partial.replace(path)
    return pid


def hold(job, token, signal):
    """Write the pid to ``data['pidfile']``, then wait until ``data['release']`` exists or the job is cancelled.

    Returns ``{"pid", "attempt"}`` when released. A cancel raises AbortError at the cooperative step.
    """
    pid = write_pid(job.data["pidfile"])
    release = Path(job.data["release"])
    while not release.exists():
        if signal.wait_blocking(POLL_INTERVAL_S):
            signal.throw_if_aborted()
    return {"pid": pid, "attempt": job.attemptsMade}


def mark_then_return(job):
    """Create ``data['marker']`` before anything else, so a test can tell that user code ran."""
    Path(job.data["marker"]).write_text(f"job {job.id} ran in pid {os.getpid()}")
    return "ran"


def quick(job):
    return {"n": job.data.get("n"), "pid": os.getpid()}


def hold_first_attempt(job, token, signal):
    """On the first attempt, write the pid to ``data['pidfile']`` and wait for the cancel. Later attempts return at once."""
    if job.attemptsMade == 0:
        write_pid(job.data["pidfile"])
        signal.wait_blocking()
        signal.throw_if_aborted()
    return {"attempt": job.attemptsMade, "pid": os.getpid()}
