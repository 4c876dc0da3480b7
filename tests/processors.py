"""Processors the tests run in child processes, many of them misbehaving on purpose."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path


def echo(job):
    return {"data": job.data, "pid": os.getpid()}


def echo_pid(job):
    return os.getpid()


async def bullmq_style(job, token):
    """Written for bullmq.Worker: async, (job, token), progress and log."""
    await job.updateProgress(42)
    await job.log(f"processing {job.id} with token {'set' if token else 'missing'}")
    await job.updateData({**job.data, "seen": True})
    return {"ok": True, "name": job.name}


def sync_updates(job):
    job.updateProgress({"step": 1})
    job.log("sync log line")
    return "sync-ok"


def raise_value_error(job):
    raise ValueError(f"bad input {job.data.get('n')}")


class TwoArgumentError(Exception):
    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail

    def __str__(self):
        return f"code {self.code}: {self.detail}"


def raise_two_argument_error(job):
    raise TwoArgumentError(7, "disk full")


class UnrecoverableError(Exception):
    pass


def raise_unrecoverable(job):
    raise UnrecoverableError("do not retry me")


def sys_exit_zero(job):
    sys.exit(0)


def os_exit_zero(job):
    os._exit(0)


def kill_self(job):
    os.kill(os.getpid(), signal.SIGKILL)


def segfault(job):
    ctypes.string_at(0)


def wait_for_file(job):
    """Block until the file named in job.data['release'] exists; report the pid first."""
    Path(job.data["pidfile"]).write_text(str(os.getpid()))
    release = Path(job.data["release"])
    while not release.exists():
        time.sleep(0.01)
    return "released"


def write_pid_then_sleep(job):
    Path(job.data["pidfile"]).write_text(str(os.getpid()))
    time.sleep(job.data.get("seconds", 60))
    return "slept"


def big_string(job):
    return "x" * job.data["size"]


def big_list(job):
    return list(range(job.data["size"]))


def return_lock(job):
    return {"lock": threading.Lock()}


def return_set(job):
    return {1, 2, 3}


def return_circular(job):
    value = {}
    value["self"] = value
    return value


def chatty(job):
    print(f"out line for {job.id}")
    print(f"err line for {job.id}", file=sys.stderr)
    return "chatted"


def cpu_loop(job):
    """Pure-Python CPU work that never yields, for job.data['seconds'] seconds."""
    deadline = time.monotonic() + job.data["seconds"]
    count = 0
    while time.monotonic() < deadline:
        count += 1
    return count


async def async_cpu_loop(job, token):
    return cpu_loop(job)


def cooperative(job, token, signal):
    """Polls the signal; stops at the cooperative step."""
    Path(job.data["pidfile"]).write_text(str(os.getpid()))
    while True:
        signal.throw_if_aborted()
        time.sleep(0.01)


def cooperative_blocking_wait(job, token, signal):
    Path(job.data["pidfile"]).write_text(str(os.getpid()))
    signal.wait_blocking()
    raise RuntimeError(f"stopped: {signal.reason}")


async def cooperative_async(job, token, signal):
    Path(job.data["pidfile"]).write_text(str(os.getpid()))
    await signal.wait()
    signal.throw_if_aborted()


def swallow_exceptions(job, token, signal):
    """Catches Exception around every step: only SIGTERM stops it."""
    Path(job.data["pidfile"]).write_text(str(os.getpid()))
    marker = Path(job.data["finally"]) if "finally" in job.data else None
    try:
        while True:
            try:
                signal.throw_if_aborted()
                time.sleep(0.01)
            except Exception:
                continue
    finally:
        if marker is not None:
            marker.write_text("finally ran")


def ignore_everything(job, token, signal):
    """Ignores SIGTERM and catches BaseException: only SIGKILL stops it."""
    signal_module = __import__("signal")
    signal_module.signal(signal_module.SIGTERM, signal_module.SIG_IGN)
    Path(job.data["pidfile"]).write_text(str(os.getpid()))
    while True:
        try:
            time.sleep(0.01)
        except BaseException:
            continue


def return_after_cancel(job, token, signal):
    Path(job.data["pidfile"]).write_text(str(os.getpid()))
    signal.wait_blocking()
    return {"finished_anyway": signal.reason}


def sleep_seconds(job):
    time.sleep(job.data["seconds"])
    return job.data["seconds"]


def count_runs(job):
    """Append a line per run to job.data['runs'], then sleep."""
    with open(job.data["runs"], "a") as handle:
        handle.write(f"{os.getpid()}\n")
    time.sleep(job.data.get("seconds", 10))
    return "ran"


def dispatch(job, token=None, signal=None):
    """Run the processor named by job.data['do'], so one queue can mix behaviours."""
    target = globals()[job.data["do"]]
    import inspect

    count = len(inspect.signature(target).parameters)
    return target(*(job, token, signal)[:count])


def allocate_mb(job):
    """Allocate job.data['mb'] MiB at once and return its length."""
    block = bytearray(job.data["mb"] * 1024 * 1024)
    return len(block)


def report_interpreter(job):
    return os.path.realpath(sys.executable)


def close_protocol_socket(job):
    """Shut down the sending side of the protocol socket (the child's --fd argument) and return."""
    import socket as socket_module

    fd = int(sys.argv[sys.argv.index("--fd") + 1])
    sock = socket_module.socket(fileno=os.dup(fd))
    sock.shutdown(socket_module.SHUT_WR)
    sock.close()
    return "closed"


def write_garbage_frame(job):
    fd = int(sys.argv[sys.argv.index("--fd") + 1])
    os.write(fd, b"\x00\x00\x00\x05hello")
    time.sleep(30)


def start_double_fork_daemon(job):
    """Start a daemon through a short-lived middle process that exits at once."""
    import subprocess

    subprocess.run(["sh", "-c", "setsid sh -c 'sleep 300' >/dev/null 2>&1 < /dev/null &"], check=True)
    return "started"
