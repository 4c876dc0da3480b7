"""Shared fixtures: real Redis servers, a check for leaked processes, and the Node.js environment."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import redis

from sandbox_runtime.redis_server import EmbeddedRedis

TESTS_DIR = Path(__file__).resolve().parent
NODE_PROJECT_DIR = TESTS_DIR / "node"
NODE_BULLMQ_DIR = NODE_PROJECT_DIR / "node_modules" / "bullmq"

# Every process started during a test inherits this variable with the test's own value. A
# process whose parent died is re-parented away from the test process, so children() no longer
# lists it, but the variable still identifies it.
TEST_TAG_VARIABLE = "SANDBOX_RUNTIME_TEST_TAG"

# How long processes started by a test may take to exit after the test returned.
LEAK_GRACE_S = 5.0
_LEAK_POLL_INTERVAL_S = 0.05

# psutil derives create_time from clock ticks (1/100 s), so compare with some margin.
_CREATE_TIME_MARGIN_S = 1.0

# Servers that outlive a single test; the leak check ignores their processes.
_shared_servers: list[EmbeddedRedis] = []


# -- Redis ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """An embedded Redis shared by the whole session. Tests must not stop or break it."""
    with EmbeddedRedis() as server:
        _shared_servers.append(server)
        yield server
        _shared_servers.remove(server)


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """URL of the shared Redis, emptied with FLUSHALL before the test."""
    if not redis_server.is_running:
        # A test broke the shared server despite the rule above; later tests still get a clean one.
        redis_server.start()

    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A synchronous client of the shared Redis that decodes responses to ``str``."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def fresh_redis() -> Iterator[EmbeddedRedis]:
    """A private embedded Redis for tests that restart, kill or otherwise break Redis."""
    with EmbeddedRedis() as server:
        yield server


# -- leaked processes ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves behind a process it started, then kill that process.

    Covers descendants of the test process and, through TEST_TAG_VARIABLE, orphans that were
    re-parented elsewhere. Processes that clear their environment and lose their parent escape it.
    """
    tag = uuid.uuid4().hex
    previous_tag = os.environ.get(TEST_TAG_VARIABLE)
    os.environ[TEST_TAG_VARIABLE] = tag
    started_at = time.time()
    existing = {process.pid for process in psutil.Process().children(recursive=True)}

    yield

    if previous_tag is None:
        os.environ.pop(TEST_TAG_VARIABLE, None)
    else:
        os.environ[TEST_TAG_VARIABLE] = previous_tag

    ignored = existing | {server.pid for server in _shared_servers if server.pid is not None}
    survivors = _wait_for_exit(_started_processes(tag, started_at, ignored), LEAK_GRACE_S)
    if not survivors:
        return

    described = [_describe(process) for process in survivors]
    for process in survivors:
        _kill_quietly(process)
    psutil.wait_procs(survivors, timeout=LEAK_GRACE_S)
    pytest.fail(
        f"{len(survivors)} process(es) started during the test were still running "
        f"{LEAK_GRACE_S} s after it ended and were killed: " + "; ".join(described)
    )


def _started_processes(tag: str, started_at: float, ignored: set[int]) -> list[psutil.Process]:
    found = {
        process.pid: process
        for process in psutil.Process().children(recursive=True)
        if process.pid not in ignored
    }

    # Orphans: any process created since the test began that carries this test's tag.
    for process in psutil.process_iter(["create_time"]):
        if process.pid in found or process.pid in ignored:
            continue
        if (process.info["create_time"] or 0) < started_at - _CREATE_TIME_MARGIN_S:
            continue
        try:
            if process.environ().get(TEST_TAG_VARIABLE) == tag:
                found[process.pid] = process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue

    return list(found.values())


def _wait_for_exit(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    running = [process for process in processes if _is_running(process)]
    while running and time.monotonic() < deadline:
        time.sleep(_LEAK_POLL_INTERVAL_S)
        running = [process for process in running if _is_running(process)]
    return running


def _is_running(process: psutil.Process) -> bool:
    # A zombie has exited and only waits to be reaped by its parent, so it is not a leaked process.
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(process: psutil.Process) -> str:
    try:
        command = " ".join(process.cmdline()) or process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        command = "?"
    return f"pid {process.pid}: {command}"


def _kill_quietly(process: psutil.Process) -> None:
    try:
        process.kill()
    except psutil.NoSuchProcess:
        pass


# -- Node.js -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRuntime:
    """The ``node`` executable and the npm project whose packages the interoperability tests use."""

    executable: str
    project_dir: Path

    @property
    def node_modules(self) -> Path:
        """The project's ``node_modules`` directory, for ``NODE_PATH`` when a script lives elsewhere."""
        return self.project_dir / "node_modules"


def _node_skip_reason() -> str | None:
    """Return why the Node.js tests cannot run here, or None when they can."""
    if shutil.which("node") is None:
        return "node is not on PATH; install Node.js to run the Node.js interoperability tests"
    if not NODE_BULLMQ_DIR.is_dir():
        return f"{NODE_BULLMQ_DIR} is missing; run `npm ci` in {NODE_PROJECT_DIR}"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("node") is None:
        return
    reason = _node_skip_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def node() -> NodeRuntime:
    """The Node.js runtime for interoperability tests. Skips the test when it is not installed."""
    reason = _node_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return NodeRuntime(executable=shutil.which("node"), project_dir=NODE_PROJECT_DIR)
