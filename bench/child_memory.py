"""Child start time (spawn -> READY) and the memory of an idle pooled child.

Three parts, in one run:

1. ``ChildPool.acquire()`` on a pool of its own, ``--spawns`` times (default 20): the time from the
   call to READY (Popen, interpreter start, ``child`` imports, processor import, handshake), and
   the child's RSS, USS and PSS (psutil ``memory_full_info``) right after READY;
2. a real Supervisor with concurrency 1, ``--rounds`` times (default 5): the first job's add ->
   completed time (it includes the spawn), then the idle child's memory after that one job, and
   after ``--more-jobs`` more (default 200);
3. for scale: a bare ``python -c`` interpreter that waits on stdin, ``--rounds`` times.

The processor is ``trivial`` from bench/processors.py. USS is the memory that belongs to the process
alone, freed when it exits. RSS also counts shared pages (interpreter binary, shared libraries) in full.

Usage: .venv/bin/python bench/child_memory.py [--spawns 20] [--rounds 5] [--more-jobs 200] [--json]
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import bullmq
import psutil

import measure
from sandbox_runtime.config import SandboxSettings
from sandbox_runtime.pool import ChildPool, ProcessorSpec, sys_path_for_children
from sandbox_runtime.tree import CgroupRoot

MIB = 1024 * 1024


def memory_sample(pid: int) -> dict[str, float]:
    info = psutil.Process(pid).memory_full_info()
    return {"rss_mib": info.rss / MIB, "uss_mib": info.uss / MIB, "pss_mib": info.pss / MIB}


async def measure_pool_spawns(count: int) -> dict[str, Any]:
    """Spawn ``count`` children one after another; time each to READY and sample its memory there."""
    cgroup_root = CgroupRoot.create()
    pool = ChildPool(
        "bench-memory",
        ProcessorSpec(reference=measure.processor_ref("trivial")),
        SandboxSettings(),
        size=1,
        redis_url=None,
        sys_path=sys_path_for_children([]),
        cgroup_root=cgroup_root,
    )
    spawn_ms: list[float] = []
    memory: list[dict[str, float]] = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            child = await pool.acquire()
            spawn_ms.append((time.perf_counter() - started) * 1000)
            memory.append(memory_sample(child.pid))
            pool.release(child, reusable=True)
            # close() retires the idle child and waits until it is gone, so spawns never overlap.
            await pool.close()
    finally:
        await pool.close()
        if cgroup_root is not None:
            cgroup_root.remove()
    return {"spawn_to_ready_ms": spawn_ms, "memory_after_ready": memory, "cgroup_v2": cgroup_root is not None}


async def measure_supervised_child(redis_url: str, round_index: int, more_jobs: int) -> dict[str, Any]:
    """Run one job through a fresh supervisor, sample the idle child, run ``more_jobs`` more, sample again."""
    queue_name = f"memory-r{round_index}"
    config = measure.queue_config(queue_name, measure.processor_ref("trivial"), concurrency=1)
    queue = bullmq.Queue(queue_name, {"connection": redis_url})
    try:
        async with measure.running_supervisor(redis_url, config) as supervisor:
            runner = supervisor.runners[queue_name]
            started = time.perf_counter()
            job = await queue.add("first", {})
            await wait_finished(queue, str(job.id))
            first_job_ms = (time.perf_counter() - started) * 1000
            child = await measure.wait_until(lambda: _only_idle_child(runner.pool), 5.0, "the child returning to the pool")
            after_one = memory_sample(child.pid)

            added = await queue.addBulk([{"name": "more", "data": {}} for _ in range(more_jobs)])
            for job in added:
                await wait_finished(queue, str(job.id))
            same_child = await measure.wait_until(lambda: _only_idle_child(runner.pool), 5.0, "the child returning to the pool")
            after_more = memory_sample(same_child.pid)
            return {
                "first_job_ms": first_job_ms,
                "after_one_job": after_one,
                "after_more_jobs": after_more,
                "same_child": same_child.pid == child.pid,
                "jobs_run_by_child": same_child.jobs_run,
            }
    finally:
        await queue.close()


def _only_idle_child(pool: ChildPool) -> Any:
    children = list(pool.children)
    if len(children) != 1 or children[0].current_job_id is not None:
        return None
    return children[0]


async def wait_finished(queue: bullmq.Queue, job_id: str, timeout_s: float = 30.0) -> None:
    state = await measure.wait_until(
        lambda: _finished_state(queue, job_id), timeout_s, f"job {job_id} finishing", interval_s=0.001
    )
    if state != "completed":
        raise RuntimeError(f"job {job_id} ended {state}, expected completed")


async def _finished_state(queue: bullmq.Queue, job_id: str) -> str | None:
    state = await queue.getJobState(job_id)
    return state if state in ("completed", "failed") else None


def measure_bare_interpreter() -> dict[str, float]:
    """Sample a bare interpreter (``python -c`` blocked on stdin) after it has started."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()
        return memory_sample(process.pid)
    finally:
        process.communicate(b"\n", timeout=10)


async def run_all(args: Any) -> dict[str, Any]:
    results: dict[str, Any] = {"pool": await measure_pool_spawns(args.spawns), "supervised": [], "bare": []}
    with measure.private_redis() as server:
        for round_index in range(args.rounds):
            results["supervised"].append(await measure_supervised_child(server.url, round_index, args.more_jobs))
            results["bare"].append(measure_bare_interpreter())
    return results


def memory_row(label: str, samples: list[dict[str, float]]) -> list[Any]:
    row: list[Any] = [label, len(samples)]
    for key in ("rss_mib", "uss_mib", "pss_mib"):
        summary = measure.summarize([sample[key] for sample in samples])
        row += [summary["median"], summary["p95"]]
    return row


def main() -> None:
    parser = measure.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--spawns", type=int, default=20, help="children spawned through ChildPool.acquire (default 20)")
    parser.add_argument("--rounds", type=int, default=5, help="supervisors started, and bare interpreters sampled (default 5)")
    parser.add_argument("--more-jobs", type=int, default=200, help="jobs run after the first before the second sample (default 200)")
    args = parser.parse_args()
    measure.configure_logging(args.verbose)

    results = asyncio.run(run_all(args))
    supervised = results["supervised"]
    memory_table = measure.format_table(
        ["process", "n", "RSS med", "RSS p95", "USS med", "USS p95", "PSS med", "PSS p95"],
        [
            memory_row("bare `python -c` interpreter", results["bare"]),
            memory_row("child at READY (ChildPool)", results["pool"]["memory_after_ready"]),
            memory_row("idle child after 1 job", [run["after_one_job"] for run in supervised]),
            memory_row(f"idle child after {args.more_jobs + 1} jobs", [run["after_more_jobs"] for run in supervised]),
        ],
    )
    spawn = measure.summarize(results["pool"]["spawn_to_ready_ms"])
    first_job = measure.summarize([run["first_job_ms"] for run in supervised])
    time_table = measure.format_table(
        ["measurement", "n", "median ms", "p95 ms", "max ms"],
        [
            ["ChildPool.acquire: spawn -> READY", spawn["n"], spawn["median"], spawn["p95"], spawn["max"]],
            ["first job of a new supervisor: add -> completed", first_job["n"], first_job["median"], first_job["p95"], first_job["max"]],
        ],
    )
    notes = (
        f"\n\nmemory in MiB; cgroup v2 leaf per child: {results['pool']['cgroup_v2']};"
        f" one child served all {args.more_jobs + 1} jobs in every round: {all(run['same_child'] for run in supervised)}"
    )
    summary = {
        "spawn_to_ready_ms": spawn,
        "first_job_ms": first_job,
        "cgroup_v2": results["pool"]["cgroup_v2"],
        "memory": {
            "bare_interpreter": results["bare"],
            "child_at_ready": results["pool"]["memory_after_ready"],
            "supervised_rounds": supervised,
        },
    }
    measure.emit_report("child start time and idle child memory", memory_table + "\n\n" + time_table + notes, summary, args.json)


if __name__ == "__main__":
    main()
