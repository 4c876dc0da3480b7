"""Graceful shutdown of ``python -m sandbox_runtime serve`` on real SIGTERM signals.

Each test runs ``serve`` as a subprocess with a TOML file written to ``tmp_path``, follows its log
(stderr, written to a file) for lifecycle lines, and reads the jobs back from a real Redis.
Processors come from ``tests.cleanup_processors``; the recording hook from ``tests.cleanup_hooks``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import bullmq
import psutil
import pytest

from tests.cleanup_hooks import HOOK_RECORD_VARIABLE, read_records
from tests.harness import add_job, bull_queue, identify, is_gone, run, wait_for, wait_for_state

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CANCEL_GRACE_S = 1.0
TERM_GRACE_S = 1.0
# Added to every bound the product promises, for a loaded machine shared with other work.
SLOW_MACHINE_MARGIN_S = 2.0
WAITING_STATES = ("waiting", "wait")


# -- the serve subprocess --------------------------------------------------------------------------


def write_config(path: Path, *, shutdown: str, shutdown_timeout_s: float, concurrency: int = 2) -> Path:
    (path.parent / "workdirs").mkdir(exist_ok=True)
    path.write_text(
        f"""
[supervisor]
shutdown = "{shutdown}"
shutdown_timeout_s = {shutdown_timeout_s}
workdir_root = "{path.parent / 'workdirs'}"

[escalation]
cancel_grace_s = {CANCEL_GRACE_S}
term_grace_s = {TERM_GRACE_S}

[[queues]]
name = "q"
processor = "tests.cleanup_processors:shutdown_job"
concurrency = {concurrency}
cleanup = ["tests.cleanup_hooks:record"]
"""
    )
    return path


class Serve:
    """A ``serve`` subprocess whose stderr goes to ``log_path``."""

    def __init__(self, config: Path, redis_url: str, log_path: Path, hook_records: Path) -> None:
        self.log_path = log_path
        env = dict(os.environ, **{HOOK_RECORD_VARIABLE: str(hook_records)})
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sandbox_runtime", "serve", "--config", str(config), "--redis", redis_url],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    async def wait_for_log(self, text: str, timeout: float = 30.0) -> str:
        def find() -> str | None:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.process.returncode} before logging {text!r}")
            return next((line for line in self.log_lines() if text in line), None)

        return await wait_for(find, timeout, f"serve to log {text!r}")

    async def wait_exit(self, timeout: float) -> int:
        """Wait until serve exits; return its exit status."""
        await wait_for(lambda: self.process.poll() is not None, timeout, "serve to exit")
        return self.process.returncode

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def hook_records(tmp_path) -> Path:
    return tmp_path / "hook-records.jsonl"


@pytest.fixture
def serve_factory(tmp_path, redis_url, hook_records):
    """Start ``serve`` subprocesses. At the end, print the log of any still running and kill it."""
    started: list[Serve] = []

    def start(config: Path) -> Serve:
        serve = Serve(config, redis_url, tmp_path / f"serve-{len(started)}.log", hook_records)
        started.append(serve)
        return serve

    yield start
    for serve in started:
        if serve.process.poll() is None:
            print(f"--- serve pid {serve.process.pid} still running; its log:\n" + "\n".join(serve.log_lines()[-80:]))
        serve.kill()


async def read_report(path: Path, timeout: float = 30.0) -> dict:
    text = await wait_for(lambda: path.exists() and path.read_text(), timeout, f"report {path.name}")
    return json.loads(text)


def summary_line(lines: list[str]) -> str:
    """Return the last log line; shutdown must end with its summary."""
    meaningful = [line for line in lines if line.strip()]
    assert meaningful, "serve wrote no log"
    return meaningful[-1]


# -- drain: short job finishes, long job is handed back -----------------------------------------


@pytest.mark.timeout(120)
def test_drain_finishes_short_hands_back_long(redis_url, tmp_path, serve_factory, hook_records):
    """On SIGTERM with shutdown = "drain" and shutdown_timeout_s = 4, the 2 s job completes. The
    60 s job is cancelled at about 4 s and goes back to waiting without spending an attempt. serve
    exits 0 with a summary line, and a second serve completes the long job."""
    shutdown_timeout_s = 4.0
    config = write_config(tmp_path / "drain.toml", shutdown="drain", shutdown_timeout_s=shutdown_timeout_s)
    done_flag = tmp_path / "done"
    aborted_at = tmp_path / "aborted-at"

    async def scenario():
        first = serve_factory(config)
        await first.wait_for_log("serving 1 queue(s)")
        async with bull_queue(redis_url, "q") as queue:
            short_id = await add_job(queue, {"mode": "short", "seconds": 2, "report": str(tmp_path / "short.json")})
            long_id = await add_job(
                queue,
                {"mode": "long", "seconds": 60, "report": str(tmp_path / "long.json"), "aborted_at": str(aborted_at), "done_flag": str(done_flag)},
            )
            await read_report(tmp_path / "short.json")
            long_report = await read_report(tmp_path / "long.json")

            signalled_at_wall, signalled_at = time.time(), time.monotonic()
            first.signal(signal.SIGTERM)
            code = await first.wait_exit(shutdown_timeout_s + CANCEL_GRACE_S + TERM_GRACE_S + SLOW_MACHINE_MARGIN_S)
            exit_after = time.monotonic() - signalled_at
            assert code == 0, "\n".join(first.log_lines())

            short_job = await wait_for_state(queue, short_id, ["completed"], timeout=1)
            long_state = await queue.getJobState(long_id)
            long_job = await bullmq.Job.fromId(queue, long_id)
            cancel_seen_after = float(aborted_at.read_text()) - signalled_at_wall
            first_log = first.log_lines()

            done_flag.touch()
            second = serve_factory(config)
            finished = await wait_for_state(queue, long_id, ["completed"], timeout=30)
            second.signal(signal.SIGTERM)
            second_code = await second.wait_exit(10)
        return short_job, long_state, long_job, long_report, cancel_seen_after, exit_after, first_log, finished, second_code

    short_job, long_state, long_job, long_report, cancel_seen_after, exit_after, first_log, finished, second_code = run(scenario())
    logger.info("measured: cancel seen %.2f s and serve exited %.2f s after SIGTERM (shutdown_timeout_s = %g)", cancel_seen_after, exit_after, shutdown_timeout_s)

    assert short_job.returnvalue["finished"] == "short"
    assert long_state in WAITING_STATES
    assert long_job.attemptsMade == 0
    assert long_job.failedReason is None
    assert shutdown_timeout_s - 0.5 <= cancel_seen_after <= shutdown_timeout_s + SLOW_MACHINE_MARGIN_S
    summary = summary_line(first_log)
    for part in ("supervisor stopped", "1 completed", "0 failed", "1 handed back", "0 killed"):
        assert part in summary, summary
    assert is_gone(identify(long_report["pid"]))

    records = read_records(hook_records)
    long_records = [entry for entry in records if entry["job_id"] == long_job.id]
    assert [(entry["state"], entry["cause"], entry["last_step"]) for entry in long_records][0] == ("handed back", "shutdown", "COOPERATIVE")

    assert finished.returnvalue["finished"] == "at once"
    # The handed-back attempt was not counted: the child saw attemptsMade 0, and BullMQ counts
    # only the attempt that completed.
    assert finished.returnvalue["attemptsMade"] == 0
    assert finished.attemptsMade == 1
    assert second_code == 0


# -- a second SIGTERM during the drain ----------------------------------------------------------


async def _second_sigterm_scenario(redis_url: str, tmp_path: Path, serve_factory) -> dict:
    """Run a job that only SIGKILL stops, SIGTERM serve twice, and return what happened."""
    config = write_config(tmp_path / "drain.toml", shutdown="drain", shutdown_timeout_s=60, concurrency=1)
    serve = serve_factory(config)
    await serve.wait_for_log("serving 1 queue(s)")
    async with bull_queue(redis_url, "q") as queue:
        job_id = await add_job(queue, {"mode": "stubborn", "report": str(tmp_path / "stubborn.json")})
        report = await read_report(tmp_path / "stubborn.json")
        processes = [identify(report["pid"]), *(identify(int(pid)) for pid in report["pids"])]
        assert all(create_time is not None for _, create_time in processes), processes

        serve.signal(signal.SIGTERM)
        await serve.wait_for_log("shutting down")
        second_at = time.monotonic()
        serve.signal(signal.SIGTERM)
        code = await serve.wait_exit(CANCEL_GRACE_S + TERM_GRACE_S + SLOW_MACHINE_MARGIN_S)
        exit_after = time.monotonic() - second_at
        return {
            "code": code,
            "exit_after": exit_after,
            "processes": processes,
            "state": await queue.getJobState(job_id),
            "job": await bullmq.Job.fromId(queue, job_id),
            "log": serve.log_lines(),
        }


@pytest.mark.timeout(90)
def test_second_sigterm_kills_at_once(redis_url, tmp_path, serve_factory):
    """A second SIGTERM during a 60 s drain SIGKILLs a job that ignores the cancel and SIGTERM.
    serve exits 0 within the ladder plus a margin and leaves none of the job's processes. The job
    was stopped for shutdown, so it goes back to waiting without spending an attempt."""
    result = run(_second_sigterm_scenario(redis_url, tmp_path, serve_factory))
    logger.info("measured: serve exited %.2f s after the second SIGTERM", result["exit_after"])

    assert result["code"] == 0, "\n".join(result["log"])
    assert result["exit_after"] <= CANCEL_GRACE_S + TERM_GRACE_S + SLOW_MACHINE_MARGIN_S
    for identity in result["processes"]:
        assert is_gone(identity), f"process {identity[0]} of the job outlived serve"
    log = "\n".join(result["log"])
    assert "second stop request" in log
    assert "SIGKILL sent" in log
    assert "SIGTERM sent" not in log, "the second stop request must skip straight to SIGKILL"
    summary = summary_line(result["log"])
    for part in ("0 failed", "1 handed back", "1 killed"):
        assert part in summary, summary
    assert result["state"] in WAITING_STATES, (result["state"], result["job"].failedReason)
    assert result["job"].attemptsMade == 0


# -- shutdown = "cancel" ------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_cancel_policy_hands_back_at_once(redis_url, tmp_path, serve_factory, hook_records):
    """With shutdown = "cancel", SIGTERM cancels the running jobs at once, and the 60 s
    shutdown_timeout_s does not matter. A cooperative job stops within a fraction of a second, one
    that ignores everything is SIGKILLed after the ladder, and both go back to waiting."""
    config = write_config(tmp_path / "cancel.toml", shutdown="cancel", shutdown_timeout_s=60)
    aborted_at = tmp_path / "aborted-at"

    async def scenario():
        serve = serve_factory(config)
        await serve.wait_for_log("serving 1 queue(s)")
        async with bull_queue(redis_url, "q") as queue:
            long_id = await add_job(queue, {"mode": "long", "seconds": 60, "report": str(tmp_path / "long.json"), "aborted_at": str(aborted_at)})
            stubborn_id = await add_job(queue, {"mode": "stubborn", "report": str(tmp_path / "stubborn.json")})
            long_report = await read_report(tmp_path / "long.json")
            stubborn_report = await read_report(tmp_path / "stubborn.json")
            processes = [identify(long_report["pid"]), identify(stubborn_report["pid"]), *(identify(int(pid)) for pid in stubborn_report["pids"])]

            signalled_at_wall, signalled_at = time.time(), time.monotonic()
            serve.signal(signal.SIGTERM)
            code = await serve.wait_exit(CANCEL_GRACE_S + TERM_GRACE_S + SLOW_MACHINE_MARGIN_S)
            exit_after = time.monotonic() - signalled_at
            states = {job_id: await queue.getJobState(job_id) for job_id in (long_id, stubborn_id)}
            jobs = {job_id: await bullmq.Job.fromId(queue, job_id) for job_id in (long_id, stubborn_id)}
            cancel_seen_after = float(aborted_at.read_text()) - signalled_at_wall
            return code, exit_after, cancel_seen_after, states, jobs, processes, serve.log_lines(), stubborn_id

    code, exit_after, cancel_seen_after, states, jobs, processes, log, stubborn_id = run(scenario())
    logger.info("measured: cancel seen %.2f s and serve exited %.2f s after SIGTERM", cancel_seen_after, exit_after)

    assert code == 0, "\n".join(log)
    assert cancel_seen_after < CANCEL_GRACE_S
    for job_id, state in states.items():
        assert state in WAITING_STATES, (job_id, state, jobs[job_id].failedReason)
        assert jobs[job_id].attemptsMade == 0
    for identity in processes:
        assert is_gone(identity), f"process {identity[0]} of a job outlived serve"
    summary = summary_line(log)
    for part in ("0 completed", "0 failed", "2 handed back", "1 killed"):
        assert part in summary, summary

    stubborn_record = next(entry for entry in read_records(hook_records) if entry["job_id"] == stubborn_id)
    assert (stubborn_record["state"], stubborn_record["cause"], stubborn_record["last_step"]) == ("handed back", "shutdown", "SIGKILL")
