"""Add prime-counting jobs to a queue with the Python ``bullmq`` package, and optionally wait for them.

Usage::

    python examples/add_jobs.py --redis redis://127.0.0.1:PORT/0 [--count 3] [--below 2000000]
                                [--timeout-ms MS] [--wait SECONDS]

The producer needs only ``bullmq``, not sandbox-runtime. It prints one job id per line. With
``--wait`` it then prints each job's final state and its return value or failedReason. The exit
status is 1 when a job failed or had not finished in time, and 2 for invalid arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import bullmq

REDIS_URL_VARIABLE = "SANDBOX_RUNTIME_REDIS_URL"
FINAL_STATES = ("completed", "failed")
POLL_INTERVAL_S = 0.1


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Add prime-counting jobs to a BullMQ queue.")
    parser.add_argument(
        "--redis",
        default=os.environ.get(REDIS_URL_VARIABLE),
        metavar="URL",
        help=f"Redis URL, as logged by serve (default: ${REDIS_URL_VARIABLE})",
    )
    parser.add_argument("--queue", default="primes", help="queue name (default: %(default)s)")
    parser.add_argument("--prefix", default="bull", help="BullMQ key prefix (default: %(default)s)")
    parser.add_argument("--count", type=int, default=3, help="number of jobs to add (default: %(default)s)")
    parser.add_argument("--below", type=int, default=2_000_000, help="count the primes below this number (default: %(default)s)")
    parser.add_argument("--timeout-ms", type=int, metavar="MS", help="set timeoutMs in each job's data: the job times out after MS milliseconds")
    parser.add_argument("--wait", type=float, metavar="SECONDS", help="wait up to SECONDS for the jobs to finish and print their results")
    args = parser.parse_args(argv)
    if not args.redis:
        parser.error(f"no Redis URL: pass --redis URL or set {REDIS_URL_VARIABLE} (serve logs the URL of its embedded Redis)")
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}")
    if args.wait is not None and not args.wait > 0:
        parser.error(f"--wait must be a positive number of seconds, got {args.wait:g}")
    return args


async def add_jobs(queue: bullmq.Queue, count: int, below: int, timeout_ms: int | None) -> list[str]:
    """Add ``count`` jobs and return their ids."""
    data: dict[str, int] = {"below": below}
    if timeout_ms is not None:
        data["timeoutMs"] = timeout_ms
    job_ids = []
    for index in range(count):
        job = await queue.add(f"primes-{index + 1}", data, {"attempts": 1})
        job_ids.append(str(job.id))
    return job_ids


async def wait_for_jobs(queue: bullmq.Queue, job_ids: list[str], timeout_s: float) -> dict[str, str]:
    """Poll until every job is completed or failed, or ``timeout_s`` passes; return {job id: state}."""
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while True:
        for job_id in job_ids:
            if states.get(job_id) not in FINAL_STATES:
                states[job_id] = await queue.getJobState(job_id)
        if all(state in FINAL_STATES for state in states.values()) or time.monotonic() >= deadline:
            return states
        await asyncio.sleep(POLL_INTERVAL_S)


async def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    queue = bullmq.Queue(args.queue, {"connection": args.redis, "prefix": args.prefix})
    try:
        job_ids = await add_jobs(queue, args.count, args.below, args.timeout_ms)
        for job_id in job_ids:
            print(job_id, flush=True)
        if args.wait is None:
            return 0

        states = await wait_for_jobs(queue, job_ids, args.wait)
        status = 0
        for job_id in job_ids:
            state = states[job_id]
            job = await bullmq.Job.fromId(queue, job_id)
            if state == "completed":
                print(f"job {job_id} completed: {json.dumps(job.returnvalue)}")
            elif state == "failed":
                print(f"job {job_id} failed: {job.failedReason}")
                status = 1
            else:
                print(f"job {job_id} still {state} after {args.wait:g} s")
                status = 1
        return status
    finally:
        await queue.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
