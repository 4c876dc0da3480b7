"""The examples and the demo: the commands the README documents must work as written."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox_runtime.config import check_config_main, load_config
from tests.harness import add_job, bull_queue, job_logs, queue_config, run, supervised, wait_for, wait_for_state

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
PRIMES = "examples.cpu:count_primes"

# Primes below 20 000; small enough that a job takes a fraction of a second.
SMALL_LIMIT = 20_000
PRIMES_BELOW_SMALL_LIMIT = 2262

DEMO_TIMEOUT_S = 120.0
SCRIPT_TIMEOUT_S = 60.0


async def run_script(*command: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``command`` from the repository root; return (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        *command, cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), SCRIPT_TIMEOUT_S)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"{' '.join(command)} did not finish within {SCRIPT_TIMEOUT_S:g} s") from None
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.mark.timeout(DEMO_TIMEOUT_S + 30)
def test_demo_shows_every_outcome(tmp_path):
    """The demo runs from any directory, exits 0 and prints one row per outcome."""
    completed = subprocess.run(
        [sys.executable, "-m", "sandbox_runtime", "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
    )
    output = completed.stdout
    assert completed.returncode == 0, f"stdout:\n{output}\nstderr:\n{completed.stderr}"

    expected_cells = [
        '"primes": 25997',
        "ValueError: quantity must be a positive integer, got -3",
        "cancelled: demo: stop counting",
        "cancelled: demo: stop sleeping",
        "cancelled: demo: stop at any cost",
        "timed out: 2000 ms (timeoutMs in the job data)",
        "child crashed: signal SIGSEGV (11)",
    ]
    for cell in expected_cells:
        assert cell in output, f"{cell!r} missing from the demo output:\n{output}"
    for step in ("cooperative", "SIGTERM", "SIGKILL"):
        assert step in output, f"ladder step {step} missing from the demo output:\n{output}"
    assert "was removed" in output
    assert "was killed" in output
    assert "all 7 jobs ended as expected" in output
    assert "UNEXPECTED" not in output


def test_example_config_passes_check_config():
    out, err = io.StringIO(), io.StringIO()

    status = check_config_main(str(EXAMPLES / "config.toml"), out, err)

    assert status == 0, err.getvalue()
    assert "url = (embedded Redis)" in out.getvalue()


def test_example_config_values():
    config = load_config(EXAMPLES / "config.toml")

    assert config.redis.url is None
    assert [queue.name for queue in config.queues] == ["primes"]
    queue = config.queue("primes")
    assert queue.processor == PRIMES
    assert queue.concurrency == 2
    assert queue.escalation.cancel_grace_s == 3
    assert queue.escalation.term_grace_s == 2


def test_count_primes_reports_progress(redis_url):
    async def scenario():
        async with supervised(redis_url, queue_config("primes", PRIMES)):
            async with bull_queue(redis_url, "primes") as queue:
                job_id = await add_job(queue, {"below": SMALL_LIMIT})
                job = await wait_for_state(queue, job_id)
                assert job.failedReason is None
                assert job.returnvalue["primes"] == PRIMES_BELOW_SMALL_LIMIT
                assert job.progress == 100
                assert f"counting primes below {SMALL_LIMIT}" in await job_logs(queue, job_id)

    run(scenario())


def test_count_primes_stops_on_cancel(redis_url):
    """count_primes checks its signal between blocks, so a cancel ends it at the cooperative step."""

    async def scenario():
        escalation = {"cancel_grace_s": 30.0, "term_grace_s": 5.0}
        async with supervised(redis_url, queue_config("primes", PRIMES, escalation=escalation)) as supervisor:
            async with bull_queue(redis_url, "primes") as queue:
                job_id = await add_job(queue, {"below": 10**12})
                await wait_for(lambda: _has_line(queue, job_id, "counting primes below"), message="processor start")
                assert supervisor.cancel_job(job_id, "enough primes")
                job = await wait_for_state(queue, job_id, ["failed"])
                assert job.failedReason == "cancelled: enough primes"
                logs = await job_logs(queue, job_id)
                assert not any("SIGTERM sent" in line for line in logs)

    run(scenario())


async def _has_line(queue, job_id: str, prefix: str) -> bool:
    return any(line.startswith(prefix) for line in await job_logs(queue, job_id))


def test_add_jobs_script_waits_for_results(redis_url):
    async def scenario():
        async with supervised(redis_url, queue_config("primes", PRIMES, concurrency=2)):
            status, stdout, stderr = await run_script(
                sys.executable, "examples/add_jobs.py", "--redis", redis_url,
                "--count", "2", "--below", str(SMALL_LIMIT), "--wait", "30",
            )
            assert status == 0, stderr
            lines = stdout.splitlines()
            job_ids = lines[:2]
            assert len(set(job_ids)) == 2
            for job_id in job_ids:
                assert any(line.startswith(f"job {job_id} completed: ") and f'"primes": {PRIMES_BELOW_SMALL_LIMIT}' in line for line in lines), stdout

            async with bull_queue(redis_url, "primes") as queue:
                for job_id in job_ids:
                    job = await wait_for_state(queue, job_id)
                    assert job.returnvalue["primes"] == PRIMES_BELOW_SMALL_LIMIT

    run(scenario())


def test_add_jobs_script_reports_timeout(redis_url):
    """--timeout-ms becomes timeoutMs in the job data; the script prints the failedReason and exits 1."""

    async def scenario():
        async with supervised(redis_url, queue_config("primes", PRIMES)):
            status, stdout, stderr = await run_script(
                sys.executable, "examples/add_jobs.py", "--redis", redis_url,
                "--count", "1", "--below", str(10**12), "--timeout-ms", "300", "--wait", "30",
            )
            assert status == 1, stderr
            assert "failed: timed out: 300 ms (timeoutMs in the job data)" in stdout

    run(scenario())


def test_add_jobs_script_requires_redis_url():
    env = {name: value for name, value in os.environ.items() if name != "SANDBOX_RUNTIME_REDIS_URL"}
    completed = subprocess.run(
        [sys.executable, "examples/add_jobs.py"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S
    )

    assert completed.returncode == 2
    assert "no Redis URL: pass --redis URL" in completed.stderr


@pytest.mark.node
def test_node_example_job_completes(redis_url, node):
    env = {**os.environ, "NODE_PATH": str(node.node_modules)}

    async def scenario():
        async with supervised(redis_url, queue_config("primes", PRIMES)):
            status, stdout, stderr = await run_script(
                node.executable, "examples/add_jobs.js", "--redis", redis_url,
                "--count", "1", "--below", str(SMALL_LIMIT), "--wait", "30", env=env,
            )
            assert status == 0, stderr
            job_id = stdout.splitlines()[0]
            assert f'job {job_id} completed: {{"below":{SMALL_LIMIT},"primes":{PRIMES_BELOW_SMALL_LIMIT},' in stdout

            async with bull_queue(redis_url, "primes") as queue:
                job = await wait_for_state(queue, job_id)
                assert job.returnvalue["primes"] == PRIMES_BELOW_SMALL_LIMIT

    run(scenario())


def test_example_hook_logs_outcome(redis_url, caplog):
    caplog.set_level(logging.INFO, logger="examples.hooks")

    async def scenario():
        config = queue_config("primes", PRIMES, cleanup=("examples.hooks:log_outcome",))
        async with supervised(redis_url, config):
            async with bull_queue(redis_url, "primes") as queue:
                job_id = await add_job(queue, {"below": SMALL_LIMIT}, name="small")
                await wait_for_state(queue, job_id)

        messages = [record.getMessage() for record in caplog.records if record.name == "examples.hooks"]
        assert len(messages) == 1, messages
        assert messages[0].startswith(f"job {job_id} of queue primes (small): completed, cause -, last ladder step RUNNING, failedReason None, ")

    run(scenario())
