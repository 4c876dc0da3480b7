"""Processors the benchmarks run in child processes, and in a plain ``bullmq.Worker`` for comparison.

The benchmark scripts name them as ``/abs/path/bench/processors.py:function``, the form a config
file uses. Each processor that reports a time writes ``time.monotonic_ns()`` values, which share one
clock (CLOCK_MONOTONIC) with the supervisor's process on Linux, so the parent can subtract them from
its own readings. Files are written to ``job.data["dir"]`` (not the job's workdir, which the parent
removes after the job) with ``write_value``, which replaces the file atomically.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path


def write_value(directory: str, name: str, value: int) -> None:
    """Write ``value`` and a newline to ``directory/name`` through a rename, so readers never see half of it."""
    path = Path(directory) / name
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(f"{value}\n")
    os.replace(temporary, path)


# Throughput and memory.


async def trivial(job, token=None):
    return 1


# Cancel latency. Each writes "<id>.started" (its pid) once running, then waits for the abort in its
# own way and returns the time it saw it. Returning before SIGTERM completes the job with that value.
# ``flag_ns`` is when the abort callbacks ran on the child's reader thread, just after it set the
# signal. The main thread can see the signal before that callback has run, so ``AbortTimes.result``
# waits for it.


class AbortTimes:
    """The time the reader thread's abort callback ran, recorded for one job."""

    def __init__(self, abort_signal) -> None:
        self.flag_ns: int | None = None
        self._flagged = threading.Event()
        abort_signal.on_abort(self._record_flag)

    def _record_flag(self, reason) -> None:
        self.flag_ns = time.monotonic_ns()
        self._flagged.set()

    def result(self, seen_ns: int, **extra) -> dict:
        """Build the processor's return value once the abort callback has recorded ``flag_ns``."""
        self._flagged.wait(5.0)
        return {"seen_ns": seen_ns, "flag_ns": self.flag_ns, **extra}


def _prepare(job, abort_signal) -> AbortTimes:
    switch_interval_ms = job.data.get("switch_interval_ms")
    if switch_interval_ms:
        sys.setswitchinterval(switch_interval_ms / 1000)
    times = AbortTimes(abort_signal)
    write_value(job.data["dir"], f"{job.id}.started", os.getpid())
    return times


def cancel_wait_blocking(job, token, abort_signal):
    """Block in ``wait_blocking`` (the GIL is free while it waits)."""
    times = _prepare(job, abort_signal)
    abort_signal.wait_blocking(120)
    seen = time.monotonic_ns()
    return times.result(seen)


async def cancel_await(job, token, abort_signal):
    """Await ``signal.wait()`` in the child's event loop."""
    times = _prepare(job, abort_signal)
    await abort_signal.wait()
    seen = time.monotonic_ns()
    return times.result(seen)


def cancel_poll(job, token, abort_signal):
    """Spin on ``signal.aborted`` with nothing else in the loop (holds the GIL between switches)."""
    times = _prepare(job, abort_signal)
    while not abort_signal.aborted:
        pass
    seen = time.monotonic_ns()
    return times.result(seen)


def cancel_cpu(job, token, abort_signal):
    """Do pure-Python arithmetic and check ``signal.aborted`` after every ``check_every_ms`` of work."""
    times = _prepare(job, abort_signal)
    check_every_ns = int(job.data.get("check_every_ms", 10) * 1e6)
    total = 0
    while not abort_signal.aborted:
        chunk_end = time.monotonic_ns() + check_every_ns
        while time.monotonic_ns() < chunk_end:
            for number in range(200):
                total += number * number
    seen = time.monotonic_ns()
    return times.result(seen, total=total % 1000)


# Escalation. Both ignore the abort signal.


def ignore_cancel(job, token=None):
    """Sleep until SIGTERM; write its arrival time ("<id>.sigterm") as the runtime's exception passes."""
    write_value(job.data["dir"], f"{job.id}.started", os.getpid())
    try:
        while True:
            time.sleep(0.5)
    except BaseException:
        # JobTerminated, raised in this frame by the runtime's SIGTERM handler.
        write_value(job.data["dir"], f"{job.id}.sigterm", time.monotonic_ns())
        raise


def ignore_sigterm(job, token=None):
    """Record SIGTERM's arrival ("<id>.sigterm") in a handler that then ignores it; sleep until SIGKILL."""
    directory = job.data["dir"]

    def record_sigterm(signum, frame):
        write_value(directory, f"{job.id}.sigterm", time.monotonic_ns())

    signal.signal(signal.SIGTERM, record_sigterm)
    write_value(directory, f"{job.id}.started", os.getpid())
    while True:
        time.sleep(0.5)


# Crash detection.


def exit_abruptly(job, token=None):
    """Record the time ("<id>.exit") and end the process with ``os._exit(3)``, skipping all cleanup."""
    write_value(job.data["dir"], f"{job.id}.exit", time.monotonic_ns())
    os._exit(3)


def sleep_until_killed(job, token=None):
    """Write the pid ("<id>.started") and sleep until something kills the process."""
    write_value(job.data["dir"], f"{job.id}.started", os.getpid())
    while True:
        time.sleep(0.5)
