"""Escalation accuracy: how close SIGTERM and SIGKILL land to their deadlines, and how soon the job is failed.

One Supervisor serves two queues with ``cancel_grace_s = 1`` and ``term_grace_s = 1``, concurrency 1.
Their processors (bench/processors.py) ignore the abort signal:

- ``ignore_cancel`` sleeps until SIGTERM; the runtime's SIGTERM handler raises in it, and it
  records the arrival time on the way out (the SIGTERM path);
- ``ignore_sigterm`` replaces the SIGTERM handler with one that records the arrival time and returns,
  then sleeps until SIGKILL (the SIGKILL path).

Each run cancels one job with ``Supervisor.cancel_job()`` once its processor has written its pid.
The SIGTERM deadline is request + 1 s and the SIGKILL deadline request + 2 s. Observed:

- SIGTERM: the handler's ``time.monotonic_ns()`` in the child (same clock as the parent's);
- process gone: a helper process blocks in ``poll()`` on a pidfd of the child and reads the clock
  when the pidfd reports the exit (before the supervisor reaps it);
- job failed: the worker's "failed" event, emitted after BullMQ wrote the failure to Redis.

Lateness is observed time minus deadline, in ms. Runs alternate between the two paths. A wrapper
around ``ProcessTree.signal`` records when the supervisor called it and how long the call took. For
scale, the same exit watcher times SIGKILL -> exit of a bare sleeping interpreter, without a supervisor.

Usage: .venv/bin/python bench/escalation_accuracy.py [--runs 20] [--json]
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bullmq

import measure
from sandbox_runtime.tree import ProcessTree

CANCEL_GRACE_S = 1.0
TERM_GRACE_S = 1.0
PATHS = {"sigterm": "ignore_cancel", "sigkill": "ignore_sigterm"}


class SignalRecorder:
    """Wraps ``ProcessTree.signal`` to record when the supervisor entered and left each call.

    The wrapper adds two clock reads per call and changes nothing else.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, int]] = []  # (root pid, signal number, entered ns, returned ns)
        self._original = ProcessTree.signal
        recorder = self

        def recorded_signal(tree: ProcessTree, signum: int, include_root: bool = True) -> int:
            entered = time.monotonic_ns()
            try:
                return recorder._original(tree, signum, include_root)
            finally:
                recorder.calls.append((tree.root_pid, int(signum), entered, time.monotonic_ns()))

        ProcessTree.signal = recorded_signal  # type: ignore[method-assign]

    def restore(self) -> None:
        ProcessTree.signal = self._original  # type: ignore[method-assign]

    def first_call(self, pid: int, signum: int) -> tuple[int, int]:
        """Return (entered ns, returned ns) of the first call that sent ``signum`` to the tree of ``pid``."""
        for root_pid, number, entered, returned in self.calls:
            if root_pid == pid and number == signum:
                return entered, returned
        raise RuntimeError(f"the supervisor sent no signal {signum} to the tree of pid {pid}")


# Runs in a process of its own, so reading the clock after the exit does not wait for the GIL of the
# benchmark's process, where the supervisor's event loop is busy handling that same exit.
WATCHER_CODE = """
import os, select, sys, time
pidfd = os.pidfd_open(int(sys.argv[1]))
print("ready", flush=True)
poller = select.poll()
poller.register(pidfd, select.POLLIN)
poller.poll(int(float(sys.argv[2]) * 1000))
print(time.monotonic_ns(), flush=True)
"""


class ExitWatcher:
    """Records ``time.monotonic_ns()`` when a process exits, from a helper process blocked on its pidfd."""

    def __init__(self, pid: int, timeout_s: float = 30.0) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", WATCHER_CODE, str(pid), str(timeout_s)], stdout=subprocess.PIPE, text=True
        )
        assert self._process.stdout is not None
        if self._process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the exit watcher of pid {pid} did not start")

    async def wait(self, timeout_s: float = 35.0) -> int:
        output, _ = await asyncio.to_thread(self._process.communicate, None, timeout_s)
        return int(output.strip())


async def escalate_one(
    supervisor: Any, queue: bullmq.Queue, events: measure.JobEvents, directory: Path, path: str, recorder: SignalRecorder
) -> dict[str, Any]:
    job = await queue.add("escalate", {"dir": str(directory)})
    job_id = str(job.id)
    pid = await measure.wait_until(lambda: measure.read_int_file(directory / f"{job_id}.started"), 30.0, f"the processor of job {job_id} starting")
    watcher = ExitWatcher(pid)

    requested_ns = time.monotonic_ns()
    if not supervisor.cancel_job(job_id, "escalation benchmark", queue=queue.name):
        raise RuntimeError(f"Supervisor.cancel_job({job_id!r}) returned False: the job is not running here")

    event = await events.wait_for_job(job_id, timeout_s=30.0)
    if event.state != "failed":
        raise RuntimeError(f"job {job_id} ended {event.state}, expected failed after the ladder")
    exited_ns = await watcher.wait()
    sigterm_ns = measure.read_int_file(directory / f"{job_id}.sigterm")
    if sigterm_ns is None:
        raise RuntimeError(f"job {job_id}: the processor recorded no SIGTERM")

    term_deadline_ns = requested_ns + int(CANCEL_GRACE_S * 1e9)
    kill_deadline_ns = term_deadline_ns + int(TERM_GRACE_S * 1e9)
    last_deadline_ns = term_deadline_ns if path == "sigterm" else kill_deadline_ns
    term_entered_ns, term_returned_ns = recorder.first_call(pid, signal.SIGTERM)
    sample = {
        "term_call_late_ms": measure.ns_to_ms(term_entered_ns - term_deadline_ns),
        "term_call_ms": measure.ns_to_ms(term_returned_ns - term_entered_ns),
        "sigterm_late_ms": measure.ns_to_ms(sigterm_ns - term_deadline_ns),
        "gone_late_ms": measure.ns_to_ms(exited_ns - last_deadline_ns),
        "failed_late_ms": measure.ns_to_ms(event.at_ns - last_deadline_ns),
        "gone_to_failed_ms": measure.ns_to_ms(event.at_ns - exited_ns),
        "failed_reason": str(event.error),
    }
    if path == "sigkill":
        kill_entered_ns, kill_returned_ns = recorder.first_call(pid, signal.SIGKILL)
        sample["kill_call_late_ms"] = measure.ns_to_ms(kill_entered_ns - kill_deadline_ns)
        sample["kill_call_ms"] = measure.ns_to_ms(kill_returned_ns - kill_entered_ns)
    return sample


async def run_all(args: Any) -> dict[str, list[dict[str, Any]]]:
    samples: dict[str, list[dict[str, Any]]] = {path: [] for path in PATHS}
    queues = [
        measure.queue_config(f"escalate-{path}", measure.processor_ref(function), cancel_grace_s=CANCEL_GRACE_S, term_grace_s=TERM_GRACE_S)
        for path, function in PATHS.items()
    ]
    recorder = SignalRecorder()
    with measure.private_redis() as server, tempfile.TemporaryDirectory(prefix="bench-escalation-") as data_dir:
        async with measure.running_supervisor(server.url, *queues) as supervisor:
            bull_queues = {path: bullmq.Queue(f"escalate-{path}", {"connection": server.url}) for path in PATHS}
            events = {path: measure.JobEvents(supervisor.runners[f"escalate-{path}"].worker) for path in PATHS}
            directories = {path: Path(data_dir, path) for path in PATHS}
            for directory in directories.values():
                directory.mkdir()
            try:
                for _ in range(args.runs):
                    for path in PATHS:
                        samples[path].append(await escalate_one(supervisor, bull_queues[path], events[path], directories[path], path, recorder))
            finally:
                for queue in bull_queues.values():
                    await queue.close()
                recorder.restore()
    return samples


async def measure_bare_kill(count: int) -> list[float]:
    """Time SIGKILL -> pidfd exit for a bare sleeping interpreter: the same observation without the supervisor."""
    delays = []
    for _ in range(count):
        process = subprocess.Popen(
            [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True
        )
        assert process.stdout is not None
        process.stdout.readline()
        watcher = ExitWatcher(process.pid)
        killed_ns = time.monotonic_ns()
        process.kill()
        delays.append(measure.ns_to_ms(await watcher.wait() - killed_ns))
        process.wait()
        process.stdout.close()
    return delays


def lateness_row(label: str, deadline: str, values: list[float]) -> list[Any]:
    stats = measure.summarize(values)
    return [label, deadline, stats["n"], stats["median"], stats["p95"], stats["max"], stats["min"]]


def main() -> None:
    parser = measure.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="cancelled jobs per path (default 20; a SIGKILL run takes about 2 s)")
    args = parser.parse_args()
    measure.configure_logging(args.verbose)

    samples = asyncio.run(run_all(args))
    bare_kill_ms = asyncio.run(measure_bare_kill(args.runs))
    term, kill = samples["sigterm"], samples["sigkill"]
    rows = [
        lateness_row("SIGTERM path: ProcessTree.signal(SIGTERM) entered", "request + 1 s", [run["term_call_late_ms"] for run in term]),
        lateness_row("SIGTERM path: SIGTERM handler ran", "request + 1 s", [run["sigterm_late_ms"] for run in term]),
        lateness_row("SIGTERM path: process gone", "request + 1 s", [run["gone_late_ms"] for run in term]),
        lateness_row("SIGTERM path: job failed in Redis", "request + 1 s", [run["failed_late_ms"] for run in term]),
        lateness_row("SIGKILL path: SIGTERM handler ran", "request + 1 s", [run["sigterm_late_ms"] for run in kill]),
        lateness_row("SIGKILL path: ProcessTree.signal(SIGKILL) entered", "request + 2 s", [run["kill_call_late_ms"] for run in kill]),
        lateness_row("SIGKILL path: process gone (SIGKILL)", "request + 2 s", [run["gone_late_ms"] for run in kill]),
        lateness_row("SIGKILL path: job failed in Redis", "request + 2 s", [run["failed_late_ms"] for run in kill]),
    ]
    table = measure.format_table(["event", "deadline", "n", "late med", "late p95", "late max", "late min"], rows)
    call_rows = [
        ["ProcessTree.signal(SIGTERM)", *_stats_cells([run["term_call_ms"] for run in term + kill])],
        ["ProcessTree.signal(SIGKILL)", *_stats_cells([run["kill_call_ms"] for run in kill])],
        ["baseline: os.kill(SIGKILL) -> bare interpreter gone", *_stats_cells(bare_kill_ms)],
    ]
    call_table = measure.format_table(["interval", "n", "med ms", "p95 ms", "max ms"], call_rows)
    reasons = sorted({run["failed_reason"] for run in term + kill})
    notes = "\n\nlateness in ms after the deadline; failedReason values seen: " + "; ".join(repr(reason) for reason in reasons)
    keys = ("term_call_late_ms", "term_call_ms", "kill_call_late_ms", "kill_call_ms", "sigterm_late_ms", "gone_late_ms", "failed_late_ms", "gone_to_failed_ms")
    summary = {
        path: {key: measure.summarize([run[key] for run in runs]) for key in keys if key in runs[0]}
        for path, runs in samples.items()
    }
    summary["failed_reasons"] = reasons
    summary["baseline_bare_kill_ms"] = measure.summarize(bare_kill_ms)
    measure.emit_report("escalation accuracy: cancel_grace_s = 1, term_grace_s = 1", table + "\n\n" + call_table + notes, summary, args.json)


def _stats_cells(values: list[float]) -> list[Any]:
    stats = measure.summarize(values)
    return [stats["n"], stats["median"], stats["p95"], stats["max"]]


if __name__ == "__main__":
    main()
