"""The ``cancel`` command: request the cancel of one job from the command line.

Usage::

    python -m sandbox_runtime cancel QUEUE JOB_ID [--reason TEXT] [--retry] [--wait SECONDS]
                                     [--redis URL | --config FILE] [--prefix PREFIX]

Exit statuses:

* 0: the cancel was recorded; with ``--wait``, the job also ended failed with a ``cancelled`` reason.
* 1: a Redis error.
* 2: a usage or configuration error.
* 3: the job was not found.
* 4: the job had already finished before the request. With ``--wait``, it ended in another way: it
  completed because it returned first, failed for another reason, or was removed from Redis before
  its outcome could be read.
* 5: with ``--wait``, the job had not finished when the wait ended.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .config import redact_url
from .control import (
    DEFAULT_REASON,
    DEFAULT_RECORD_TTL_S,
    CancelOutcome,
    FinalState,
    cancel_record_key,
    control_channel,
    request_cancel,
    wait_for_final_state,
)
from .errors import ConfigError

EXIT_OK = 0
EXIT_REDIS_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_FINISHED = 4
EXIT_STILL_RUNNING = 5

REDIS_URL_VARIABLE = "SANDBOX_RUNTIME_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "bull"

_CONNECT_TIMEOUT_S = 5.0
_COMMAND_TIMEOUT_S = 10.0

EXIT_STATUS_HELP = """\
exit status:
  0  the cancel was recorded; with --wait, the job also ended failed as cancelled
  1  Redis error
  2  usage or configuration error
  3  job not found
  4  job already finished before the request; with --wait, it ended another way
     (completed because it returned first, failed for another reason, or removed)
  5  with --wait: the job had not finished when the wait ended
"""


class _UsageError(Exception):
    """An argument or configuration problem, reported with exit status 2."""


@dataclass(frozen=True)
class _Target:
    url: str
    prefix: str
    record_ttl_s: float


def add_cancel_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``cancel`` subcommand to ``subparsers`` (from ``add_subparsers()``) and return its parser."""
    parser = subparsers.add_parser(
        "cancel",
        help="request the cancel of one job",
        description=(
            "Request the cancel of one job: write its cancel record, then publish the request on the"
            " queue's control channel. The supervisor that runs the job stops it and fails it with"
            " failedReason 'cancelled: TEXT'. A job that no supervisor runs yet is cancelled when a"
            " supervisor claims it."
        ),
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("queue", metavar="QUEUE", help="name of the BullMQ queue")
    parser.add_argument("job_id", metavar="JOB_ID", help="id of the job to cancel")
    parser.add_argument(
        "--reason",
        default=DEFAULT_REASON,
        metavar="TEXT",
        help="reason stored with the cancel and shown in the job's failedReason (default: %(default)r)",
    )
    parser.add_argument(
        "--retry",
        action="store_true",
        help=(
            "fail the job so that BullMQ retries it while attempts remain, instead of failing it for good."
            " With --wait, the wait then lasts until a later attempt finishes"
        ),
    )
    parser.add_argument(
        "--wait",
        type=_positive_seconds,
        metavar="SECONDS",
        help="wait up to SECONDS for the job to finish, then print its final state, failedReason and last ladder step",
    )

    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--redis",
        metavar="URL",
        help=f"Redis URL (default: ${REDIS_URL_VARIABLE}, else {DEFAULT_REDIS_URL})",
    )
    source.add_argument(
        "--config",
        metavar="FILE",
        help="read the Redis URL and key prefix from the [redis] table of this TOML config",
    )
    parser.add_argument(
        "--prefix",
        help=f"BullMQ key prefix (default: [redis] prefix of --config, else {DEFAULT_PREFIX!r})",
    )
    return parser


def run_cancel(args: argparse.Namespace) -> int:
    """Run the ``cancel`` command with parsed ``args``, print one line per step, and return the exit status."""
    try:
        target = _resolve_target(args)
        _check_names(args)
    except _UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(_cancel(args, target))


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _check_names(args: argparse.Namespace) -> None:
    if not args.queue:
        raise _UsageError("QUEUE is empty: pass the name of the job's queue")
    if not args.job_id:
        raise _UsageError("JOB_ID is empty: pass the id of the job to cancel")


def _resolve_target(args: argparse.Namespace) -> _Target:
    """Resolve the Redis URL, key prefix and record TTL from the flags, the config and the environment."""
    if args.config is None:
        url = args.redis or os.environ.get(REDIS_URL_VARIABLE) or DEFAULT_REDIS_URL
        return _Target(url, args.prefix or DEFAULT_PREFIX, DEFAULT_RECORD_TTL_S)

    # Imported here so that `cancel --redis` does not depend on the config loader.
    from .config import load_config

    try:
        config = load_config(args.config)
    except ConfigError as error:
        raise _UsageError(f"config {args.config}: {error}") from error
    if not config.redis.url:
        raise _UsageError(
            f"config {args.config} has no [redis] url: pass --redis URL"
            " (serve logs the address of its embedded Redis at start)"
        )
    return _Target(
        config.redis.url,
        args.prefix or config.redis.prefix,
        config.supervisor.cancel_record_ttl_s,
    )


async def _cancel(args: argparse.Namespace, target: _Target) -> int:
    try:
        client = aioredis.from_url(
            target.url, socket_connect_timeout=_CONNECT_TIMEOUT_S, socket_timeout=_COMMAND_TIMEOUT_S
        )
    except ValueError as error:
        print(f"error: invalid Redis URL {redact_url(target.url)!r}: {error}", file=sys.stderr)
        return EXIT_USAGE

    try:
        outcome = await request_cancel(
            client,
            target.prefix,
            args.queue,
            args.job_id,
            reason=args.reason,
            retry=args.retry,
            ttl_s=target.record_ttl_s,
        )
        status = _print_outcome(outcome, target)
        if status != EXIT_OK or args.wait is None:
            return status

        print(f"waiting up to {args.wait:g} s for job {args.job_id} to finish")
        final = await wait_for_final_state(client, target.prefix, args.queue, args.job_id, args.wait)
        return _print_final_state(final, args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (RedisError, OSError) as error:
        print(
            f"error: Redis at {redact_url(target.url)} failed: {type(error).__name__}: {error}."
            " Check --redis or the [redis] url of --config.",
            file=sys.stderr,
        )
        return EXIT_REDIS_ERROR
    finally:
        await client.aclose()


def _print_outcome(outcome: CancelOutcome, target: _Target) -> int:
    where = f"queue {outcome.queue!r} (prefix {target.prefix!r})"
    if outcome.status == "not_found":
        print(
            f"job {outcome.job_id} not found in {where}: nothing was recorded."
            " Check the queue name, the job id and --prefix."
        )
        return EXIT_NOT_FOUND

    print(f"job {outcome.job_id} found in {where}: state {outcome.state}")
    if outcome.status == "finished":
        print(f"job {outcome.job_id} had already {outcome.state}: nothing was recorded")
        return EXIT_FINISHED

    if outcome.lock_held:
        print("held by a supervisor")
    else:
        print("not held by any supervisor (it will be cancelled when a supervisor claims it)")
    if outcome.promoted:
        print("the job was delayed: it was promoted to waiting, so a supervisor claims it now and fails it as cancelled without running it")

    channel = control_channel(target.prefix, outcome.queue)
    record = cancel_record_key(target.prefix, outcome.queue, outcome.job_id)
    print(
        f"cancel recorded at {record} (expires in {target.record_ttl_s:g} s)"
        f" and published on {channel}: {outcome.receivers} receiver(s)"
    )
    if outcome.receivers == 0:
        print(f"no supervisor is subscribed to {channel} now, so the record cancels the job when a supervisor claims it")
    return EXIT_OK


def _print_final_state(final: FinalState, args: argparse.Namespace) -> int:
    if final.state not in ("completed", "failed", "removed"):
        print(f"job {args.job_id} had not finished after {args.wait:g} s: state {final.state}")
        print(f"last ladder step: {final.ladder_line or 'none'}")
        return EXIT_STILL_RUNNING

    print(f"final state: {final.state}")
    if final.state == "removed":
        print("the job was removed from Redis (removeOnComplete or removeOnFail) before its outcome could be read")
    if final.failed_reason is not None:
        print(f"failedReason: {final.failed_reason}")
    print(f"last ladder step: {final.ladder_line or 'none'}")

    if final.state == "failed" and (final.failed_reason or "").startswith("cancelled"):
        return EXIT_OK
    return EXIT_FINISHED
