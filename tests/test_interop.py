"""Jobs added by Node.js BullMQ, and CPU-bound processors that would stall a plain bullmq.Worker."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import bullmq
import pytest
import redis

from tests.harness import add_job, bull_queue, queue_config, run, supervised, wait_for, wait_for_state

P = "tests.processors"


@pytest.mark.node
def test_node_job_processed_and_result_read_by_node(redis_url, node):
    async def scenario():
        async with supervised(redis_url, queue_config("interop", f"{P}:echo")):
            process = await asyncio.create_subprocess_exec(
                node.executable, str(node.project_dir / "add_and_wait.js"), redis_url, "interop", json.dumps({"n": 7}), "30000",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
            assert process.returncode == 0, stderr.decode()
            return json.loads(stdout)

    result = run(scenario())
    assert result["state"] == "completed"
    assert result["failedReason"] is None
    assert result["returnvalue"]["data"] == {"n": 7}


def _stalled_events(redis_url: str, queue: str) -> list[dict[str, str]]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        entries = client.xrange(f"bull:{queue}:events")
    finally:
        client.close()
    return [fields for _, fields in entries if fields.get("event") == "stalled"]


PLAIN_WORKER = textwrap.dedent(
    """
    import asyncio, sys, time
    import bullmq

    async def cpu_bound(job, token):
        deadline = time.monotonic() + job.data["seconds"]
        while time.monotonic() < deadline:
            pass
        return "done"

    async def main():
        worker = bullmq.Worker(sys.argv[2], cpu_bound, {
            "connection": sys.argv[1], "lockDuration": 1000, "stalledInterval": 500, "maxStalledCount": 0,
        })
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def test_cpu_bound_job_stalls_only_unsandboxed(redis_url):
    """A pure-Python CPU loop lasting 5 x lock_duration_ms: the sandbox keeps its lock, a plain worker loses it."""
    seconds = 5.0

    async def sandboxed():
        queue_settings = dict(concurrency=2, lock_duration_ms=1000, stalled_interval_ms=500, max_stalled_count=0)
        async with supervised(redis_url, queue_config("sandboxed", f"{P}:async_cpu_loop", **queue_settings)):
            async with bull_queue(redis_url, "sandboxed") as queue:
                job_id = await add_job(queue, {"seconds": seconds})
                job = await wait_for_state(queue, job_id, timeout=60)
                assert job.failedReason is None
                assert job.returnvalue > 0
                assert job.attemptsMade == 1
                assert job.stalledCounter == 0

    async def plain():
        async with bull_queue(redis_url, "plain") as queue:
            job_id = await add_job(queue, {"seconds": seconds})
            worker = subprocess.Popen([sys.executable, "-c", PLAIN_WORKER, redis_url, "plain"])
            try:
                await wait_for_state(queue, job_id, ["active"], timeout=30)
                # A second, idle worker runs the stalled-job check that the busy one cannot run.
                checker = bullmq.Worker("plain", _never_called, {
                    "connection": redis_url, "lockDuration": 1000, "stalledInterval": 500, "maxStalledCount": 0,
                })
                try:
                    await wait_for(lambda: _stalled_events(redis_url, "plain"), timeout=30, message="a stalled event")
                    job = await wait_for_state(queue, job_id, ["failed", "completed"], timeout=30)
                finally:
                    await checker.close(force=True)
            finally:
                worker.kill()
                worker.wait(10)
            assert job.failedReason == "job stalled more than allowable limit"

    run(sandboxed())
    assert _stalled_events(redis_url, "sandboxed") == []
    run(plain())


async def _never_called(job, token):
    raise AssertionError("the checker worker must not receive the job")
