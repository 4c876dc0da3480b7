"""Helpers shared by the benchmark scripts: statistics, machine facts, tables, Redis and supervisor setup.

The scripts import this module by name, which works because Python puts the script's own
directory (``bench/``) first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

import bullmq

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

from sandbox_runtime import (  # noqa: E402
    Config,
    EscalationSettings,
    QueueConfig,
    RedisSettings,
    SandboxSettings,
    Supervisor,
    SupervisorSettings,
)
from sandbox_runtime.redis_server import EmbeddedRedis  # noqa: E402

PROCESSORS_FILE = BENCH_DIR / "processors.py"


def processor_ref(function: str) -> str:
    """Return the ``path/to/file.py:function`` reference of a processor in bench/processors.py."""
    return f"{PROCESSORS_FILE}:{function}"


# Statistics.


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the ``fraction`` quantile (0..1) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    lower = math.floor(position)
    upper = math.ceil(position)
    if lower == upper:
        return ordered[lower]
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Return n, median, p95, min and max of ``values``."""
    if not values:
        return {"n": 0, "median": math.nan, "p95": math.nan, "min": math.nan, "max": math.nan}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p95": percentile(values, 0.95),
        "min": min(values),
        "max": max(values),
    }


def ns_to_ms(nanoseconds: int | float) -> float:
    return nanoseconds / 1e6


# Machine facts, so every result names the hardware it came from.


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {
        "date_utc": time.strftime("%Y-%m-%d", time.gmtime()),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "load_average_1m_at_end": round(load[0], 2),
    }


# Output.


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Format rows as a Markdown table: text left-aligned, numbers right-aligned, floats with two decimals."""
    cells = [[_format_cell(value) for value in row] for row in rows]
    widths = [max(len(str(header)), *(len(row[index]) for row in cells)) for index, header in enumerate(headers)]
    lines = [
        "| " + " | ".join(str(header).ljust(widths[index]) for index, header in enumerate(headers)) + " |",
        "|" + "|".join("-" * (width + 2) for width in widths) + "|",
    ]
    for row, values in zip(cells, rows):
        aligned = [
            cell.ljust(widths[index]) if isinstance(value, str) else cell.rjust(widths[index])
            for index, (cell, value) in enumerate(zip(row, values))
        ]
        lines.append("| " + " | ".join(aligned) + " |")
    return "\n".join(lines)


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def emit_report(title: str, table: str, results: dict[str, Any], as_json: bool) -> None:
    """Print the table (or the JSON document) to stdout, with the machine facts."""
    machine = machine_info()
    if as_json:
        print(json.dumps({"benchmark": title, "machine": machine, "results": results}, indent=2, default=_json_default))
        return
    print(f"{title}")
    print(
        f"machine: {machine['cpus']} CPUs ({machine['cpu_model']}), Linux {machine['kernel']}, "
        f"Python {machine['python']}, load average {machine['load_average_1m_at_end']} at the end, {machine['date_utc']}"
    )
    print()
    print(table)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document instead of a table")
    parser.add_argument("--verbose", action="store_true", help="show the supervisor's INFO log lines on stderr")
    return parser


def configure_logging(verbose: bool) -> None:
    """Log to stderr; WARNING and above unless ``verbose``, because per-job INFO lines cost time."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        # The ladder's SIGTERM/SIGKILL warnings are expected in these measurements.
        logging.getLogger("sandbox_runtime").setLevel(logging.ERROR)


# Redis and supervisor.


@contextlib.contextmanager
def private_redis() -> Iterator[EmbeddedRedis]:
    """Start a private Redis without persistence on a free 127.0.0.1 port, for one script run."""
    server = EmbeddedRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def queue_config(
    name: str,
    processor: str,
    *,
    concurrency: int = 1,
    cancel_grace_s: float = 10.0,
    term_grace_s: float = 5.0,
    sandbox: SandboxSettings | None = None,
) -> QueueConfig:
    return QueueConfig(
        name=name,
        processor=processor,
        concurrency=concurrency,
        escalation=EscalationSettings(cancel_grace_s=cancel_grace_s, term_grace_s=term_grace_s),
        sandbox=sandbox or SandboxSettings(),
    )


@contextlib.asynccontextmanager
async def running_supervisor(redis_url: str, *queues: QueueConfig) -> AsyncIterator[Supervisor]:
    """Run a Supervisor for the block; on the way out, cancel what still runs and stop it."""
    config = Config(
        queues=tuple(queues),
        redis=RedisSettings(url=redis_url),
        supervisor=SupervisorSettings(shutdown="cancel", shutdown_timeout_s=5.0),
    )
    supervisor = Supervisor(config)
    await supervisor.start()
    try:
        yield supervisor
    finally:
        await supervisor.stop()


async def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.001) -> Any:
    """Poll ``predicate()`` (sync, or returning an awaitable) until it returns a truthy value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(interval_s)


def read_int_file(path: Path) -> int | None:
    """Return the integer a processor wrote to ``path``, or None while the file is missing or partly written."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    if not text.endswith("\n"):
        return None
    return int(text)


@dataclass(frozen=True)
class FinishedJob:
    """A "completed" or "failed" event of a worker, with ``time.monotonic_ns()`` when it was emitted."""

    job_id: str
    state: str
    at_ns: int
    result: Any = None
    error: Any = None
    job: Any = None


class JobEvents:
    """Collects the "completed" and "failed" events of a ``bullmq.Worker``.

    The worker emits both after it has written the outcome to Redis, so ``at_ns`` is the moment the
    job's final state is stored, as seen by the process that runs the worker.
    """

    def __init__(self, worker: bullmq.Worker) -> None:
        self.finished: dict[str, FinishedJob] = {}
        self._waiters: dict[str, asyncio.Future[FinishedJob]] = {}
        self._count_target: int | None = None
        self._count_reached = asyncio.Event()
        worker.on("completed", lambda job, result: self._record(FinishedJob(str(job.id), "completed", time.monotonic_ns(), result=result, job=job)))
        worker.on("failed", lambda job, error: self._record(FinishedJob(str(job.id), "failed", time.monotonic_ns(), error=error, job=job)))

    @property
    def failures(self) -> list[FinishedJob]:
        return [event for event in self.finished.values() if event.state == "failed"]

    def _record(self, event: FinishedJob) -> None:
        self.finished[event.job_id] = event
        waiter = self._waiters.pop(event.job_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(event)
        if self._count_target is not None and len(self.finished) >= self._count_target:
            self._count_reached.set()

    async def wait_for_job(self, job_id: str, timeout_s: float = 60.0) -> FinishedJob:
        """Return the event that finished ``job_id``, waiting for it when it has not happened yet."""
        if job_id in self.finished:
            return self.finished[job_id]
        future: asyncio.Future[FinishedJob] = asyncio.get_running_loop().create_future()
        self._waiters[job_id] = future
        try:
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"job {job_id} did not finish within {timeout_s:g} s") from None
        finally:
            self._waiters.pop(job_id, None)

    async def wait_for_count(self, count: int, timeout_s: float) -> None:
        """Wait until ``count`` jobs have finished in total."""
        self._count_target = count
        if len(self.finished) < count:
            self._count_reached.clear()
            try:
                await asyncio.wait_for(self._count_reached.wait(), timeout_s)
            except asyncio.TimeoutError:
                raise TimeoutError(f"{len(self.finished)} of {count} jobs finished within {timeout_s:g} s") from None


def require_completed(event: FinishedJob) -> FinishedJob:
    if event.state != "completed":
        raise RuntimeError(f"job {event.job_id} failed ({event.error}), expected it to complete")
    return event
