"""The pipe protocol between the supervisor and a child process.

Every frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON: one object
whose ``kind`` names a message class below. JSON keeps the supervisor from ever unpickling
anything a child sends; the processor itself travels parent to child only.

Both sides import this module, so it depends on the standard library alone.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

HEADER = struct.Struct(">I")

# A frame carries at most one job's data or result. 512 MiB is far above any sane job payload and
# still stops a corrupt length prefix from making either side allocate gigabytes.
MAX_FRAME_BYTES = 512 * 1024 * 1024


class FrameError(Exception):
    """A frame could not be decoded: bad length, bad JSON, or an unknown ``kind``."""


_MESSAGE_TYPES: dict[str, type["Message"]] = {}


@dataclass(frozen=True)
class Message:
    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _MESSAGE_TYPES[cls.kind] = cls

    def to_dict(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        body["kind"] = self.kind
        return body


# Parent to child.


@dataclass(frozen=True)
class Init(Message):
    """First frame: what to load and how to set up the process before loading it."""

    kind: ClassVar[str] = "init"
    processor_ref: str | None = None
    processor_pickle: str | None = None  # base64 of cloudpickle bytes
    sys_path: list[str] = field(default_factory=list)
    core_dumps: bool = False
    address_space_limit_mb: int = 0
    no_new_privileges: bool = True
    cgroup_dir: str | None = None
    queue_name: str = ""


@dataclass(frozen=True)
class Start(Message):
    """Run one job. ``job`` contains the BullMQ job fields under BullMQ's names."""

    kind: ClassVar[str] = "start"
    job: dict[str, Any] = field(default_factory=dict)
    token: str | None = None
    workdir: str | None = None


@dataclass(frozen=True)
class Cancel(Message):
    """Abort the signal of the job ``job_id`` with ``reason``."""

    kind: ClassVar[str] = "cancel"
    job_id: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Stop(Message):
    """Exit once idle."""

    kind: ClassVar[str] = "stop"


# Child to parent.


@dataclass(frozen=True)
class Ready(Message):
    kind: ClassVar[str] = "ready"
    pid: int = 0
    arity: int = 0


@dataclass(frozen=True)
class LoadFailed(Message):
    """The processor could not be loaded. ``retryable`` is False when loading again cannot help."""

    kind: ClassVar[str] = "load_failed"
    exc_type: str = ""
    message: str = ""
    traceback: str = ""
    retryable: bool = True


@dataclass(frozen=True)
class Started(Message):
    kind: ClassVar[str] = "started"
    job_id: str = ""


@dataclass(frozen=True)
class CancelSeen(Message):
    """The child aborted the job's signal; ``seen_ns`` is the child's ``time.monotonic_ns()``."""

    kind: ClassVar[str] = "cancel_seen"
    job_id: str = ""
    seen_ns: int = 0


@dataclass(frozen=True)
class Progress(Message):
    kind: ClassVar[str] = "progress"
    job_id: str = ""
    value: Any = None


@dataclass(frozen=True)
class Log(Message):
    kind: ClassVar[str] = "log"
    job_id: str = ""
    text: str = ""


@dataclass(frozen=True)
class UpdateData(Message):
    kind: ClassVar[str] = "update_data"
    job_id: str = ""
    data: Any = None


@dataclass(frozen=True)
class AddResource(Message):
    """A resource the parent releases after the job: ``resource`` is ``path`` or ``process``."""

    kind: ClassVar[str] = "add_resource"
    job_id: str = ""
    resource: str = ""
    path: str | None = None
    pid: int | None = None
    create_time: float | None = None


@dataclass(frozen=True)
class Completed(Message):
    kind: ClassVar[str] = "completed"
    job_id: str = ""
    result: Any = None


@dataclass(frozen=True)
class Failed(Message):
    """The processor raised. ``aborted`` is True when the job's signal was aborted by then."""

    kind: ClassVar[str] = "failed"
    job_id: str = ""
    exc_type: str = ""
    message: str = ""
    traceback: str = ""
    unrecoverable: bool = False
    aborted: bool = False


@dataclass(frozen=True)
class Retire(Message):
    """The job left something running in the child (threads), so it must not run another job."""

    kind: ClassVar[str] = "retire"
    job_id: str = ""
    detail: str = ""


@dataclass(frozen=True)
class ResultInvalid(Message):
    """The processor returned a value that is not JSON-serialisable."""

    kind: ClassVar[str] = "result_invalid"
    job_id: str = ""
    detail: str = ""


def encode(message: Message) -> bytes:
    """Encode ``message`` as one frame. Raises TypeError or ValueError for non-JSON content."""
    body = json.dumps(message.to_dict(), allow_nan=False, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {len(body)} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> Message:
    """Decode one frame body (without its length prefix)."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"frame is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise FrameError(f"frame is not a JSON object: {body[:80]!r}")
    kind = raw.pop("kind", None)
    message_type = _MESSAGE_TYPES.get(kind)
    if message_type is None:
        raise FrameError(f"unknown message kind {kind!r} in frame {body[:80]!r}")
    try:
        return message_type(**raw)
    except TypeError as exc:
        raise FrameError(f"invalid fields for {kind!r}: {exc}") from exc


def check_length(length: int) -> None:
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"frame length {length} exceeds the limit of {MAX_FRAME_BYTES} bytes")


class BlockingConnection:
    """A frame reader and writer over a connected socket, for the child's threads.

    ``send`` may be called from any thread; a lock keeps frames whole.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()

    def send(self, message: Message) -> None:
        frame = encode(message)
        with self._send_lock:
            self._sock.sendall(frame)

    def receive(self) -> Message | None:
        """Return the next message, or None when the other side closed the connection."""
        header = self._receive_exactly(HEADER.size)
        if header is None:
            return None
        (length,) = HEADER.unpack(header)
        check_length(length)
        body = self._receive_exactly(length)
        if body is None:
            return None
        return decode(body)

    def _receive_exactly(self, size: int) -> bytes | None:
        chunks = []
        remaining = size
        while remaining:
            chunk = self._sock.recv(min(remaining, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
