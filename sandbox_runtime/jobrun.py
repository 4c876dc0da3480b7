"""One attempt of one job: hand it to a child, watch it, stop it if asked, and decide its outcome.

The decision rules:
- a result the child returns before SIGTERM is sent completes the job, even after a cooperative
  cancel, because the processor chose to finish. Once SIGTERM is sent, no message of the child counts;
- a lost lock forbids every write for the attempt, whatever the child did;
- otherwise a cancel request decides the outcome by its cause, then the child's own report, then
  how the child process ended.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from child import protocol

from .cleanup import HandedResources, JobOutcome, create_workdir, remove_tree, run_hooks
from .errors import ChildStartError
from .ladder import CAUSE_STRENGTH, CancelCause, EscalationPolicy, Ladder, Step
from .pool import ChildProcess, ProcessorLoadFailed

if TYPE_CHECKING:
    from .runner import QueueRunner

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
# How long a child that closed its protocol connection may take to exit before its tree is killed.
PROTOCOL_EOF_GRACE_S = 2.0
LOG_PREFIX = "sandbox-runtime: "


@dataclass
class Verdict:
    """The raw facts at the end of an attempt, before they become a JobOutcome."""

    kind: str  # completed, raised, invalid, exited, load_failed, cancelled_before_start
    message: protocol.Message | None = None
    detail: str = ""
    retryable: bool = True
    traceback: str = ""


class JobRun:
    """Runs one attempt; also the LadderActions of its ladder."""

    def __init__(self, runner: "QueueRunner", job: Any, token: str) -> None:
        self.runner = runner
        self.job = job
        self.job_id = str(job.id)
        self.token = token
        self.queue = runner.config.name
        escalation = runner.config.escalation
        self.ladder = Ladder(EscalationPolicy(escalation.cancel_grace_s, escalation.term_grace_s), self)
        self.child: ChildProcess | None = None
        self.resources = HandedResources()
        self.started_at = time.monotonic()
        self.cancel_retryable = False
        self.retire_child = False
        self._wake = asyncio.Event()
        self._pending_writes: list[asyncio.Task[Any]] = []
        self._cancel_sent_at: float | None = None

    # Requests from outside.

    def request_cancel(self, cause: CancelCause, reason: str, *, retry: bool = False) -> bool:
        """Start or strengthen the ladder for this attempt; return True when it changed anything."""
        if self.ladder.exited:
            return False
        if cause is CancelCause.USER:
            self.cancel_retryable = retry
        if self.child is None:
            # Not in a child yet: record the request; the attempt ends before user code runs.
            current = self.ladder.cause
            changed = current is None or CAUSE_STRENGTH[cause] > CAUSE_STRENGTH[current]
            if changed:
                self.ladder.cause, self.ladder.reason = cause, reason
            self._wake.set()
            return changed
        changed = self.ladder.request(cause, reason)
        if changed:
            logger.info(
                "cancel requested: queue=%s job=%s pid=%d cause=%s reason=%r",
                self.queue, self.job_id, self.child.pid, cause.value, reason,
            )
        self._wake.set()
        return changed

    def escalate_now(self) -> None:
        if self.child is not None:
            self.ladder.escalate_now()
        self._wake.set()

    # LadderActions.

    def deliver_cancel(self, reason: str) -> None:
        assert self.child is not None
        self._cancel_sent_at = time.monotonic()
        self.child.send_nowait(protocol.Cancel(job_id=self.job_id, reason=reason))
        self._job_log(f"cancel requested ({self.ladder.cause.value if self.ladder.cause else 'user'}): {reason}; abort signal sent to the processor in child pid {self.child.pid}")

    def terminate_tree(self) -> None:
        assert self.child is not None
        count = self.child.tree.signal(signal.SIGTERM)
        elapsed = self._elapsed_since_request()
        logger.warning(
            "SIGTERM sent: queue=%s job=%s pid=%d processes=%d cause=%s after %.1f s (escalation.cancel_grace_s = %g)",
            self.queue, self.job_id, self.child.pid, count, self._cause_name(), elapsed, self.ladder.policy.cancel_grace_s,
        )
        self._job_log(f"SIGTERM sent to {count} process(es) of child pid {self.child.pid} {elapsed:.1f} s after the cancel request")

    def kill_tree(self) -> None:
        assert self.child is not None
        count = self.child.tree.signal(signal.SIGKILL)
        elapsed = self._elapsed_since_request()
        logger.warning(
            "SIGKILL sent: queue=%s job=%s pid=%d processes=%d cause=%s after %.1f s",
            self.queue, self.job_id, self.child.pid, count, self._cause_name(), elapsed,
        )
        self._job_log(f"SIGKILL sent to {count} process(es) of child pid {self.child.pid} {elapsed:.1f} s after the cancel request")

    def _elapsed_since_request(self) -> float:
        requested = self.ladder.requested_at
        return 0.0 if requested is None else time.monotonic() - requested

    def _cause_name(self) -> str:
        return self.ladder.cause.value if self.ladder.cause else "none"

    def _job_log(self, text: str) -> None:
        """Append a ladder step to the job's log, unless the lock is lost (nothing may be written)."""
        if self.ladder.cause is CancelCause.LOCK_LOST:
            return
        self._pending_writes.append(asyncio.get_running_loop().create_task(self._write_log(LOG_PREFIX + text)))

    async def _write_log(self, text: str) -> None:
        try:
            await self.job.log(text)
        except Exception as exc:
            logger.warning("could not write to the log of job %s: %s", self.job_id, exc)

    # The attempt.

    async def execute(self) -> JobOutcome:
        workdir: Path | None = None
        outcome: JobOutcome | None = None
        try:
            verdict = await self._check_before_start()
            if verdict is None:
                workdir = create_workdir(self.runner.workdir_root, self.queue, self.job_id, self.runner.workdir_owner)
                verdict = await self._run_in_child(workdir)
            outcome = self._decide(verdict)
        finally:
            await self._finish(workdir, outcome)
        return outcome

    async def _check_before_start(self) -> Verdict | None:
        if self.runner.stopping:
            self.ladder.cause, self.ladder.reason = CancelCause.SHUTDOWN, "supervisor is shutting down"
            return Verdict("cancelled_before_start")
        record = await self.runner.fetch_cancel_record(self.job_id)
        if record is not None:
            self.cancel_retryable = record.retry
            self.ladder.cause, self.ladder.reason = CancelCause.USER, record.reason
            return Verdict("cancelled_before_start")
        return None

    async def _run_in_child(self, workdir: Path) -> Verdict:
        try:
            child = await self.runner.pool.acquire()
        except ProcessorLoadFailed as exc:
            return Verdict("load_failed", detail=f"{exc.exc_type}: {exc.message}", retryable=exc.retryable, traceback=exc.traceback)
        except ChildStartError as exc:
            return Verdict("load_failed", detail=f"ChildStartError: {exc}", retryable=True)
        if self.ladder.cause is not None:
            # A cancel arrived while the child was being prepared: user code never runs.
            self.runner.pool.release(child, reusable=True)
            return Verdict("cancelled_before_start")

        self.child = child
        child.current_job_id = self.job_id
        child.jobs_run += 1
        reusable = False
        try:
            await child.send(protocol.Start(job=self._job_fields(), token=self.token, workdir=str(workdir)))
            verdict = await self._supervise(child)
            reusable = (
                verdict.kind in ("completed", "raised", "invalid")
                and self.ladder.step < Step.SIGTERM
                and child.is_alive
                and not self.retire_child
            )
            return verdict
        finally:
            await self._end_leftovers(child, child_alive=reusable)
            self.runner.pool.release(child, reusable=reusable)

    def _job_fields(self) -> dict[str, Any]:
        job = self.job
        return {
            "id": self.job_id,
            "name": job.name,
            "data": job.data,
            "opts": job.opts,
            "attemptsMade": job.attemptsMade,
            "attemptsStarted": getattr(job, "attemptsStarted", 0),
            "stalledCounter": getattr(job, "stalledCounter", 0),
            "timestamp": job.timestamp,
            "processedOn": getattr(job, "processedOn", None),
            "progress": job.progress,
            "queueName": self.queue,
        }

    async def _supervise(self, child: ChildProcess) -> Verdict:
        limits = self.runner.config.sandbox
        # The timeout counts from the start frame, so spawning a child and loading the processor
        # do not use up the job's time.
        timeout_s, timeout_label = self._timeout()
        timeout_at = time.monotonic() + timeout_s if timeout_s else None
        # Limits need frequent samples. Without a cgroup, samples also remember descendants, so that an
        # orphan re-parented to the supervisor is still known as part of the job.
        sample_every: float | None = None
        if limits.memory_limit_mb or limits.cpu_time_limit_s:
            sample_every = 0.1
        elif child.cgroup is None:
            sample_every = 0.25
        next_sample = time.monotonic()
        cpu_at_start = child.tree.cpu_seconds() if limits.cpu_time_limit_s else 0.0
        eof_deadline: float | None = None

        message_task = asyncio.ensure_future(child.messages.get())
        exit_task = asyncio.ensure_future(child.exited.wait())
        wake_task = asyncio.ensure_future(self._wake.wait())
        try:
            while True:
                now = time.monotonic()
                if timeout_at is not None and now >= timeout_at:
                    timeout_at = None
                    self.request_cancel(CancelCause.TIMEOUT, timeout_label)
                if sample_every is not None and now >= next_sample:
                    next_sample = now + sample_every
                    self._check_limits(child, cpu_at_start)
                if eof_deadline is not None and now >= eof_deadline:
                    eof_deadline = None
                    if child.protocol_error is None:
                        child.protocol_error = "protocol connection closed before the job ended"
                    logger.warning("job %s: child pid %d closed its protocol connection; killing its tree", self.job_id, child.pid)
                    child.tree.signal(signal.SIGKILL)
                self.ladder.advance()

                candidates = (self.ladder.next_deadline(), timeout_at, next_sample if sample_every else None, eof_deadline)
                deadlines = [d for d in candidates if d is not None]
                wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
                done, _ = await asyncio.wait({message_task, exit_task, wake_task}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)

                if wake_task in done:
                    self._wake.clear()
                    wake_task = asyncio.ensure_future(self._wake.wait())
                if message_task in done:
                    message = message_task.result()
                    if message is None:
                        # The child closed its end, so it can no longer report: give it a moment
                        # to exit by itself, then end its tree.
                        message_task = asyncio.get_running_loop().create_future()
                        eof_deadline = time.monotonic() + PROTOCOL_EOF_GRACE_S
                    else:
                        message_task = asyncio.ensure_future(child.messages.get())
                        verdict = await self._handle_message(message)
                        if verdict is not None:
                            return verdict
                if exit_task in done:
                    self.ladder.mark_exited()
                    await self._drain_messages(child)
                    return Verdict("exited", detail=child.describe_exit())
        finally:
            for task in (message_task, exit_task, wake_task):
                task.cancel()

    def _timeout(self) -> tuple[float, str]:
        data = self.job.data
        if isinstance(data, dict):
            timeout_ms = data.get("timeoutMs")
            if isinstance(timeout_ms, (int, float)) and not isinstance(timeout_ms, bool) and timeout_ms > 0:
                return timeout_ms / 1000.0, f"{timeout_ms:g} ms (timeoutMs in the job data)"
        limit = self.runner.config.escalation.job_timeout_s
        if limit > 0:
            return limit, f"{limit:g} s (escalation.job_timeout_s)"
        return 0.0, ""

    def _check_limits(self, child: ChildProcess, cpu_at_start: float) -> None:
        limits = self.runner.config.sandbox
        if limits.memory_limit_mb:
            rss = child.tree.rss_bytes()
            if rss > limits.memory_limit_mb * MIB:
                self.request_cancel(CancelCause.MEMORY, f"rss {rss / MIB:.1f} MiB > {limits.memory_limit_mb} MiB")
        elif child.cgroup is None:
            child.tree.members()  # remember descendants in case they are orphaned later
        if limits.cpu_time_limit_s:
            used = child.tree.cpu_seconds() - cpu_at_start
            if used > limits.cpu_time_limit_s:
                self.request_cancel(CancelCause.CPU, f"{used:.1f} s > {limits.cpu_time_limit_s:g} s (sandbox.cpu_time_limit_s)")

    async def _handle_message(self, message: protocol.Message) -> Verdict | None:
        terminated = self.ladder.step >= Step.SIGTERM
        if isinstance(message, (protocol.Completed, protocol.Failed, protocol.ResultInvalid)):
            if terminated:
                return None  # SIGTERM was sent: nothing the child returns is written
            kind = {protocol.Completed: "completed", protocol.Failed: "raised", protocol.ResultInvalid: "invalid"}[type(message)]
            return Verdict(kind, message=message)
        if isinstance(message, protocol.CancelSeen):
            if self._cancel_sent_at is not None:
                logger.info("cancel seen by the processor: queue=%s job=%s after %.2f ms", self.queue, self.job_id, (time.monotonic() - self._cancel_sent_at) * 1000)
            return None
        if isinstance(message, protocol.Started):
            return None
        if isinstance(message, protocol.AddResource):
            self._add_resource(message)
            return None
        if isinstance(message, protocol.Retire):
            logger.info("job %s: %s; child pid %d will not be reused", self.job_id, message.detail, self.child.pid if self.child else -1)
            self.retire_child = True
            return None
        if terminated or self.ladder.cause is CancelCause.LOCK_LOST:
            return None
        await self._relay(message)
        return None

    async def _relay(self, message: protocol.Message) -> None:
        try:
            if isinstance(message, protocol.Progress):
                await self.job.updateProgress(message.value)
            elif isinstance(message, protocol.Log):
                await self.job.log(message.text)
            elif isinstance(message, protocol.UpdateData):
                await self.job.updateData(message.data)
            else:
                logger.warning("unexpected frame from child pid %s during job %s: %r", self.child.pid if self.child else "?", self.job_id, message)
        except Exception as exc:
            logger.warning("could not relay %s of job %s to Redis: %s", message.kind, self.job_id, exc)

    def _add_resource(self, message: protocol.AddResource) -> None:
        if message.resource == "path" and message.path:
            self.resources.paths.append(Path(message.path))
        elif message.resource == "process" and message.pid:
            self.resources.processes.append((message.pid, message.create_time))

    async def _drain_messages(self, child: ChildProcess) -> None:
        """Read resources the child sent just before it exited; results no longer count."""
        while not child.messages.empty():
            message = child.messages.get_nowait()
            if isinstance(message, protocol.AddResource):
                self._add_resource(message)

    async def _end_leftovers(self, child: ChildProcess, child_alive: bool) -> None:
        """Kill every process of the job except a reusable child, and wait until they are gone."""
        if not child_alive and child.is_alive:
            child.tree.signal(signal.SIGKILL)
            await child.wait_exited(10.0)
        killed = await child.kill_leftovers(10.0)
        if killed:
            logger.info("job %s left %d process(es) running; killed them", self.job_id, killed)
            self._job_log(f"SIGKILL sent to {killed} leftover process(es) the job started")
        if not child_alive:
            await child.wait_exited(10.0)

    # Deciding and finishing.

    def _decide(self, verdict: Verdict) -> JobOutcome:
        cause = self.ladder.cause
        child = self.child
        base = dict(
            queue=self.queue,
            job_id=self.job_id,
            last_step=self.ladder.step,
            elapsed_s=time.monotonic() - self.started_at,
            pid=child.pid if child else None,
        )
        if child is not None and child.returncode is not None:
            code = child.returncode
            base["exit_code"] = code if code >= 0 else None
            base["exit_signal"] = -code if code < 0 else None

        if cause is CancelCause.LOCK_LOST:
            return JobOutcome("abandoned", cause=cause, reason=self.ladder.reason, **base)
        if verdict.kind == "completed" and self.ladder.step < Step.SIGTERM:
            assert isinstance(verdict.message, protocol.Completed)
            return JobOutcome("completed", result=verdict.message.result, **base)
        if cause is not None:
            return self._cancelled_outcome(cause, base)
        if verdict.kind == "raised":
            failed = verdict.message
            assert isinstance(failed, protocol.Failed)
            return JobOutcome(
                "failed", failed_reason=f"{failed.exc_type}: {failed.message}", retryable=not failed.unrecoverable,
                traceback=failed.traceback, **base,
            )
        if verdict.kind == "invalid":
            assert isinstance(verdict.message, protocol.ResultInvalid)
            return JobOutcome("failed", failed_reason=f"result not serializable: {verdict.message.detail}", retryable=False, **base)
        if verdict.kind == "load_failed":
            return JobOutcome(
                "failed", failed_reason=f"processor load failed: {verdict.detail}", retryable=verdict.retryable,
                traceback=verdict.traceback, **base,
            )
        return JobOutcome("failed", failed_reason=verdict.detail, retryable=True, **base)

    def _cancelled_outcome(self, cause: CancelCause, base: dict[str, Any]) -> JobOutcome:
        reason = self.ladder.reason
        if cause is CancelCause.SHUTDOWN:
            return JobOutcome("handed back", cause=cause, reason=reason, **base)
        failed_reason = {
            CancelCause.USER: f"cancelled: {reason}",
            CancelCause.TIMEOUT: f"timed out: {reason}",
            CancelCause.MEMORY: f"memory limit exceeded: {reason}",
            CancelCause.CPU: f"cpu time limit exceeded: {reason}",
        }[cause]
        retryable = cause is not CancelCause.USER or self.cancel_retryable
        return JobOutcome("cancelled", cause=cause, reason=reason, failed_reason=failed_reason, retryable=retryable, **base)

    async def _finish(self, workdir: Path | None, outcome: JobOutcome | None) -> None:
        self.ladder.mark_exited()
        if self._pending_writes:
            await asyncio.gather(*self._pending_writes, return_exceptions=True)
        self.resources.release(self.job_id)
        if workdir is not None:
            await asyncio.to_thread(remove_tree, workdir)
        if outcome is not None:
            await run_hooks(self.runner.hooks, self.job, outcome, self.runner.hook_timeout_s)
