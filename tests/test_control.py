"""Remote cancellation: message parsing, the control listener, cancel records, request_cancel and the CLI.

Every test runs against a real redis-server: the shared one (``redis_url``), or a private one
(``fresh_redis``) when the test kills connections or restarts the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable

import pytest
import redis.asyncio as aioredis
from bullmq import Queue, UnrecoverableError, Worker
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from helpers import async_wait_until, free_port
from sandbox_runtime import control
from sandbox_runtime.cancel_cli import (
    EXIT_FINISHED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REDIS_ERROR,
    EXIT_STILL_RUNNING,
    EXIT_USAGE,
    add_cancel_parser,
    run_cancel,
)
from sandbox_runtime.control import (
    DEFAULT_REASON,
    CancelRequest,
    ControlListener,
    MalformedControlMessage,
    cancel_record_key,
    clear_cancel_record,
    control_channel,
    fetch_cancel_records,
    last_ladder_line,
    parse_control_message,
    record_cancel,
    request_cancel,
    wait_for_final_state,
)

PREFIX = "bull"
QUEUE = "media"
CHANNEL = f"{PREFIX}:{QUEUE}:control"
LOGGER_NAME = "sandbox_runtime.control"
PROJECT_DIR = Path(__file__).resolve().parent.parent
NODE_PUBLISHER = Path(__file__).resolve().parent / "node" / "publish_cancel.js"

# Bounds for waits on the listener. They only limit how long a failing test hangs.
DELIVERY_TIMEOUT_S = 10.0
RECONNECT_TIMEOUT_S = 20.0


def cancel_message(job_id: object, reason: str | None = None, **extra: object) -> bytes:
    fields: dict[str, object] = {"action": "cancel", "jobId": job_id}
    if reason is not None:
        fields["reason"] = reason
    fields.update(extra)
    return json.dumps(fields).encode()


class CancelRecorder:
    """Stands in for the supervisor: records every request and runs the jobs listed in ``active``."""

    def __init__(self, active: Iterable[str] = ()) -> None:
        self.active: dict[str, set[str]] = {QUEUE: set(active)}
        self.requests: list[CancelRequest] = []
        self.results: list[bool] = []
        self.active_jobs_calls = 0
        self.raise_next: Exception | None = None

    def on_cancel(self, request: CancelRequest) -> bool:
        self.requests.append(request)
        if self.raise_next is not None:
            error, self.raise_next = self.raise_next, None
            self.results.append(False)
            raise error
        accepted = request.job_id in self.active.get(request.queue, set())
        self.results.append(accepted)
        return accepted

    def active_jobs(self) -> dict[str, set[str]]:
        self.active_jobs_calls += 1
        return {queue: set(ids) for queue, ids in self.active.items()}

    def requests_for(self, job_id: str) -> list[CancelRequest]:
        return [request for request in self.requests if request.job_id == job_id]


def shared_client(url: str) -> aioredis.Redis:
    """A client like the supervisor's: it retries a command once the server is back."""
    return aioredis.from_url(url, retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 3))


@contextlib.asynccontextmanager
async def running_listener(
    url: str, recorder: CancelRecorder, sweep_interval_s: float = 3600.0
) -> AsyncIterator[tuple[ControlListener, aioredis.Redis]]:
    client = shared_client(url)
    listener = ControlListener(
        url,
        PREFIX,
        [QUEUE],
        recorder.on_cancel,
        recorder.active_jobs,
        client,
        sweep_interval_s=sweep_interval_s,
    )
    await listener.start()
    try:
        yield listener, client
    finally:
        await listener.close()
        await client.aclose()


def records_at(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == LOGGER_NAME and record.levelno == level and text in record.getMessage()
    ]


async def wait_for_log(caplog: pytest.LogCaptureFixture, level: int, text: str, timeout: float) -> None:
    await async_wait_until(
        lambda: records_at(caplog, level, text), timeout=timeout, message=f"log record {text!r}"
    )


async def add_job(url: str, name: str = "work", data: dict | None = None, opts: dict | None = None, prefix: str = PREFIX) -> str:
    queue = Queue(QUEUE, {"connection": url, "prefix": prefix})
    try:
        job = await queue.add(name, data or {}, opts or {})
    finally:
        await queue.close()
    return str(job.id)


async def mark_finished(client: aioredis.Redis, job_id: str, state: str) -> None:
    """Move a waiting job to the completed or failed set, as a worker's moveToFinished leaves it."""
    await client.lrem(f"{PREFIX}:{QUEUE}:wait", 0, job_id)
    await client.zadd(f"{PREFIX}:{QUEUE}:{state}", {job_id: 1})
    field = "returnvalue" if state == "completed" else "failedReason"
    await client.hset(f"{PREFIX}:{QUEUE}:{job_id}", mapping={field: '"done"', "finishedOn": 1})


def cancel_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sandbox_runtime")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_cancel_parser(subparsers)
    return parser.parse_args(["cancel", *argv])


# -- names ---------------------------------------------------------------------------------------


def test_channel_and_record_names() -> None:
    assert control_channel("bull", "media") == "bull:media:control"
    assert cancel_record_key("bull", "media", "42") == "bull:media:cancel:42"


# -- parse_control_message -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (cancel_message("42", "user asked"), CancelRequest(QUEUE, "42", "user asked")),
        (cancel_message("42", "user asked").decode(), CancelRequest(QUEUE, "42", "user asked")),
        (cancel_message(42, "numeric id"), CancelRequest(QUEUE, "42", "numeric id")),
        (cancel_message(7.0), CancelRequest(QUEUE, "7", DEFAULT_REASON)),
        (cancel_message("a:b"), CancelRequest(QUEUE, "a:b", DEFAULT_REASON)),
        (cancel_message("1", reason=None, retry=True), CancelRequest(QUEUE, "1", DEFAULT_REASON, retry=True)),
        (cancel_message("1", "x", retry=False), CancelRequest(QUEUE, "1", "x", retry=False)),
        (cancel_message("1", ""), CancelRequest(QUEUE, "1", DEFAULT_REASON)),
        (b'{"action":"cancel","jobId":"1","reason":null,"retry":null}', CancelRequest(QUEUE, "1", DEFAULT_REASON)),
        (cancel_message("1", "r\u00e9sum\u00e9", sender="api-3", at=123), CancelRequest(QUEUE, "1", "r\u00e9sum\u00e9")),
    ],
    ids=[
        "string-id",
        "str-payload",
        "numeric-id",
        "integral-float-id",
        "colon-in-id",
        "retry-true",
        "retry-false",
        "empty-reason",
        "null-reason-and-retry",
        "extra-fields",
    ],
)
def test_parse_valid_message(raw: bytes | str, expected: CancelRequest) -> None:
    request = parse_control_message(QUEUE, raw)
    assert request == expected
    assert request.origin == "channel"


@pytest.mark.parametrize(
    "raw",
    [b'{"action":"pause"}', b'{"action":"cancel-all","jobId":"1"}', b'{"action":"CANCEL","jobId":"1"}'],
)
def test_parse_unknown_action_returns_none(raw: bytes) -> None:
    assert parse_control_message(QUEUE, raw) is None


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b"not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"action":"cancel","jobId":"1"', "not valid JSON"),
        (b'{"action":"cancel","jobId":NaN}', "not valid JSON"),
        (b'{"action":"cancel","jobId":' + b"9" * 5000 + b"}", "not valid JSON"),
        (b"[" * 40000, "not valid JSON"),
        (b"[1,2]", "expected a JSON object, got an array"),
        (b'"cancel"', "expected a JSON object, got string"),
        (b"null", "expected a JSON object, got null"),
        (b'{"jobId":"1"}', '"action" is missing'),
        (b'{"action":5,"jobId":"1"}', '"action" must be a string'),
        (b'{"action":"cancel"}', '"jobId" is missing'),
        (b'{"action":"cancel","jobId":""}', '"jobId" must be a non-empty string or an integer'),
        (b'{"action":"cancel","jobId":null}', '"jobId" must be a non-empty string or an integer, got null'),
        (b'{"action":"cancel","jobId":true}', "got boolean true"),
        (b'{"action":"cancel","jobId":1.5}', "got number 1.5"),
        (b'{"action":"cancel","jobId":["1"]}', "got an array"),
        (b'{"action":"cancel","jobId":{"id":"1"}}', "got an object"),
        (b'{"action":"cancel","jobId":"1","reason":5}', '"reason" must be a string, got number 5'),
        (b'{"action":"cancel","jobId":"1","reason":["a"]}', '"reason" must be a string'),
        (b'{"action":"cancel","jobId":"1","retry":"yes"}', '"retry" must be true or false'),
        (b'{"action":"cancel","jobId":"1","retry":1}', '"retry" must be true or false'),
        (b'\xff\xfe{"action":"cancel"}', "not valid UTF-8"),
        (b'{"action":"cancel","jobId":"\xc3"}', "not valid UTF-8"),
        ('{"action":"cancel","jobId":"\ud800"}', "not encodable as UTF-8"),
        (b'{"action":"cancel","jobId":"1","reason":"' + b"x" * 70000 + b'"}', "over the limit of 65536 bytes"),
    ],
    ids=[
        "not-json",
        "empty",
        "truncated",
        "nan",
        "huge-integer",
        "deep-nesting",
        "array",
        "string",
        "null",
        "no-action",
        "numeric-action",
        "no-job-id",
        "empty-job-id",
        "null-job-id",
        "boolean-job-id",
        "fractional-job-id",
        "array-job-id",
        "object-job-id",
        "numeric-reason",
        "array-reason",
        "string-retry",
        "numeric-retry",
        "invalid-utf8-start",
        "truncated-utf8",
        "lone-surrogate",
        "oversized",
    ],
)
def test_parse_malformed_message_raises(raw: bytes | str, detail: str) -> None:
    with pytest.raises(MalformedControlMessage) as caught:
        parse_control_message(QUEUE, raw)
    assert detail in caught.value.detail
    assert detail in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_parse_honours_max_bytes() -> None:
    raw = cancel_message("1", "x" * 100)
    assert parse_control_message(QUEUE, raw, max_bytes=len(raw)) is not None
    with pytest.raises(MalformedControlMessage, match="over the limit of 50 bytes"):
        parse_control_message(QUEUE, raw, max_bytes=50)


# -- listener: delivery ----------------------------------------------------------------------------


def test_listener_delivers_published_cancel(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    recorder = CancelRecorder(active={"42"})

    async def scenario() -> None:
        async with running_listener(redis_url, recorder) as (listener, client):
            assert listener.channels == (CHANNEL,)
            receivers = await client.publish(CHANNEL, cancel_message("42", "user asked"))
            assert receivers == 1
            await async_wait_until(lambda: recorder.requests, timeout=DELIVERY_TIMEOUT_S, message="delivery")

    asyncio.run(scenario())
    assert recorder.requests == [CancelRequest(QUEUE, "42", "user asked", retry=False, origin="channel")]
    assert recorder.results == [True]
    received = records_at(caplog, logging.INFO, "cancel received: queue=media job=42 reason='user asked'")
    assert len(received) == 1


def test_listener_ignores_foreign_job(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    recorder = CancelRecorder(active={"1"})

    async def scenario() -> None:
        async with running_listener(redis_url, recorder) as (_listener, client):
            await client.publish(CHANNEL, cancel_message("99", "not mine"))
            await async_wait_until(lambda: recorder.requests, timeout=DELIVERY_TIMEOUT_S, message="delivery")
            assert not await client.exists(cancel_record_key(PREFIX, QUEUE, "99"))

    asyncio.run(scenario())
    assert recorder.requests == [CancelRequest(QUEUE, "99", "not mine")]
    assert recorder.results == [False]
    assert records_at(caplog, logging.DEBUG, "cancel for job 99 ignored: not running here")
    assert not records_at(caplog, logging.INFO, "cancel received")
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_listener_ignores_unknown_action(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    recorder = CancelRecorder(active={"1"})

    async def scenario() -> None:
        async with running_listener(redis_url, recorder) as (_listener, client):
            await client.publish(CHANNEL, b'{"action":"pause","jobId":"1"}')
            await client.publish(CHANNEL, cancel_message("1"))
            await async_wait_until(lambda: recorder.requests, timeout=DELIVERY_TIMEOUT_S, message="delivery")

    asyncio.run(scenario())
    assert recorder.requests == [CancelRequest(QUEUE, "1", DEFAULT_REASON)]
    assert records_at(caplog, logging.DEBUG, "unknown action ignored")
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_listener_awaits_async_on_cancel(redis_url: str) -> None:
    delivered: list[CancelRequest] = []

    async def on_cancel(request: CancelRequest) -> bool:
        await asyncio.sleep(0)
        delivered.append(request)
        return True

    async def scenario() -> None:
        client = shared_client(redis_url)
        listener = ControlListener(redis_url, PREFIX, [QUEUE], on_cancel, lambda: {QUEUE: ["3"]}, client)
        await listener.start()
        try:
            await client.publish(CHANNEL, cancel_message(3))
            await async_wait_until(lambda: delivered, timeout=DELIVERY_TIMEOUT_S, message="delivery")
        finally:
            await listener.close()
            await client.aclose()

    asyncio.run(scenario())
    assert delivered == [CancelRequest(QUEUE, "3", DEFAULT_REASON)]


def test_listener_survives_on_cancel_exception(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    recorder = CancelRecorder(active={"5"})
    recorder.raise_next = RuntimeError("supervisor bug")

    async def scenario() -> None:
        async with running_listener(redis_url, recorder) as (_listener, client):
            await client.publish(CHANNEL, cancel_message("5", "first"))
            await client.publish(CHANNEL, cancel_message("5", "second"))
            await async_wait_until(lambda: len(recorder.requests) == 2, timeout=DELIVERY_TIMEOUT_S, message="two deliveries")

    asyncio.run(scenario())
    assert [request.reason for request in recorder.requests] == ["first", "second"]
    failures = records_at(caplog, logging.ERROR, "on_cancel failed for job 5")
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert records_at(caplog, logging.INFO, "cancel received: queue=media job=5 reason='second'")


def test_listener_start_fails_without_redis() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"

    async def scenario() -> None:
        client = aioredis.from_url(url)
        listener = ControlListener(url, PREFIX, [QUEUE], lambda request: True, lambda: {}, client)
        try:
            with pytest.raises(aioredis.ConnectionError):
                await listener.start()
        finally:
            await listener.close()
            await client.aclose()

    asyncio.run(scenario())


def test_listener_rejects_invalid_arguments(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    with pytest.raises(ValueError, match="queues is empty"):
        ControlListener(redis_url, PREFIX, [], lambda request: True, lambda: {}, client)
    with pytest.raises(ValueError, match="sweep_interval_s=0"):
        ControlListener(redis_url, PREFIX, [QUEUE], lambda request: True, lambda: {}, client, sweep_interval_s=0)


# -- listener: malformed input ---------------------------------------------------------------------


def random_payloads(count: int, seed: int = 20240611) -> list[bytes]:
    """Build ``count`` payloads that are invalid, or valid cancels for jobs that are not running."""
    rng = random.Random(seed)
    templates: list[Callable[[], bytes]] = [
        lambda: rng.randbytes(rng.randint(0, 200)),
        lambda: b"{" * rng.randint(1, 50),
        lambda: b"[" * 30000,
        lambda: b'{"action":"cancel","jobId":' + str(rng.random()).encode() + b"}",
        lambda: b'{"action":"cancel","jobId":' + json.dumps(rng.choice([None, True, [], {}, ""])).encode() + b"}",
        lambda: b'{"action":"cancel","jobId":"1","reason":' + str(rng.randint(0, 9)).encode() + b"}",
        lambda: b'{"action":"cancel","jobId":"1","retry":"' + rng.randbytes(4).hex().encode() + b'"}',
        lambda: b'{"action":' + str(rng.randint(0, 99)).encode() + b"}",
        lambda: json.dumps(rng.choice([[1, 2], "text", 3.5, None, True])).encode(),
        lambda: cancel_message("1")[: rng.randint(1, 20)],
        lambda: b"\xc3\x28" + cancel_message("1"),
        lambda: b'{"action":"cancel","jobId":"1","reason":"' + b"y" * 70000 + b'"}',
        lambda: json.dumps({"action": rng.choice(["stop", "pause", "resume"]), "jobId": "1"}).encode(),
        lambda: cancel_message(f"ghost-{rng.randint(0, 10**6)}"),
    ]
    return [rng.choice(templates)() for _ in range(count)]


def test_listener_survives_malformed_flood(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    recorder = CancelRecorder(active={"real"})
    payloads = random_payloads(1000)

    async def scenario() -> None:
        async with running_listener(redis_url, recorder) as (_listener, client):
            async with client.pipeline(transaction=False) as pipe:
                for payload in payloads:
                    pipe.publish(CHANNEL, payload)
                receivers = await pipe.execute()
            assert receivers == [1] * len(payloads)
            await client.publish(CHANNEL, cancel_message("real", "after the flood"))
            await async_wait_until(
                lambda: recorder.requests_for("real"), timeout=30.0, message="the cancel sent after the flood"
            )

    asyncio.run(scenario())
    assert recorder.requests_for("real") == [CancelRequest(QUEUE, "real", "after the flood")]
    warnings = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert 1 <= len(warnings) <= 30
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert not records_at(caplog, logging.WARNING, "connection lost")


def test_malformed_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER_NAME)

    async def scenario() -> None:
        warnings = control._MalformedWarnings(limit=3, window_s=0.2)
        for index in range(10):
            warnings.report(CHANNEL, "not valid JSON", b"x" * index)
        await wait_for_log(caplog, logging.WARNING, "dropped 7 malformed control messages", timeout=5.0)

    asyncio.run(scenario())
    assert len(records_at(caplog, logging.WARNING, "malformed control message on bull:media:control dropped")) == 3
    assert len(records_at(caplog, logging.WARNING, "dropped 7 malformed control messages in the last 0.2 s")) == 1


def test_malformed_warning_shows_short_payload(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    recorder = CancelRecorder(active={"1"})

    async def scenario() -> None:
        async with running_listener(redis_url, recorder) as (_listener, client):
            await client.publish(CHANNEL, b"z" * 5000)
            await client.publish(CHANNEL, cancel_message("1"))
            await async_wait_until(lambda: recorder.requests, timeout=DELIVERY_TIMEOUT_S, message="delivery")

    asyncio.run(scenario())
    (warning,) = records_at(caplog, logging.WARNING, "malformed control message")
    text = warning.getMessage()
    assert "not valid JSON" in text
    assert "(5000 in total)" in text
    assert len(text) < 300


# -- listener: reconnection ------------------------------------------------------------------------


def test_listener_resubscribes_after_client_kill(fresh_redis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    recorder = CancelRecorder(active={"5"})

    async def scenario() -> None:
        async with running_listener(fresh_redis.url, recorder) as (_listener, client):
            killed = await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            assert killed == 1
            await wait_for_log(caplog, logging.INFO, "control channel resubscribed", RECONNECT_TIMEOUT_S)
            assert await client.publish(CHANNEL, cancel_message("5", "after kill")) == 1
            await async_wait_until(lambda: recorder.requests, timeout=DELIVERY_TIMEOUT_S, message="delivery")

    asyncio.run(scenario())
    assert recorder.requests == [CancelRequest(QUEUE, "5", "after kill")]
    assert len(records_at(caplog, logging.WARNING, "control channel connection lost")) == 1


def test_listener_resubscribes_after_redis_restart(fresh_redis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    recorder = CancelRecorder(active={"6"})

    async def scenario() -> None:
        async with running_listener(fresh_redis.url, recorder) as (_listener, client):
            # Called on the event loop's thread on purpose: the server must not be tied to a
            # worker thread, and the listener only needs to notice the restart afterwards.
            fresh_redis.restart()
            await wait_for_log(caplog, logging.WARNING, "control channel connection lost", RECONNECT_TIMEOUT_S)
            await wait_for_log(caplog, logging.INFO, "control channel resubscribed", RECONNECT_TIMEOUT_S)
            assert await client.publish(CHANNEL, cancel_message("6", "after restart")) == 1
            await async_wait_until(lambda: recorder.requests, timeout=DELIVERY_TIMEOUT_S, message="delivery")

    asyncio.run(scenario())
    assert recorder.requests == [CancelRequest(QUEUE, "6", "after restart")]


def test_sweep_delivers_record_after_resubscribe(fresh_redis, caplog: pytest.LogCaptureFixture) -> None:
    """A cancel published while the listener was not subscribed still arrives through its record."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    recorder = CancelRecorder()

    async def scenario() -> None:
        # The periodic sweep is effectively off, so only the sweep after resubscribing can deliver.
        async with running_listener(fresh_redis.url, recorder, sweep_interval_s=3600.0) as (listener, client):
            await async_wait_until(lambda: recorder.active_jobs_calls >= 1, message="the sweep after start")
            await record_cancel(client, PREFIX, QUEUE, "8", "missed message")
            recorder.active[QUEUE].add("8")
            assert recorder.requests == []

            await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            await async_wait_until(lambda: recorder.requests, timeout=RECONNECT_TIMEOUT_S, message="delivery by the sweep")

            # Later sweeps do not deliver or log the same record again.
            await listener.sweep()
            await listener.sweep()

    asyncio.run(scenario())
    assert recorder.requests == [CancelRequest(QUEUE, "8", "missed message", retry=False, origin="record")]
    assert len(records_at(caplog, logging.INFO, "cancel received: queue=media job=8")) == 1
    resubscribed = records_at(caplog, logging.INFO, "control channel resubscribed")
    received = records_at(caplog, logging.INFO, "cancel received: queue=media job=8")
    assert resubscribed[0].created <= received[0].created


def test_periodic_sweep_delivers_once_while_active(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    recorder = CancelRecorder(active={"3"})

    async def scenario() -> None:
        async with running_listener(redis_url, recorder, sweep_interval_s=0.05) as (_listener, client):
            await record_cancel(client, PREFIX, QUEUE, "3", "from record", retry=True)
            await async_wait_until(lambda: recorder.requests, timeout=DELIVERY_TIMEOUT_S, message="delivery by the sweep")
            calls = recorder.active_jobs_calls
            await async_wait_until(lambda: recorder.active_jobs_calls >= calls + 5, message="five more sweeps")
            assert len(recorder.requests) == 1

            # A job that stops running is forgotten, so a later attempt of it is cancelled again.
            recorder.active[QUEUE].clear()
            calls = recorder.active_jobs_calls
            await async_wait_until(lambda: recorder.active_jobs_calls >= calls + 2, message="two sweeps without the job")
            recorder.active[QUEUE].add("3")
            await async_wait_until(lambda: len(recorder.requests) == 2, timeout=DELIVERY_TIMEOUT_S, message="second delivery")

    asyncio.run(scenario())
    expected = CancelRequest(QUEUE, "3", "from record", retry=True, origin="record")
    assert recorder.requests == [expected, expected]
    assert len(records_at(caplog, logging.INFO, "cancel received: queue=media job=3")) == 2


def test_sweep_skips_channel_delivered_job(redis_url: str) -> None:
    recorder = CancelRecorder()

    async def scenario() -> None:
        async with running_listener(redis_url, recorder) as (listener, client):
            # The sweep after start finds no active job; from then on only the test triggers sweeps.
            await async_wait_until(lambda: recorder.active_jobs_calls >= 1, message="the sweep after start")
            recorder.active[QUEUE].add("4")
            await record_cancel(client, PREFIX, QUEUE, "4", "both ways")
            await client.publish(CHANNEL, cancel_message("4", "both ways"))
            await async_wait_until(lambda: recorder.requests, timeout=DELIVERY_TIMEOUT_S, message="delivery")
            await listener.sweep()

    asyncio.run(scenario())
    assert recorder.requests == [CancelRequest(QUEUE, "4", "both ways", origin="channel")]


def test_sweep_failure_logged_once_per_outage(fresh_redis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    recorder = CancelRecorder(active={"9"})

    async def scenario() -> None:
        async with running_listener(fresh_redis.url, recorder, sweep_interval_s=0.05):
            fresh_redis.kill()
            calls = recorder.active_jobs_calls
            await async_wait_until(lambda: recorder.active_jobs_calls >= calls + 4, timeout=30.0, message="four sweeps during the outage")
            assert len(records_at(caplog, logging.WARNING, "cancel record sweep failed")) == 1
            fresh_redis.start()
            await wait_for_log(caplog, logging.INFO, "cancel record sweep recovered", RECONNECT_TIMEOUT_S)
            await wait_for_log(caplog, logging.INFO, "control channel resubscribed", RECONNECT_TIMEOUT_S)

    asyncio.run(scenario())
    assert len(records_at(caplog, logging.WARNING, "cancel record sweep failed")) == 1
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_sweep_warns_once_about_invalid_record(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    recorder = CancelRecorder(active={"2"})

    async def scenario() -> None:
        async with running_listener(redis_url, recorder) as (listener, client):
            await client.set(cancel_record_key(PREFIX, QUEUE, "2"), b"garbage")
            await listener.sweep()
            await listener.sweep()

    asyncio.run(scenario())
    assert recorder.requests == []
    assert len(records_at(caplog, logging.WARNING, "cancel record bull:media:cancel:2 is invalid")) == 1


# -- records ---------------------------------------------------------------------------------------


def test_record_fetch_and_clear(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        client = aioredis.from_url(redis_url, decode_responses=True)
        try:
            await record_cancel(client, PREFIX, QUEUE, "11", "first", ttl_s=600)
            await record_cancel(client, PREFIX, QUEUE, "12", "second", retry=True)
            await client.set(cancel_record_key(PREFIX, QUEUE, "13"), "[]")

            stored = json.loads(await client.get(cancel_record_key(PREFIX, QUEUE, "11")))
            assert stored["jobId"] == "11"
            assert stored["reason"] == "first"
            assert stored["retry"] is False
            assert isinstance(stored["requestedAt"], int)
            assert 0 < await client.ttl(cancel_record_key(PREFIX, QUEUE, "11")) <= 600
            assert 600 < await client.ttl(cancel_record_key(PREFIX, QUEUE, "12")) <= 86400

            found = await fetch_cancel_records(client, PREFIX, QUEUE, ["11", "12", "13", "14"])
            assert found == {
                "11": CancelRequest(QUEUE, "11", "first", retry=False, origin="record"),
                "12": CancelRequest(QUEUE, "12", "second", retry=True, origin="record"),
            }
            assert await fetch_cancel_records(client, PREFIX, QUEUE, []) == {}

            assert await clear_cancel_record(client, PREFIX, QUEUE, "11") is True
            assert await clear_cancel_record(client, PREFIX, QUEUE, "11") is False
            assert await fetch_cancel_records(client, PREFIX, QUEUE, ["11"]) == {}

            with pytest.raises(ValueError, match="ttl_s=0"):
                await record_cancel(client, PREFIX, QUEUE, "15", "x", ttl_s=0)
        finally:
            await client.aclose()

    asyncio.run(scenario())
    assert records_at(caplog, logging.WARNING, "cancel record bull:media:cancel:13 is invalid")


# -- request_cancel and wait_for_final_state ---------------------------------------------------------


def test_request_cancel_missing_job(redis_url: str) -> None:
    async def scenario() -> None:
        client = aioredis.from_url(redis_url)
        try:
            outcome = await request_cancel(client, PREFIX, QUEUE, "404", "gone")
            assert outcome.status == "not_found"
            assert outcome.state is None
            assert not await client.exists(cancel_record_key(PREFIX, QUEUE, "404"))
        finally:
            await client.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("state", ["completed", "failed"])
def test_request_cancel_finished_job(redis_url: str, state: str) -> None:
    async def scenario() -> None:
        client = aioredis.from_url(redis_url)
        try:
            job_id = await add_job(redis_url)
            await mark_finished(client, job_id, state)
            outcome = await request_cancel(client, PREFIX, QUEUE, job_id, "too late")
            assert outcome.status == "finished"
            assert outcome.state == state
            assert not await client.exists(cancel_record_key(PREFIX, QUEUE, job_id))
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_request_cancel_waiting_job(redis_url: str) -> None:
    recorder = CancelRecorder()

    async def scenario() -> None:
        async with running_listener(redis_url, recorder) as (_listener, client):
            job_id = await add_job(redis_url)
            outcome = await request_cancel(client, PREFIX, QUEUE, job_id, "changed my mind", retry=True, ttl_s=120)
            assert outcome.status == "requested"
            assert outcome.state == "waiting"
            assert outcome.lock_held is False
            assert outcome.receivers == 1
            assert outcome.promoted is False
            assert 0 < await client.ttl(cancel_record_key(PREFIX, QUEUE, job_id)) <= 120
            record = await fetch_cancel_records(client, PREFIX, QUEUE, [job_id])
            assert record[job_id] == CancelRequest(QUEUE, job_id, "changed my mind", retry=True, origin="record")
            await async_wait_until(lambda: recorder.requests, timeout=DELIVERY_TIMEOUT_S, message="the published message")
            assert recorder.requests == [CancelRequest(QUEUE, job_id, "changed my mind", retry=True)]

    asyncio.run(scenario())


def test_request_cancel_promotes_delayed_job(redis_url: str) -> None:
    async def scenario() -> None:
        client = aioredis.from_url(redis_url)
        try:
            job_id = await add_job(redis_url, opts={"delay": 3_600_000})
            outcome = await request_cancel(client, PREFIX, QUEUE, job_id, "not needed")
            assert outcome.status == "requested"
            assert outcome.state == "delayed"
            assert outcome.promoted is True
            assert outcome.receivers == 0
            queue = Queue(QUEUE, {"connection": redis_url, "prefix": PREFIX})
            try:
                assert await queue.getJobState(job_id) == "waiting"
            finally:
                await queue.close()
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_request_cancel_rejects_oversized_reason(redis_url: str) -> None:
    async def scenario() -> None:
        client = aioredis.from_url(redis_url)
        try:
            job_id = await add_job(redis_url)
            with pytest.raises(ValueError, match="shorten the reason"):
                await request_cancel(client, PREFIX, QUEUE, job_id, "x" * 70000)
            assert not await client.exists(cancel_record_key(PREFIX, QUEUE, job_id))
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_wait_for_final_state_outcomes(redis_url: str) -> None:
    async def scenario() -> None:
        client = aioredis.from_url(redis_url)
        try:
            running = await add_job(redis_url)
            final = await wait_for_final_state(client, PREFIX, QUEUE, running, timeout_s=0.2)
            assert final == ("waiting", None, None)

            failed = await add_job(redis_url)
            logs = f"{PREFIX}:{QUEUE}:{failed}:logs"
            await client.rpush(logs, "sandbox-runtime: cancel sent to the child", "user line")
            await client.rpush(logs, *[f"user line {index}" for index in range(250)])
            await client.rpush(logs, "sandbox-runtime: SIGTERM sent to the process group", "after")
            await client.rpush(logs, *[f"user line {index}" for index in range(150)])
            await mark_finished(client, failed, "failed")
            await client.hset(f"{PREFIX}:{QUEUE}:{failed}", "failedReason", "cancelled: stop")
            final = await wait_for_final_state(client, PREFIX, QUEUE, failed, timeout_s=5)
            assert final.state == "failed"
            assert final.failed_reason == "cancelled: stop"
            assert final.ladder_line == "sandbox-runtime: SIGTERM sent to the process group"

            removed = await add_job(redis_url)
            await client.delete(f"{PREFIX}:{QUEUE}:{removed}")
            await client.lrem(f"{PREFIX}:{QUEUE}:wait", 0, removed)
            assert await wait_for_final_state(client, PREFIX, QUEUE, removed, timeout_s=5) == ("removed", None, None)
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_last_ladder_line_scans_long_logs(redis_url: str) -> None:
    async def scenario() -> None:
        client = aioredis.from_url(redis_url, decode_responses=True)
        try:
            logs = f"{PREFIX}:{QUEUE}:77:logs"
            assert await last_ladder_line(client, PREFIX, QUEUE, "77") is None
            await client.rpush(logs, "sandbox-runtime: first step")
            await client.rpush(logs, *[f"line {index}" for index in range(399)])
            assert await last_ladder_line(client, PREFIX, QUEUE, "77") == "sandbox-runtime: first step"
        finally:
            await client.aclose()

    asyncio.run(scenario())


# -- CLI -------------------------------------------------------------------------------------------


def test_cancel_cli_parser() -> None:
    args = cancel_args("media", "42", "--reason", "stop now", "--retry", "--wait", "2.5", "--redis", "redis://h:1/0")
    assert (args.queue, args.job_id, args.reason, args.retry, args.wait) == ("media", "42", "stop now", True, 2.5)
    assert args.redis == "redis://h:1/0"
    assert args.config is None
    assert args.prefix is None

    defaults = cancel_args("media", "42")
    assert (defaults.reason, defaults.retry, defaults.wait) == (DEFAULT_REASON, False, None)


@pytest.mark.parametrize(
    "argv",
    [
        ["media", "42", "--redis", "redis://h:1/0", "--config", "x.toml"],
        ["media", "42", "--wait", "0"],
        ["media", "42", "--wait", "-1"],
        ["media", "42", "--wait", "soon"],
        ["media"],
    ],
    ids=["redis-and-config", "zero-wait", "negative-wait", "text-wait", "no-job-id"],
)
def test_cancel_cli_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cancel_args(*argv)
    assert caught.value.code == EXIT_USAGE


def test_cancel_cli_help_lists_exit_statuses() -> None:
    parser = argparse.ArgumentParser(prog="sandbox_runtime")
    cancel_parser = add_cancel_parser(parser.add_subparsers())
    text = cancel_parser.format_help()
    assert "exit status:" in text
    for status in range(6):
        assert f"\n  {status}  " in text


def test_cancel_cli_missing_job(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = run_cancel(cancel_args(QUEUE, "404", "--redis", redis_url))
    assert status == EXIT_NOT_FOUND
    assert "job 404 not found in queue 'media' (prefix 'bull')" in capsys.readouterr().out


def test_cancel_cli_finished_job(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    async def prepare() -> str:
        client = aioredis.from_url(redis_url)
        try:
            job_id = await add_job(redis_url)
            await mark_finished(client, job_id, "completed")
            return job_id
        finally:
            await client.aclose()

    job_id = asyncio.run(prepare())
    status = run_cancel(cancel_args(QUEUE, job_id, "--redis", redis_url))
    assert status == EXIT_FINISHED
    assert f"job {job_id} had already completed: nothing was recorded" in capsys.readouterr().out


def test_cancel_cli_waiting_job(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    job_id = asyncio.run(add_job(redis_url))
    status = run_cancel(cancel_args(QUEUE, job_id, "--redis", redis_url, "--reason", "cli test"))
    assert status == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"job {job_id} found in queue 'media' (prefix 'bull'): state waiting"
    assert lines[1] == "not held by any supervisor (it will be cancelled when a supervisor claims it)"
    assert lines[2].startswith(f"cancel recorded at bull:media:cancel:{job_id} (expires in 86400 s)")
    assert lines[2].endswith("published on bull:media:control: 0 receiver(s)")

    async def read_record() -> dict:
        client = aioredis.from_url(redis_url)
        try:
            return await fetch_cancel_records(client, PREFIX, QUEUE, [job_id])
        finally:
            await client.aclose()

    assert asyncio.run(read_record())[job_id].reason == "cli test"


def test_cancel_cli_wait_times_out(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    job_id = asyncio.run(add_job(redis_url))
    status = run_cancel(cancel_args(QUEUE, job_id, "--redis", redis_url, "--wait", "0.3"))
    assert status == EXIT_STILL_RUNNING
    output = capsys.readouterr().out
    assert f"job {job_id} had not finished after 0.3 s: state waiting" in output
    assert "last ladder step: none" in output


def test_cancel_cli_redis_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    status = run_cancel(cancel_args(QUEUE, "1", "--redis", url))
    assert status == EXIT_REDIS_ERROR
    error = capsys.readouterr().err
    assert f"error: Redis at {url} failed" in error


def test_cancel_cli_config_without_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "no-url.toml"
    config.write_text('[redis]\nprefix = "jobs"\n\n[[queues]]\nname = "media"\nprocessor = "examples.media:transcode"\n')
    status = run_cancel(cancel_args(QUEUE, "1", "--config", str(config)))
    assert status == EXIT_USAGE
    error = capsys.readouterr().err
    assert f"config {config} has no [redis] url: pass --redis URL" in error
    assert "serve logs the address of its embedded Redis at start" in error


def test_cancel_cli_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = run_cancel(cancel_args(QUEUE, "1", "--config", str(tmp_path / "missing.toml")))
    assert status == EXIT_USAGE
    assert "not found" in capsys.readouterr().err


def test_cancel_cli_config_url_and_prefix(redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "sandbox.toml"
    config.write_text(
        f'[redis]\nurl = "{redis_url}"\nprefix = "jobs"\n\n[[queues]]\nname = "media"\nprocessor = "examples.media:transcode"\n'
    )
    job_id = asyncio.run(add_job(redis_url, prefix="jobs"))

    status = run_cancel(cancel_args(QUEUE, job_id, "--config", str(config)))
    assert status == EXIT_OK
    assert f"cancel recorded at jobs:media:cancel:{job_id}" in capsys.readouterr().out

    # An explicit --prefix wins over the config's.
    status = run_cancel(cancel_args(QUEUE, job_id, "--config", str(config), "--prefix", "bull"))
    assert status == EXIT_NOT_FOUND


def test_cancel_cli_ends_running_job(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """End to end: a BullMQ worker with a listener plays the supervisor, and the CLI waits for the outcome."""
    running: dict[str, asyncio.Event] = {}
    reasons: dict[str, str] = {}

    def on_cancel(request: CancelRequest) -> bool:
        event = running.get(request.job_id)
        if event is None:
            return False
        reasons[request.job_id] = request.reason
        event.set()
        return True

    async def process(job, token):
        job_id = str(job.id)
        running[job_id] = asyncio.Event()
        await running[job_id].wait()
        await job.log("sandbox-runtime: cooperative cancel delivered to the child")
        raise UnrecoverableError(f"cancelled: {reasons[job_id]}")

    async def scenario() -> int:
        client = shared_client(redis_url)
        listener = ControlListener(
            redis_url, PREFIX, [QUEUE], on_cancel, lambda: {QUEUE: list(running)}, client, sweep_interval_s=0.2
        )
        await listener.start()
        worker = Worker(QUEUE, process, {"connection": redis_url, "prefix": PREFIX})
        try:
            job_id = await add_job(redis_url)
            await async_wait_until(lambda: job_id in running, timeout=DELIVERY_TIMEOUT_S, message="the worker taking the job")
            await async_wait_until(
                lambda: client.exists(f"{PREFIX}:{QUEUE}:{job_id}:lock"), timeout=DELIVERY_TIMEOUT_S, message="the job's lock"
            )
            args = cancel_args(QUEUE, job_id, "--redis", redis_url, "--reason", "user pressed stop", "--wait", "20")
            return await asyncio.to_thread(run_cancel, args)
        finally:
            await worker.close()
            await listener.close()
            await client.aclose()

    status = asyncio.run(scenario())
    output = capsys.readouterr().out
    assert status == EXIT_OK, output
    assert "state active" in output
    assert "held by a supervisor\n" in output
    assert "published on bull:media:control: 1 receiver(s)" in output
    assert "final state: failed" in output
    assert "failedReason: cancelled: user pressed stop" in output
    assert "last ladder step: sandbox-runtime: cooperative cancel delivered to the child" in output


def test_cancel_cli_job_completed_first(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A job whose processor returns instead of acting on the cancel ends completed, and the CLI exits 4."""

    async def scenario() -> int:
        finish = asyncio.Event()
        started_jobs: list[str] = []

        async def process(job, token):
            started_jobs.append(str(job.id))
            await finish.wait()
            return "done"

        def on_cancel(request: CancelRequest) -> bool:
            # This worker ignores cancels, so the job finishes normally.
            finish.set()
            return False

        client = shared_client(redis_url)
        listener = ControlListener(redis_url, PREFIX, [QUEUE], on_cancel, lambda: {QUEUE: started_jobs}, client)
        await listener.start()
        worker = Worker(QUEUE, process, {"connection": redis_url, "prefix": PREFIX})
        try:
            job_id = await add_job(redis_url)
            await async_wait_until(lambda: started_jobs, timeout=DELIVERY_TIMEOUT_S, message="the worker taking the job")
            args = cancel_args(QUEUE, job_id, "--redis", redis_url, "--wait", "20")
            return await asyncio.to_thread(run_cancel, args)
        finally:
            await worker.close()
            await listener.close()
            await client.aclose()

    status = asyncio.run(scenario())
    output = capsys.readouterr().out
    assert status == EXIT_FINISHED, output
    assert "final state: completed" in output


@pytest.mark.skipif(
    not (PROJECT_DIR / "sandbox_runtime" / "cli.py").exists() or not (PROJECT_DIR / "sandbox_runtime" / "__main__.py").exists(),
    reason="python -m sandbox_runtime is not wired yet (sandbox_runtime/cli.py or __main__.py is missing)",
)
def test_cancel_command_subprocess(redis_url: str) -> None:
    job_id = asyncio.run(add_job(redis_url))
    env = {key: value for key, value in os.environ.items() if key != "SANDBOX_RUNTIME_REDIS_URL"}

    found = subprocess.run(
        [sys.executable, "-m", "sandbox_runtime", "cancel", QUEUE, job_id, "--redis", redis_url, "--reason", "from a shell"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT_DIR,
        env=env,
    )
    assert found.returncode == EXIT_OK, found.stderr
    assert "not held by any supervisor" in found.stdout

    missing = subprocess.run(
        [sys.executable, "-m", "sandbox_runtime", "cancel", QUEUE, "no-such-job", "--redis", redis_url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT_DIR,
        env=env,
    )
    assert missing.returncode == EXIT_NOT_FOUND, missing.stderr

    help_text = subprocess.run(
        [sys.executable, "-m", "sandbox_runtime", "cancel", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT_DIR,
        env=env,
    )
    assert help_text.returncode == 0
    assert "exit status:" in help_text.stdout


# -- Node.js publishers ----------------------------------------------------------------------------


@pytest.mark.node
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["n-1", "from node"], CancelRequest(QUEUE, "n-1", "from node")),
        (["314", "numeric id", "--numeric-id"], CancelRequest(QUEUE, "314", "numeric id")),
        (["315"], CancelRequest(QUEUE, "315", DEFAULT_REASON)),
    ],
    ids=["string-id", "numeric-id", "no-reason"],
)
def test_listener_receives_node_publisher(node, redis_url: str, argv: list[str], expected: CancelRequest) -> None:
    recorder = CancelRecorder(active={expected.job_id})

    async def scenario() -> tuple[int, bytes, bytes]:
        async with running_listener(redis_url, recorder):
            process = await asyncio.create_subprocess_exec(
                node.executable,
                str(NODE_PUBLISHER),
                redis_url,
                CHANNEL,
                *argv,
                cwd=node.project_dir,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
            except TimeoutError:
                process.kill()
                await process.wait()
                raise
            if process.returncode == 0:
                await async_wait_until(lambda: recorder.requests, timeout=DELIVERY_TIMEOUT_S, message="delivery")
            return process.returncode, stdout, stderr

    returncode, stdout, stderr = asyncio.run(scenario())
    assert returncode == 0, stderr.decode()
    assert json.loads(stdout) == {"receivers": 1}
    assert recorder.requests == [expected]
