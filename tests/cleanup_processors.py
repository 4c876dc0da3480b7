"""Processors for the cleanup, shutdown and limit tests. They run in child processes.

Most of them write a report file named by ``job.data["report"]`` as soon as they start: their pid,
cwd, workdir and the processes they started (pid -> create time), so a test or a cleanup hook can
check from outside what the supervisor removed and killed.
"""

from __future__ import annotations

import json
import os
import resource
import signal as signal_module
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MIB = 1024 * 1024

# Upper bound for processors that wait for the supervisor to stop them, so that a product bug
# ends in a failed assertion rather than a process that runs forever.
SAFETY_LIMIT_S = 120.0


# Helpers.


def _create_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def _write_json_atomically(path: str | os.PathLike[str], value: Any) -> None:
    """Write ``value`` as JSON so that a reader never sees a half-written file."""
    target = Path(path)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(value))
    os.replace(temporary, target)


def write_report(job: Any, **fields: Any) -> None:
    """Write the report file named by ``job.data["report"]``, if any."""
    path = job.data.get("report")
    if not path:
        return
    report = {"pid": os.getpid(), "cwd": os.getcwd(), "workdir": job.workdir, "pids": {}}
    report.update(fields)
    _write_json_atomically(path, report)


def _start_sleeper(new_session: bool = False) -> subprocess.Popen:
    return subprocess.Popen(["sleep", "300"], start_new_session=new_session)


def _ignore_everything(deadline_s: float = SAFETY_LIMIT_S) -> None:
    """Ignore SIGTERM and every exception until ``deadline_s`` passes: only SIGKILL stops this."""
    signal_module.signal(signal_module.SIGTERM, signal_module.SIG_IGN)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            time.sleep(0.01)
        except BaseException:
            continue


def _fill_workdir(job: Any) -> None:
    """Create files, a nested read-only directory and a symlink to a file outside the workdir."""
    workdir = Path(job.workdir)
    (workdir / "data.txt").write_text(f"job {job.id}\n")
    nested = workdir / "nested" / "deeper"
    nested.mkdir(parents=True)
    (nested / "blob.bin").write_bytes(os.urandom(4096))
    (nested / "read-only.txt").write_text("read only")
    os.chmod(nested / "read-only.txt", 0o400)
    os.chmod(nested, 0o500)
    outside = job.data.get("outside_file")
    if outside:
        os.symlink(outside, workdir / "link-to-outside")
    Path("relative.txt").write_text("written relative to the cwd")


# Cleanup tests.


def _append_forever(path: str, first_write: threading.Event) -> None:
    while True:
        with open(path, "a") as handle:
            handle.write("x\n")
        first_write.set()
        time.sleep(0.01)


def workdir_job(job: Any, token: Any, signal: Any) -> Any:
    """Fill the workdir, write the report, then act as ``job.data["mode"]`` selects.

    Modes: ``return``; ``raise``; ``sleep`` (for ``job.data["seconds"]``, then returns); ``cooperative`` (stops when the signal aborts); ``stubborn``
    (ignores the cancel and SIGTERM); ``stray_thread`` (starts a non-daemon thread that appends
    to ``job.data["stray"]`` every 10 ms, then raises). With ``job.data["sleeper"]`` a
    ``sleep 300`` is started first, in the child's process group, and left running.
    """
    _fill_workdir(job)
    pids: dict[int, float | None] = {}
    if job.data.get("sleeper"):
        sleeper = _start_sleeper()
        pids[sleeper.pid] = _create_time(sleeper.pid)
    write_report(job, pids=pids)

    mode = job.data["mode"]
    if mode == "return":
        return {"workdir": job.workdir, "pid": os.getpid()}
    if mode == "raise":
        raise ValueError(f"job {job.id} raised on purpose")
    if mode == "sleep":
        time.sleep(job.data["seconds"])
        return {"workdir": job.workdir, "pid": os.getpid()}
    if mode == "cooperative":
        signal.wait_blocking(SAFETY_LIMIT_S)
        signal.throw_if_aborted()
        raise RuntimeError(f"no cancel arrived within {SAFETY_LIMIT_S:g} s")
    if mode == "stubborn":
        _ignore_everything()
        raise RuntimeError(f"still running after {SAFETY_LIMIT_S:g} s")
    if mode == "stray_thread":
        first_write = threading.Event()
        threading.Thread(target=_append_forever, args=(job.data["stray"], first_write), name="stray-writer", daemon=False).start()
        # Raise only once the file has content, so the test can tell "stopped" from "never started".
        first_write.wait(SAFETY_LIMIT_S)
        raise ValueError(f"job {job.id} raised and left a thread running")
    raise ValueError(f"unknown mode {mode!r}")


def hand_over(job: Any, token: Any, signal: Any) -> Any:
    """Create a directory and a file outside the workdir and a ``sleep 300`` in its own session,
    hand all three to the supervisor, and hand over ``job.data["external_pid"]`` if given.

    Returns at once, or with ``job.data["stubborn"]`` ignores the cancel and SIGTERM.
    """
    outside = Path(job.data["outside"])
    directory = Path(tempfile.mkdtemp(prefix=f"handed-{job.id}-", dir=outside))
    (directory / "inner").mkdir()
    (directory / "inner" / "file.txt").write_text("handed over")
    handed_file = outside / f"handed-file-{job.id}.txt"
    handed_file.write_text("handed over")
    daemon = _start_sleeper(new_session=True)

    job.add_cleanup_path(directory)
    job.add_cleanup_path(handed_file)
    job.add_cleanup_process(daemon)
    if "external_pid" in job.data:
        job.add_cleanup_process(job.data["external_pid"])
    write_report(
        job,
        directory=str(directory),
        file=str(handed_file),
        daemon_session=os.getsid(daemon.pid),
        own_session=os.getsid(0),
        pids={daemon.pid: _create_time(daemon.pid)},
    )
    if job.data.get("stubborn"):
        _ignore_everything()
    return {"directory": str(directory), "daemon": daemon.pid}


# Shutdown tests.


def shutdown_job(job: Any, token: Any, signal: Any) -> Any:
    """Write the report, then act as ``job.data["mode"]`` selects. Finish at once if ``job.data["done_flag"]`` exists.

    Modes: ``short`` sleeps ``seconds`` and returns; ``long`` waits up to ``seconds`` for a
    cancel, writes the time it saw the cancel to ``job.data["aborted_at"]`` and stops;
    ``stubborn`` starts a ``sleep 300`` and ignores the cancel and SIGTERM.
    """
    flag = job.data.get("done_flag")
    summary = {"pid": os.getpid(), "attemptsMade": job.attemptsMade, "attemptsStarted": job.attemptsStarted}
    if flag and os.path.exists(flag):
        write_report(job)
        return {**summary, "finished": "at once"}

    mode = job.data["mode"]
    if mode == "short":
        write_report(job)
        time.sleep(job.data["seconds"])
        return {**summary, "finished": "short"}
    if mode == "long":
        write_report(job)
        if signal.wait_blocking(job.data["seconds"]):
            Path(job.data["aborted_at"]).write_text(repr(time.time()))
            signal.throw_if_aborted()
        return {**summary, "finished": "long"}
    if mode == "stubborn":
        sleeper = _start_sleeper()
        write_report(job, pids={sleeper.pid: _create_time(sleeper.pid)})
        _ignore_everything()
        return {**summary, "finished": "stubborn"}
    raise ValueError(f"unknown mode {mode!r}")


# Limit tests.


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB


def allocate_until_stopped(job: Any) -> Any:
    """Allocate 20 MiB every 100 ms, keeping every block, and trace the RSS around each step.

    Each line of ``job.data["trace"]`` is ``{"pid", "phase", "t", "rss_mib"}``, with phase
    ``before`` just before an allocation starts and ``after`` once it is done, because the
    supervisor may stop the child in the middle of an allocation. Allocation stops at
    ``job.data["max_mib"]``; the processor then waits and fails, because the supervisor should
    have stopped it long before.
    """
    blocks = []
    with open(job.data["trace"], "a") as trace:

        def write(phase: str) -> None:
            trace.write(json.dumps({"pid": os.getpid(), "phase": phase, "t": time.time(), "rss_mib": _rss_mib()}) + "\n")
            trace.flush()

        while _rss_mib() < job.data["max_mib"]:
            write("before")
            # Repeating a one-byte bytearray writes every byte, so each page really is resident.
            blocks.append(bytearray(b"\x01") * (20 * MIB))
            write("after")
            time.sleep(0.1)
    time.sleep(30)
    raise RuntimeError(f"reached {job.data['max_mib']} MiB and was not stopped")


def report_memory(job: Any) -> Any:
    return {"pid": os.getpid(), "rss_mib": _rss_mib()}


def _fd_targets() -> dict[int, str]:
    targets = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            targets[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the descriptor of the directory listing itself, closed by now
    return targets


def describe_sandbox(job: Any) -> Any:
    """Return the child's fds, inet connections, environment, ids and RLIMIT_CORE."""
    import psutil

    workdir_stat = os.stat(job.workdir)
    Path("probe.txt").write_text("the workdir is writable")
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "cwd": os.getcwd(),
        "workdir": job.workdir,
        "workdir_uid": workdir_stat.st_uid,
        "workdir_mode": workdir_stat.st_mode & 0o777,
        "fds": _fd_targets(),
        "socket_families": _socket_families(),
        "inet_connections": [str(connection) for connection in psutil.Process().net_connections(kind="inet")],
        "env": dict(os.environ),
        "rlimit_core": list(resource.getrlimit(resource.RLIMIT_CORE)),
    }


def _socket_families() -> list[str]:
    """Return the address family of every socket fd, by asking each socket."""
    families = []
    for fd, target in _fd_targets().items():
        if not target.startswith("socket:"):
            continue
        duplicate = socket.socket(fileno=os.dup(fd))
        try:
            families.append(duplicate.family.name)
        finally:
            duplicate.close()
    return families


def probe_privileges(job: Any) -> Any:
    """Try what an unprivileged account must not do; return what happened."""
    results: dict[str, Any] = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
    for key in ("secret", "group_secret", "public"):
        try:
            with open(job.data[key]) as handle:
                handle.read()
            results[f"{key}_read"] = "ok"
        except PermissionError:
            results[f"{key}_read"] = "PermissionError"
    try:
        os.kill(job.data["supervisor_pid"], 0)
        results["signal_supervisor"] = "ok"
    except PermissionError:
        results["signal_supervisor"] = "PermissionError"
    workdir_stat = os.stat(job.workdir)
    results["workdir_uid"] = workdir_stat.st_uid
    results["workdir_gid"] = workdir_stat.st_gid
    results["cwd"] = os.getcwd()
    results["workdir"] = job.workdir
    Path("written-by-the-job.txt").write_text("ok")
    results["workdir_writable"] = True
    return results


def child_pid(job: Any) -> Any:
    return os.getpid()


def burn_cpu(job: Any) -> Any:
    """Spin in pure Python, never looking at the signal, for up to ``SAFETY_LIMIT_S``."""
    write_report(job)
    deadline = time.monotonic() + SAFETY_LIMIT_S
    count = 0
    while time.monotonic() < deadline:
        count += 1
    return count


def limit_job(job: Any) -> Any:
    """Run the limit-test processor named by ``job.data["mode"]``: ``allocate``, ``report_memory``,
    ``burn_cpu`` or ``child_pid``, so that one queue (and one pool of children) can mix them."""
    processors = {"allocate": allocate_until_stopped, "report_memory": report_memory, "burn_cpu": burn_cpu, "child_pid": child_pid}
    return processors[job.data["mode"]](job)


def end_badly(job: Any, token: Any, signal: Any) -> Any:
    """Misbehave as ``job.data["mode"]`` selects, after starting processes that outlive the child.

    Modes: ``exit`` starts a ``sleep 300`` (and with ``daemon`` a second one in its own session),
    then leaves with ``os._exit(3)``; ``hang`` starts the same, then sleeps without looking at the
    signal, so the timeout's SIGTERM ends it; ``stubborn`` ignores the cancel and SIGTERM.
    """
    _start_sleeper()
    if job.data.get("daemon"):
        _start_sleeper(new_session=True)
    mode = job.data["mode"]
    if mode == "exit":
        sys.stdout.flush()
        os._exit(3)
    if mode == "hang":
        time.sleep(SAFETY_LIMIT_S)
        return "not stopped"
    if mode == "stubborn":
        _ignore_everything()
        return "not stopped"
    raise ValueError(f"unknown mode {mode!r}")
