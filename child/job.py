"""The job object a processor receives in the child.

It carries the BullMQ job's fields under BullMQ's names. Its methods send a frame to the supervisor,
which performs the Redis write. They return at once with an awaitable that is already done, so
``job.log("x")`` and ``await job.log("x")`` both work.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Generator

from . import protocol


class _Done:
    """An awaitable that is already complete; returned by the job methods."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return None
        yield  # noqa: unreachable; makes this a generator

    def __repr__(self) -> str:
        return "<done>"


_DONE = _Done()


class SandboxedJob:
    """A BullMQ job as seen by a processor in a child process."""

    def __init__(self, fields: dict[str, Any], workdir: str | None, send: Callable[[protocol.Message], None]) -> None:
        self._send = send
        self.id: str = str(fields.get("id"))
        self.name: str = fields.get("name", "")
        self.data: Any = fields.get("data")
        self.opts: dict[str, Any] = fields.get("opts") or {}
        self.attemptsMade: int = fields.get("attemptsMade", 0)
        self.attemptsStarted: int = fields.get("attemptsStarted", 0)
        self.stalledCounter: int = fields.get("stalledCounter", 0)
        self.timestamp: int = fields.get("timestamp", 0)
        self.processedOn: int | None = fields.get("processedOn")
        self.progress: Any = fields.get("progress", 0)
        self.queueName: str = fields.get("queueName", "")
        self.token: str | None = fields.get("token")
        self.workdir: str | None = workdir

    def updateProgress(self, value: Any) -> _Done:
        """Set the job's progress (a number or a JSON object) in Redis."""
        self.progress = value
        self._send(protocol.Progress(job_id=self.id, value=value))
        return _DONE

    def log(self, text: str) -> _Done:
        """Append ``text`` to the job's log in Redis."""
        self._send(protocol.Log(job_id=self.id, text=str(text)))
        return _DONE

    def updateData(self, data: Any) -> _Done:
        """Replace the job's data in Redis."""
        self.data = data
        self._send(protocol.UpdateData(job_id=self.id, data=data))
        return _DONE

    def add_cleanup_path(self, path: str | os.PathLike[str]) -> None:
        """Have the supervisor delete ``path`` (file or directory tree) after the job, whatever its outcome."""
        self._send(protocol.AddResource(job_id=self.id, resource="path", path=os.path.abspath(os.fspath(path))))

    def add_cleanup_process(self, process: Any) -> None:
        """Have the supervisor kill a process after the job if it still runs.

        ``process`` is a pid or an object with a ``pid`` attribute (``subprocess.Popen``,
        ``multiprocessing.Process``). Its start time is recorded, so a reused pid is never killed.
        """
        pid = int(getattr(process, "pid", process))
        self._send(protocol.AddResource(job_id=self.id, resource="process", pid=pid, create_time=_start_time(pid)))

    # snake_case aliases for Python code that prefers them.
    update_progress = updateProgress
    update_data = updateData

    def __repr__(self) -> str:
        return f"SandboxedJob(id={self.id!r}, name={self.name!r}, queueName={self.queueName!r})"


def _start_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None
