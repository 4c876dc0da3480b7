"""Child processes: spawning with a READY handshake, the framed pipe, output relay, and the pool.

A child is a fresh interpreter (``python -m child``), never a fork of the supervisor, so it
inherits no event loop, thread or Redis socket. Children are spawned from one long-lived thread:
the child's parent-death signal fires when the thread that created it exits, so that thread must
live as long as the supervisor.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import pwd
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import child as child_package
from child import protocol
from child.runtime import EXIT_PROTOCOL_BROKEN

from .config import SandboxSettings
from .errors import ChildStartError
from .tree import CgroupLeaf, CgroupRoot, ProcessTree

logger = logging.getLogger(__name__)
output_logger = logging.getLogger("sandbox_runtime.output")

# One thread spawns every child and never exits (ThreadPoolExecutor keeps idle workers alive), so
# no child gets its parent-death signal because a short-lived thread ended.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-runtime-spawner")

MAX_OUTPUT_LINE = 16 * 1024
CHILD_PACKAGE_ROOT = str(Path(child_package.__file__).resolve().parent.parent)
_REDIS_VARIABLE = re.compile("REDIS", re.IGNORECASE)


@dataclass(frozen=True)
class ProcessorSpec:
    """The processor a child loads: a ``module:function`` or ``file.py:function`` reference, or pickled bytes."""

    reference: str | None = None
    pickled: bytes | None = None

    @classmethod
    def from_processor(cls, processor: str | Callable[..., Any]) -> "ProcessorSpec":
        if isinstance(processor, str):
            target, sep, attribute = processor.rpartition(":")
            if sep and target.endswith(".py") and not os.path.isabs(target):
                # Children start in "/", so a relative file is resolved against the supervisor's cwd.
                processor = f"{os.path.abspath(target)}:{attribute}"
            return cls(reference=processor)
        import cloudpickle

        return cls(pickled=cloudpickle.dumps(processor))

    def describe(self) -> str:
        return self.reference or "<callable shipped with cloudpickle>"


class ProcessorLoadFailed(Exception):
    """The child could not load the processor. ``retryable`` is False when another try cannot help."""

    def __init__(self, exc_type: str, message: str, traceback: str, retryable: bool) -> None:
        super().__init__(f"{exc_type}: {message}")
        self.exc_type = exc_type
        self.message = message
        self.traceback = traceback
        self.retryable = retryable


def build_child_env(sandbox: SandboxSettings, redis_url: str | None) -> dict[str, str]:
    """Return the child's environment: the supervisor's, minus what configures its Redis, plus ``sandbox.env``."""
    env = dict(os.environ)
    if not sandbox.inherit_redis_env:
        secrets = _redis_secrets(redis_url)
        for name in list(env):
            value = env[name]
            if _REDIS_VARIABLE.search(name) or any(secret in value for secret in secrets):
                del env[name]
    env.update(sandbox.env)
    env["PYTHONUNBUFFERED"] = "1"
    python_path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = CHILD_PACKAGE_ROOT + (os.pathsep + python_path if python_path else "")
    return env


def _redis_secrets(redis_url: str | None) -> list[str]:
    if not redis_url:
        return []
    secrets = [redis_url]
    from urllib.parse import urlsplit

    password = urlsplit(redis_url).password
    if password and len(password) >= 4:
        secrets.append(password)
    return secrets


class ChildProcess:
    """One running child: its process, protocol stream, output relay and exit status."""

    def __init__(self, popen: subprocess.Popen[bytes], tree: ProcessTree, cgroup: CgroupLeaf | None, queue_name: str) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.tree = tree
        self.cgroup = cgroup
        self.queue_name = queue_name
        self.messages: asyncio.Queue[protocol.Message | None] = asyncio.Queue()
        self.exited = asyncio.Event()
        self.current_job_id: str | None = None
        self.jobs_run = 0
        self.started_at = time.monotonic()
        self.idle_since = self.started_at
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pidfd: int | None = None
        self._sends: set[asyncio.Task[bool]] = set()
        self.protocol_error: str | None = None

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    @property
    def is_alive(self) -> bool:
        return not self.exited.is_set()

    async def attach(self, parent_socket: socket.socket) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=parent_socket, limit=1 << 20)
        self._tasks.append(asyncio.create_task(self._read_frames(reader)))
        for stream, name in ((self.popen.stdout, "stdout"), (self.popen.stderr, "stderr")):
            if stream is not None:
                self._tasks.append(asyncio.create_task(self._relay_output(stream, name)))
        self._watch_exit()

    async def send(self, message: protocol.Message) -> bool:
        """Send one frame; return False when the child's end is already closed."""
        if self._writer is None or self._writer.is_closing():
            return False
        try:
            self._writer.write(protocol.encode(message))
            await self._writer.drain()
            return True
        except (ConnectionError, OSError):
            return False

    def send_nowait(self, message: protocol.Message) -> None:
        """Queue one frame from synchronous code; frames keep their order."""
        task = asyncio.get_running_loop().create_task(self.send(message))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _read_frames(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                header = await reader.readexactly(protocol.HEADER.size)
                (length,) = protocol.HEADER.unpack(header)
                protocol.check_length(length)
                body = await reader.readexactly(length)
                self.messages.put_nowait(protocol.decode(body))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except protocol.FrameError as exc:
            logger.error("child pid %d sent an invalid frame, stopping it: %s", self.pid, exc)
            self.protocol_error = f"invalid protocol frame ({exc})"
            self.kill()
        finally:
            self.messages.put_nowait(None)

    async def _relay_output(self, stream: Any, name: str) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_OUTPUT_LINE * 4)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stream)
        pending = b""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._log_output_line(name, line)
                if len(pending) > MAX_OUTPUT_LINE:
                    self._log_output_line(name, pending)
                    pending = b""
            if pending:
                self._log_output_line(name, pending)
        finally:
            transport.close()

    def _log_output_line(self, stream_name: str, line: bytes) -> None:
        text = line[:MAX_OUTPUT_LINE].decode("utf-8", "replace").rstrip("\r")
        if len(line) > MAX_OUTPUT_LINE:
            text += f" ... ({len(line) - MAX_OUTPUT_LINE} more bytes)"
        output_logger.info("[job %s pid %d %s] %s", self.current_job_id or "-", self.pid, stream_name, text)

    def _watch_exit(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            # Kernels before 5.3 have no pidfd: wait in a thread instead.
            loop.run_in_executor(None, self._wait_blocking, loop)
            return
        loop.add_reader(self._pidfd, self._on_pidfd_readable)

    def _on_pidfd_readable(self) -> None:
        if self.popen.poll() is None:
            return
        loop = asyncio.get_running_loop()
        assert self._pidfd is not None
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self.exited.set()

    def _wait_blocking(self, loop: asyncio.AbstractEventLoop) -> None:
        self.popen.wait()
        loop.call_soon_threadsafe(self.exited.set)

    def kill(self) -> None:
        """SIGKILL the child's whole tree."""
        import signal

        self.tree.signal(signal.SIGKILL)

    async def kill_leftovers(self, timeout_s: float) -> int:
        """SIGKILL every process of the tree but the child itself; wait up to ``timeout_s`` until
        they are gone and reaped. Return how many were running."""
        import signal

        leftovers = self.tree.alive(include_root=False)
        if not leftovers:
            return 0
        self.tree.signal(signal.SIGKILL, include_root=False)
        deadline = time.monotonic() + timeout_s
        while self.tree.alive(include_root=False) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return len(leftovers)

    async def wait_exited(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        """Release the pipes and tasks of an exited child."""
        if self._writer is not None:
            self._writer.close()
        for task in self._tasks:
            if not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), 1.0)
                except (asyncio.TimeoutError, Exception):
                    task.cancel()
        if self.cgroup is not None:
            self.cgroup.remove()

    def describe_exit(self) -> str:
        """Return how the child ended, in the words of a job's failure reason."""
        if self.protocol_error is not None:
            return f"child crashed: {self.protocol_error}"
        code = self.returncode
        if code == EXIT_PROTOCOL_BROKEN:
            return "child crashed: protocol connection closed before the job ended"
        if code is None:
            return "child still running"
        if code < 0:
            import signal

            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"SIG{-code}"
            return f"child crashed: signal {name} ({-code})"
        return f"child exited: code {code} before returning a result"


class ChildPool:
    """The children of one queue: at most ``size`` alive, reused while they stay healthy."""

    def __init__(
        self,
        queue_name: str,
        spec: ProcessorSpec,
        sandbox: SandboxSettings,
        *,
        size: int,
        redis_url: str | None,
        sys_path: list[str],
        cgroup_root: CgroupRoot | None,
    ) -> None:
        self.queue_name = queue_name
        self.spec = spec
        self.sandbox = sandbox
        self.size = size
        self._env = build_child_env(sandbox, redis_url)
        self._python = sandbox.python or sys.executable
        self._sys_path = sys_path
        self._cgroup_root = cgroup_root
        self._idle: list[ChildProcess] = []
        self.children: set[ChildProcess] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self.spawned = 0

    async def acquire(self) -> ChildProcess:
        """Return an idle child, or spawn one. Raises ProcessorLoadFailed or ChildStartError."""
        while self._idle:
            child = self._idle.pop()
            if child.is_alive:
                return child
            await self._discard(child)
        return await self._spawn()

    def release(self, child: ChildProcess, reusable: bool) -> None:
        """Put ``child`` back for the next job, or retire it."""
        child.current_job_id = None
        limit = self.sandbox.max_jobs_per_child
        if reusable and child.is_alive and (limit == 0 or child.jobs_run < limit):
            child.idle_since = time.monotonic()
            self._idle.append(child)
            return
        if reusable and limit and child.jobs_run >= limit:
            logger.info("recycling child pid %d of queue %s after %d jobs (max_jobs_per_child)", child.pid, self.queue_name, child.jobs_run)
        task = asyncio.get_running_loop().create_task(self._retire(child))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def retire_idle(self, now: float) -> int:
        """Retire children idle for longer than ``sandbox.idle_timeout_s``; return how many."""
        timeout = self.sandbox.idle_timeout_s
        if not timeout:
            return 0
        expired = [child for child in self._idle if now - child.idle_since > timeout]
        for child in expired:
            self._idle.remove(child)
            logger.info("retiring child pid %d of queue %s: idle for %g s (sandbox.idle_timeout_s)", child.pid, self.queue_name, timeout)
            task = asyncio.get_running_loop().create_task(self._retire(child))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return len(expired)

    async def close(self) -> None:
        """Stop idle children and wait for retirements; busy children are the caller's to stop first."""
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._retire(child) for child in idle), return_exceptions=True)
        if self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)
        for child in list(self.children):
            child.kill()
            await child.wait_exited(5.0)
            await self._discard(child)

    async def _retire(self, child: ChildProcess) -> None:
        if child.is_alive:
            await child.send(protocol.Stop())
            if not await child.wait_exited(2.0):
                child.kill()
                await child.wait_exited(5.0)
        # Anything the child left behind (a daemon it started, say) goes with it.
        await child.kill_leftovers(5.0)
        await self._discard(child)

    async def _discard(self, child: ChildProcess) -> None:
        self.children.discard(child)
        child.tree.reap()
        await child.close()

    async def _spawn(self) -> ChildProcess:
        loop = asyncio.get_running_loop()
        parent_socket, child_socket = socket.socketpair()
        command, options = self._popen_arguments(child_socket.fileno())
        try:
            popen = await loop.run_in_executor(_SPAWNER, lambda: subprocess.Popen(command, **options))
        except OSError as exc:
            parent_socket.close()
            account = f" as user {self.sandbox.user}" if self.sandbox.user else ""
            raise ChildStartError(f"could not start {self._python}{account}: {exc}; set sandbox.python to an interpreter that account can run") from exc
        finally:
            child_socket.close()
        self.spawned += 1

        cgroup = self._cgroup_root.new_leaf() if self._cgroup_root is not None else None
        if cgroup is not None and not cgroup.add(popen.pid):
            cgroup.remove()
            cgroup = None
        child = ChildProcess(popen, ProcessTree(popen.pid, cgroup), cgroup, self.queue_name)
        self.children.add(child)
        await child.attach(parent_socket)

        try:
            await self._handshake(child, cgroup)
        except BaseException:
            child.kill()
            await child.wait_exited(5.0)
            await self._discard(child)
            raise
        logger.info("child pid %d started for queue %s (%s)", child.pid, self.queue_name, self.spec.describe())
        return child

    def _popen_arguments(self, child_fd: int) -> tuple[list[str], dict[str, Any]]:
        command = [self._python, "-m", "child", "--fd", str(child_fd), "--parent", str(os.getpid())]
        options: dict[str, Any] = dict(
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(child_fd,),
            close_fds=True,
            env=self._env,
            cwd="/",
            process_group=0,
        )
        if self.sandbox.user is not None:
            options["user"] = self.sandbox.user
            options["extra_groups"] = []
            # Without an explicit group the child would keep the supervisor's gid (0 for root).
            options["group"] = pwd.getpwnam(self.sandbox.user).pw_gid
        if self.sandbox.group is not None:
            options["group"] = self.sandbox.group
        return command, options

    async def _handshake(self, child: ChildProcess, cgroup: CgroupLeaf | None) -> None:
        init = protocol.Init(
            processor_ref=self.spec.reference,
            processor_pickle=base64.b64encode(self.spec.pickled).decode("ascii") if self.spec.pickled is not None else None,
            sys_path=self._sys_path,
            core_dumps=self.sandbox.core_dumps,
            address_space_limit_mb=self.sandbox.address_space_limit_mb,
            no_new_privileges=True,
            cgroup_dir=str(cgroup.path) if cgroup is not None else None,
            queue_name=self.queue_name,
        )
        await child.send(init)
        timeout = self.sandbox.start_timeout_s
        try:
            message = await asyncio.wait_for(child.messages.get(), timeout)
        except asyncio.TimeoutError:
            raise ChildStartError(
                f"child pid {child.pid} of queue {self.queue_name} sent no READY within {timeout:g} s "
                "(sandbox.start_timeout_s); loading the processor may be slow or stuck"
            ) from None
        if isinstance(message, protocol.Ready):
            return
        if isinstance(message, protocol.LoadFailed):
            raise ProcessorLoadFailed(message.exc_type, message.message, message.traceback, message.retryable)
        await child.wait_exited(5.0)
        raise ProcessorLoadFailed(
            "ChildStartError",
            f"{child.describe_exit()} while loading the processor",
            "",
            retryable=True,
        )


def sys_path_for_children(extra: list[str]) -> list[str]:
    """Return the import path entries a child puts first: the supervisor's cwd and ``extra``."""
    entries = [os.getcwd(), *extra]
    seen: list[str] = []
    for entry in entries:
        if entry and entry not in seen:
            seen.append(entry)
    return seen
