"""Test helpers: bounded waits on state, free ports, and readers for BullMQ's Redis keys.

Import them as ``from helpers import wait_until`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Awaitable, Callable, TypeVar

import redis

from sandbox_runtime.redis_server import find_free_port

T = TypeVar("T")

Message = str | Callable[[], str]


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: Message = "condition",
) -> T:
    """Call ``predicate`` until it returns a truthy value, and return that value.

    Raises AssertionError naming ``message`` (a string, or a callable that builds one at failure
    time, for example to show the current state) when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timeout_text(message, timeout, value))
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: Message = "condition",
) -> T:
    """Like ``wait_until``, for the event loop. ``predicate`` may be a plain or an async function."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timeout_text(message, timeout, value))
        await asyncio.sleep(interval)


def _timeout_text(message: Message, timeout: float, last_value: Any) -> str:
    text = message() if callable(message) else message
    return f"timed out after {timeout} s waiting for {text} (last value: {last_value!r})"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    return find_free_port()


def job_key(prefix: str, queue: str, job_id: str) -> str:
    """Return the Redis key of a BullMQ job's hash, ``{prefix}:{queue}:{job_id}``."""
    return f"{prefix}:{queue}:{job_id}"


def job_hash(client: redis.Redis, prefix: str, queue: str, job_id: str) -> dict[str, str]:
    """Read a BullMQ job's hash (fields such as ``data``, ``failedReason``, ``returnvalue``).

    Returns an empty dict when the job does not exist. Works with clients that decode
    responses and with clients that return bytes.
    """
    raw = client.hgetall(job_key(prefix, queue, job_id))
    return {_to_str(field): _to_str(value) for field, value in raw.items()}


def job_logs(client: redis.Redis, prefix: str, queue: str, job_id: str) -> list[str]:
    """Read a BullMQ job's log lines, oldest first, from ``{prefix}:{queue}:{job_id}:logs``."""
    raw = client.lrange(f"{job_key(prefix, queue, job_id)}:logs", 0, -1)
    return [_to_str(line) for line in raw]


def _to_str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
