"""Running a Supervisor inside a test, and reading what BullMQ ended up holding."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from typing import Any, AsyncIterator, Iterable

import bullmq
import psutil

from sandbox_runtime import (
    Config,
    EscalationSettings,
    QueueConfig,
    RedisSettings,
    SandboxSettings,
    Supervisor,
    SupervisorSettings,
)

FINAL_STATES = ("completed", "failed")


def queue_config(name: str, processor: Any, **options: Any) -> QueueConfig:
    """Build a QueueConfig; ``escalation`` and ``sandbox`` may be given as dicts."""
    if isinstance(options.get("escalation"), dict):
        options["escalation"] = EscalationSettings(**options["escalation"])
    if isinstance(options.get("sandbox"), dict):
        options["sandbox"] = SandboxSettings(**options["sandbox"])
    return QueueConfig(name=name, processor=processor, **options)


@contextlib.asynccontextmanager
async def supervised(redis_url: str, *queues: QueueConfig, prefix: str = "bull", **settings: Any) -> AsyncIterator[Supervisor]:
    """Run a Supervisor for the block; stop it (as configured) on the way out."""
    settings.setdefault("shutdown", "cancel")
    settings.setdefault("shutdown_timeout_s", 5.0)
    config = Config(queues=queues, redis=RedisSettings(url=redis_url, prefix=prefix), supervisor=SupervisorSettings(**settings))
    supervisor = Supervisor(config)
    await supervisor.start()
    try:
        yield supervisor
    finally:
        await supervisor.stop()


@contextlib.asynccontextmanager
async def bull_queue(redis_url: str, name: str, prefix: str = "bull") -> AsyncIterator[bullmq.Queue]:
    queue = bullmq.Queue(name, {"connection": redis_url, "prefix": prefix})
    try:
        yield queue
    finally:
        await queue.close()


async def add_job(queue: bullmq.Queue, data: Any = None, *, name: str = "job", **opts: Any) -> str:
    job = await queue.add(name, data if data is not None else {}, opts)
    return str(job.id)


async def wait_for_state(queue: bullmq.Queue, job_id: str, states: Iterable[str] = FINAL_STATES, timeout: float = 20.0) -> bullmq.Job:
    """Poll Redis until the job is in one of ``states``; return the job as stored."""
    wanted = tuple(states)
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = await queue.getJobState(job_id)
        if state in wanted:
            job = await bullmq.Job.fromId(queue, job_id)
            assert job is not None
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} was still {state!r} after {timeout} s, expected one of {wanted}")


async def wait_for(predicate: Any, timeout: float = 20.0, message: str = "condition") -> Any:
    """Poll ``predicate()`` (sync or async) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"{message} not reached within {timeout} s")


async def job_logs(queue: bullmq.Queue, job_id: str) -> list[str]:
    result = await queue.getJobLogs(job_id)
    return list(result["logs"])


SCENARIO_TIMEOUT_S = float(os.environ.get("SANDBOX_RUNTIME_SCENARIO_TIMEOUT_S", "100"))


def run(coroutine: Any, timeout: float = SCENARIO_TIMEOUT_S) -> Any:
    """Run a test scenario; on timeout, print every pending asyncio task's stack, then fail."""
    return asyncio.run(_run_bounded(coroutine, timeout))


async def _run_bounded(coroutine: Any, timeout: float) -> Any:
    task = asyncio.ensure_future(coroutine)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if task in done:
        return task.result()
    dump_path = os.environ.get("SANDBOX_RUNTIME_TASK_DUMP")
    stream = open(dump_path, "a") if dump_path else sys.stderr
    for pending in asyncio.all_tasks():
        if pending is not asyncio.current_task():
            print(f"--- pending task {pending.get_name()}", file=stream)
            pending.print_stack(file=stream)
    if dump_path:
        stream.close()
    task.cancel()
    raise AssertionError(f"test scenario did not finish within {timeout} s; pending tasks printed to stderr")


def identify(pid: int) -> tuple[int, float | None]:
    """Return (pid, create time) so that a reused pid is never mistaken for the original process."""
    try:
        return pid, psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return pid, None


def is_gone(identity: tuple[int, float | None]) -> bool:
    """Return True when the process exited (a zombie counts) or its pid now names another process."""
    pid, create_time = identity
    if create_time is None:
        return True
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - create_time) > 0.01:
            return True
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
