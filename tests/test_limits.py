"""Sandbox limits and child hygiene: memory and CPU limits, child reuse, inherited descriptors and
environment, RLIMIT_CORE, an unprivileged account, and no leftover processes or threads after many
jobs that end badly.

Real Redis, real child processes. Processors come from ``tests.cleanup_processors``.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import psutil
import pytest
import redis

from sandbox_runtime.redis_server import find_redis_server
from tests.cleanup_hooks import HOOK_RECORD_VARIABLE, read_records
from tests.harness import add_job, bull_queue, job_logs, queue_config, run, supervised, wait_for_state
from tests.helpers import free_port, wait_until

logger = logging.getLogger(__name__)

C = "tests.cleanup_processors"
H = "tests.cleanup_hooks"
GRACE = {"cancel_grace_s": 1, "term_grace_s": 1}


# -- memory limit -------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_memory_limit_stops_child(redis_url, tmp_path, monkeypatch):
    """A processor that allocates 20 MiB every 100 ms under memory_limit_mb = 200 is SIGKILLed soon
    after its RSS crosses the limit, on every attempt. The next job runs in a fresh, small child."""
    limit_mib = 200
    max_mib = 600
    trace = tmp_path / "trace.jsonl"
    records_path = tmp_path / "hook-records.jsonl"
    monkeypatch.setenv(HOOK_RECORD_VARIABLE, str(records_path))

    async def scenario():
        queue = queue_config(
            "q", f"{C}:limit_job", escalation=GRACE,
            sandbox={"memory_limit_mb": limit_mib}, cleanup=(f"{H}:record",),
        )
        async with supervised(redis_url, queue, workdir_root=str(tmp_path / "w")):
            async with bull_queue(redis_url, "q") as bull:
                job_id = await add_job(bull, {"mode": "allocate", "trace": str(trace), "max_mib": max_mib}, attempts=2)
                job = await wait_for_state(bull, job_id, ["failed"], timeout=60)
                logs = await job_logs(bull, job_id)
                report_id = await add_job(bull, {"mode": "report_memory"})
                report = await wait_for_state(bull, report_id, ["completed"])
        return job, logs, report

    job, logs, report = run(scenario())

    assert job.failedReason.startswith("memory limit exceeded: rss"), job.failedReason
    assert f"> {limit_mib} MiB" in job.failedReason
    assert job.attemptsMade == 2
    assert any("SIGKILL sent" in line for line in logs), logs

    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    attempt_pids = list(dict.fromkeys(step["pid"] for step in steps))
    assert len(attempt_pids) == 2, "each attempt runs in its own child"
    records = {entry["pid"]: entry for entry in read_records(records_path)}
    for pid in attempt_pids:
        own = [step for step in steps if step["pid"] == pid]
        # The limit is crossed during the first allocation that starts less than 20 MiB below it.
        crossing = next(step for step in own if step["phase"] == "before" and step["rss_mib"] + 20 > limit_mib)
        peak = max(step["rss_mib"] for step in own)
        record = records[pid]
        logger.info(
            "measured: child %d started crossing %d MiB at %.0f MiB; last traced at %.0f MiB %.2f s later; "
            "hooks ran %.2f s after the crossing started",
            pid, limit_mib, crossing["rss_mib"], own[-1]["rss_mib"], own[-1]["t"] - crossing["t"], record["time"] - crossing["t"],
        )
        assert (record["state"], record["cause"], record["last_step"], record["exit_signal"]) == ("cancelled", "memory", "SIGKILL", 9)
        assert peak < max_mib, "the child reached the processor's own safety cap: the limit was not enforced"
        assert record["child"] is None

    assert report.returnvalue["pid"] not in attempt_pids
    assert report.returnvalue["rss_mib"] < 100


# -- descriptors and environment the child inherits ---------------------------------------------


def socket_fds(fds: dict[str, str]) -> list[str]:
    return [target for target in fds.values() if target.startswith("socket:")]


@pytest.mark.timeout(60)
def test_child_inherits_no_redis_access(redis_url, tmp_path, monkeypatch):
    """A child has one socket (its AF_UNIX protocol socket) and no TCP connection. Its environment
    has no variable naming Redis or containing the Redis URL, unless ``inherit_redis_env`` keeps
    them. ``sandbox.env`` adds its own variables."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_PASSWORD", "not-the-real-password")
    monkeypatch.setenv("APP_BROKER", redis_url)
    monkeypatch.setenv("APP_VISIBLE", "kept")

    async def scenario():
        queues = (
            queue_config("plain", f"{C}:describe_sandbox", sandbox={"env": {"FOO": "bar"}}),
            queue_config("inherit", f"{C}:describe_sandbox", sandbox={"inherit_redis_env": True}),
        )
        async with supervised(redis_url, *queues, workdir_root=str(tmp_path / "w")):
            async with bull_queue(redis_url, "plain") as plain, bull_queue(redis_url, "inherit") as inherit:
                plain_job = await wait_for_state(plain, await add_job(plain), ["completed"])
                inherit_job = await wait_for_state(inherit, await add_job(inherit), ["completed"])
                supervisor_connections = psutil.Process().net_connections(kind="inet")
        return plain_job.returnvalue, inherit_job.returnvalue, supervisor_connections

    plain, inherit, supervisor_connections = run(scenario())

    assert supervisor_connections, "the supervisor itself holds Redis connections, which a child could inherit"
    assert len(socket_fds(plain["fds"])) == 1, plain["fds"]
    assert plain["socket_families"] == ["AF_UNIX"], plain["fds"]
    assert plain["inet_connections"] == [], plain["inet_connections"]
    assert plain["fds"]["0"] == "/dev/null", plain["fds"]

    env = plain["env"]
    assert [name for name in env if "REDIS" in name.upper()] == []
    assert [name for name, value in env.items() if redis_url in value] == []
    assert env["FOO"] == "bar"
    assert env["APP_VISIBLE"] == "kept"

    assert inherit["inet_connections"] == []
    assert inherit["env"]["REDIS_URL"] == redis_url
    assert inherit["env"]["REDIS_PASSWORD"] == "not-the-real-password"
    assert inherit["env"]["APP_BROKER"] == redis_url
    assert "FOO" not in inherit["env"]


@pytest.fixture
def password_redis(tmp_path):
    """A private redis-server on 127.0.0.1 that requires a password; yields (url, password)."""
    password = f"pw-{uuid.uuid4().hex}"
    port = free_port()
    data_dir = tmp_path / "password-redis"
    data_dir.mkdir()
    command = [
        find_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
        "--dir", str(data_dir), "--requirepass", password,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def answers_ping() -> bool:
        assert process.poll() is None, f"redis-server exited with {process.returncode}"
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    try:
        wait_until(answers_ping, timeout=10, message="the password-protected redis-server to answer PING")
        yield url, password
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.timeout(60)
def test_child_environment_without_redis_password(password_redis, tmp_path, monkeypatch):
    """With a password in the Redis URL, a variable whose value contains the password or the URL
    is left out of the child's environment, whatever its name."""
    url, password = password_redis
    monkeypatch.setenv("APP_SECRET_COPY", password)
    monkeypatch.setenv("APP_BROKER", url)
    monkeypatch.setenv("APP_VISIBLE", "kept")

    async def scenario():
        async with supervised(url, queue_config("q", f"{C}:describe_sandbox"), workdir_root=str(tmp_path / "w")):
            async with bull_queue(url, "q") as bull:
                job = await wait_for_state(bull, await add_job(bull), ["completed"])
        return job.returnvalue

    described = run(scenario())

    env = described["env"]
    assert "APP_SECRET_COPY" not in env
    assert "APP_BROKER" not in env
    assert [name for name, value in env.items() if password in value] == []
    assert env["APP_VISIBLE"] == "kept"
    assert described["inet_connections"] == []


# -- core dumps ---------------------------------------------------------------------------------


@pytest.fixture
def core_limit():
    """The test process's RLIMIT_CORE, restored after the test; skips when the hard limit is 0."""
    original = resource.getrlimit(resource.RLIMIT_CORE)
    if original[1] == 0:
        pytest.skip("the hard RLIMIT_CORE of this process is 0, so no child can be allowed core dumps")
    try:
        yield original
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, original)


def child_core_limit(redis_url: str, tmp_path: Path, core_dumps: bool) -> list[int]:
    async def scenario():
        queue = queue_config("q", f"{C}:describe_sandbox", sandbox={"core_dumps": core_dumps})
        async with supervised(redis_url, queue, workdir_root=str(tmp_path / "w")):
            async with bull_queue(redis_url, "q") as bull:
                job = await wait_for_state(bull, await add_job(bull), ["completed"])
        return job.returnvalue["rlimit_core"]

    return run(scenario())


@pytest.mark.timeout(60)
def test_core_dumps_off_by_default(redis_url, tmp_path, core_limit):
    """The child's RLIMIT_CORE is 0 even when the supervisor's own soft limit allows core dumps."""
    hard = core_limit[1]
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))

    assert child_core_limit(redis_url, tmp_path, core_dumps=False) == [0, 0]


@pytest.mark.timeout(60)
def test_core_dumps_keep_supervisor_limit(redis_url, tmp_path, core_limit):
    """With core_dumps = true the child keeps a non-zero limit the supervisor has."""
    hard = core_limit[1]
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))

    assert child_core_limit(redis_url, tmp_path, core_dumps=True) == [hard, hard]


@pytest.mark.timeout(60)
def test_core_dumps_override_zero_soft_limit(redis_url, tmp_path, core_limit):
    """core_dumps = true allows core dumps up to the hard limit even when the supervisor's soft limit is 0."""
    hard = core_limit[1]
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))

    soft, child_hard = child_core_limit(redis_url, tmp_path, core_dumps=True)
    assert child_hard == hard
    assert soft != 0


# -- an unprivileged account --------------------------------------------------------------------


def can_execute_as(executable: str, account: str) -> bool:
    """True when ``account`` can start ``executable`` and import the ``child`` package with it."""
    try:
        completed = subprocess.run(
            [executable, "-c", "import child.runtime"],
            user=account, extra_groups=[], cwd="/", env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
            capture_output=True, timeout=30,
        )
    except OSError:
        return False
    return completed.returncode == 0


def interpreter_for(account: str) -> str | None:
    """Return a Python of this version that ``account`` can run: this one, else the system's."""
    candidates = [sys.executable, f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"]
    for candidate in candidates:
        if os.path.exists(candidate) and can_execute_as(candidate, account):
            return candidate
    return None


@pytest.fixture
def nobody():
    if os.geteuid() != 0:
        pytest.skip("needs root: the supervisor starts children as another account")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' account on this machine")


@pytest.fixture
def shared_dir():
    """A directory every account can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-runtime-privileges-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_probe_as_nobody(redis_url: str, shared_dir: Path, monkeypatch) -> dict:
    """Run probe_privileges once with user = "nobody"; return its result and the workdir root.

    The child uses the supervisor's interpreter when that account may run it. Where the interpreter
    lives under a directory private to root (a per-user pyenv, say), the system Python of the same
    version is used instead; the probe needs nothing beyond the standard library.
    """
    interpreter = interpreter_for("nobody")
    if interpreter is None:
        pytest.skip(f"nobody can run neither {sys.executable} nor a system Python {sys.version_info.major}.{sys.version_info.minor}")
    if interpreter != sys.executable:
        monkeypatch.setattr(sys, "executable", interpreter)

    files = {"secret": ("root only", 0o600), "group_secret": ("root and group root", 0o640), "public": ("anyone", 0o644)}
    for name, (text, mode) in files.items():
        path = shared_dir / f"{name}.txt"
        path.write_text(text)
        os.chmod(path, mode)
    workdir_root = shared_dir / "workdirs"

    async def scenario():
        queue = queue_config("q", f"{C}:probe_privileges", sandbox={"user": "nobody"})
        async with supervised(redis_url, queue, workdir_root=str(workdir_root)):
            async with bull_queue(redis_url, "q") as bull:
                data = {name: str(shared_dir / f"{name}.txt") for name in files}
                data["supervisor_pid"] = os.getpid()
                return await wait_for_state(bull, await add_job(bull, data), timeout=30)

    job = run(scenario())
    assert job.failedReason is None, job.failedReason
    return {**job.returnvalue, "workdir_root": workdir_root}


@pytest.mark.timeout(60)
def test_child_runs_as_nobody(redis_url, nobody, shared_dir, monkeypatch):
    """With user = "nobody" the child runs as that account and cannot read a root-only file nor
    signal the supervisor. It works in a workdir it owns, which the supervisor removes afterwards."""
    result = run_probe_as_nobody(redis_url, shared_dir, monkeypatch)

    assert result["uid"] == nobody.pw_uid
    assert result["groups"] == [], "the child must not keep root's supplementary groups"
    assert result["secret_read"] == "PermissionError"
    assert result["public_read"] == "ok"
    assert result["signal_supervisor"] == "PermissionError"
    assert result["workdir_uid"] == nobody.pw_uid
    assert result["workdir_gid"] == nobody.pw_gid
    assert result["cwd"] == result["workdir"]
    assert result["workdir_writable"] is True
    assert not os.path.lexists(result["workdir"])
    assert list(result["workdir_root"].iterdir()) == []


@pytest.mark.timeout(60)
def test_child_gets_account_group(redis_url, nobody, shared_dir, monkeypatch):
    """With user = "nobody" and no group, the child runs with nobody's primary group, so a file
    readable by root's group stays closed to it."""
    result = run_probe_as_nobody(redis_url, shared_dir, monkeypatch)

    assert result["gid"] == nobody.pw_gid
    assert result["group_secret_read"] == "PermissionError"


@pytest.mark.timeout(60)
def test_unreachable_interpreter_named(redis_url, nobody, shared_dir):
    """When the account cannot run the supervisor's interpreter, the job fails with a message that
    names the interpreter and the account, and the supervisor goes on."""
    if can_execute_as(sys.executable, "nobody"):
        pytest.skip(f"nobody can run {sys.executable} here")

    async def scenario():
        queue = queue_config("q", f"{C}:child_pid", sandbox={"user": "nobody"})
        async with supervised(redis_url, queue, workdir_root=str(shared_dir / "workdirs")):
            async with bull_queue(redis_url, "q") as bull:
                return await wait_for_state(bull, await add_job(bull), ["failed"], timeout=30)

    job = run(scenario())

    assert job.failedReason.startswith("processor load failed: ChildStartError: could not start"), job.failedReason
    assert sys.executable in job.failedReason
    assert "nobody" in job.failedReason


# -- child reuse limit and CPU time limit ------------------------------------------------------


@pytest.mark.timeout(60)
def test_child_retired_after_max_jobs(redis_url, tmp_path):
    """With max_jobs_per_child = 2, three jobs in a row run in two children: two in the first."""

    async def scenario():
        queue = queue_config("q", f"{C}:child_pid", sandbox={"max_jobs_per_child": 2})
        async with supervised(redis_url, queue, workdir_root=str(tmp_path / "w")):
            async with bull_queue(redis_url, "q") as bull:
                pids = []
                for _ in range(3):
                    job = await wait_for_state(bull, await add_job(bull), ["completed"])
                    pids.append(job.returnvalue)
        return pids

    pids = run(scenario())

    assert pids[0] == pids[1]
    assert pids[2] != pids[0]


@pytest.mark.timeout(90)
def test_cpu_time_limit_fails_job(redis_url, tmp_path):
    """A pure-Python loop that ignores the signal, under cpu_time_limit_s = 1, is stopped through
    the ladder and fails with "cpu time limit exceeded"; the next job runs in a fresh child."""
    report_path = tmp_path / "report.json"

    async def scenario():
        queue = queue_config("q", f"{C}:limit_job", escalation=GRACE, sandbox={"cpu_time_limit_s": 1})
        async with supervised(redis_url, queue, workdir_root=str(tmp_path / "w")):
            async with bull_queue(redis_url, "q") as bull:
                job_id = await add_job(bull, {"mode": "burn_cpu", "report": str(report_path)})
                job = await wait_for_state(bull, job_id, ["failed"], timeout=60)
                logs = await job_logs(bull, job_id)
                later = await wait_for_state(bull, await add_job(bull, {"mode": "child_pid"}), ["completed"])
        return job, logs, later

    job, logs, later = run(scenario())

    assert job.failedReason.startswith("cpu time limit exceeded: "), job.failedReason
    assert "sandbox.cpu_time_limit_s" in job.failedReason
    logger.info("measured: the cpu job ran %.2f s of wall time", (job.finishedOn - job.processedOn) / 1000)
    assert any("SIGTERM sent" in line for line in logs), logs
    assert later.returnvalue != json.loads(report_path.read_text())["pid"]


# -- many bad endings, nothing left behind -----------------------------------------------------


def own_children() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def zombie_children() -> list[int]:
    zombies = []
    for process in own_children():
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                zombies.append(process.pid)
        except psutil.NoSuchProcess:
            continue
    return zombies


def resource_counts() -> dict[str, int]:
    me = psutil.Process()
    return {
        "children": len(own_children()),
        "threads": me.num_threads(),
        "python_threads": threading.active_count(),
        "fds": me.num_fds(),
    }


def run_jobs(redis_url: str, tmp_path: Path, modes: list[dict], concurrency: int) -> list:
    """Run one job per entry of ``modes`` on a fresh supervisor; return the stored jobs."""

    async def scenario():
        queue = queue_config(
            "q", f"{C}:end_badly", concurrency=concurrency,
            escalation={"cancel_grace_s": 0.2, "term_grace_s": 0.3, "job_timeout_s": 1.0},
        )
        async with supervised(redis_url, queue, workdir_root=str(tmp_path / "w")):
            async with bull_queue(redis_url, "q") as bull:
                ids = [await add_job(bull, data) for data in modes]
                return [await wait_for_state(bull, job_id, ["failed"], timeout=60) for job_id in ids]

    return run(scenario())


@pytest.mark.timeout(180)
def test_bad_endings_leave_nothing(redis_url, tmp_path):
    """Forty jobs at concurrency 4 time out or exit abruptly, each leaving a ``sleep`` behind, some
    in their own session. Afterwards the test process has no zombie child, and as many child
    processes, threads and open descriptors as before."""
    # One job first, so that what lives for the whole session (the thread that spawns children)
    # already exists when the baseline is taken.
    run_jobs(redis_url, tmp_path, [{"mode": "exit"}], concurrency=1)
    baseline = resource_counts()

    kinds = [{"mode": "exit"}, {"mode": "exit", "daemon": True}, {"mode": "hang", "daemon": True}, {"mode": "stubborn"}]
    jobs = run_jobs(redis_url, tmp_path, [kinds[index % len(kinds)] for index in range(40)], concurrency=4)

    # The timeout counts from when the supervisor takes the job, child start included, so on a
    # loaded machine a job may time out before it reaches os._exit.
    timed_out = "timed out: 1 s (escalation.job_timeout_s)"
    exited = "child exited: code 3 before returning a result"
    reasons = [job.failedReason for job in jobs]
    for reason, data in zip(reasons, (kinds[index % len(kinds)] for index in range(40))):
        allowed = (exited, timed_out) if data["mode"] == "exit" else (timed_out,)
        assert reason in allowed, reasons
    assert exited in reasons, reasons

    wait_until(lambda: not zombie_children(), timeout=10, message=lambda: f"zombie children {zombie_children()} to be reaped")
    wait_until(
        lambda: resource_counts() == baseline, timeout=10,
        message=lambda: f"counts {resource_counts()} to return to {baseline}; children: {[p.cmdline() for p in own_children()]}",
    )
