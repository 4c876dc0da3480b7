"""Trivial-job throughput and latency through the supervisor, next to a plain in-process bullmq.Worker.

Both run the same ``async def trivial(job, token): return 1`` (bench/processors.py) against one
private Redis, in the same run, at each concurrency. Per configuration:

1. warm-up: a few jobs, so the supervisor's children are spawned before timing starts;
2. latency: ``--latency-jobs`` jobs one at a time: add, wait for the "completed" event, next.
   Reported as the client's add -> completed-event time and as BullMQ's timestamp -> finishedOn;
3. throughput: the queue is paused, ``--jobs`` jobs are added with addBulk, and the clock runs from
   ``resume()`` to the last "completed" event. Also reported: processedOn -> finishedOn per job.

Usage: .venv/bin/python bench/throughput.py [--jobs 2000] [--concurrency 1 4] [--rounds 3] [--json]
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import statistics
import time
from typing import Any

import bullmq

import measure
from processors import trivial

QUEUE_PREFIX = "bull"
WORKER_CLOSE_TIMEOUT_S = 15.0

logger = logging.getLogger(__name__)


async def measure_queue(redis_url: str, queue_name: str, worker: bullmq.Worker, jobs: int, latency_jobs: int, concurrency: int) -> dict[str, Any]:
    """Run warm-up, the latency phase and the throughput phase against a worker already serving ``queue_name``."""
    events = measure.JobEvents(worker)
    queue = bullmq.Queue(queue_name, {"connection": redis_url, "prefix": QUEUE_PREFIX})
    try:
        warm_up = await queue.addBulk([{"name": "warm-up", "data": {}} for _ in range(concurrency * 2)])
        for job in warm_up:
            measure.require_completed(await events.wait_for_job(str(job.id)))

        latency = await measure_latency(queue, events, latency_jobs)
        throughput = await measure_throughput(queue, events, jobs)
    finally:
        await queue.close()
    return {**latency, **throughput}


async def measure_latency(queue: bullmq.Queue, events: measure.JobEvents, count: int) -> dict[str, Any]:
    client_ms: list[float] = []
    job_ids: list[str] = []
    for _ in range(count):
        started_ns = time.monotonic_ns()
        job = await queue.add("latency", {})
        finished = measure.require_completed(await events.wait_for_job(str(job.id)))
        client_ms.append(measure.ns_to_ms(finished.at_ns - started_ns))
        job_ids.append(str(job.id))
    stored = await read_job_times(queue, job_ids)
    return {
        "latency_client_ms": client_ms,
        "latency_timestamp_to_finished_ms": [row["finishedOn"] - row["timestamp"] for row in stored],
    }


async def measure_throughput(queue: bullmq.Queue, events: measure.JobEvents, count: int) -> dict[str, Any]:
    already_finished = len(events.finished)
    await queue.pause()
    added = await queue.addBulk([{"name": "bulk", "data": {}} for _ in range(count)])
    started_ns = time.monotonic_ns()
    await queue.resume()
    await events.wait_for_count(already_finished + count, timeout_s=600)
    if events.failures:
        raise RuntimeError(f"{len(events.failures)} jobs failed, the first: {events.failures[0].error}")
    job_ids = [str(job.id) for job in added]
    elapsed = (max(events.finished[job_id].at_ns for job_id in job_ids) - started_ns) / 1e9
    stored = await read_job_times(queue, job_ids)
    return {
        "jobs": count,
        "elapsed_s": elapsed,
        "jobs_per_s": count / elapsed,
        "processed_to_finished_ms": [row["finishedOn"] - row["processedOn"] for row in stored],
    }


async def read_job_times(queue: bullmq.Queue, job_ids: list[str]) -> list[dict[str, int]]:
    """Read timestamp, processedOn and finishedOn (epoch ms, as BullMQ stores them) of each job."""
    fields = ("timestamp", "processedOn", "finishedOn")
    pipeline = queue.client.pipeline(transaction=False)
    for job_id in job_ids:
        pipeline.hmget(f"{QUEUE_PREFIX}:{queue.name}:{job_id}", *fields)
    rows = await pipeline.execute()
    return [{field: int(value) for field, value in zip(fields, row)} for row in rows]


async def run_plain(redis_url: str, concurrency: int, round_index: int, args: Any) -> dict[str, Any]:
    queue_name = f"plain-c{concurrency}-r{round_index}"
    worker = bullmq.Worker(queue_name, trivial, {"connection": redis_url, "prefix": QUEUE_PREFIX, "concurrency": concurrency, "autorun": False})
    run_task = asyncio.create_task(worker.run())
    try:
        return await measure_queue(redis_url, queue_name, worker, args.jobs, args.latency_jobs, concurrency)
    finally:
        await close_worker(worker)
        await asyncio.wait_for(run_task, WORKER_CLOSE_TIMEOUT_S)


async def close_worker(worker: bullmq.Worker) -> None:
    """Close ``worker``; when that hangs, cancel its job-fetching tasks once more and wait again."""
    close_task = asyncio.ensure_future(worker.close())
    done, _ = await asyncio.wait({close_task}, timeout=WORKER_CLOSE_TIMEOUT_S)
    if not done:
        # NOTE: with bullmq 3.4.4 and redis 8.2.0, Worker.close() was seen to wait forever: the
        # cancel of its BZPOPMIN was absorbed by redis-py's retry loop, which went on sleeping and
        # retrying. A second cancel reaches that sleep and ends the task.
        logger.warning("bullmq.Worker.close() did not return within %g s; cancelling its fetch tasks again", WORKER_CLOSE_TIMEOUT_S)
        stuck = [worker.waiting] if worker.waiting is not None else []
        for task in stuck + list(worker.processing):
            task.cancel()
        await asyncio.wait_for(close_task, WORKER_CLOSE_TIMEOUT_S)
    close_task.result()


async def run_sandboxed(redis_url: str, concurrency: int, round_index: int, args: Any) -> dict[str, Any]:
    queue_name = f"sandbox-c{concurrency}-r{round_index}"
    config = measure.queue_config(queue_name, measure.processor_ref("trivial"), concurrency=concurrency)
    async with measure.running_supervisor(redis_url, config) as supervisor:
        runner = supervisor.runners[queue_name]
        result = await measure_queue(redis_url, queue_name, runner.worker, args.jobs, args.latency_jobs, concurrency)
        result["children_spawned"] = runner.pool.spawned
        return result


async def run_all(args: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with measure.private_redis() as server:
        for round_index, concurrency in itertools.product(range(args.rounds), args.concurrency):
            for kind, runner in (("plain", run_plain), ("sandbox", run_sandboxed)):
                result = await runner(server.url, concurrency, round_index, args)
                results.setdefault(f"{kind}-c{concurrency}", []).append(result)
    return results


SAMPLE_KEYS = ("processed_to_finished_ms", "latency_client_ms", "latency_timestamp_to_finished_ms")


def combine(results: dict[str, Any], concurrencies: list[int]) -> tuple[list[list[Any]], dict[str, Any]]:
    """Build the table rows and the JSON summary: rates are the median round, latencies pool every round."""
    rows: list[list[Any]] = []
    summary: dict[str, Any] = {}
    for concurrency in concurrencies:
        plain_rate = statistics.median(run["jobs_per_s"] for run in results[f"plain-c{concurrency}"])
        for kind in ("plain", "sandbox"):
            runs = results[f"{kind}-c{concurrency}"]
            rate = statistics.median(run["jobs_per_s"] for run in runs)
            pooled = {key: measure.summarize([value for run in runs for value in run[key]]) for key in SAMPLE_KEYS}
            rows.append([
                "bullmq.Worker (in-process)" if kind == "plain" else "sandbox Supervisor",
                concurrency,
                rate,
                rate / plain_rate,
                1000 / rate,
                pooled["processed_to_finished_ms"]["median"],
                pooled["processed_to_finished_ms"]["p95"],
                pooled["latency_client_ms"]["median"],
                pooled["latency_client_ms"]["p95"],
                pooled["latency_timestamp_to_finished_ms"]["median"],
                pooled["latency_timestamp_to_finished_ms"]["p95"],
            ])
            summary[f"{kind}-c{concurrency}"] = {
                "jobs_per_s_median_of_rounds": rate,
                "ratio_to_plain": rate / plain_rate,
                "jobs_per_s_each_round": [run["jobs_per_s"] for run in runs],
                "children_spawned_each_round": [run.get("children_spawned") for run in runs],
                **pooled,
            }
    return rows, summary


HEADERS = [
    "worker",
    "conc.",
    "jobs/s",
    "ratio",
    "ms/job",
    "proc->fin med",
    "proc->fin p95",
    "1-job client med",
    "1-job client p95",
    "1-job ts->fin med",
    "1-job ts->fin p95",
]


def main() -> None:
    parser = measure.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs in each throughput phase (default 2000)")
    parser.add_argument("--latency-jobs", type=int, default=200, help="jobs run one at a time in each latency phase (default 200)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="concurrency values to measure (default 1 4)")
    parser.add_argument("--rounds", type=int, default=3, help="repeat every configuration this many times; rates are the median round (default 3)")
    args = parser.parse_args()
    measure.configure_logging(args.verbose)

    results = asyncio.run(run_all(args))
    rows, summary = combine(results, args.concurrency)
    table = measure.format_table(HEADERS, rows)
    notes = (
        "\n\njobs/s: throughput of the addBulk phase; ratio: jobs/s over the in-process worker at the same concurrency;"
        "\nms/job: 1000 / jobs/s; proc->fin: BullMQ processedOn -> finishedOn in the throughput phase (ms, 1 ms resolution);"
        "\n1-job: one job at a time; client = add() call -> completed event (ms); ts->fin = BullMQ timestamp -> finishedOn (ms)."
        f"\njobs/s is the median of {args.rounds} round(s); latency columns pool the samples of every round."
    )
    measure.emit_report("throughput: trivial async job, supervisor vs in-process bullmq.Worker", table + notes, summary, args.json)


if __name__ == "__main__":
    main()
