"""Remote cancellation end to end: real supervisors, the control channel, cancel records and the ``cancel`` CLI.

Every test runs real supervisors (in this process through ``supervised``, or as ``python -m
sandbox_runtime serve`` subprocesses) against a real redis-server, and real processors from
``tests/remote_processors.py`` in child processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator

import psutil
import pytest
import redis.asyncio as aioredis

from sandbox_runtime.control import cancel_record_key, control_channel, request_cancel
from tests.harness import add_job, bull_queue, queue_config, run, supervised, wait_for, wait_for_state

P = "tests.remote_processors"
PREFIX = "bull"
QUEUE = "q"
CHANNEL = control_channel(PREFIX, QUEUE)
LOGGER_NAME = "sandbox_runtime.control"
PROJECT_DIR = Path(__file__).resolve().parent.parent
NODE_PUBLISHER = Path(__file__).resolve().parent / "node" / "publish_cancel.js"

# Short ladder graces keep the tests fast. The processors here stop at the cooperative step anyway.
GRACES = {"cancel_grace_s": 1.0, "term_grace_s": 1.0}

# Bounds for waits. They only limit how long a failing test hangs.
RUN_TIMEOUT_S = 20.0
RECONNECT_TIMEOUT_S = 20.0
SUBPROCESS_TIMEOUT_S = 60.0


# -- helpers -------------------------------------------------------------------------------------


def hold_queue_config(name: str = QUEUE, processor: str = "hold", **options: Any):
    return queue_config(name, f"{P}:{processor}", escalation=dict(GRACES), **options)


def hold_data(directory: Path, label: str) -> dict[str, str]:
    """Job data for ``remote_processors.hold``: where to write the pid, and which file releases the job."""
    return {"pidfile": str(directory / f"{label}.pid"), "release": str(directory / "release")}


async def wait_for_pid(pidfile: str | Path, timeout: float = RUN_TIMEOUT_S) -> int:
    """Wait until a processor has written its pid to ``pidfile``, and return the pid."""
    path = Path(pidfile)
    return int(await wait_for(lambda: path.exists() and path.read_text(), timeout, f"pid in {path}"))


def cancel_message(job_id: object, reason: str | None = None, **extra: Any) -> str:
    fields: dict[str, Any] = {"action": "cancel", "jobId": job_id}
    if reason is not None:
        fields["reason"] = reason
    fields.update(extra)
    return json.dumps(fields)


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def subscriber_count(client: aioredis.Redis, channel: str = CHANNEL) -> int:
    [(_, count)] = await client.pubsub_numsub(channel)
    return int(count)


def cli_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "SANDBOX_RUNTIME_REDIS_URL"}


async def run_cli(*argv: str, timeout: float = SUBPROCESS_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sandbox_runtime ARGV`` without blocking the event loop, where the supervisors run."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sandbox_runtime",
        *argv,
        cwd=PROJECT_DIR,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return subprocess.CompletedProcess(list(argv), process.returncode, stdout.decode(), stderr.decode())


def control_records(caplog: pytest.LogCaptureFixture, level: int, text: str = "") -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == LOGGER_NAME and record.levelno == level and text in record.getMessage()
    ]


class RecordsByTask(logging.Handler):
    """Collect log records with the asyncio task that emitted them.

    Two supervisors in one process log through the same logger, and their records carry nothing that
    names the supervisor. Each supervisor reads its control channel in a task of its own, so the
    emitting task identifies the listener.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[tuple[int | None, logging.LogRecord]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            task = asyncio.current_task()
        except RuntimeError:
            task = None
        self.records.append((None if task is None else id(task), record))

    def per_task(self, level: int, text: str) -> Counter[int | None]:
        """Count the records at ``level`` whose message contains ``text``, per emitting task."""
        return Counter(task for task, record in self.records if record.levelno == level and text in record.getMessage())


@contextlib.contextmanager
def records_by_task(logger_name: str) -> Any:
    handler = RecordsByTask()
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# -- channel messages between two supervisors ----------------------------------------------------


def test_bad_messages_change_nothing_then_cancel(redis_url, tmp_path, caplog):
    """Malformed and unknown messages reach both supervisors and change nothing. A valid cancel stops one job only."""
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)

    async def scenario():
        with records_by_task(LOGGER_NAME) as by_task:
            async with supervised(redis_url, hold_queue_config()) as first, supervised(redis_url, hold_queue_config()) as second:
                supervisors = (first, second)
                async with bull_queue(redis_url, QUEUE) as queue, redis_client(redis_url) as client:
                    cancelled_id = await add_job(queue, hold_data(tmp_path, "cancelled"))
                    kept_id = await add_job(queue, hold_data(tmp_path, "kept"))
                    cancelled_pid = await wait_for_pid(tmp_path / "cancelled.pid")
                    kept_pid = await wait_for_pid(tmp_path / "kept.pid")
                    assert sorted(len(supervisor.runners[QUEUE].runs) for supervisor in supervisors) == [1, 1]
                    owner = next(s for s in supervisors if cancelled_id in s.runners[QUEUE].runs)
                    other = second if owner is first else first

                    for payload in ("not json", '{"action":"pause"}', '{"action":"cancel"}'):
                        assert await client.publish(CHANNEL, payload) == 2
                    # Each listener handles its messages in order, so once both have warned about the
                    # last one, both have handled the two before it.
                    await wait_for(
                        lambda: sum(by_task.per_task(logging.WARNING, '"jobId" is missing').values()) == 2,
                        RUN_TIMEOUT_S,
                        "a warning from each supervisor about the cancel without jobId",
                    )

                    not_json = by_task.per_task(logging.WARNING, "not valid JSON")
                    no_job_id = by_task.per_task(logging.WARNING, '"jobId" is missing')
                    unknown_action = by_task.per_task(logging.DEBUG, "unknown action ignored")
                    assert len(not_json) == 2
                    assert list(not_json.values()) == [1, 1]
                    assert set(no_job_id) == set(not_json)
                    assert list(no_job_id.values()) == [1, 1]
                    # An unknown action is ignored by design, with a DEBUG record and no WARNING.
                    assert set(unknown_action) == set(not_json)
                    assert list(unknown_action.values()) == [1, 1]
                    assert len(control_records(caplog, logging.WARNING)) == 4

                    for job_id in (cancelled_id, kept_id):
                        assert await queue.getJobState(job_id) == "active"
                    assert psutil.pid_exists(cancelled_pid)
                    assert psutil.pid_exists(kept_pid)
                    assert first.outcomes == Counter()
                    assert second.outcomes == Counter()
                    assert not control_records(caplog, logging.INFO, "cancel received")

                    valid = cancel_message(cancelled_id, "from api")
                    assert await client.publish(CHANNEL, valid) == 2
                    job = await wait_for_state(queue, cancelled_id, ["failed"], RUN_TIMEOUT_S)
                    assert job.failedReason == "cancelled: from api"
                    assert job.attemptsMade == 1
                    assert owner.outcomes["cancelled"] == 1

                    assert await queue.getJobState(kept_id) == "active"
                    Path(hold_data(tmp_path, "kept")["release"]).touch()
                    kept_job = await wait_for_state(queue, kept_id, ["completed"], RUN_TIMEOUT_S)
                    assert kept_job.returnvalue == {"pid": kept_pid, "attempt": 0}
                    assert other.outcomes == Counter({"completed": 1})
                    assert owner.outcomes == Counter({"cancelled": 1})

        received = control_records(caplog, logging.INFO, f"cancel received: queue={QUEUE} job={cancelled_id} ")
        assert len(received) == 1
        assert "origin=channel" in received[0].getMessage()
        assert len(control_records(caplog, logging.WARNING)) == 4

    run(scenario())


# -- Node.js publisher ---------------------------------------------------------------------------


@pytest.mark.node
@pytest.mark.parametrize("id_flag", [[], ["--numeric-id"]], ids=["string-id", "numeric-id"])
def test_node_publisher_cancels_job(node, redis_url, tmp_path, id_flag):
    """A Node.js application publishing the documented message with ioredis cancels a running job."""

    async def scenario():
        async with supervised(redis_url, hold_queue_config()):
            async with bull_queue(redis_url, QUEUE) as queue:
                job_id = await add_job(queue, hold_data(tmp_path, "job"))
                await wait_for_pid(tmp_path / "job.pid")

                process = await asyncio.create_subprocess_exec(
                    node.executable,
                    str(NODE_PUBLISHER),
                    redis_url,
                    CHANNEL,
                    job_id,
                    "from node",
                    *id_flag,
                    cwd=node.project_dir,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                try:
                    stdout, stderr = await asyncio.wait_for(process.communicate(), SUBPROCESS_TIMEOUT_S)
                except TimeoutError:
                    process.kill()
                    await process.wait()
                    raise
                assert process.returncode == 0, stderr.decode()
                assert json.loads(stdout) == {"receivers": 1}

                job = await wait_for_state(queue, job_id, ["failed"], RUN_TIMEOUT_S)
                assert job.failedReason == "cancelled: from node"
                assert job.attemptsMade == 1

    run(scenario())


# -- the CLI across supervisors ------------------------------------------------------------------


def test_cli_cancels_one_of_six_jobs(redis_url, tmp_path):
    """Three supervisors run six jobs, and ``cancel --wait`` stops exactly one and reports how it ended."""

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            supervisors = [
                await stack.enter_async_context(supervised(redis_url, hold_queue_config(concurrency=2))) for _ in range(3)
            ]
            queue = await stack.enter_async_context(bull_queue(redis_url, QUEUE))
            labels = [f"job{index}" for index in range(6)]
            job_ids = {label: await add_job(queue, hold_data(tmp_path, label)) for label in labels}
            pids = {label: await wait_for_pid(tmp_path / f"{label}.pid") for label in labels}
            assert len(set(pids.values())) == 6
            assert [len(supervisor.runners[QUEUE].runs) for supervisor in supervisors] == [2, 2, 2]

            target = job_ids["job3"]
            result = await run_cli("cancel", QUEUE, target, "--reason", "operator stop", "--redis", redis_url, "--wait", "20")
            assert result.returncode == 0, result.stdout + result.stderr
            assert f"job {target} found in queue '{QUEUE}' (prefix '{PREFIX}'): state active" in result.stdout
            assert "held by a supervisor\n" in result.stdout
            assert f"published on {CHANNEL}: 3 receiver(s)" in result.stdout
            assert "final state: failed\n" in result.stdout
            assert "failedReason: cancelled: operator stop\n" in result.stdout
            assert "last ladder step: sandbox-runtime: cancel requested (user): operator stop" in result.stdout

            cancelled = await wait_for_state(queue, target, ["failed"], RUN_TIMEOUT_S)
            assert cancelled.failedReason == "cancelled: operator stop"
            for label, job_id in job_ids.items():
                if job_id != target:
                    assert await queue.getJobState(job_id) == "active", label

            Path(hold_data(tmp_path, "job0")["release"]).touch()
            for label, job_id in job_ids.items():
                if job_id == target:
                    continue
                job = await wait_for_state(queue, job_id, timeout=RUN_TIMEOUT_S)
                assert job.failedReason is None, label
                assert job.returnvalue == {"pid": pids[label], "attempt": 0}, label

            totals = sum((supervisor.outcomes for supervisor in supervisors), Counter())
            assert totals == Counter({"completed": 5, "cancelled": 1})

    run(scenario())


# -- jobs that have not started ------------------------------------------------------------------


def test_waiting_and_delayed_jobs_never_run(redis_url, tmp_path):
    """Cancelled while waiting or delayed with no supervisor running, both jobs fail without running user code."""

    async def scenario():
        marker = {label: tmp_path / f"{label}.marker" for label in ("waiting", "delayed", "control")}
        async with bull_queue(redis_url, QUEUE) as queue, redis_client(redis_url) as client:
            waiting_id = await add_job(queue, {"marker": str(marker["waiting"])}, attempts=3)
            delayed_id = await add_job(queue, {"marker": str(marker["delayed"])}, attempts=3, delay=60000)
            assert await queue.getJobState(waiting_id) == "waiting"
            assert await queue.getJobState(delayed_id) == "delayed"

            result = await run_cli("cancel", QUEUE, waiting_id, "--reason", "not needed", "--redis", redis_url)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "state waiting" in result.stdout
            assert "not held by any supervisor" in result.stdout
            assert "0 receiver(s)" in result.stdout

            outcome = await request_cancel(client, PREFIX, QUEUE, delayed_id, reason="too late")
            assert outcome.status == "requested"
            assert outcome.state == "delayed"
            assert outcome.promoted is True
            assert outcome.lock_held is False
            assert outcome.receivers == 0
            assert await queue.getJobState(delayed_id) == "waiting"

            control_id = await add_job(queue, {"marker": str(marker["control"])})
            async with supervised(redis_url, queue_config(QUEUE, f"{P}:mark_then_return", escalation=dict(GRACES))):
                waiting = await wait_for_state(queue, waiting_id, ["failed"], RUN_TIMEOUT_S)
                delayed = await wait_for_state(queue, delayed_id, ["failed"], RUN_TIMEOUT_S)
                control = await wait_for_state(queue, control_id, ["completed"], RUN_TIMEOUT_S)

            assert waiting.failedReason == "cancelled: not needed"
            assert delayed.failedReason == "cancelled: too late"
            assert waiting.attemptsMade == 1
            assert delayed.attemptsMade == 1
            assert not marker["waiting"].exists()
            assert not marker["delayed"].exists()
            # The control job proves that the processor does write its marker when it runs.
            assert control.returnvalue == "ran"
            assert marker["control"].exists()
            for job_id in (waiting_id, delayed_id):
                assert not await client.exists(cancel_record_key(PREFIX, QUEUE, job_id))

    run(scenario())


# -- connection loss -----------------------------------------------------------------------------


def test_cancel_survives_connection_loss(fresh_redis, tmp_path, caplog):
    """Killed pub/sub and command connections heal, and a cancel published while unsubscribed arrives by its record."""
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    url = fresh_redis.url

    async def start_held_job(label: str) -> tuple[str, int]:
        async with bull_queue(url, QUEUE) as queue:
            job_id = await add_job(queue, hold_data(tmp_path, label))
        return job_id, await wait_for_pid(tmp_path / f"{label}.pid")

    async def final_job(job_id: str, states: list[str]):
        async with bull_queue(url, QUEUE) as queue:
            return await wait_for_state(queue, job_id, states, RUN_TIMEOUT_S)

    async def scenario():
        # The periodic sweep is effectively off, so a record is read only at claim time and after a resubscribe.
        async with supervised(url, hold_queue_config(), cancel_sweep_interval_s=3600.0), redis_client(url) as admin:
            # 1. The pub/sub connection is killed: the listener resubscribes, and a later message arrives.
            first_id, _ = await start_held_job("first")
            assert await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
            await wait_for(lambda: subscriber_count(admin), RECONNECT_TIMEOUT_S, "resubscription after CLIENT KILL TYPE pubsub")
            assert await admin.publish(CHANNEL, cancel_message(first_id, "after pubsub kill")) == 1
            first = await final_job(first_id, ["failed"])
            assert first.failedReason == "cancelled: after pubsub kill"

            # 2. Every command connection is killed (the supervisor's, the bullmq worker's, and this
            #    test's other clients); the admin connection survives because CLIENT KILL skips the caller.
            killed = await admin.execute_command("CLIENT", "KILL", "TYPE", "normal")
            assert killed >= 1
            async with bull_queue(url, QUEUE) as queue:
                release = tmp_path / "release"
                release.touch()
                fetched_id = await add_job(queue, hold_data(tmp_path, "fetched"))
                fetched = await wait_for_state(queue, fetched_id, ["completed"], RUN_TIMEOUT_S)
                assert fetched.returnvalue["attempt"] == 0
                release.unlink()

            second_id, _ = await start_held_job("second")
            assert await admin.publish(CHANNEL, cancel_message(second_id, "after normal kill")) == 1
            second = await final_job(second_id, ["failed"])
            assert second.failedReason == "cancelled: after normal kill"

            # 3. No supervisor is subscribed when the cancel is published: an ACL rule rejects
            #    SUBSCRIBE, so the listener's reconnect attempts fail until the rule is lifted.
            missed_id, missed_pid = await start_held_job("missed")
            attempts_before = len(control_records(caplog, logging.DEBUG, "reconnect attempt"))
            await admin.execute_command("ACL", "SETUSER", "default", "-subscribe")
            try:
                assert await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
                await wait_for(
                    lambda: len(control_records(caplog, logging.DEBUG, "reconnect attempt")) > attempts_before,
                    RECONNECT_TIMEOUT_S,
                    "a rejected reconnect attempt",
                )
                outcome = await request_cancel(admin, PREFIX, QUEUE, missed_id, reason="while unsubscribed")
                assert outcome.status == "requested"
                assert outcome.lock_held is True
                assert outcome.receivers == 0
                async with bull_queue(url, QUEUE) as queue:
                    assert await queue.getJobState(missed_id) == "active"
                assert psutil.pid_exists(missed_pid)
            finally:
                await admin.execute_command("ACL", "SETUSER", "default", "+subscribe")

            missed = await final_job(missed_id, ["failed"])
            assert missed.failedReason == "cancelled: while unsubscribed"
            assert not await admin.exists(cancel_record_key(PREFIX, QUEUE, missed_id))

        received = control_records(caplog, logging.INFO, f"cancel received: queue={QUEUE} job={missed_id} ")
        assert len(received) == 1
        assert "origin=record" in received[0].getMessage()
        resubscribed = control_records(caplog, logging.INFO, "control channel resubscribed")
        assert len(resubscribed) == 2
        assert resubscribed[-1].created <= received[0].created

    run(scenario())


# -- a flood of bad payloads against serve subprocesses --------------------------------------------

FLOOD_SIZE = 1000
FLOOD_SEED = 20240611
SHORT_JOBS = 10
MAX_CONTROL_WARNINGS = 30
MAX_RSS_GROWTH_MIB = 50
SERVE_CONFIG = """\
[supervisor]
shutdown = "cancel"
shutdown_timeout_s = 5
log_level = "INFO"

[escalation]
cancel_grace_s = 1
term_grace_s = 1

[[queues]]
name = "load"
processor = "tests.remote_processors:quick"

[[queues]]
name = "hold"
processor = "tests.remote_processors:hold"
"""
LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+)\s+(?P<logger>[\w.]+): (?P<message>.*)$")


def flood_payloads(rng: random.Random, count: int) -> tuple[list[bytes], int]:
    """Build ``count`` payloads, and return them with the number that a supervisor must reject as malformed.

    The rest are valid messages that must change nothing: unknown actions, and cancels of job ids
    that do not exist (``ghost-...``), so no real job can be hit.
    """
    malformed_makers = [
        lambda: rng.randbytes(rng.randint(0, 300)),
        lambda: b"\xff\xfe" + rng.randbytes(rng.randint(0, 40)),
        lambda: b"not json " + str(rng.random()).encode(),
        lambda: json.dumps(rng.choice([[], [1, 2], 7, 3.5, "cancel", None, True])).encode(),
        lambda: b"{}",
        lambda: json.dumps({"action": rng.choice([1, None, [], {}, False])}).encode(),
        lambda: json.dumps({"action": "cancel"}).encode(),
        lambda: json.dumps({"action": "cancel", "jobId": rng.choice(["", None, True, [], {}, 1.5])}).encode(),
        lambda: json.dumps({"action": "cancel", "jobId": "ghost", "reason": rng.choice([1, [], {}, True])}).encode(),
        lambda: json.dumps({"action": "cancel", "jobId": "ghost", "retry": rng.choice(["yes", 1, [], {}])}).encode(),
        lambda: b'{"action": "cancel", "jobId": NaN}',
        lambda: b'{"action": "cancel", "jobId": 1e999}',
        lambda: b'{"action": "cancel", "jobId": ' + b"9" * 5000 + b"}",
        lambda: b'{"action": "cancel", "jobId": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        lambda: b'{"action": "cancel", "jobId": "ghost", "reason": "' + b"x" * 70000 + b'"}',
        lambda: json.dumps({"action": "cancel", "jobId": "ghost"}).encode()[:-3],
    ]
    ignored_makers = [
        lambda: json.dumps({"action": rng.choice(["pause", "resume", "", "CANCEL", "cancel "]), "jobId": "1"}).encode(),
        lambda: cancel_message(f"ghost-{rng.randrange(10**9)}", "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(20))).encode(),
        lambda: cancel_message(10**12 + rng.randrange(10**6), None, extra={"nested": [1, {"a": None}]}).encode(),
    ]

    payloads: list[bytes] = []
    malformed = 0
    for _ in range(count):
        if rng.random() < 0.8:
            payloads.append(rng.choice(malformed_makers)())
            malformed += 1
        else:
            payloads.append(rng.choice(ignored_makers)())
    return payloads, malformed


def control_log_counts(log_path: Path) -> dict[str, int]:
    """Count, in a serve log, the control WARNING lines and the malformed messages they report."""
    counts = Counter()
    for line in log_path.read_text(errors="replace").splitlines():
        parsed = LOG_LINE.match(line)
        if parsed is None or parsed["logger"] != LOGGER_NAME:
            continue
        counts[parsed["level"]] += 1
        message = parsed["message"]
        if message.startswith("malformed control message on "):
            counts["malformed reported"] += 1
        summary = re.match(r"dropped (\d+) malformed control messages", message)
        if summary:
            counts["malformed reported"] += int(summary[1])
    return dict(counts)


@contextlib.asynccontextmanager
async def serve_processes(redis_url: str, config_path: Path, log_dir: Path, count: int) -> AsyncIterator[list[Any]]:
    """Run ``count`` ``serve`` subprocesses that log to ``log_dir/serve-N.log``, and send them SIGTERM on exit."""
    processes = []
    try:
        for index in range(count):
            with open(log_dir / f"serve-{index}.log", "wb") as log:
                processes.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "sandbox_runtime",
                        "serve",
                        "--config",
                        str(config_path),
                        "--redis",
                        redis_url,
                        cwd=PROJECT_DIR,
                        env=cli_env(),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                    )
                )
        yield processes
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), SUBPROCESS_TIMEOUT_S)
            except TimeoutError:
                process.kill()
                await process.wait()


async def all_subscribed(client: aioredis.Redis, channels: list[str], expected: int) -> bool:
    """Return whether each of ``channels`` has exactly ``expected`` subscribers."""
    counts = await client.pubsub_numsub(*channels)
    return all(int(count) == expected for _, count in counts)


def serve_pid_of(child_pid: int, serve_pids: set[int]) -> int | None:
    """Return the pid of the serve process that is an ancestor of ``child_pid``."""
    for ancestor in psutil.Process(child_pid).parents():
        if ancestor.pid in serve_pids:
            return ancestor.pid
    return None


def test_payload_flood_leaves_serve_healthy(redis_url, tmp_path):
    """1,000 random and malformed payloads while jobs run: bounded warnings and memory, every job done."""
    config_path = tmp_path / "serve.toml"
    config_path.write_text(SERVE_CONFIG)
    payloads, malformed = flood_payloads(random.Random(FLOOD_SEED), FLOOD_SIZE)
    channels = [control_channel(PREFIX, "load"), control_channel(PREFIX, "hold")]

    async def scenario() -> dict[int, Path]:
        async with serve_processes(redis_url, config_path, tmp_path, 2) as processes, redis_client(redis_url) as client:
            serve_pids = {process.pid for process in processes}
            logs = {process.pid: tmp_path / f"serve-{index}.log" for index, process in enumerate(processes)}
            await wait_for(
                lambda: all_subscribed(client, channels, len(processes)), SUBPROCESS_TIMEOUT_S, "both serve processes subscribed"
            )

            # One held job per serve process (concurrency 1 on "hold"). Cancelling them after the flood
            # proves that each process has handled every payload published before.
            async with bull_queue(redis_url, "hold") as hold, bull_queue(redis_url, "load") as load:
                held_ids = [await add_job(hold, hold_data(tmp_path, f"held{index}")) for index in range(2)]
                held_pids = [await wait_for_pid(tmp_path / f"held{index}.pid", SUBPROCESS_TIMEOUT_S) for index in range(2)]
                assert {serve_pid_of(pid, serve_pids) for pid in held_pids} == serve_pids

                rss_before = {pid: psutil.Process(pid).memory_info().rss for pid in serve_pids}
                short = [await add_job(load, {"n": n}) for n in range(SHORT_JOBS)]
                pipeline = client.pipeline(transaction=False)
                for index, payload in enumerate(payloads):
                    pipeline.publish(channels[index % 2], payload)
                receivers = await pipeline.execute()
                assert receivers == [2] * FLOOD_SIZE

                for job_id in held_ids:
                    assert await client.publish(control_channel(PREFIX, "hold"), cancel_message(job_id, "after the flood")) == 2
                for job_id in held_ids:
                    job = await wait_for_state(hold, job_id, ["failed"], SUBPROCESS_TIMEOUT_S)
                    assert job.failedReason == "cancelled: after the flood"
                for n, job_id in enumerate(short):
                    job = await wait_for_state(load, job_id, ["completed"], SUBPROCESS_TIMEOUT_S)
                    assert job.returnvalue["n"] == n
                    assert job.returnvalue["pid"] not in serve_pids

                for process in processes:
                    assert process.returncode is None, f"serve pid {process.pid} exited: see {logs[process.pid]}"
                for pid in serve_pids:
                    growth_mib = (psutil.Process(pid).memory_info().rss - rss_before[pid]) / (1024 * 1024)
                    assert growth_mib < MAX_RSS_GROWTH_MIB, f"serve pid {pid} grew by {growth_mib:.1f} MiB"

        for process in processes:
            assert process.returncode == 0, f"serve pid {process.pid} exited with {process.returncode}: see {logs[process.pid]}"
        return logs

    logs = run(scenario())
    for pid, log_path in logs.items():
        counts = control_log_counts(log_path)
        assert 1 <= counts.get("WARNING", 0) <= MAX_CONTROL_WARNINGS, (pid, counts)
        assert counts.get("ERROR", 0) == 0, (pid, counts)
        # Every malformed payload was either warned about or counted in a summary line.
        assert counts.get("malformed reported", 0) == malformed, (pid, counts)
        assert "Traceback" not in log_path.read_text(errors="replace")


# -- finished jobs -------------------------------------------------------------------------------


def test_cancel_of_completed_job_changes_nothing(redis_url, caplog):
    """A cancel for a job that already completed is rejected by the CLI and ignored on the channel."""
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)

    async def scenario():
        async with supervised(redis_url, queue_config(QUEUE, f"{P}:quick", escalation=dict(GRACES))):
            async with bull_queue(redis_url, QUEUE) as queue, redis_client(redis_url) as client:
                job_id = await add_job(queue, {"n": 7})
                done = await wait_for_state(queue, job_id, ["completed"], RUN_TIMEOUT_S)
                assert done.returnvalue["n"] == 7

                result = await run_cli("cancel", QUEUE, job_id, "--reason", "too late", "--redis", redis_url)
                assert result.returncode == 4, result.stdout + result.stderr
                assert f"job {job_id} had already completed: nothing was recorded" in result.stdout

                outcome = await request_cancel(client, PREFIX, QUEUE, job_id, reason="too late")
                assert outcome.status == "finished"
                assert outcome.state == "completed"

                # A bare message, as a publisher that skips the state check would send it.
                assert await client.publish(CHANNEL, cancel_message(job_id, "too late")) == 1
                await wait_for(
                    lambda: control_records(caplog, logging.DEBUG, f"cancel for job {job_id} ignored: not running here"),
                    RUN_TIMEOUT_S,
                    "the supervisor ignoring the cancel",
                )

                after = await wait_for_state(queue, job_id, ["completed"], RUN_TIMEOUT_S)
                assert after.returnvalue == done.returnvalue
                assert after.failedReason is None
                assert after.finishedOn == done.finishedOn
                assert not await client.exists(cancel_record_key(PREFIX, QUEUE, job_id))

    run(scenario())


# -- retryable cancels ---------------------------------------------------------------------------


@pytest.mark.parametrize("sender", ["message", "cli"])
def test_retry_cancel_runs_second_attempt(redis_url, tmp_path, sender):
    """``retry: true`` fails the attempt as retryable, so BullMQ runs the job again and it completes."""

    async def scenario():
        async with supervised(redis_url, hold_queue_config(processor="hold_first_attempt")) as supervisor:
            async with bull_queue(redis_url, QUEUE) as queue, redis_client(redis_url) as client:
                job_id = await add_job(queue, {"pidfile": str(tmp_path / "first.pid")}, attempts=2)
                await wait_for_pid(tmp_path / "first.pid")

                if sender == "message":
                    assert await client.publish(CHANNEL, cancel_message(job_id, "retry please", retry=True)) == 1
                else:
                    result = await run_cli("cancel", QUEUE, job_id, "--reason", "retry please", "--retry", "--redis", redis_url)
                    assert result.returncode == 0, result.stdout + result.stderr

                job = await wait_for_state(queue, job_id, ["completed", "failed"], RUN_TIMEOUT_S)
                assert await queue.getJobState(job_id) == "completed", job.failedReason
                assert job.returnvalue["attempt"] == 1
                assert job.attemptsMade == 2
                assert job.stacktrace[0].startswith("cancelled: retry please")
                assert supervisor.outcomes == Counter({"cancelled": 1, "completed": 1})
                assert not await client.exists(cancel_record_key(PREFIX, QUEUE, job_id))

    run(scenario())
