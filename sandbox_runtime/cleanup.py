"""Cleanup that lives in the supervisor, so it happens even after a child was SIGKILLed.

Three kinds: the per-job working directory, resources a processor handed over from the child
(a path to delete, a process to kill), and configured hooks called with the job and its outcome.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil

from .errors import ConfigError
from .ladder import CancelCause, Step

logger = logging.getLogger(__name__)

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class JobOutcome:
    """The outcome of one attempt of a job, as cleanup hooks receive it.

    ``state`` is ``completed``, ``failed``, ``cancelled`` (stopped by a cancel request of any
    cause), ``handed back`` (returned to waiting for shutdown) or ``abandoned`` (the lock was
    lost, so nothing was written).
    """

    state: str
    queue: str
    job_id: str
    cause: CancelCause | None = None
    reason: str | None = None
    failed_reason: str | None = None
    last_step: Step = Step.RUNNING
    exit_code: int | None = None
    exit_signal: int | None = None
    elapsed_s: float = 0.0
    result: Any = None
    retryable: bool = False
    pid: int | None = None
    traceback: str | None = None


def default_workdir_root() -> Path:
    return Path(tempfile.gettempdir()) / "sandbox-runtime"


def prepare_workdir_root(shared_root: Path) -> Path:
    """Return this supervisor's own directory for job workdirs under ``shared_root``.

    Supervisors share ``shared_root``; each uses ``supervisor-<pid>`` below it. Directories of
    supervisors that are no longer running (killed before they could clean up) are removed here.
    """
    shared_root.mkdir(parents=True, exist_ok=True)
    os.chmod(shared_root, 0o711)
    for stale in shared_root.glob("supervisor-*"):
        try:
            pid = int(stale.name.split("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not psutil.pid_exists(pid):
            logger.info("removing %s, left by a supervisor that is no longer running", stale)
            remove_tree(stale)
    own = shared_root / f"supervisor-{os.getpid()}"
    own.mkdir(exist_ok=True)
    os.chmod(own, 0o711)
    return own


def create_workdir(root: Path, queue: str, job_id: str, owner: tuple[int, int] | None) -> Path:
    """Create a fresh private directory for one job attempt, owned by ``owner`` (uid, gid) if given.

    ``root`` comes from ``prepare_workdir_root``, which created it once for this supervisor.
    """
    prefix = _UNSAFE_NAME_CHARS.sub("_", f"{queue}-{job_id}")[:80] + "-"
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    if owner is not None:
        os.chown(path, owner[0], owner[1])
    return path


def remove_tree(path: Path) -> None:
    """Remove ``path`` whatever it contains; log what could not be removed."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        try:
            path.unlink()
        except OSError as exc:
            logger.warning("could not remove %s: %s", path, exc)
        return

    def make_writable_and_retry(function: Callable[..., Any], failed_path: str, exc_info: Any) -> None:
        try:
            os.chmod(os.path.dirname(failed_path), 0o700)
            if os.path.isdir(failed_path) and not os.path.islink(failed_path):
                os.chmod(failed_path, 0o700)
            function(failed_path)
        except OSError as exc:
            logger.warning("could not remove %s: %s", failed_path, exc)

    shutil.rmtree(path, onerror=make_writable_and_retry)


@dataclass
class HandedResources:
    """Resources a processor asked the supervisor to release after its job."""

    paths: list[Path] = field(default_factory=list)
    processes: list[tuple[int, float | None]] = field(default_factory=list)

    def release(self, job_id: str) -> None:
        for pid, create_time in self.processes:
            _kill_if_same(pid, create_time, job_id)
        for path in self.paths:
            if os.path.lexists(path):
                logger.info("job %s: removing %s handed over by the processor", job_id, path)
                remove_tree(path)


def _kill_if_same(pid: int, create_time: float | None, job_id: str) -> None:
    try:
        process = psutil.Process(pid)
        if create_time is not None and abs(process.create_time() - create_time) > 0.01:
            return  # the pid now belongs to another process
        if process.status() == psutil.STATUS_ZOMBIE:
            _reap(pid)
            return
        logger.info("job %s: killing process %d handed over by the processor", job_id, pid)
        process.kill()
        process.wait(timeout=5)
    except psutil.TimeoutExpired:
        logger.warning("job %s: process %d did not exit within 5 s of SIGKILL", job_id, pid)
    except psutil.Error:
        pass
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except OSError:
        pass


CleanupHook = Callable[[Any, JobOutcome], Any]


def load_hook(reference: str | CleanupHook, key: str) -> tuple[str, CleanupHook]:
    """Import a hook named ``package.module:function``; return (name, callable)."""
    if callable(reference):
        return getattr(reference, "__qualname__", repr(reference)), reference
    module_name, sep, attribute = reference.partition(":")
    if not sep:
        raise ConfigError(key, f"cleanup hook {reference!r} is not of the form package.module:function")
    try:
        value: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            value = getattr(value, part)
    except Exception as exc:
        raise ConfigError(key, f"cleanup hook {reference!r} could not be loaded: {type(exc).__name__}: {exc}") from exc
    if not callable(value):
        raise ConfigError(key, f"cleanup hook {reference!r} is not callable")
    return reference, value


async def run_hooks(hooks: list[tuple[str, CleanupHook]], job: Any, outcome: JobOutcome, timeout_s: float) -> None:
    """Call every hook once with (job, outcome); a hook that raises or hangs is logged and skipped."""
    for name, hook in hooks:
        try:
            if inspect.iscoroutinefunction(hook):
                await asyncio.wait_for(hook(job, outcome), timeout_s)
            else:
                result = await asyncio.wait_for(asyncio.shield(asyncio.to_thread(hook, job, outcome)), timeout_s)
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, timeout_s)
        except asyncio.TimeoutError:
            # A sync hook keeps its thread until it returns; the supervisor no longer waits for it.
            logger.error("cleanup hook %s for job %s did not finish within %g s (supervisor.hook_timeout_s); abandoned", name, outcome.job_id, timeout_s)
        except Exception:
            logger.exception("cleanup hook %s for job %s raised", name, outcome.job_id)
