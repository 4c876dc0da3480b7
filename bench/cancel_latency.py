"""Cancel latency: from a cancel request in the parent to ``signal.aborted`` seen by the processor in the child.

One Supervisor serves four queues (concurrency 1, cancel_grace_s 30, so the ladder never reaches
SIGTERM). Each queue's processor (bench/processors.py) waits for the abort in another way:

- blocking: ``signal.wait_blocking()``; the main thread waits without the GIL;
- async: ``await signal.wait()`` in the child's event loop;
- poll: a bare ``while not signal.aborted: pass`` loop, which holds the GIL between switches;
- cpu: pure-Python arithmetic, checking ``signal.aborted`` after every ``--check-every-ms`` of work.

Three ways to request the cancel, timed from just before the call:

- api: ``Supervisor.cancel_job()`` in the supervisor's process;
- request_cancel: ``sandbox_runtime.control.request_cancel()`` (reads the job's state, writes the
  cancel record, then publishes on ``bull:<queue>:control``);
- publish: a bare PUBLISH of the cancel message on the control channel.

The processor writes its pid to a file once running. The request is sent after that file appears and
a random delay of 0 to ``--check-every-ms`` ms. Times in the child are ``time.monotonic_ns()``, the
same CLOCK_MONOTONIC the parent reads:

- flag: the abort callbacks ran on the child's reader thread, just after it set the signal;
- seen: the processor's own code observed the signal. In the blocking and async processors this
  can come a few microseconds before flag, because the callbacks run after the signal is set;
- stored: the worker's "completed" event, emitted after BullMQ wrote the result (the processor
  returns once it observes the abort, so the job completes).

The publisher, the supervisor and its bullmq.Worker share one process and one asyncio event loop,
as in an application that embeds the supervisor.

``--child-switch-interval-ms`` sets ``sys.setswitchinterval()`` in the child, which bounds how long
the reader thread waits for the GIL while the processor's main thread runs Python code.

Usage: .venv/bin/python bench/cancel_latency.py [--cancels 50] [--check-every-ms 10]
       [--child-switch-interval-ms MS] [--json]
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import bullmq
import redis.asyncio as redis_asyncio

import measure
from sandbox_runtime import control

PREFIX = "bull"
MODES = {
    "blocking": "cancel_wait_blocking",
    "async": "cancel_await",
    "poll": "cancel_poll",
    "cpu": "cancel_cpu",
}
PATHS = ("api", "request_cancel", "publish")
REASON = "benchmark cancel"


async def cancel_one(
    supervisor: Any, queue: bullmq.Queue, events: measure.JobEvents, client: redis_asyncio.Redis, path: str, data: dict[str, Any]
) -> dict[str, float]:
    """Start one job, cancel it through ``path`` once its processor runs, and return the delays in ms."""
    job = await queue.add("cancel", data)
    job_id = str(job.id)
    started_file = Path(data["dir"]) / f"{job_id}.started"
    await measure.wait_until(started_file.exists, 30.0, f"the processor of job {job_id} starting")
    # A random delay puts the request at a random point of the cpu processor's work chunk. Without it,
    # every request would land just after the first chunk began.
    await asyncio.sleep(random.uniform(0, data["check_every_ms"]) / 1000)

    requested_ns = time.monotonic_ns()
    if path == "api":
        if not supervisor.cancel_job(job_id, REASON, queue=queue.name):
            raise RuntimeError(f"Supervisor.cancel_job({job_id!r}) returned False: the job is not running here")
    elif path == "request_cancel":
        outcome = await control.request_cancel(client, PREFIX, queue.name, job_id, REASON)
        if outcome.status != "requested":
            raise RuntimeError(f"request_cancel for job {job_id} returned {outcome!r}")
    else:
        receivers = await client.publish(control.control_channel(PREFIX, queue.name), control.encode_control_message(job_id, REASON))
        if receivers < 1:
            raise RuntimeError(f"PUBLISH for job {job_id} reached no subscriber")

    event = measure.require_completed(await events.wait_for_job(job_id))
    result = event.result
    return {
        "flag_ms": measure.ns_to_ms(result["flag_ns"] - requested_ns),
        "seen_ms": measure.ns_to_ms(result["seen_ns"] - requested_ns),
        "stored_ms": measure.ns_to_ms(event.at_ns - requested_ns),
    }


async def run_all(args: Any) -> dict[str, list[dict[str, float]]]:
    samples: dict[str, list[dict[str, float]]] = {f"{mode}/{path}": [] for mode in MODES for path in PATHS}
    queues = [
        measure.queue_config(f"cancel-{mode}", measure.processor_ref(function), concurrency=1, cancel_grace_s=30.0, term_grace_s=5.0)
        for mode, function in MODES.items()
    ]
    with measure.private_redis() as server, tempfile.TemporaryDirectory(prefix="bench-cancel-") as data_dir:
        async with measure.running_supervisor(server.url, *queues) as supervisor:
            client = redis_asyncio.from_url(server.url)
            bull_queues = {mode: bullmq.Queue(f"cancel-{mode}", {"connection": server.url, "prefix": PREFIX}) for mode in MODES}
            events = {mode: measure.JobEvents(supervisor.runners[f"cancel-{mode}"].worker) for mode in MODES}
            # Job ids count from 1 in every queue, so each queue gets a directory of its own.
            data = {
                mode: {"dir": str(Path(data_dir, mode)), "check_every_ms": args.check_every_ms, "switch_interval_ms": args.child_switch_interval_ms}
                for mode in MODES
            }
            for values in data.values():
                Path(values["dir"]).mkdir()
            try:
                # Rounds interleave every mode and path, so load from other work on the machine
                # spreads over all of them instead of landing on one.
                for _ in range(args.cancels):
                    for mode in MODES:
                        for path in PATHS:
                            sample = await cancel_one(supervisor, bull_queues[mode], events[mode], client, path, data[mode])
                            samples[f"{mode}/{path}"].append(sample)
            finally:
                for queue in bull_queues.values():
                    await queue.close()
                await client.aclose()
    return samples


def main() -> None:
    parser = measure.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--cancels", type=int, default=50, help="cancels per processor kind and request path (default 50)")
    parser.add_argument("--check-every-ms", type=float, default=10.0, help="pure-Python work between two checks in the cpu processor, in ms (default 10)")
    parser.add_argument(
        "--child-switch-interval-ms", type=float, default=None,
        help="set sys.setswitchinterval() in the child to this many ms before each job (default: leave CPython's 5 ms)",
    )
    args = parser.parse_args()
    measure.configure_logging(args.verbose)

    samples = asyncio.run(run_all(args))
    rows: list[list[Any]] = []
    summary: dict[str, Any] = {}
    for key, values in samples.items():
        mode, path = key.split("/")
        stats = {name: measure.summarize([value[name] for value in values]) for name in ("flag_ms", "seen_ms", "stored_ms")}
        summary[key] = stats
        rows.append([
            mode, path, stats["seen_ms"]["n"],
            stats["flag_ms"]["median"], stats["flag_ms"]["p95"],
            stats["seen_ms"]["median"], stats["seen_ms"]["p95"], stats["seen_ms"]["max"],
            stats["stored_ms"]["median"], stats["stored_ms"]["p95"],
        ])
    table = measure.format_table(
        ["processor", "request", "n", "flag med", "flag p95", "seen med", "seen p95", "seen max", "stored med", "stored p95"],
        rows,
    )
    notes = (
        "\n\nms from the request: flag = abort callback ran on the child's reader thread; seen = processor observed the signal;"
        f"\nstored = job completed in Redis. cpu processor checks every {args.check_every_ms:g} ms of work."
        f"\nchild thread switch interval: {f'{args.child_switch_interval_ms:g} ms' if args.child_switch_interval_ms else 'CPython default'}."
    )
    measure.emit_report("cancel latency: request -> signal.aborted in the child", table + notes, summary, args.json)


if __name__ == "__main__":
    main()
