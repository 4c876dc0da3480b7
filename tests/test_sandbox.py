"""Jobs run in child processes: results, exceptions, crashes, load failures and output."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import bullmq
import psutil
import pytest

from tests.harness import add_job, bull_queue, job_logs, queue_config, run, supervised, wait_for, wait_for_state

P = "tests.processors"


def test_result_completes_job(redis_url):
    async def scenario():
        async with supervised(redis_url, queue_config("q", f"{P}:echo")):
            async with bull_queue(redis_url, "q") as queue:
                job_id = await add_job(queue, {"n": 1})
                job = await wait_for_state(queue, job_id)
                assert job.failedReason is None
                assert job.returnvalue["data"] == {"n": 1}
                assert job.returnvalue["pid"] != os.getpid()

    run(scenario())


def test_bullmq_style_processor_unchanged(redis_url):
    """An async (job, token) processor written for bullmq.Worker runs unchanged."""

    async def scenario():
        async with supervised(redis_url, queue_config("q", f"{P}:bullmq_style")):
            async with bull_queue(redis_url, "q") as queue:
                job_id = await add_job(queue, {"n": 2}, name="resize")
                job = await wait_for_state(queue, job_id)
                assert job.returnvalue == {"ok": True, "name": "resize"}
                assert job.progress == 42
                assert job.data == {"n": 2, "seen": True}
                logs = await job_logs(queue, job_id)
                assert f"processing {job_id} with token set" in logs

    run(scenario())


def test_sync_processor_updates_without_await(redis_url):
    async def scenario():
        async with supervised(redis_url, queue_config("q", f"{P}:sync_updates")):
            async with bull_queue(redis_url, "q") as queue:
                job_id = await add_job(queue)
                job = await wait_for_state(queue, job_id)
                assert job.returnvalue == "sync-ok"
                assert job.progress == {"step": 1}
                assert "sync log line" in await job_logs(queue, job_id)

    run(scenario())


def test_callable_shipped_with_cloudpickle(redis_url):
    factor = 3

    async def scenario():
        processor = lambda job: job.data["n"] * factor  # noqa: E731 - a closure on purpose
        async with supervised(redis_url, queue_config("q", processor)):
            async with bull_queue(redis_url, "q") as queue:
                job_id = await add_job(queue, {"n": 5})
                job = await wait_for_state(queue, job_id)
                assert job.returnvalue == 15

    run(scenario())


def test_exception_fails_with_child_traceback(redis_url):
    async def scenario():
        async with supervised(redis_url, queue_config("q", f"{P}:raise_value_error")):
            async with bull_queue(redis_url, "q") as queue:
                job_id = await add_job(queue, {"n": 9}, attempts=2)
                job = await wait_for_state(queue, job_id, ["failed"])
                assert job.failedReason == "ValueError: bad input 9"
                assert job.attemptsMade == 2
                assert "raise_value_error" in job.stacktrace[-1]
                assert "tests/processors.py" in job.stacktrace[-1]

    run(scenario())


def test_two_argument_exception_keeps_class_and_message(redis_url):
    async def scenario():
        async with supervised(redis_url, queue_config("q", f"{P}:raise_two_argument_error")):
            async with bull_queue(redis_url, "q") as queue:
                job_id = await add_job(queue)
                job = await wait_for_state(queue, job_id, ["failed"])
                assert job.failedReason == "TwoArgumentError: code 7: disk full"

    run(scenario())


def test_unrecoverable_error_not_retried(redis_url):
    async def scenario():
        async with supervised(redis_url, queue_config("q", f"{P}:raise_unrecoverable")):
            async with bull_queue(redis_url, "q") as queue:
                job_id = await add_job(queue, attempts=5)
                job = await wait_for_state(queue, job_id, ["failed"])
                assert job.failedReason == "UnrecoverableError: do not retry me"
                assert job.attemptsMade == 1

    run(scenario())


def test_killed_child_retried_in_new_child(redis_url, tmp_path):
    async def scenario():
        async with supervised(redis_url, queue_config("q", f"{P}:wait_for_file")) as supervisor:
            async with bull_queue(redis_url, "q") as queue:
                pidfile, release = tmp_path / "pid", tmp_path / "release"
                job_id = await add_job(queue, {"pidfile": str(pidfile), "release": str(release)}, attempts=2)
                first_pid = int(await wait_for(lambda: pidfile.exists() and pidfile.read_text()))
                pidfile.unlink()
                os.kill(first_pid, signal.SIGKILL)

                second_pid = int(await wait_for(lambda: pidfile.exists() and pidfile.read_text()))
                assert second_pid != first_pid
                stored = await bullmq.Job.fromId(queue, job_id)
                assert stored.failedReason == "child crashed: signal SIGKILL (9)"
                assert stored.attemptsMade == 1
                release.touch()
                job = await wait_for_state(queue, job_id)
                assert job.returnvalue == "released"
                assert supervisor.outcomes["completed"] == 1

    run(scenario())


def test_crash_without_attempts_left_fails(redis_url, tmp_path):
    async def scenario():
        async with supervised(redis_url, queue_config("q", f"{P}:kill_self")):
            async with bull_queue(redis_url, "q") as queue:
                job_id = await add_job(queue)
                job = await wait_for_state(queue, job_id, ["failed"])
                assert job.failedReason == "child crashed: signal SIGKILL (9)"

    run(scenario())


@pytest.mark.parametrize("processor", ["sys_exit_zero", "os_exit_zero"])
def test_exit_zero_is_not_a_result(redis_url, processor):
    async def scenario():
        async with supervised(redis_url, queue_config("q", f"{P}:{processor}")):
            async with bull_queue(redis_url, "q") as queue:
                job_id = await add_job(queue)
                job = await wait_for_state(queue, job_id, ["failed"])
                assert job.failedReason == "child exited: code 0 before returning a result"
                assert job.returnvalue is None

    run(scenario())


def test_segfault_leaves_sibling_child_alone(redis_url, tmp_path):
    async def scenario():
        queues = (queue_config("crash", f"{P}:segfault"), queue_config("steady", f"{P}:wait_for_file"))
        async with supervised(redis_url, *queues):
            async with bull_queue(redis_url, "crash") as crash, bull_queue(redis_url, "steady") as steady:
                pidfile, release = tmp_path / "pid", tmp_path / "release"
                steady_id = await add_job(steady, {"pidfile": str(pidfile), "release": str(release)})
                sibling_pid = int(await wait_for(lambda: pidfile.exists() and pidfile.read_text()))

                crash_id = await add_job(crash)
                job = await wait_for_state(crash, crash_id, ["failed"])
                assert job.failedReason == "child crashed: signal SIGSEGV (11)"

                assert psutil.pid_exists(sibling_pid)
                release.touch()
                done = await wait_for_state(steady, steady_id)
                assert done.returnvalue == "released"

    run(scenario())


def test_segfault_with_concurrency_two(redis_url, tmp_path):
    """With concurrency 2 on one queue, a segfault in one child leaves the other job in its own child."""

    async def scenario():
        async with supervised(redis_url, queue_config("q", f"{P}:dispatch", concurrency=2)):
            async with bull_queue(redis_url, "q") as queue:
                pidfile, release = tmp_path / "pid", tmp_path / "release"
                steady_id = await add_job(queue, {"do": "wait_for_file", "pidfile": str(pidfile), "release": str(release)})
                sibling_pid = int(await wait_for(lambda: pidfile.exists() and pidfile.read_text()))
                crash_id = await add_job(queue, {"do": "segfault"})
                job = await wait_for_state(queue, crash_id, ["failed"])
                assert job.failedReason == "child crashed: signal SIGSEGV (11)"
                assert psutil.pid_exists(sibling_pid)
                release.touch()
                done = await wait_for_state(queue, steady_id)
                assert done.returnvalue == "released"

    run(scenario())


def test_import_failure_once_then_recovers(redis_url, tmp_path, monkeypatch):
    module_dir = tmp_path / "mods"
    module_dir.mkdir()
    marker = tmp_path / "failed-once"
    (module_dir / "flaky_module.py").write_text(
        "import os\n"
        f"MARKER = {str(marker)!r}\n"
        "if not os.path.exists(MARKER):\n"
        "    open(MARKER, 'w').close()\n"
        "    raise RuntimeError('first import fails')\n"
        "def process(job):\n"
        "    return os.getpid()\n"
    )
    monkeypatch.syspath_prepend(str(module_dir))
    monkeypatch.setenv("PYTHONPATH", str(module_dir) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    async def scenario():
        async with supervised(redis_url, queue_config("q", "flaky_module:process")) as supervisor:
            async with bull_queue(redis_url, "q") as queue:
                first = await add_job(queue, attempts=2)
                job = await wait_for_state(queue, first)
                assert job.returnvalue > 0
                assert job.attemptsMade == 2
                assert "RuntimeError: first import fails" in job.stacktrace[0]
                second = await add_job(queue)
                job2 = await wait_for_state(queue, second)
                assert job2.returnvalue == job.returnvalue  # the healthy child is reused
                pool = supervisor.runners["q"].pool
                assert pool.spawned == 2

    run(scenario())


@pytest.mark.parametrize(
    "processor, expected",
    [
        ("tests.no_such_module:process", "processor load failed: ModuleNotFoundError: No module named 'tests.no_such_module'"),
        (f"{P}:no_such_function", "processor load failed: AttributeError: module 'tests.processors' has no attribute 'no_such_function'"),
    ],
)
def test_missing_processor_not_retried(redis_url, processor, expected):
    async def scenario():
        async with supervised(redis_url, queue_config("q", processor)):
            async with bull_queue(redis_url, "q") as queue:
                job_id = await add_job(queue, attempts=3)
                job = await wait_for_state(queue, job_id, ["failed"])
                assert job.failedReason == expected
                assert job.attemptsMade == 1

    run(scenario())


def test_corrupt_pickle_not_retried(redis_url):
    from sandbox_runtime.pool import ProcessorSpec

    async def scenario():
        async with supervised(redis_url, queue_config("q", f"{P}:echo")) as supervisor:
            supervisor.runners["q"].pool.spec = ProcessorSpec(pickled=b"\x80\x05not a pickle")
            async with bull_queue(redis_url, "q") as queue:
                job_id = await add_job(queue, attempts=3)
                job = await wait_for_state(queue, job_id, ["failed"])
                assert job.failedReason.startswith("processor load failed: UnpicklingError")
                assert job.attemptsMade == 1

    run(scenario())


@pytest.mark.parametrize(
    "processor, size",
    [("big_string", 16 * 1024 * 1024), ("big_list", 200_000), ("big_string", 65_537)],
)
def test_large_results_arrive_intact(redis_url, processor, size):
    async def scenario():
        async with supervised(redis_url, queue_config("q", f"{P}:{processor}")):
            async with bull_queue(redis_url, "q") as queue:
                job_id = await add_job(queue, {"size": size})
                job = await wait_for_state(queue, job_id, timeout=60)
                assert job.failedReason is None
                assert len(job.returnvalue) == size
                if processor == "big_list":
                    assert job.returnvalue[-1] == size - 1

    run(scenario())


@pytest.mark.parametrize(
    "processor, detail",
    [
        ("return_lock", "TypeError: Object of type lock is not JSON serializable"),
        ("return_set", "TypeError: Object of type set is not JSON serializable"),
        ("return_circular", "ValueError: Circular reference detected"),
    ],
)
def test_unserializable_result_not_retried(redis_url, processor, detail):
    async def scenario():
        async with supervised(redis_url, queue_config("q", f"{P}:{processor}")):
            async with bull_queue(redis_url, "q") as queue:
                job_id = await add_job(queue, attempts=3)
                job = await wait_for_state(queue, job_id, ["failed"])
                assert job.failedReason == f"result not serializable: {detail}"
                assert job.attemptsMade == 1

    run(scenario())


def test_child_output_tagged_with_job_id(redis_url, caplog):
    caplog.set_level(logging.INFO, logger="sandbox_runtime.output")

    async def scenario():
        async with supervised(redis_url, queue_config("q", f"{P}:chatty")):
            async with bull_queue(redis_url, "q") as queue:
                job_id = await add_job(queue)
                await wait_for_state(queue, job_id)

                def tagged(stream, text):
                    return any(f"[job {job_id} pid" in r.getMessage() and f"{stream}] {text}" in r.getMessage() for r in caplog.records)

                await wait_for(lambda: tagged("stdout", f"out line for {job_id}") and tagged("stderr", f"err line for {job_id}"))

    run(scenario())


def test_supervisor_keeps_serving_after_failures(redis_url):
    async def scenario():
        async with supervised(redis_url, queue_config("crash", f"{P}:kill_self"), queue_config("ok", f"{P}:echo")):
            async with bull_queue(redis_url, "crash") as crash, bull_queue(redis_url, "ok") as ok:
                for _ in range(3):
                    await wait_for_state(crash, await add_job(crash), ["failed"])
                job = await wait_for_state(ok, await add_job(ok, {"n": 3}))
                assert job.returnvalue["data"] == {"n": 3}

    run(scenario())


def test_address_space_limit_raises_memory_error(redis_url):
    async def scenario():
        sandbox = {"address_space_limit_mb": 1024}
        async with supervised(redis_url, queue_config("q", f"{P}:allocate_mb", sandbox=sandbox)):
            async with bull_queue(redis_url, "q") as queue:
                small = await wait_for_state(queue, await add_job(queue, {"mb": 16}))
                assert small.returnvalue == 16 * 1024 * 1024
                big = await wait_for_state(queue, await add_job(queue, {"mb": 2048}), ["failed"])
                assert big.failedReason.startswith("MemoryError")

    run(scenario())


def test_children_use_configured_interpreter(redis_url):
    import sys as sys_module

    interpreter = os.path.realpath(sys_module.executable)

    async def scenario():
        sandbox = {"python": interpreter}
        async with supervised(redis_url, queue_config("q", f"{P}:report_interpreter", sandbox=sandbox)):
            async with bull_queue(redis_url, "q") as queue:
                job = await wait_for_state(queue, await add_job(queue))
                assert job.returnvalue == interpreter

    run(scenario())


@pytest.mark.parametrize(
    "processor, reason",
    [
        ("close_protocol_socket", "child crashed: protocol connection closed before the job ended"),
        ("write_garbage_frame", "child crashed: invalid protocol frame"),
    ],
)
def test_broken_protocol_fails_job(redis_url, processor, reason):
    async def scenario():
        async with supervised(redis_url, queue_config("q", f"{P}:{processor}")):
            async with bull_queue(redis_url, "q") as queue:
                job = await wait_for_state(queue, await add_job(queue), ["failed"])
                assert job.failedReason.startswith(reason)

    run(scenario())


def test_double_fork_leaves_no_zombie(redis_url):
    """The short-lived middle process of a double fork is re-parented to the supervisor and reaped."""

    def zombies():
        return [p.pid for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]

    async def scenario():
        async with supervised(redis_url, queue_config("q", f"{P}:start_double_fork_daemon")):
            async with bull_queue(redis_url, "q") as queue:
                for _ in range(3):
                    job = await wait_for_state(queue, await add_job(queue))
                    assert job.returnvalue == "started"
                await wait_for(lambda: not zombies(), timeout=10, message="no zombie child processes")

    run(scenario())


def test_idle_child_retired_after_timeout(redis_url):
    async def scenario():
        queue = queue_config("q", f"{P}:echo_pid", sandbox={"idle_timeout_s": 0.5})
        async with supervised(redis_url, queue) as supervisor:
            pool = supervisor.runners["q"].pool
            async with bull_queue(redis_url, "q") as bull:
                first = await wait_for_state(bull, await add_job(bull))
                await wait_for(lambda: not pool.children, timeout=15, message="the idle child retired")
                assert not psutil.pid_exists(first.returnvalue) or psutil.Process(first.returnvalue).status() == psutil.STATUS_ZOMBIE
                second = await wait_for_state(bull, await add_job(bull))
                assert second.returnvalue != first.returnvalue
                assert pool.spawned == 2

    run(scenario())
