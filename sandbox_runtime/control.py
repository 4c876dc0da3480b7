"""Remote cancellation: the control channel, durable cancel records, and the request API.

A cancel request reaches the supervisor that runs the job in two ways:

* a message on the pub/sub channel ``{prefix}:{queue}:control``, which arrives at once but is lost by a
  supervisor that is not subscribed at that moment (during a reconnect or a Redis restart);
* a record, the string key ``{prefix}:{queue}:cancel:{job_id}`` with a TTL, which ``ControlListener``
  reads for its active jobs every ``sweep_interval_s`` and after every (re)subscribe. A message lost
  during a reconnect therefore still cancels the job, one sweep later.

``request_cancel`` writes the record first, then publishes the message::

    {"action": "cancel", "jobId": "<id>", "reason": "<text>", "retry": true}

``jobId`` may also be a JSON integer, ``reason`` and ``retry`` are optional, and other fields are
ignored. A message with another ``action`` is ignored, so publishers can add actions that older
supervisors skip.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Collection, Mapping, NamedTuple, Sequence

import redis.asyncio as aioredis
from bullmq import Job, Queue
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .errors import SandboxRuntimeError

logger = logging.getLogger(__name__)

DEFAULT_REASON = "cancelled remotely"
MAX_MESSAGE_BYTES = 65536
DEFAULT_RECORD_TTL_S = 86400
LADDER_LOG_PREFIX = "sandbox-runtime:"
FINISHED_STATES = ("completed", "failed")

_RECONNECT_DELAY_MIN_S = 0.1
_RECONNECT_DELAY_MAX_S = 5.0
_RECONNECT_WARNING_INTERVAL_S = 60.0
_SUBSCRIBE_TIMEOUT_S = 10.0
_MALFORMED_WARNINGS_PER_WINDOW = 10
_MALFORMED_WINDOW_S = 10.0
_PAYLOAD_REPR_BYTES = 80
_LOG_SCAN_CHUNK = 100


# ---------------------------------------------------------------------------------------------------
# Key and channel names


def control_channel(prefix: str, queue: str) -> str:
    """Return the pub/sub channel that carries control messages for ``queue``."""
    return f"{prefix}:{queue}:control"


def cancel_record_key(prefix: str, queue: str, job_id: str) -> str:
    """Return the key of the durable cancel record of one job."""
    return f"{prefix}:{queue}:cancel:{job_id}"


def _job_key(prefix: str, queue: str, job_id: str) -> str:
    return f"{prefix}:{queue}:{job_id}"


def _lock_key(prefix: str, queue: str, job_id: str) -> str:
    return f"{prefix}:{queue}:{job_id}:lock"


def _logs_key(prefix: str, queue: str, job_id: str) -> str:
    return f"{prefix}:{queue}:{job_id}:logs"


# ---------------------------------------------------------------------------------------------------
# Messages and records


@dataclass(frozen=True)
class CancelRequest:
    """A request to cancel one job, read from the control channel or from a cancel record.

    ``retry`` True requests a failure that BullMQ may retry while attempts remain, instead of a final
    one. ``origin`` is ``"channel"`` or ``"record"``.
    """

    queue: str
    job_id: str
    reason: str
    retry: bool = False
    origin: str = "channel"


class MalformedControlMessage(SandboxRuntimeError, ValueError):
    """A control message or cancel record that cannot be parsed. ``detail`` names the problem."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def parse_control_message(
    queue: str, raw: bytes | str, max_bytes: int = MAX_MESSAGE_BYTES
) -> CancelRequest | None:
    """Parse one message published on the control channel of ``queue``.

    Returns a ``CancelRequest`` (origin ``"channel"``) for a valid cancel, and None for a JSON object
    whose ``action`` is another string. Raises ``MalformedControlMessage`` for anything else: more than
    ``max_bytes`` bytes, invalid UTF-8 or JSON, not an object, or a missing or invalid field.
    """
    fields = _decode_json_object(raw, max_bytes)

    if "action" not in fields:
        raise MalformedControlMessage('"action" is missing')
    action = fields["action"]
    if not isinstance(action, str):
        raise MalformedControlMessage(f'"action" must be a string, got {_describe_json(action)}')
    if action != "cancel":
        return None

    return CancelRequest(
        queue=queue,
        job_id=_read_job_id(fields),
        reason=_read_reason(fields),
        retry=_read_retry(fields),
        origin="channel",
    )


def encode_control_message(job_id: str, reason: str, retry: bool = False) -> str:
    """Return the JSON text of a cancel message; ``retry`` is included only when true."""
    message: dict[str, Any] = {"action": "cancel", "jobId": str(job_id), "reason": reason}
    if retry:
        message["retry"] = True
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def _parse_record(queue: str, job_id: str, raw: bytes | str) -> CancelRequest:
    """Parse a cancel record. The key names the job, so the record's own ``jobId`` is not read."""
    fields = _decode_json_object(raw, MAX_MESSAGE_BYTES)
    return CancelRequest(
        queue=queue,
        job_id=job_id,
        reason=_read_reason(fields),
        retry=_read_retry(fields),
        origin="record",
    )


def _reject_json_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _decode_json_object(raw: bytes | str, max_bytes: int) -> dict[str, Any]:
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError as error:
            raise MalformedControlMessage(f"not encodable as UTF-8 ({error.reason})") from error

    if len(raw) > max_bytes:
        raise MalformedControlMessage(f"{len(raw)} bytes is over the limit of {max_bytes} bytes")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MalformedControlMessage(f"not valid UTF-8 ({error.reason} at byte {error.start})") from error

    try:
        value = json.loads(text, parse_constant=_reject_json_constant)
    except json.JSONDecodeError as error:
        raise MalformedControlMessage(
            f"not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from error
    except ValueError as error:
        # NaN/Infinity, and integers longer than Python's int conversion limit.
        raise MalformedControlMessage(f"not valid JSON ({error})") from error
    except RecursionError as error:
        raise MalformedControlMessage("not valid JSON (nested too deeply)") from error

    if not isinstance(value, dict):
        raise MalformedControlMessage(f"expected a JSON object, got {_describe_json(value)}")
    return value


def _read_job_id(fields: Mapping[str, Any]) -> str:
    if "jobId" not in fields:
        raise MalformedControlMessage('"jobId" is missing')
    job_id = fields["jobId"]

    # Node publishers often send numeric ids, which BullMQ stores as their decimal text.
    if isinstance(job_id, bool):
        pass
    elif isinstance(job_id, int):
        return str(job_id)
    elif isinstance(job_id, float) and job_id.is_integer():
        return str(int(job_id))
    elif isinstance(job_id, str) and job_id:
        return job_id
    raise MalformedControlMessage(
        f'"jobId" must be a non-empty string or an integer, got {_describe_json(job_id)}'
    )


def _read_reason(fields: Mapping[str, Any]) -> str:
    reason = fields.get("reason")
    if reason is None or reason == "":
        return DEFAULT_REASON
    if not isinstance(reason, str):
        raise MalformedControlMessage(f'"reason" must be a string, got {_describe_json(reason)}')
    return reason


def _read_retry(fields: Mapping[str, Any]) -> bool:
    retry = fields.get("retry")
    if retry is None:
        return False
    if not isinstance(retry, bool):
        raise MalformedControlMessage(f'"retry" must be true or false, got {_describe_json(retry)}')
    return retry


def _describe_json(value: Any) -> str:
    """Name a decoded JSON value's type, with a short excerpt of scalars."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, (int, float)):
        return f"number {_clip(repr(value))}"
    if isinstance(value, str):
        return f"string {_clip(repr(value))}"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _short_repr(payload: Any) -> str:
    """Return the repr of the first bytes of a payload, with its full length when clipped."""
    if isinstance(payload, (bytes, str)) and len(payload) > _PAYLOAD_REPR_BYTES:
        return f"{payload[:_PAYLOAD_REPR_BYTES]!r}... ({len(payload)} in total)"
    return repr(payload)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# ---------------------------------------------------------------------------------------------------
# Durable records


async def record_cancel(
    redis: aioredis.Redis,
    prefix: str,
    queue: str,
    job_id: str,
    reason: str,
    retry: bool = False,
    ttl_s: float = DEFAULT_RECORD_TTL_S,
) -> None:
    """Write the cancel record of one job, replacing an older one, with a TTL of ``ttl_s`` seconds.

    Raises ValueError when ``ttl_s`` is not positive.
    """
    if not ttl_s > 0:
        raise ValueError(f"ttl_s={ttl_s!r} is invalid: the cancel record TTL must be a positive number of seconds")
    record = {
        "jobId": str(job_id),
        "reason": reason,
        "retry": bool(retry),
        "requestedAt": int(time.time() * 1000),
    }
    await redis.set(
        cancel_record_key(prefix, queue, job_id),
        json.dumps(record, ensure_ascii=False, separators=(",", ":")),
        ex=max(1, math.ceil(ttl_s)),
    )


async def fetch_cancel_records(
    redis: aioredis.Redis, prefix: str, queue: str, job_ids: Collection[str]
) -> dict[str, CancelRequest]:
    """Read the cancel records of ``job_ids`` with one MGET and return {job id: request} for those found.

    A record that cannot be parsed is logged at WARNING and left out.
    """
    requests, invalid = await _read_records(redis, prefix, queue, job_ids)
    for job_id, detail in invalid.items():
        logger.warning(
            "cancel record %s is invalid and was ignored: %s",
            cancel_record_key(prefix, queue, job_id),
            detail,
        )
    return requests


async def _read_records(
    redis: aioredis.Redis, prefix: str, queue: str, job_ids: Collection[str]
) -> tuple[dict[str, CancelRequest], dict[str, str]]:
    """Return ({job id: request}, {job id: problem with its record}) for the records found."""
    ids = [str(job_id) for job_id in job_ids]
    if not ids:
        return {}, {}
    values = await redis.mget([cancel_record_key(prefix, queue, job_id) for job_id in ids])

    requests: dict[str, CancelRequest] = {}
    invalid: dict[str, str] = {}
    for job_id, raw in zip(ids, values):
        if raw is None:
            continue
        try:
            requests[job_id] = _parse_record(queue, job_id, raw)
        except MalformedControlMessage as error:
            invalid[job_id] = f"{error.detail}; value {_short_repr(raw)}"
    return requests, invalid


async def clear_cancel_record(redis: aioredis.Redis, prefix: str, queue: str, job_id: str) -> bool:
    """Delete the cancel record of one job and return whether there was one."""
    return bool(await redis.delete(cancel_record_key(prefix, queue, job_id)))


# ---------------------------------------------------------------------------------------------------
# Requests from applications and the CLI


@dataclass(frozen=True)
class CancelOutcome:
    """Result of ``request_cancel``.

    ``status`` is ``"requested"`` (record written and message published), ``"not_found"`` (no job
    hash) or ``"finished"`` (already completed or failed, nothing written). ``state`` is the BullMQ
    state read before the request. ``lock_held`` is True when the job's lock key existed, so a worker
    was running it. ``receivers`` is the PUBLISH result: the number of clients subscribed to the channel.
    ``promoted`` is True when the job was delayed and was moved to waiting.
    """

    status: str
    queue: str
    job_id: str
    state: str | None = None
    lock_held: bool = False
    receivers: int = 0
    promoted: bool = False


class FinalState(NamedTuple):
    """Result of ``wait_for_final_state``."""

    state: str
    failed_reason: str | None
    ladder_line: str | None


def _bullmq_queue(redis: aioredis.Redis, prefix: str, queue: str) -> Queue:
    # The bullmq Queue wraps the caller's client and owns no other resource. It must not be closed,
    # because Queue.close() would close the caller's client.
    return Queue(queue, {"connection": redis, "prefix": prefix})


async def _job_state(bull_queue: Queue, job_id: str) -> str:
    state = await bull_queue.getJobState(job_id)
    return _text(state)


async def request_cancel(
    redis: aioredis.Redis,
    prefix: str,
    queue: str,
    job_id: str,
    reason: str = DEFAULT_REASON,
    retry: bool = False,
    ttl_s: float = DEFAULT_RECORD_TTL_S,
) -> CancelOutcome:
    """Request the cancel of one job from any process: record it, then publish it on the channel.

    A job that does not exist or has already finished gets no record. The record lets a supervisor
    that missed the message (reconnecting, or not running the job yet) cancel the job when it finds it.
    A record expires after ``ttl_s``, so a job that waits longer than that before a supervisor claims
    it runs normally. Raises ValueError when the message would exceed ``MAX_MESSAGE_BYTES``, and
    ``redis.exceptions.RedisError`` when Redis fails.
    """
    job_id = str(job_id)
    message = encode_control_message(job_id, reason, retry)
    size = len(message.encode("utf-8"))
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"the cancel message for job {job_id} is {size} bytes, over the limit of {MAX_MESSAGE_BYTES}"
            " bytes that supervisors accept: shorten the reason"
        )

    if not await redis.exists(_job_key(prefix, queue, job_id)):
        return CancelOutcome("not_found", queue, job_id)
    bull_queue = _bullmq_queue(redis, prefix, queue)
    state = await _job_state(bull_queue, job_id)
    if state in FINISHED_STATES:
        return CancelOutcome("finished", queue, job_id, state=state)

    lock_held = bool(await redis.exists(_lock_key(prefix, queue, job_id)))
    await record_cancel(redis, prefix, queue, job_id, reason, retry=retry, ttl_s=ttl_s)
    promoted = await _promote_if_delayed(bull_queue, job_id, state)
    receivers = int(await redis.publish(control_channel(prefix, queue), message))
    return CancelOutcome("requested", queue, job_id, state, lock_held, receivers, promoted)


async def _promote_if_delayed(bull_queue: Queue, job_id: str, state: str) -> bool:
    # A delayed job is moved to waiting at once, so a supervisor claims it soon, finds the record and
    # fails it as cancelled without running user code. Left delayed, it would wait out its delay, and
    # its record could expire first.
    if state != "delayed":
        return False
    # A bare Job handle is enough, because promote() needs only the id. Job.fromId would also read
    # the hash, and it misreads a client created without decode_responses=True.
    job = Job(bull_queue, "", None, {}, job_id)
    try:
        await job.promote()
    except TypeError as error:
        # bullmq raises TypeError when the job left the delayed set since its state was read.
        logger.debug("job %s was not promoted: %s", job_id, error)
        return False
    return True


async def wait_for_final_state(
    redis: aioredis.Redis,
    prefix: str,
    queue: str,
    job_id: str,
    timeout_s: float,
    poll_interval_s: float = 0.1,
) -> FinalState:
    """Poll one job until it is completed or failed, or until ``timeout_s`` seconds have passed.

    Returns (state, failedReason, last ladder line). ``state`` is ``"completed"`` or ``"failed"`` when
    the job finished, ``"removed"`` when its hash was deleted (for example by ``removeOnFail``), and
    otherwise the BullMQ state it had when the time ran out. ``failedReason`` is set only for
    ``"failed"``. The ladder line is the last job log line starting with ``"sandbox-runtime:"``.
    """
    job_id = str(job_id)
    bull_queue = _bullmq_queue(redis, prefix, queue)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, timeout_s)

    while True:
        state = await _job_state(bull_queue, job_id)
        if state in FINISHED_STATES:
            break
        if not await redis.exists(_job_key(prefix, queue, job_id)):
            state = "removed"
            break
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        await asyncio.sleep(min(poll_interval_s, remaining))

    failed_reason = None
    if state == "failed":
        raw_reason = await redis.hget(_job_key(prefix, queue, job_id), "failedReason")
        failed_reason = None if raw_reason is None else _text(raw_reason)
    ladder_line = await last_ladder_line(redis, prefix, queue, job_id)
    return FinalState(state, failed_reason, ladder_line)


async def last_ladder_line(redis: aioredis.Redis, prefix: str, queue: str, job_id: str) -> str | None:
    """Return the last log line of the job that starts with ``"sandbox-runtime:"``, or None."""
    key = _logs_key(prefix, queue, str(job_id))
    end = -1
    while True:
        chunk = await redis.lrange(key, end - _LOG_SCAN_CHUNK + 1, end)
        for raw in reversed(chunk):
            line = _text(raw)
            if line.startswith(LADDER_LOG_PREFIX):
                return line
        if len(chunk) < _LOG_SCAN_CHUNK:
            return None
        end -= _LOG_SCAN_CHUNK


# ---------------------------------------------------------------------------------------------------
# The listener


class _MalformedWarnings:
    """Log malformed control messages: at most ``limit`` warnings per window, then one count."""

    def __init__(self, limit: int = _MALFORMED_WARNINGS_PER_WINDOW, window_s: float = _MALFORMED_WINDOW_S):
        self._limit = limit
        self._window_s = window_s
        self._window_end: float | None = None
        self._warned = 0
        self._suppressed = 0
        self._summary_timer: asyncio.TimerHandle | None = None

    def report(self, channel: str, detail: str, payload: Any) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._window_end is None or now >= self._window_end:
            self.flush()
            self._window_end = now + self._window_s
            self._warned = 0

        if self._warned < self._limit:
            self._warned += 1
            logger.warning(
                "malformed control message on %s dropped: %s, payload %s", channel, detail, _short_repr(payload)
            )
            return

        self._suppressed += 1
        if self._summary_timer is None:
            self._summary_timer = loop.call_at(self._window_end, self.flush)

    def flush(self) -> None:
        """Log the count of messages dropped without a warning since the last flush, if any."""
        if self._summary_timer is not None:
            self._summary_timer.cancel()
            self._summary_timer = None
        if self._suppressed:
            logger.warning(
                "dropped %d malformed control messages in the last %g s without logging each"
                " (at most %d warnings per %g s)",
                self._suppressed,
                self._window_s,
                self._limit,
                self._window_s,
            )
            self._suppressed = 0


class ControlListener:
    """Receive cancel requests for ``queues`` from the control channels and the cancel records.

    ``on_cancel(request)`` returns True when this supervisor runs the job, and False otherwise. It
    should return quickly; an awaitable result is awaited. ``active_jobs()`` returns
    ``{queue: ids of the jobs running here}``, and the sweep reads the cancel records of those jobs.

    Pub/sub uses a connection of its own, opened from ``url``, because a subscribed connection accepts
    no other command. The sweep uses ``redis``, the caller's client. After the connection drops, the
    listener reconnects with exponential backoff (0.1 s doubling to 5 s), subscribes again and sweeps
    at once. Malformed messages and exceptions raised by ``on_cancel`` are logged and do not stop the
    listener.
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        queues: Sequence[str],
        on_cancel: Callable[[CancelRequest], bool | Awaitable[bool]],
        active_jobs: Callable[[], Mapping[str, Collection[str]]],
        redis: aioredis.Redis,
        sweep_interval_s: float = 2.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        if not queues:
            raise ValueError("queues is empty: the control listener needs at least one queue name")
        if not sweep_interval_s > 0:
            raise ValueError(f"sweep_interval_s={sweep_interval_s!r} is invalid: it must be a positive number")
        self._url = url
        self._prefix = prefix
        self._channels = {control_channel(prefix, queue): queue for queue in queues}
        self._on_cancel = on_cancel
        self._active_jobs = active_jobs
        self._redis = redis
        self._sweep_interval_s = sweep_interval_s
        self._max_message_bytes = max_message_bytes

        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._reader_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        self._sweep_requested = asyncio.Event()
        self._malformed = _MalformedWarnings()

        # (queue, job id) pairs: delivered to on_cancel with True, whose on_cancel raised, and whose
        # record is invalid. Each is kept only while the job is active, so each event is logged once.
        self._delivered: set[tuple[str, str]] = set()
        self._failed_deliveries: set[tuple[str, str]] = set()
        self._invalid_records: set[tuple[str, str]] = set()
        self._sweep_failing = False
        self._active_jobs_failing = False

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels this listener subscribes to."""
        return tuple(self._channels)

    async def start(self) -> None:
        """Subscribe to every channel, then start the reader and the sweep tasks.

        Returns once Redis has confirmed the subscriptions, so a message published afterwards is
        delivered. Raises ``redis.exceptions.RedisError`` or ``OSError`` when Redis cannot be reached.
        """
        if self._client is not None:
            raise RuntimeError("ControlListener.start() was already called")
        # No retry inside redis-py: an error must reach the reader loop, which reconnects, subscribes
        # again and sweeps. redis-py's own retry would resubscribe silently and skip the sweep.
        self._client = aioredis.from_url(
            self._url,
            retry=Retry(NoBackoff(), 0, supported_errors=()),
            socket_connect_timeout=_SUBSCRIBE_TIMEOUT_S,
            socket_timeout=_SUBSCRIBE_TIMEOUT_S,
            socket_keepalive=True,
        )
        try:
            await self._subscribe()
        except BaseException:
            await self._discard_pubsub()
            client, self._client = self._client, None
            await client.aclose()
            raise

        logger.info("control channel subscribed: %s", ", ".join(self._channels))
        self._sweep_requested.set()
        self._reader_task = asyncio.create_task(self._read_forever(), name="control-channel-reader")
        self._sweep_task = asyncio.create_task(self._sweep_forever(), name="cancel-record-sweep")

    async def close(self) -> None:
        """Stop the reader and sweep tasks and close the pub/sub connection. Calling it again is a no-op."""
        tasks = [task for task in (self._reader_task, self._sweep_task) if task is not None]
        self._reader_task = self._sweep_task = None
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                logger.error("control listener task had failed: %s: %s", type(result).__name__, result)

        self._malformed.flush()
        await self._discard_pubsub()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
            logger.info("control channel closed")

    async def sweep(self) -> None:
        """Deliver the cancel records of the active jobs that were not delivered yet.

        Runs every ``sweep_interval_s`` and after each (re)subscribe. It issues one MGET per queue and
        logs a Redis failure once per outage.
        """
        active = self._read_active_jobs()
        if active is None:
            return
        self._forget_inactive(active)

        for queue, job_ids in active.items():
            pending = [job_id for job_id in job_ids if (queue, job_id) not in self._delivered]
            if not pending:
                continue
            try:
                requests, invalid = await _read_records(self._redis, self._prefix, queue, pending)
            except (RedisError, OSError) as error:
                if not self._sweep_failing:
                    self._sweep_failing = True
                    logger.warning(
                        "cancel record sweep failed: %s: %s, retrying every %g s",
                        type(error).__name__,
                        error,
                        self._sweep_interval_s,
                    )
                return

            self._log_invalid_records(queue, invalid)
            for job_id in pending:
                request = requests.get(job_id)
                if request is not None:
                    await self._deliver(request)

        if self._sweep_failing:
            self._sweep_failing = False
            logger.info("cancel record sweep recovered")

    # -- subscription ------------------------------------------------------------------------------

    async def _subscribe(self) -> None:
        """Open a pub/sub connection, subscribe to every channel and wait for Redis to confirm each."""
        assert self._client is not None
        self._pubsub = self._client.pubsub()
        await self._pubsub.subscribe(*self._channels)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + _SUBSCRIBE_TIMEOUT_S
        unconfirmed = set(self._channels)
        while unconfirmed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"Redis did not confirm SUBSCRIBE {' '.join(sorted(unconfirmed))} within {_SUBSCRIBE_TIMEOUT_S:g} s"
                )
            message = await self._pubsub.get_message(timeout=remaining)
            if message is None:
                continue
            if message["type"] == "subscribe":
                unconfirmed.discard(_text(message["channel"]))
            else:
                await self._handle_message(message)

    async def _discard_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is None:
            return
        try:
            await pubsub.aclose()
        except (RedisError, OSError) as error:
            logger.debug("closing the old control channel connection failed: %s", error)

    async def _read_forever(self) -> None:
        while True:
            try:
                await self._read_messages()
            except Exception as error:
                # Whatever broke the connection, the way back is a fresh connection.
                logger.warning(
                    "control channel connection lost: %s: %s, reconnecting", type(error).__name__, error
                )
            await self._reconnect()

    async def _read_messages(self) -> None:
        while True:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if message is not None:
                await self._handle_message(message)

    async def _reconnect(self) -> None:
        await self._discard_pubsub()
        loop = asyncio.get_running_loop()
        started = last_warning = loop.time()
        delay = _RECONNECT_DELAY_MIN_S
        attempts = 0

        while True:
            await asyncio.sleep(delay)
            attempts += 1
            try:
                await self._subscribe()
            except Exception as error:
                await self._discard_pubsub()
                delay = min(delay * 2, _RECONNECT_DELAY_MAX_S)
                if loop.time() - last_warning >= _RECONNECT_WARNING_INTERVAL_S:
                    last_warning = loop.time()
                    logger.warning(
                        "control channel still reconnecting after %.0f s (%d attempts): %s: %s",
                        last_warning - started,
                        attempts,
                        type(error).__name__,
                        error,
                    )
                else:
                    logger.debug("control channel reconnect attempt %d failed: %s", attempts, error)
                continue

            logger.info(
                "control channel resubscribed after %.1f s (attempt %d)", loop.time() - started, attempts
            )
            self._sweep_requested.set()
            return

    # -- messages ----------------------------------------------------------------------------------

    async def _handle_message(self, message: Mapping[str, Any]) -> None:
        if message.get("type") != "message":
            return
        channel = _text(message["channel"])
        queue = self._channels.get(channel)
        if queue is None:
            return

        payload = message["data"]
        try:
            request = parse_control_message(queue, payload, self._max_message_bytes)
        except MalformedControlMessage as error:
            self._malformed.report(channel, error.detail, payload)
            return
        except Exception as error:
            # A bug in parsing must not take the reader down with it.
            self._malformed.report(channel, f"parsing failed: {type(error).__name__}: {error}", payload)
            return

        if request is None:
            logger.debug("control message with an unknown action ignored on %s", channel)
            return
        await self._deliver(request)

    async def _deliver(self, request: CancelRequest) -> None:
        pair = (request.queue, request.job_id)
        try:
            accepted = self._on_cancel(request)
            if inspect.isawaitable(accepted):
                accepted = await accepted
        except Exception:
            if pair in self._failed_deliveries:
                logger.debug("on_cancel failed again for job %s of queue %s", request.job_id, request.queue)
            else:
                self._failed_deliveries.add(pair)
                logger.exception(
                    "on_cancel failed for job %s of queue %s (origin %s)",
                    request.job_id,
                    request.queue,
                    request.origin,
                )
            return

        if not accepted:
            logger.debug(
                "cancel for job %s ignored: not running here (queue=%s, origin=%s)",
                request.job_id,
                request.queue,
                request.origin,
            )
            return
        self._delivered.add(pair)
        logger.info(
            "cancel received: queue=%s job=%s reason=%r origin=%s retry=%s",
            request.queue,
            request.job_id,
            request.reason,
            request.origin,
            request.retry,
        )

    # -- sweep -------------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._sweep_requested.wait(), timeout=self._sweep_interval_s)
            except TimeoutError:
                pass
            self._sweep_requested.clear()
            try:
                await self.sweep()
            except Exception:
                logger.exception("cancel record sweep failed")

    def _read_active_jobs(self) -> dict[str, list[str]] | None:
        try:
            snapshot = self._active_jobs()
            active = {str(queue): list(dict.fromkeys(str(job_id) for job_id in ids)) for queue, ids in snapshot.items()}
        except Exception:
            if not self._active_jobs_failing:
                self._active_jobs_failing = True
                logger.exception("active_jobs() failed, so cancel record sweeps are skipped until it succeeds")
            return None
        self._active_jobs_failing = False
        return active

    def _forget_inactive(self, active: Mapping[str, Collection[str]]) -> None:
        active_pairs = {(queue, job_id) for queue, job_ids in active.items() for job_id in job_ids}
        self._delivered &= active_pairs
        self._failed_deliveries &= active_pairs
        self._invalid_records &= active_pairs

    def _log_invalid_records(self, queue: str, invalid: Mapping[str, str]) -> None:
        for job_id, detail in invalid.items():
            if (queue, job_id) in self._invalid_records:
                continue
            self._invalid_records.add((queue, job_id))
            logger.warning(
                "cancel record %s is invalid and was ignored: %s",
                cancel_record_key(self._prefix, queue, job_id),
                detail,
            )
