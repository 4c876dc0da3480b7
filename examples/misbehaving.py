"""Processors that fail or resist cancellation on purpose, one per outcome the demo shows.

Each one that must be running before it is cancelled first writes a job log line, so a caller
can wait for that line instead of guessing how long the child takes to start.
"""

from __future__ import annotations

import ctypes
import os
import signal as signals
import subprocess
import sys
import tempfile
import time

STARTED_LOG_LINE = "processor started"


def parse_order(job):
    """Fail with ``ValueError`` when ``job.data["quantity"]`` is not a positive integer."""
    quantity = (job.data or {}).get("quantity")
    if not isinstance(quantity, int) or quantity <= 0:
        raise ValueError(f"quantity must be a positive integer, got {quantity!r}")
    return {"quantity": quantity}


def ignore_abort_signal(job, token, signal):
    """Sleep in a loop without ever checking ``signal``: only SIGTERM stops it.

    SIGTERM raises ``JobTerminated`` inside ``time.sleep``, so the ``finally`` block runs.
    """
    job.log(STARTED_LOG_LINE)
    try:
        while True:
            time.sleep(0.1)
    finally:
        print(f"job {job.id}: finally block ran", file=sys.stderr, flush=True)


def ignore_sigterm(job, token, signal):
    """Ignore SIGTERM and keep a helper process running: only SIGKILL stops the job.

    The processor also creates a scratch directory outside its workdir and hands it to the
    supervisor. The helper inherits the ignored SIGTERM, because ignored signals stay ignored
    across exec. The processor logs the directory and the helper's pid, so the caller can check
    afterwards that the supervisor removed the directory and that SIGKILL reached the helper.
    """
    signals.signal(signals.SIGTERM, signals.SIG_IGN)
    scratch = tempfile.mkdtemp(prefix="sandbox-runtime-example-")
    job.add_cleanup_path(scratch)
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    job.log(f"scratch directory {scratch}")
    job.log(f"helper pid {helper.pid}")
    job.log(STARTED_LOG_LINE)
    while True:
        time.sleep(0.1)


def crash_in_native_code(job):
    """Read memory at address 0 through ctypes: the child dies of SIGSEGV."""
    job.log(STARTED_LOG_LINE)
    ctypes.string_at(0)


def sleep_seconds(job):
    """Sleep for ``job.data["seconds"]`` in one blocking call, without checking any signal."""
    seconds = float((job.data or {}).get("seconds", 30))
    job.log(STARTED_LOG_LINE)
    time.sleep(seconds)
    return {"slept_s": seconds, "pid": os.getpid()}
