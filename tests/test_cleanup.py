"""Cleanup in the supervisor: per-job workdirs, resources handed over by the processor, and hooks.

Everything runs against a real Redis with real child processes. Hooks record what they saw in a
JSON-lines file (``tests.cleanup_hooks``); processors report their workdir and the processes they
started in a report file (``tests.cleanup_processors``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests import cleanup_hooks
from tests.cleanup_hooks import HOOK_RECORD_VARIABLE, read_records
from tests.harness import add_job, bull_queue, job_logs, queue_config, run, supervised, wait_for, wait_for_state

C = "tests.cleanup_processors"
H = "tests.cleanup_hooks"
GRACE = {"cancel_grace_s": 1, "term_grace_s": 1}


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def hook_records(tmp_path, monkeypatch) -> Path:
    """The file the recording hooks append to during this test."""
    path = tmp_path / "hook-records.jsonl"
    monkeypatch.setenv(HOOK_RECORD_VARIABLE, str(path))
    return path


async def read_report(path: Path, timeout: float = 30.0) -> dict:
    """Wait until the processor has written its report file; return it."""
    text = await wait_for(lambda: path.exists() and path.read_text(), timeout, f"report {path.name}")
    return json.loads(text)


def is_gone(pid: int, create_time: float | None) -> bool:
    """True when the process exited (a zombie counts) or the pid now names another process."""
    try:
        process = psutil.Process(pid)
        if create_time is not None and abs(process.create_time() - create_time) > 0.01:
            return True
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def records_by_job(records: list[dict], hook: str) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for entry in records:
        if entry["hook"] == hook:
            grouped.setdefault(entry["job_id"], []).append(entry)
    return grouped


def workdirs_left(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir()) if root.exists() else []


# -- every way to end, each cleaned up ----------------------------------------------------------


@pytest.mark.timeout(120)
def test_cleanup_after_every_outcome(redis_url, tmp_path, hook_records, caplog):
    """Whatever way a job ends, its processes are gone before the hooks run, and each recording
    hook runs once per attempt. A raising hook changes nothing. Every workdir is removed without
    following a symlink out of it, and the supervisor goes on serving."""
    caplog.set_level(logging.INFO)
    workdir_root = tmp_path / "workdirs"
    reports = tmp_path / "reports"
    reports.mkdir()
    outside_file = tmp_path / "outside.txt"
    outside_file.write_text("must survive the workdir removal")

    def data(mode: str, report: str, **extra) -> dict:
        return {"mode": mode, "report": str(reports / f"{report}.json"), "outside_file": str(outside_file), **extra}

    async def scenario():
        queues = (
            queue_config("work", f"{C}:workdir_job", concurrency=4, escalation=GRACE, cleanup=(f"{H}:record_async",)),
            queue_config("hooked", f"{C}:workdir_job", cleanup=(f"{H}:raise_error", f"{H}:record")),
        )
        async with supervised(redis_url, *queues, workdir_root=str(workdir_root)) as supervisor:
            async with bull_queue(redis_url, "work") as work, bull_queue(redis_url, "hooked") as hooked:
                ids = {
                    "return": await add_job(work, data("return", "return", sleeper=True)),
                    "raise": await add_job(work, data("raise", "raise"), attempts=2),
                    "cooperative": await add_job(work, data("cooperative", "cooperative")),
                    "stubborn": await add_job(work, data("stubborn", "stubborn", sleeper=True)),
                    "hooked": await add_job(hooked, data("return", "hooked")),
                }

                await read_report(reports / "cooperative.json")
                await read_report(reports / "stubborn.json")
                assert supervisor.cancel_job(ids["cooperative"], "stop politely", queue="work")
                assert supervisor.cancel_job(ids["stubborn"], "stop at any cost", queue="work")

                jobs = {mode: await wait_for_state(work, job_id, timeout=40) for mode, job_id in ids.items() if mode != "hooked"}
                jobs["hooked"] = await wait_for_state(hooked, ids["hooked"])
                jobs["stubborn_logs"] = await job_logs(work, ids["stubborn"])

                # The supervisor keeps serving both queues.
                ids["final_work"] = await add_job(work, data("return", "final-work"))
                ids["final_hooked"] = await add_job(hooked, data("return", "final-hooked"))
                jobs["final_work"] = await wait_for_state(work, ids["final_work"])
                jobs["final_hooked"] = await wait_for_state(hooked, ids["final_hooked"])
        return ids, jobs

    ids, jobs = run(scenario())

    # What BullMQ holds.
    assert jobs["return"].returnvalue["workdir"]
    assert jobs["raise"].failedReason == f"ValueError: job {ids['raise']} raised on purpose"
    assert jobs["raise"].attemptsMade == 2
    assert jobs["cooperative"].failedReason == "cancelled: stop politely"
    assert jobs["stubborn"].failedReason == "cancelled: stop at any cost"
    assert any("SIGKILL sent" in line for line in jobs["stubborn_logs"]), jobs["stubborn_logs"]
    assert jobs["hooked"].returnvalue["workdir"], "a raising hook must not change the job's outcome"
    assert jobs["final_work"].returnvalue["workdir"]
    assert jobs["final_hooked"].returnvalue["workdir"]

    # Each recording hook ran exactly once per attempt.
    records = read_records(hook_records)
    work_records = records_by_job([r for r in records if r["queue"] == "work"], "record_async")
    hooked_records = records_by_job([r for r in records if r["queue"] == "hooked"], "record")
    expected_work_calls = {ids["return"]: 1, ids["raise"]: 2, ids["cooperative"]: 1, ids["stubborn"]: 1, ids["final_work"]: 1}
    assert {job_id: len(entries) for job_id, entries in work_records.items()} == expected_work_calls
    assert {job_id: len(entries) for job_id, entries in hooked_records.items()} == {ids["hooked"]: 1, ids["final_hooked"]: 1}
    assert [entry["attempts_made"] for entry in work_records[ids["raise"]]] == [0, 1]

    # The outcome each hook received.
    assert work_records[ids["return"]][0]["state"] == "completed"
    assert [entry["state"] for entry in work_records[ids["raise"]]] == ["failed", "failed"]
    cooperative = work_records[ids["cooperative"]][0]
    assert (cooperative["state"], cooperative["cause"], cooperative["last_step"]) == ("cancelled", "user", "COOPERATIVE")
    assert cooperative["failed_reason"] == "cancelled: stop politely"
    stubborn = work_records[ids["stubborn"]][0]
    assert (stubborn["state"], stubborn["cause"], stubborn["last_step"]) == ("cancelled", "user", "SIGKILL")
    assert stubborn["exit_signal"] == 9
    assert hooked_records[ids["hooked"]][0]["state"] == "completed"

    # When each hook ran, the job's processes were gone: a killed child entirely, a reused child
    # without any descendant, and every process the processor reported.
    assert stubborn["child"] is None, stubborn["child"]
    all_entries = [entry for grouped in (work_records, hooked_records) for entries in grouped.values() for entry in entries]
    for entry in all_entries:
        assert entry["child"] is None or entry["child"]["descendants"] == [], entry
        assert entry["report"] is not None, entry
        assert entry["report"]["alive_pids"] == [], entry
        assert entry["report"]["workdir_exists"] is False, entry

    # Every workdir was the job's cwd and is gone; the symlink's target outside survived.
    for report_file in reports.glob("*.json"):
        report = json.loads(report_file.read_text())
        assert report["cwd"] == report["workdir"], report
        # Each supervisor keeps its workdirs in a directory of its own under workdir_root.
        assert Path(report["workdir"]).parent.parent == workdir_root
        assert not os.path.lexists(report["workdir"]), report
    assert workdirs_left(workdir_root) == []
    assert outside_file.read_text() == "must survive the workdir removal"

    # The raising hook was logged with its name, and the hook after it still ran.
    assert f"cleanup hook {H}:raise_error for job {ids['hooked']} raised" in caplog.text


@pytest.mark.timeout(60)
def test_stray_thread_stops_with_job(redis_url, tmp_path):
    """A thread the processor started and left running stops when its job ends: the file it
    appends to every 10 ms does not grow while a later 0.5 s job runs."""
    stray_file = tmp_path / "stray.txt"

    async def scenario():
        queue = queue_config("q", f"{C}:workdir_job")
        async with supervised(redis_url, queue, workdir_root=str(tmp_path / "w")):
            async with bull_queue(redis_url, "q") as bull:
                stray_id = await add_job(bull, {"mode": "stray_thread", "stray": str(stray_file)})
                stray_job = await wait_for_state(bull, stray_id, ["failed"])
                assert stray_job.failedReason == f"ValueError: job {stray_id} raised and left a thread running"
                size_at_end = stray_file.stat().st_size

                later_id = await add_job(bull, {"mode": "sleep", "seconds": 0.5})
                later_job = await wait_for_state(bull, later_id, ["completed"])
                assert later_job.returnvalue["workdir"]
                return size_at_end, stray_file.stat().st_size

    size_at_end, size_later = run(scenario())

    assert size_at_end > 0
    assert size_later == size_at_end, f"the thread kept writing after its job ended: {size_at_end} -> {size_later} bytes"


# -- hooks that hang -------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_hanging_hooks_abandoned(redis_url, tmp_path, hook_records, caplog):
    """A sync and an async hook that never return are abandoned after hook_timeout_s each. The
    hook after them still runs, the job's outcome is written, and later jobs run."""
    caplog.set_level(logging.INFO)
    hook_timeout_s = 1.0
    cleanup_hooks.SYNC_HANG_RELEASE.clear()

    async def scenario():
        queue = queue_config("q", f"{C}:workdir_job", cleanup=(f"{H}:hang_async", f"{H}:hang_sync", f"{H}:record"))
        try:
            async with supervised(redis_url, queue, hook_timeout_s=hook_timeout_s, workdir_root=str(tmp_path / "w")):
                async with bull_queue(redis_url, "q") as bull:
                    timings = []
                    job_ids = []
                    for index in range(2):
                        added = time.monotonic()
                        job_id = await add_job(bull, {"mode": "return", "report": str(tmp_path / f"report-{index}.json")})
                        job = await wait_for_state(bull, job_id, ["completed"], timeout=30)
                        timings.append(time.monotonic() - added)
                        job_ids.append(job_id)
                        assert job.returnvalue["workdir"]
                    return job_ids, timings
        finally:
            # The abandoned sync hooks still hold worker threads; asyncio.run waits for them at exit.
            cleanup_hooks.SYNC_HANG_RELEASE.set()

    job_ids, timings = run(scenario())

    records = records_by_job(read_records(hook_records), "record")
    assert {job_id: len(entries) for job_id, entries in records.items()} == {job_id: 1 for job_id in job_ids}
    for job_id in job_ids:
        for name in ("hang_async", "hang_sync"):
            assert f"cleanup hook {H}:{name} for job {job_id} did not finish within 1 s" in caplog.text
    for elapsed in timings:
        # Two hooks wait hook_timeout_s each before the outcome is written; allow for a slow machine.
        assert 2 * hook_timeout_s <= elapsed < 2 * hook_timeout_s + 10, timings


# -- resources handed over from the child -------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("ending", ["returns", "killed"])
def test_handed_resources_released(redis_url, tmp_path, ending):
    """Resources handed over with add_cleanup_path / add_cleanup_process are gone after the job,
    both when it returns and when it is SIGKILLed. They are a directory and a file outside the
    workdir, a ``sleep`` in its own session, and a process outside the job's tree."""
    outside = tmp_path / "outside"
    outside.mkdir()
    report_path = tmp_path / "report.json"
    # Started by the test, so no tree tracking can find it: only the hand-over can end it.
    external = subprocess.Popen(["sleep", "300"])
    external_create_time = psutil.Process(external.pid).create_time()

    async def scenario():
        queue = queue_config("q", f"{C}:hand_over", escalation=GRACE)
        async with supervised(redis_url, queue, workdir_root=str(tmp_path / "w")) as supervisor:
            async with bull_queue(redis_url, "q") as bull:
                data = {"outside": str(outside), "report": str(report_path), "external_pid": external.pid}
                if ending == "killed":
                    data["stubborn"] = True
                job_id = await add_job(bull, data)
                report = await read_report(report_path)
                assert report["daemon_session"] != report["own_session"], "the sleep must run in its own session"
                if ending == "killed":
                    assert Path(report["directory"]).is_dir(), "removed while the job still ran"
                    supervisor.cancel_job(job_id, "stop the hand-over job")
                job = await wait_for_state(bull, job_id, timeout=30)
                return job, report, await job_logs(bull, job_id)

    try:
        job, report, logs = run(scenario())
        external_gone = is_gone(external.pid, external_create_time)
    finally:
        if external.poll() is None:
            external.kill()
        external.wait(timeout=10)

    if ending == "returns":
        assert job.returnvalue["daemon"] > 0
    else:
        assert job.failedReason == "cancelled: stop the hand-over job"
        assert any("SIGKILL sent" in line for line in logs), logs
    assert not os.path.lexists(report["directory"])
    assert not os.path.lexists(report["file"])
    for pid, create_time in report["pids"].items():
        assert is_gone(int(pid), create_time), f"handed-over sleep {pid} still running"
    assert external_gone, "the process handed over by pid was still running"
    assert list(outside.iterdir()) == []
