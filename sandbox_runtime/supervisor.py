"""The supervisor: one QueueRunner per configured queue, the control channel, and shutdown.

Embedding in an asyncio application::

    async with Supervisor(config) as supervisor:
        await supervisor.wait_stopped()      # or run your own program here

``serve`` does the same and calls ``request_stop()`` on SIGTERM and SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import pwd
import grp
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis.asyncio as redis_asyncio

from .cleanup import JobOutcome, default_workdir_root, load_hook, prepare_workdir_root, remove_tree
from .config import Config, QueueConfig
from .ladder import CancelCause
from .pool import ChildPool, ProcessorSpec, sys_path_for_children
from .runner import QueueRunner
from .tree import CgroupRoot, OrphanReaper, become_subreaper

logger = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL_S = 1.0


class Supervisor:
    """Runs the processors of every configured queue in child processes."""

    def __init__(self, config: Config, *, redis_url: str | None = None) -> None:
        self.config = config
        self._redis_url_override = redis_url
        self.redis_url: str | None = None
        self.runners: dict[str, QueueRunner] = {}
        self.outcomes: Counter[str] = Counter()
        self._embedded: Any = None
        self._redis: redis_asyncio.Redis | None = None
        self._control: Any = None
        self._cgroup_root: CgroupRoot | None = None
        self._stop_requests = 0
        self._stopped = asyncio.Event()
        self._job_ended = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._started = False
        self._reaper: OrphanReaper | None = None
        self._workdir_root: Path | None = None
        self._reaper_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "Supervisor":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    @property
    def prefix(self) -> str:
        return self.config.redis.prefix

    async def start(self) -> None:
        """Connect to Redis (starting an embedded one if none is configured) and start every queue."""
        if self._started:
            raise RuntimeError("Supervisor.start() was already called")
        self._started = True
        self.redis_url = self._redis_url_override or self.config.redis.url
        if self.redis_url is None:
            from .redis_server import EmbeddedRedis

            self._embedded = EmbeddedRedis()
            self._embedded.start()
            self.redis_url = self._embedded.url
            logger.info("no Redis URL configured: started an embedded Redis at %s", self.redis_url)
        self._redis = redis_asyncio.from_url(self.redis_url)
        become_subreaper()
        self._reaper = OrphanReaper(self._own_children)
        self._reaper_task = asyncio.get_running_loop().create_task(self._housekeeping(), name="supervisor-housekeeping")
        self._cgroup_root = CgroupRoot.create()

        supervisor_settings = self.config.supervisor
        shared_root = Path(supervisor_settings.workdir_root) if supervisor_settings.workdir_root else default_workdir_root()
        workdir_root = self._workdir_root = prepare_workdir_root(shared_root)
        extra_paths = [str(self.config.source.parent)] if self.config.source is not None else []
        for index, queue in enumerate(self.config.queues):
            hooks = [load_hook(ref, f"queues[{index}].cleanup[{position}]") for position, ref in enumerate(queue.cleanup)]
            pool = ChildPool(
                queue.name,
                ProcessorSpec.from_processor(queue.processor),
                queue.sandbox,
                size=queue.concurrency,
                redis_url=self.redis_url,
                sys_path=sys_path_for_children(extra_paths),
                cgroup_root=self._cgroup_root,
            )
            runner = QueueRunner(
                queue,
                redis_url=self.redis_url,
                prefix=self.prefix,
                supervisor=self,
                pool=pool,
                hooks=hooks,
                hook_timeout_s=supervisor_settings.hook_timeout_s,
                workdir_root=workdir_root,
                workdir_owner=_account_ids(queue),
            )
            self.runners[queue.name] = runner
        await self._start_control_channel()
        for runner in self.runners.values():
            await runner.start()

    async def _start_control_channel(self) -> None:
        from .control import ControlListener

        self._control = ControlListener(
            self.redis_url,
            self.prefix,
            list(self.runners),
            on_cancel=self._on_remote_cancel,
            active_jobs=self.active_jobs,
            redis=self._redis,
            sweep_interval_s=self.config.supervisor.cancel_sweep_interval_s,
        )
        await self._control.start()

    def _own_children(self) -> set[int]:
        """Return the pids this supervisor waits for itself: its children and its embedded Redis."""
        pids = {child.pid for runner in self.runners.values() for child in runner.pool.children}
        if self._embedded is not None and self._embedded.pid is not None:
            pids.add(self._embedded.pid)
        return pids

    async def _housekeeping(self) -> None:
        """Reap adopted orphans and retire children idle past their queue's timeout, every second."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            reaped = self._reaper.sweep()
            if reaped:
                logger.debug("reaped %d exited orphan process(es)", reaped)
            now = time.monotonic()
            for runner in self.runners.values():
                runner.pool.retire_idle(now)

    # Cancellation API.

    def cancel_job(self, job_id: str, reason: str = "cancelled by the application", *, queue: str | None = None) -> bool:
        """Cancel a job running here; return False when no queue of this supervisor runs it."""
        runners = [self.runners[queue]] if queue is not None else list(self.runners.values())
        return any(runner.cancel_job(str(job_id), CancelCause.USER, reason) for runner in runners)

    def cancel_all_jobs(self, reason: str = "cancelled by the application") -> int:
        """Cancel every job running here; return how many were running."""
        return sum(runner.cancel_all(CancelCause.USER, reason) for runner in self.runners.values())

    def active_jobs(self) -> dict[str, list[str]]:
        return {name: list(runner.runs) for name, runner in self.runners.items()}

    def _on_remote_cancel(self, request: Any) -> bool:
        runner = self.runners.get(request.queue)
        if runner is None:
            return False
        return runner.cancel_job(request.job_id, CancelCause.USER, request.reason, retry=request.retry)

    async def fetch_cancel_record(self, queue: str, job_id: str) -> Any:
        from .control import fetch_cancel_records

        try:
            records = await fetch_cancel_records(self._redis, self.prefix, queue, [job_id])
        except Exception as exc:
            logger.warning("could not read cancel records for job %s: %s", job_id, exc)
            return None
        return records.get(job_id)

    async def clear_cancel_record(self, queue: str, job_id: str) -> None:
        from .control import clear_cancel_record

        try:
            await clear_cancel_record(self._redis, self.prefix, queue, job_id)
        except Exception as exc:
            logger.warning("could not remove the cancel record of job %s: %s", job_id, exc)

    def record_outcome(self, outcome: JobOutcome | None) -> None:
        """Count a finished attempt; None when the attempt ended with an unexpected error."""
        self._job_ended.set()
        if outcome is None:
            self.outcomes["error"] += 1
            return
        self.outcomes[outcome.state] += 1
        if outcome.last_step.name == "SIGKILL":
            self.outcomes["killed"] += 1

    # Shutdown.

    def request_stop(self) -> None:
        """Begin a graceful shutdown; a second call skips every ladder to SIGKILL."""
        self._stop_requests += 1
        if self._stop_requests == 1:
            self._shutdown_task = asyncio.get_running_loop().create_task(self._shutdown())
        else:
            logger.warning("second stop request: sending SIGKILL to every running job")
            for runner in self.runners.values():
                runner.escalate_all()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        """Shut down as configured and wait until everything is released."""
        if self._stop_requests == 0:
            self.request_stop()
        assert self._shutdown_task is not None
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self) -> None:
        settings = self.config.supervisor
        started = time.monotonic()
        running = sum(len(r.runs) for r in self.runners.values())
        logger.info("shutting down: policy %s, %d job(s) running, supervisor.shutdown_timeout_s = %g", settings.shutdown, running, settings.shutdown_timeout_s)
        for runner in self.runners.values():
            runner.stop_fetching()
        try:
            if settings.shutdown == "cancel":
                self._cancel_for_shutdown()
            else:
                await self._drain(settings.shutdown_timeout_s)
            await asyncio.gather(*(runner.wait_closed() for runner in self.runners.values()), return_exceptions=True)
        finally:
            await self._release()
            logger.info(
                "supervisor stopped in %.1f s: %d completed, %d failed, %d cancelled, %d handed back, %d abandoned, %d killed",
                time.monotonic() - started, self.outcomes["completed"], self.outcomes["failed"], self.outcomes["cancelled"],
                self.outcomes["handed back"], self.outcomes["abandoned"], self.outcomes["killed"],
            )
            self._stopped.set()

    async def _drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(runner.runs for runner in self.runners.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._cancel_for_shutdown()
                return
            self._job_ended.clear()
            try:
                await asyncio.wait_for(self._job_ended.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def _cancel_for_shutdown(self) -> None:
        count = sum(runner.cancel_all(CancelCause.SHUTDOWN, "supervisor is shutting down") for runner in self.runners.values())
        if count:
            logger.info("cancelling %d running job(s) for shutdown; they go back to waiting", count)

    async def _release(self) -> None:
        if self._reaper_task is not None:
            self._reaper_task.cancel()
            # Two sweeps: the second reaps what the first saw, such as orphans of the last jobs.
            self._reaper.sweep()
            self._reaper.sweep()
        if self._control is not None:
            try:
                await self._control.close()
            except Exception as exc:
                logger.warning("control channel did not close cleanly: %s", exc)
        if self._redis is not None:
            await self._redis.aclose()
        if self._cgroup_root is not None:
            self._cgroup_root.remove()
        if self._workdir_root is not None:
            remove_tree(self._workdir_root)
        if self._embedded is not None:
            self._embedded.stop()


def _account_ids(queue: QueueConfig) -> tuple[int, int] | None:
    user = queue.sandbox.user
    if user is None:
        return None
    entry = pwd.getpwnam(user)
    gid = grp.getgrnam(queue.sandbox.group).gr_gid if queue.sandbox.group else entry.pw_gid
    return entry.pw_uid, gid
