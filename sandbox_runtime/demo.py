"""``python -m sandbox_runtime demo``: example jobs on an embedded Redis, one per outcome.

The demo starts a private Redis and a Supervisor and adds one job per outcome: completed,
processor raised, cancelled at each ladder step, timed out and child crashed. It waits for each
job to finish, prints a table of what BullMQ contains afterwards, and stops everything. Cancels go
through ``request_cancel``, the same durable path as the ``cancel`` command. The exit status is 0
when every job ended as expected, 1 when one did not, and 2 when the example processors are missing.

The processors live in the ``examples`` package of a source checkout; children find it because
the directory that contains the ``child`` package is on their ``PYTHONPATH``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bullmq
import psutil
import redis.asyncio as aioredis

import child as child_package

from .config import Config, EscalationSettings, QueueConfig, RedisSettings, SupervisorSettings
from .control import request_cancel, wait_for_final_state
from .redis_server import EmbeddedRedis
from .supervisor import Supervisor

logger = logging.getLogger(__name__)

PREFIX = "bull"
EXAMPLES_DIR = Path(child_package.__file__).resolve().parent.parent / "examples"
STARTED_LOG_LINE = "processor started"  # written by every processor in examples.misbehaving
PRIMES_STARTED_LOG_LINE = "counting primes below"  # written by examples.cpu:count_primes

# Short graces keep the demo quick: each ladder step follows the previous one after 1 s.
DEMO_ESCALATION = EscalationSettings(cancel_grace_s=1.0, term_grace_s=1.0)
START_TIMEOUT_S = 20.0
FINISH_TIMEOUT_S = 30.0
CLEANUP_CHECK_TIMEOUT_S = 5.0
MAX_CELL_CHARS = 72

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_NO_EXAMPLES = 2


@dataclass(frozen=True)
class Scenario:
    """One demo job: where it goes, what its processor does, and how it is expected to end.

    ``expected_reason`` is a prefix of the expected failedReason. ``expected_step`` is the last
    ladder step written to the job log: ``-`` (none), ``cooperative``, ``SIGTERM`` or ``SIGKILL``.
    With ``cancel_reason`` set, the demo cancels the job once its processor has logged ``started_log``.
    With ``check_cleanup``, it also checks that the job's scratch directory and helper process are gone.
    """

    queue: str
    behaviour: str
    data: dict[str, Any]
    expected_state: str
    expected_reason: str | None = None
    expected_step: str = "-"
    cancel_reason: str | None = None
    started_log: str = STARTED_LOG_LINE
    check_cleanup: bool = False


@dataclass
class Row:
    """The final state of one demo job as stored in BullMQ, and its differences from the expected outcome."""

    scenario: Scenario
    job_id: str = "?"
    state: str = "?"
    detail: str = ""
    step: str = "-"
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


QUEUES = (
    QueueConfig("primes", "examples.cpu:count_primes", concurrency=2, escalation=DEMO_ESCALATION),
    QueueConfig("orders", "examples.misbehaving:parse_order", escalation=DEMO_ESCALATION),
    QueueConfig("stubborn", "examples.misbehaving:ignore_abort_signal", escalation=DEMO_ESCALATION),
    QueueConfig("unkillable", "examples.misbehaving:ignore_sigterm", escalation=DEMO_ESCALATION),
    QueueConfig("sleepy", "examples.misbehaving:sleep_seconds", escalation=DEMO_ESCALATION),
    QueueConfig("native", "examples.misbehaving:crash_in_native_code", escalation=DEMO_ESCALATION),
)

SCENARIOS = (
    Scenario(
        "primes", "counts primes below 300000", {"below": 300_000},
        expected_state="completed", started_log=PRIMES_STARTED_LOG_LINE,
    ),
    Scenario(
        "orders", "raises ValueError on a bad quantity", {"quantity": -3},
        expected_state="failed", expected_reason="ValueError: quantity must be a positive integer",
    ),
    Scenario(
        "primes", "checks its abort signal; cancelled", {"below": 500_000_000},
        expected_state="failed", expected_reason="cancelled: demo: stop counting",
        expected_step="cooperative", cancel_reason="demo: stop counting", started_log=PRIMES_STARTED_LOG_LINE,
    ),
    Scenario(
        "stubborn", "never checks its signal; cancelled", {},
        expected_state="failed", expected_reason="cancelled: demo: stop sleeping",
        expected_step="SIGTERM", cancel_reason="demo: stop sleeping",
    ),
    Scenario(
        "unkillable", "ignores SIGTERM; cancelled", {},
        expected_state="failed", expected_reason="cancelled: demo: stop at any cost",
        expected_step="SIGKILL", cancel_reason="demo: stop at any cost", check_cleanup=True,
    ),
    Scenario(
        "sleepy", "sleeps 30 s with timeoutMs 2000", {"seconds": 30, "timeoutMs": 2000},
        expected_state="failed", expected_reason="timed out: 2000 ms", expected_step="SIGTERM",
    ),
    Scenario(
        "native", "segfaults in native code", {},
        expected_state="failed", expected_reason="child crashed: signal SIGSEGV (11)",
    ),
)


async def run_demo() -> int:
    """Run every scenario on a private Redis, print the table and return the exit status."""
    if not (EXAMPLES_DIR / "cpu.py").is_file():
        print(
            f"error: the example processors are missing ({EXAMPLES_DIR / 'cpu.py'} not found). "
            "The demo runs from a source checkout: clone the repository and `pip install -e .` there.",
            file=sys.stderr,
        )
        return EXIT_NO_EXAMPLES

    server = EmbeddedRedis()
    server.start()
    try:
        print(f"embedded Redis at {server.url}", flush=True)
        rows = await _run_scenarios(server.url)
    finally:
        server.stop()

    _print_table(rows)
    return _print_verdict(rows)


async def _run_scenarios(redis_url: str) -> list[Row]:
    config = Config(
        queues=QUEUES,
        redis=RedisSettings(url=redis_url, prefix=PREFIX),
        supervisor=SupervisorSettings(shutdown="cancel", shutdown_timeout_s=5.0),
    )
    client = aioredis.from_url(redis_url)
    queues = {queue.name: bullmq.Queue(queue.name, {"connection": redis_url, "prefix": PREFIX}) for queue in QUEUES}
    try:
        async with Supervisor(config):
            print(
                f"supervisor serving {len(QUEUES)} queues with cancel_grace_s = {DEMO_ESCALATION.cancel_grace_s:g}"
                f" and term_grace_s = {DEMO_ESCALATION.term_grace_s:g}; running {len(SCENARIOS)} jobs",
                flush=True,
            )
            started = time.monotonic()
            rows = await asyncio.gather(*(_run_scenario(scenario, queues[scenario.queue], client) for scenario in SCENARIOS))
            print(f"all jobs finished in {time.monotonic() - started:.1f} s; stopping the supervisor\n", flush=True)
    finally:
        for queue in queues.values():
            await queue.close()
        await client.aclose()
    return list(rows)


async def _run_scenario(scenario: Scenario, queue: bullmq.Queue, client: aioredis.Redis) -> Row:
    row = Row(scenario)
    try:
        job = await queue.add(scenario.queue, scenario.data, {"attempts": 1})
        row.job_id = str(job.id)
        if scenario.cancel_reason is not None:
            await _wait_for_log_line(queue, row.job_id, scenario.started_log)
            outcome = await request_cancel(client, PREFIX, scenario.queue, row.job_id, reason=scenario.cancel_reason)
            if outcome.status != "requested":
                row.problems.append(f"the cancel request returned {outcome.status!r}, expected 'requested'")

        final = await wait_for_final_state(client, PREFIX, scenario.queue, row.job_id, FINISH_TIMEOUT_S)
        row.state = final.state
        row.step = _ladder_step(final.ladder_line)
        if final.state == "completed":
            stored = await bullmq.Job.fromId(queue, row.job_id)
            row.detail = json.dumps(stored.returnvalue if stored is not None else None)
        else:
            row.detail = final.failed_reason or ""
        if scenario.check_cleanup:
            await _check_cleanup(queue, row)
    except Exception as exc:
        logger.exception("demo job on queue %s failed to run", scenario.queue)
        row.problems.append(f"{type(exc).__name__}: {exc}")
    _compare(row)
    return row


async def _wait_for_log_line(queue: bullmq.Queue, job_id: str, prefix: str) -> list[str]:
    """Wait until a line of the job's log starts with ``prefix``; return the log lines."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        logs = list((await queue.getJobLogs(job_id))["logs"])
        if any(line.startswith(prefix) for line in logs):
            return logs
        if time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} wrote no log line starting with {prefix!r} within {START_TIMEOUT_S:g} s")
        await asyncio.sleep(0.05)


async def _check_cleanup(queue: bullmq.Queue, row: Row) -> None:
    """Check that the scratch directory and helper process of ``examples.misbehaving:ignore_sigterm`` are gone."""
    logs = list((await queue.getJobLogs(row.job_id))["logs"])
    scratch = _logged_value(logs, "scratch directory ")
    helper_pid = _logged_value(logs, "helper pid ")
    if scratch is None or helper_pid is None:
        row.problems.append("the processor did not log its scratch directory and helper pid")
        return

    deadline = time.monotonic() + CLEANUP_CHECK_TIMEOUT_S
    while (Path(scratch).exists() or _is_running(int(helper_pid))) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if Path(scratch).exists():
        row.problems.append(f"scratch directory {scratch} still exists")
    else:
        row.notes.append(f"the scratch directory it handed over ({scratch}) was removed")
    if _is_running(int(helper_pid)):
        row.problems.append(f"helper process {helper_pid} still runs")
    else:
        row.notes.append(f"its helper process (pid {helper_pid}, also ignoring SIGTERM) was killed")


def _logged_value(logs: list[str], prefix: str) -> str | None:
    for line in logs:
        if line.startswith(prefix):
            return line[len(prefix):]
    return None


def _is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _ladder_step(line: str | None) -> str:
    """Name the ladder step of a ``sandbox-runtime:`` job log line."""
    if line is None:
        return "-"
    if "SIGKILL sent" in line:
        return "SIGKILL"
    if "SIGTERM sent" in line:
        return "SIGTERM"
    if "cancel requested" in line:
        return "cooperative"
    return line


def _compare(row: Row) -> None:
    scenario = row.scenario
    if row.state != scenario.expected_state:
        row.problems.append(f"state {row.state!r}, expected {scenario.expected_state!r}")
    if scenario.expected_reason is not None and not row.detail.startswith(scenario.expected_reason):
        row.problems.append(f"failedReason {row.detail!r}, expected it to start with {scenario.expected_reason!r}")
    if row.step != scenario.expected_step:
        row.problems.append(f"last ladder step {row.step!r}, expected {scenario.expected_step!r}")


def _print_table(rows: list[Row]) -> None:
    header = ("job", "what the processor does", "state", "failedReason or return value", "last step", "check")
    lines = [header]
    for row in rows:
        lines.append((
            f"{row.scenario.queue}/{row.job_id}",
            row.scenario.behaviour,
            row.state,
            _clip(row.detail),
            row.step,
            "ok" if not row.problems else "UNEXPECTED",
        ))
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    for index, line in enumerate(lines):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _clip(text: str) -> str:
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 3] + "..."


def _print_verdict(rows: list[Row]) -> int:
    print()
    for row in rows:
        for note in row.notes:
            print(f"{row.scenario.queue}/{row.job_id}: {note}")
        for problem in row.problems:
            print(f"{row.scenario.queue}/{row.job_id}: UNEXPECTED: {problem}")
    failures = sum(1 for row in rows if row.problems)
    if failures:
        print(f"{failures} of {len(rows)} jobs did not end as expected")
        return EXIT_UNEXPECTED
    print(f"all {len(rows)} jobs ended as expected")
    return EXIT_OK
