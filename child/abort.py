"""AbortSignal for processors running in a child process.

The child's reader thread aborts the signal the moment a cancel frame arrives, so the signal works
while the processor's main thread is busy: sync code can poll ``aborted`` or block in
``wait_blocking``, async code can ``await signal.wait()``.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import asyncio

logger = logging.getLogger(__name__)


class AbortError(Exception):
    """Raised by ``AbortSignal.throw_if_aborted()``; ``reason`` is the cancel reason."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason or "the operation was aborted")
        self.reason = reason


class AbortSignal:
    """Tells a processor that its job was cancelled. Aborting happens once; the first reason stays."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._reason: str | None = None
        self._callbacks: list[Callable[[str | None], object]] = []
        self._waiters: list[tuple[Any, Any]] = []  # (event loop, future) of each pending wait()

    @property
    def aborted(self) -> bool:
        return self._event.is_set()

    @property
    def reason(self) -> str | None:
        return self._reason

    def throw_if_aborted(self) -> None:
        """Raise AbortError with the reason when the signal is aborted."""
        if self._event.is_set():
            raise AbortError(self._reason)

    def wait_blocking(self, timeout: float | None = None) -> bool:
        """Block until the signal aborts or ``timeout`` seconds pass; return ``aborted``."""
        return self._event.wait(timeout)

    async def wait(self) -> None:
        """Return once the signal is aborted."""
        # Imported here: asyncio costs a sync processor's child about 6 MiB and some start-up time.
        import asyncio

        loop = asyncio.get_running_loop()
        with self._lock:
            if self._event.is_set():
                return
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, future))
        try:
            await future
        finally:
            with self._lock:
                self._waiters = [(l, f) for (l, f) in self._waiters if f is not future]

    def on_abort(self, callback: Callable[[str | None], object]) -> None:
        """Call ``callback(reason)`` once when the signal aborts, or now if it already has.

        The callback runs on the child's reader thread, so it must be quick and thread-safe.
        An exception it raises is logged and ignored.
        """
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        _run_callback(callback, self._reason)

    def add_event_listener(self, event: str, callback: Callable[[str | None], object]) -> None:
        """Register ``callback`` for the ``abort`` event, as ``signal.addEventListener`` does in Node."""
        if event != "abort":
            raise ValueError(f"unknown event {event!r}: AbortSignal only emits 'abort'")
        self.on_abort(callback)

    def _abort(self, reason: str | None) -> bool:
        """Abort with ``reason``; return False when the signal was already aborted."""
        with self._lock:
            if self._event.is_set():
                return False
            self._reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future)
        for callback in callbacks:
            _run_callback(callback, reason)
        return True


def _resolve(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)


def _run_callback(callback: Callable[[str | None], object], reason: str | None) -> None:
    try:
        callback(reason)
    except Exception:
        logger.exception("abort callback %r raised", callback)


class AbortController:
    """The owner of an AbortSignal. The child runtime keeps one per job."""

    def __init__(self) -> None:
        self.signal = AbortSignal()

    def abort(self, reason: str | None = None) -> bool:
        return self.signal._abort(reason)
