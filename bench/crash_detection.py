"""Crash detection: from a child's death to its job failed in Redis.

One Supervisor serves two queues (concurrency 1, one attempt per job), with processors from
bench/processors.py:

- exit: ``exit_abruptly`` reads ``time.monotonic_ns()`` and calls ``os._exit(3)`` right after;
- kill: ``sleep_until_killed`` writes its pid and sleeps; the benchmark reads the clock and sends
  SIGKILL to that pid from outside the supervisor's code (``os.kill``).

The end point is the worker's "failed" event, emitted after BullMQ wrote the failure to Redis.
Child and parent clocks are the same CLOCK_MONOTONIC. Each crash costs the pool a new child for the
next job; that spawn is not part of the measured time. Runs alternate between the two kinds.

Usage: .venv/bin/python bench/crash_detection.py [--runs 30] [--json]
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import bullmq

import measure

KINDS = {"exit": "exit_abruptly", "kill": "sleep_until_killed"}


async def crash_one(queue: bullmq.Queue, events: measure.JobEvents, directory: Path, kind: str) -> dict[str, Any]:
    job = await queue.add("crash", {"dir": str(directory)})
    job_id = str(job.id)
    if kind == "exit":
        died_ns = await measure.wait_until(lambda: measure.read_int_file(directory / f"{job_id}.exit"), 30.0, f"job {job_id} exiting")
    else:
        pid = await measure.wait_until(lambda: measure.read_int_file(directory / f"{job_id}.started"), 30.0, f"the processor of job {job_id} starting")
        died_ns = time.monotonic_ns()
        os.kill(pid, signal.SIGKILL)

    event = await events.wait_for_job(job_id, timeout_s=30.0)
    if event.state != "failed":
        raise RuntimeError(f"job {job_id} ended {event.state}, expected failed after its child died")
    return {"death_to_failed_ms": measure.ns_to_ms(event.at_ns - died_ns), "failed_reason": str(event.error)}


async def run_all(args: Any) -> dict[str, list[dict[str, Any]]]:
    samples: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    queues = [measure.queue_config(f"crash-{kind}", measure.processor_ref(function)) for kind, function in KINDS.items()]
    with measure.private_redis() as server, tempfile.TemporaryDirectory(prefix="bench-crash-") as data_dir:
        async with measure.running_supervisor(server.url, *queues) as supervisor:
            bull_queues = {kind: bullmq.Queue(f"crash-{kind}", {"connection": server.url}) for kind in KINDS}
            events = {kind: measure.JobEvents(supervisor.runners[f"crash-{kind}"].worker) for kind in KINDS}
            directories = {kind: Path(data_dir, kind) for kind in KINDS}
            for directory in directories.values():
                directory.mkdir()
            try:
                for _ in range(args.runs):
                    for kind in KINDS:
                        samples[kind].append(await crash_one(bull_queues[kind], events[kind], directories[kind], kind))
            finally:
                for queue in bull_queues.values():
                    await queue.close()
    return samples


def main() -> None:
    parser = measure.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="crashed jobs per kind (default 30)")
    args = parser.parse_args()
    measure.configure_logging(args.verbose)

    samples = asyncio.run(run_all(args))
    labels = {"exit": "os._exit(3) in the processor", "kill": "SIGKILL from outside"}
    rows: list[list[Any]] = []
    summary: dict[str, Any] = {}
    for kind, runs in samples.items():
        stats = measure.summarize([run["death_to_failed_ms"] for run in runs])
        reasons = sorted({run["failed_reason"] for run in runs})
        summary[kind] = {"death_to_failed_ms": stats, "failed_reasons": reasons}
        rows.append([labels[kind], stats["n"], stats["median"], stats["p95"], stats["max"], " / ".join(reasons)])
    table = measure.format_table(["child death", "n", "med ms", "p95 ms", "max ms", "failedReason"], rows)
    measure.emit_report("crash detection: child death -> job failed in Redis", table, summary, args.json)


if __name__ == "__main__":
    main()
