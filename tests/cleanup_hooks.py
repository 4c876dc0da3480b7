"""Cleanup hooks for the cleanup, shutdown and limit tests. They run in the supervisor process.

The recording hooks append one JSON line per call to the file named by the environment variable
``HOOK_RECORD_VARIABLE``, so a test reads what every call saw whether the supervisor runs in the
test process or in a ``serve`` subprocess. Each line also lists which processes were still alive
when the hook ran: the child (``outcome.pid``), its descendants, and the pids a processor listed
in its report file (``job.data["report"]``, written by ``tests.cleanup_processors``).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import psutil

HOOK_RECORD_VARIABLE = "SANDBOX_RUNTIME_TEST_HOOK_RECORD"

# hang_sync returns after this many seconds even if the test never sets SYNC_HANG_RELEASE, so a
# failed test cannot keep a worker thread of the supervisor busy forever.
SYNC_HANG_LIMIT_S = 60.0
SYNC_HANG_RELEASE = threading.Event()

# Serialises appends from sync hooks, which run in worker threads.
_RECORD_LOCK = threading.Lock()


def record(job: Any, outcome: Any) -> None:
    """Append what this call saw to the record file (a sync hook, so it runs in a worker thread)."""
    _append(_observe("record", job, outcome))


async def record_async(job: Any, outcome: Any) -> None:
    """Append what this call saw to the record file (an async hook, run on the supervisor's loop)."""
    _append(_observe("record_async", job, outcome))


def raise_error(job: Any, outcome: Any) -> None:
    """Fail on every call."""
    raise RuntimeError(f"cleanup hook failed on purpose for job {outcome.job_id}")


async def hang_async(job: Any, outcome: Any) -> None:
    """Never return; the supervisor must abandon it after ``supervisor.hook_timeout_s``."""
    await asyncio.sleep(3600)


def hang_sync(job: Any, outcome: Any) -> None:
    """Block the worker thread until the test sets SYNC_HANG_RELEASE, or SYNC_HANG_LIMIT_S passes."""
    SYNC_HANG_RELEASE.wait(SYNC_HANG_LIMIT_S)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Return the records appended so far, oldest first."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Observation.


def _observe(hook: str, job: Any, outcome: Any) -> dict[str, Any]:
    return {
        "hook": hook,
        "time": time.time(),
        "thread": threading.current_thread().name,
        "queue": outcome.queue,
        "job_id": outcome.job_id,
        "job_name": job.name,
        "attempts_made": job.attemptsMade,
        "state": outcome.state,
        "cause": outcome.cause.value if outcome.cause is not None else None,
        "reason": outcome.reason,
        "failed_reason": outcome.failed_reason,
        "last_step": outcome.last_step.name,
        "exit_code": outcome.exit_code,
        "exit_signal": outcome.exit_signal,
        "elapsed_s": outcome.elapsed_s,
        "pid": outcome.pid,
        "child": _describe_child(outcome.pid),
        "report": _check_report(job),
    }


def _describe_child(pid: int | None) -> dict[str, Any] | None:
    """Return the child's status and its live descendants, or None when the child is gone."""
    if pid is None:
        return None
    try:
        process = psutil.Process(pid)
        status = process.status()
        if status == psutil.STATUS_ZOMBIE:
            return {"status": status, "descendants": []}
        descendants = [
            {"pid": child.pid, "status": _status(child), "command": _command(child)}
            for child in process.children(recursive=True)
            if _status(child) not in (None, psutil.STATUS_ZOMBIE)
        ]
        return {"status": status, "command": _command(process), "descendants": descendants}
    except psutil.NoSuchProcess:
        return None


def _check_report(job: Any) -> dict[str, Any] | None:
    """Check the workdir and the processes named in the processor's report file, if there is one."""
    data = job.data if isinstance(job.data, dict) else {}
    path = data.get("report")
    if not path or not os.path.exists(path):
        return None
    report = json.loads(Path(path).read_text())
    workdir = report.get("workdir")
    alive = [int(pid) for pid, create_time in report.get("pids", {}).items() if _is_alive(int(pid), create_time)]
    return {"workdir": workdir, "workdir_exists": bool(workdir) and os.path.lexists(workdir), "alive_pids": alive}


def _is_alive(pid: int, create_time: float | None) -> bool:
    """True when ``pid`` still names the reported process and it has not exited."""
    try:
        process = psutil.Process(pid)
        if create_time is not None and abs(process.create_time() - create_time) > 0.01:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _status(process: psutil.Process) -> str | None:
    try:
        return process.status()
    except psutil.NoSuchProcess:
        return None


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return "?"


def _append(entry: dict[str, Any]) -> None:
    path = os.environ.get(HOOK_RECORD_VARIABLE)
    if not path:
        raise RuntimeError(f"set {HOOK_RECORD_VARIABLE} to the file the recording hooks append to")
    line = json.dumps(entry) + "\n"
    with _RECORD_LOCK, open(path, "a") as handle:
        handle.write(line)
