"""One queue: a ``bullmq.Worker`` that pulls jobs and renews their locks, and a pool of children.

The worker's processor never runs user code. It hands the job to a JobRun, which runs it in a child,
then turns the outcome into what BullMQ expects: a return value, an exception, or a DelayedError
after which the worker writes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import bullmq
from bullmq.custom_errors import DelayedError, UnrecoverableError

from .cleanup import CleanupHook, JobOutcome
from .config import QueueConfig
from .jobrun import JobRun
from .ladder import CancelCause, Step
from .pool import ChildPool, ProcessorSpec

logger = logging.getLogger(__name__)

# Time Worker.close() gets once no job runs; past it the worker's pending fetches are cancelled.
WORKER_CLOSE_TIMEOUT_S = 15.0


class QueueRunner:
    def __init__(
        self,
        config: QueueConfig,
        *,
        redis_url: str,
        prefix: str,
        supervisor: Any,
        pool: ChildPool,
        hooks: list[tuple[str, CleanupHook]],
        hook_timeout_s: float,
        workdir_root: Path,
        workdir_owner: tuple[int, int] | None,
    ) -> None:
        self.config = config
        self.redis_url = redis_url
        self.prefix = prefix
        self.supervisor = supervisor
        self.pool = pool
        self.hooks = hooks
        self.hook_timeout_s = hook_timeout_s
        self.workdir_root = workdir_root
        self.workdir_owner = workdir_owner
        self.runs: dict[str, JobRun] = {}
        self.stopping = False
        self.worker: bullmq.Worker | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._hand_back_script: Any = None

    @property
    def name(self) -> str:
        return self.config.name

    async def start(self) -> None:
        options = {
            "connection": self.redis_url,
            "prefix": self.prefix,
            "concurrency": self.config.concurrency,
            "lockDuration": self.config.lock_duration_ms,
            "stalledInterval": self.config.stalled_interval_ms,
            "maxStalledCount": self.config.max_stalled_count,
            "autorun": False,
        }
        self.worker = bullmq.Worker(self.config.name, self._process, options)
        self.worker.on("lockRenewalFailed", self._on_lock_renewal_failed)
        self.worker.on("error", self._on_worker_error)
        self.worker.on("stalled", lambda job_id, *rest: logger.warning("job %s of queue %s stalled and was moved back to waiting", job_id, self.name))
        self._hand_back_script = _register_hand_back_script(self.worker)
        self._run_task = asyncio.create_task(self.worker.run(), name=f"bullmq-worker-{self.name}")
        logger.info(
            "serving queue %s: processor %s, concurrency %d, lock_duration_ms %d",
            self.name, self.pool.spec.describe(), self.config.concurrency, self.config.lock_duration_ms,
        )

    def stop_fetching(self) -> None:
        """Stop claiming jobs at once; running jobs go on until they end or are cancelled."""
        self.stopping = True
        if self.worker is not None and self._close_task is None:
            self._close_task = asyncio.create_task(self.worker.close())

    async def wait_closed(self) -> None:
        if self._close_task is not None:
            deadline = time.monotonic() + WORKER_CLOSE_TIMEOUT_S
            while not self._close_task.done() and time.monotonic() < deadline:
                self._interrupt_blocking_fetch()
                await asyncio.wait({self._close_task}, timeout=0.05)
            if not self._close_task.done():
                await self._cancel_stuck_fetches()
            else:
                await self._close_task
        if self._run_task is not None:
            try:
                await asyncio.wait_for(self._run_task, 10.0)
            except (asyncio.TimeoutError, Exception) as exc:
                logger.debug("worker loop of queue %s ended with %r", self.name, exc)
        await self.pool.close()

    async def _cancel_stuck_fetches(self) -> None:
        """Cancel what keeps Worker.close() from returning; no job runs by now, only fetches."""
        logger.warning(
            "queue %s: the bullmq worker did not close within %g s; cancelling its pending fetches",
            self.name, WORKER_CLOSE_TIMEOUT_S,
        )
        stuck = [task for task in getattr(self.worker, "processing", ()) if not task.done()]
        for task in stuck:
            task.cancel()
        await asyncio.wait({self._close_task}, timeout=5.0)
        if not self._close_task.done():
            logger.error("queue %s: the bullmq worker still did not close; leaving it", self.name)
            self._close_task.cancel()

    def _interrupt_blocking_fetch(self) -> None:
        # bullmq 3.4.4's Worker.close() cancels the blocking BZPOPMIN only if it has already
        # started. A fetch task that starts its BZPOPMIN just after close() then blocks close()
        # for as long as Redis lets it, so keep cancelling until close() is done.
        waiting = getattr(self.worker, "waiting", None)
        if waiting is not None and not waiting.done():
            waiting.cancel()

    # Cancel requests.

    def cancel_job(self, job_id: str, cause: CancelCause, reason: str, *, retry: bool = False) -> bool:
        run = self.runs.get(str(job_id))
        if run is None:
            return False
        run.request_cancel(cause, reason, retry=retry)
        return True

    def cancel_all(self, cause: CancelCause, reason: str) -> int:
        for run in list(self.runs.values()):
            run.request_cancel(cause, reason)
        return len(self.runs)

    def escalate_all(self) -> None:
        """SIGKILL every running job at once, as a shutdown: the jobs go back to waiting."""
        for run in list(self.runs.values()):
            run.request_cancel(CancelCause.SHUTDOWN, "supervisor is shutting down (second stop request)")
            run.escalate_now()

    def _on_lock_renewal_failed(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            run = self.runs.get(str(job_id))
            # The worker reports the same job on every renewal until the attempt ends: log the first.
            if run is not None and run.request_cancel(CancelCause.LOCK_LOST, "lock renewal failed"):
                logger.warning("lock renewal failed: queue=%s job=%s; stopping its child and writing nothing", self.name, job_id)

    def _on_worker_error(self, error: Any, *args: Any) -> None:
        text = str(error)
        if "Missing lock" in text or "could not renew lock" in text:
            logger.warning("queue %s: %s", self.name, text)
        else:
            logger.error("queue %s: worker error: %r", self.name, error)

    async def fetch_cancel_record(self, job_id: str) -> Any:
        return await self.supervisor.fetch_cancel_record(self.name, job_id)

    # The processor bullmq.Worker calls.

    async def _process(self, job: Any, token: str, signal: Any) -> Any:
        run = JobRun(self, job, token)
        self.runs[run.job_id] = run
        watcher = asyncio.create_task(self._watch_worker_signal(run, signal))
        outcome: JobOutcome | None = None
        try:
            outcome = await run.execute()
        finally:
            watcher.cancel()
            self.runs.pop(run.job_id, None)
            self.supervisor.record_outcome(outcome)
        _log_outcome(outcome)
        if run.ladder.cause is CancelCause.USER and outcome.cause is not CancelCause.USER:
            # The job ended some other way (it returned first, say): its cancel record is spent.
            await self.supervisor.clear_cancel_record(self.name, outcome.job_id)
        return await self._write_outcome(job, token, outcome)

    async def _watch_worker_signal(self, run: JobRun, signal: Any) -> None:
        """Turn ``Worker.cancelJob`` on the underlying bullmq worker into a cancel of cause user."""
        await signal.wait()
        run.request_cancel(CancelCause.USER, signal.reason or "cancelled with Worker.cancelJob")

    async def _write_outcome(self, job: Any, token: str, outcome: JobOutcome) -> Any:
        if outcome.state == "completed":
            return outcome.result
        if outcome.state == "abandoned":
            raise DelayedError("lock lost: nothing written for this attempt")
        if outcome.state == "handed back":
            await self._hand_back(job, token)
            raise DelayedError("handed back for shutdown")
        if outcome.cause is CancelCause.USER:
            await self.supervisor.clear_cancel_record(self.name, outcome.job_id)
        message = outcome.failed_reason or "failed"
        error: Exception = Exception(message) if outcome.retryable else UnrecoverableError(message)
        stack = outcome.traceback or _ladder_summary(outcome)
        job.updateStacktrace = lambda: job.stacktrace.append(stack)
        raise error

    async def _hand_back(self, job: Any, token: str) -> None:
        """Move an active job back to waiting without spending an attempt."""
        try:
            if self._hand_back_script is not None:
                keys = self.worker.scripts.getKeys(["active", "wait", "stalled", "paused", "meta", "limiter", "prioritized", "marker", "events"])
                job_key = f"{self.prefix}:{self.name}:{job.id}"
                result = await self._hand_back_script(keys=keys, args=[job.id, token, job_key])
                if isinstance(result, int) and result < 0:
                    logger.warning("job %s could not be handed back (code %d): its lock is gone; the stalled-job check will return it", job.id, result)
                return
            await job.moveToDelayed(int(time.time() * 1000), token)
        except Exception as exc:
            logger.error("job %s could not be handed back: %s; the stalled-job check will return it", job.id, exc)


def _register_hand_back_script(worker: bullmq.Worker) -> Any:
    from bullmq import redis_connection

    path = os.path.join(os.path.dirname(redis_connection.__file__), "commands", "moveJobFromActiveToWait-9.lua")
    client = getattr(worker, "client", None)
    if client is None or not os.path.exists(path):
        return None
    with open(path) as handle:
        return client.register_script(handle.read())


def _ladder_summary(outcome: JobOutcome) -> str:
    parts = [f"{outcome.failed_reason}"]
    if outcome.last_step > Step.RUNNING:
        parts.append(f"last ladder step: {outcome.last_step.name.lower()}")
    if outcome.exit_signal:
        parts.append(f"child pid {outcome.pid} ended by signal {outcome.exit_signal}")
    elif outcome.exit_code is not None:
        parts.append(f"child pid {outcome.pid} exited with code {outcome.exit_code}")
    return "\n".join(parts)


def _log_outcome(outcome: JobOutcome) -> None:
    if outcome.state == "completed":
        logger.info("job completed: queue=%s job=%s pid=%s in %.2f s", outcome.queue, outcome.job_id, outcome.pid, outcome.elapsed_s)
    elif outcome.state in ("handed back", "abandoned"):
        logger.info(
            "job %s: queue=%s job=%s cause=%s last step=%s in %.2f s",
            outcome.state, outcome.queue, outcome.job_id, outcome.cause.value if outcome.cause else "-", outcome.last_step.name, outcome.elapsed_s,
        )
    else:
        logger.warning(
            "job %s: queue=%s job=%s pid=%s reason=%r retryable=%s last step=%s in %.2f s",
            outcome.state, outcome.queue, outcome.job_id, outcome.pid, outcome.failed_reason, outcome.retryable, outcome.last_step.name, outcome.elapsed_s,
        )
