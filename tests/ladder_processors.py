"""Processors for the cancellation tests: process trees, detached daemons and side-effect records.

Each processor reports the pids it started to a file named in ``job.data`` so that the test can
watch those processes from outside.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# A Python grandchild that ignores SIGTERM, prints "ready", then never exits by itself.
_SIGTERM_IGNORING_SCRIPT = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    time.sleep(0.1)\n"
)


def _sleep_forever() -> None:
    while True:
        time.sleep(0.1)


def _write_json_atomically(path: Path, value: object) -> None:
    """Write ``value`` as JSON so that a reader never sees a half-written file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value))
    os.replace(temporary, path)


def spawn_tree(job, token, signal_):
    """Start a shell, a SIGTERM-ignoring Python grandchild and a multiprocessing child, then loop.

    Writes {"child", "shell", "python", "multiprocessing", "all"} to ``job.data["pids"]``, where
    "all" lists every descendant alive at that moment. With ``job.data["ignore_sigterm"]`` the
    child itself ignores SIGTERM and catches BaseException, so only SIGKILL ends it. Without it,
    SIGTERM ends the child and leaves its descendants behind for the runtime to kill.
    """
    import psutil

    if job.data.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    shell = subprocess.Popen(["sh", "-c", "sleep 300; echo shell done"])
    python = subprocess.Popen([sys.executable, "-c", _SIGTERM_IGNORING_SCRIPT], stdout=subprocess.PIPE, text=True)
    if python.stdout.readline().strip() != "ready":
        raise RuntimeError("the SIGTERM-ignoring grandchild did not start")
    context = multiprocessing.get_context(job.data.get("start_method", "spawn"))
    mp_child = context.Process(target=_sleep_forever, daemon=False)
    mp_child.start()

    descendants = [process.pid for process in psutil.Process().children(recursive=True)]
    _write_json_atomically(
        Path(job.data["pids"]),
        {
            "child": os.getpid(),
            "shell": shell.pid,
            "python": python.pid,
            "multiprocessing": mp_child.pid,
            "all": descendants,
        },
    )
    while True:
        try:
            time.sleep(0.05)
        except BaseException:
            if not job.data.get("ignore_sigterm"):
                raise


def start_detached_sleeper(job):
    """Start ``sleep 300`` in a new session through a double fork, then return its pid.

    ``setsid -f`` forks and its parent exits, so the sleeper loses its parent and is re-parented
    to the nearest subreaper. The sleeper's shell writes its pid, then becomes ``sleep`` by exec.
    """
    pidfile = Path(job.data["pidfile"])
    script = f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile} && exec sleep 300"
    subprocess.run(["setsid", "-f", "sh", "-c", script], check=True)
    deadline = time.monotonic() + 10.0
    while not pidfile.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the detached sleeper did not write {pidfile} within 10 s")
        time.sleep(0.01)
    return int(pidfile.read_text())


def record_start_and_end(job):
    """Append ``START pid`` to ``job.data["effects"]``, work for ``seconds`` ignoring cancels, append ``END pid``."""
    effects = Path(job.data["effects"])
    with effects.open("a") as handle:
        handle.write(f"START {os.getpid()}\n")
    deadline = time.monotonic() + job.data["seconds"]
    while time.monotonic() < deadline:
        time.sleep(0.05)
    with effects.open("a") as handle:
        handle.write(f"END {os.getpid()}\n")
    return os.getpid()


def grandchild_then_sleep(job):
    """Start ``sleep 300``, append ``child_pid grandchild_pid`` to ``job.data["pids"]``, then sleep ``seconds``."""
    grandchild = subprocess.Popen(["sleep", "300"])
    with open(job.data["pids"], "a") as handle:
        handle.write(f"{os.getpid()} {grandchild.pid}\n")
    time.sleep(job.data["seconds"])
    return {"child": os.getpid(), "grandchild": grandchild.pid}


def write_marker_first(job, token, signal_):
    """Write ``job.data["marker"]`` as the very first act, then return."""
    Path(job.data["marker"]).write_text("user code ran")
    return "ran"


def swallow_exceptions_with_pass(job, token, signal_):
    """Catch Exception around every step with ``pass``, then write ``job.data["finally"]`` in a finally block.

    Unlike ``tests.processors:swallow_exceptions`` the handler does not end in ``continue``:
    CPython 3.11 and 3.12.1 skip the enclosing ``finally`` when an exception raised by a signal
    handler lands on a ``continue`` that ends an ``except`` clause (3.10 and 3.13 run it).
    """
    Path(job.data["pidfile"]).write_text(str(os.getpid()))
    marker = Path(job.data["finally"])
    try:
        while True:
            try:
                signal_.throw_if_aborted()
                time.sleep(0.01)
            except Exception:
                pass
    finally:
        marker.write_text("finally ran")
