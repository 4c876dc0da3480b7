"""Command line: ``python -m sandbox_runtime serve | cancel | check-config | demo``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Sequence

from redis.exceptions import RedisError

from .config import LOG_LEVELS, check_config_main, load_config, redact_url
from .errors import ConfigError

logger = logging.getLogger("sandbox_runtime")

EXIT_REDIS_ERROR = 1
EXIT_CONFIG_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIG_ERROR
    return int(args.run(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    from .cancel_cli import add_cancel_parser, run_cancel

    parser = argparse.ArgumentParser(
        prog="python -m sandbox_runtime",
        description="Run BullMQ job processors in supervised child processes.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the configured queues until SIGTERM or SIGINT")
    serve.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
    serve.add_argument("--redis", metavar="URL", help="Redis URL; overrides [redis] url (with neither, an embedded Redis is started)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="overrides [supervisor] log_level")
    serve.set_defaults(run=run_serve)

    cancel = add_cancel_parser(commands)
    cancel.set_defaults(run=run_cancel)

    check = commands.add_parser("check-config", help="validate a configuration file and print the effective settings")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(run=lambda args: check_config_main(args.file))

    demo = commands.add_parser("demo", help="run example jobs on an embedded Redis and show how each one ends")
    demo.add_argument("--log-level", choices=LOG_LEVELS, default="WARNING", help="supervisor log level during the demo (default WARNING)")
    demo.set_defaults(run=run_demo)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    configure_logging(args.log_level or config.supervisor.log_level)
    try:
        return asyncio.run(_serve(config, args.redis))
    except ConfigError as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except (RedisError, OSError) as exc:
        url = redact_url(args.redis or config.redis.url)
        print(f"error: could not use Redis at {url}: {exc}; check that it runs and that [redis] url or --redis is right", file=sys.stderr)
        return EXIT_REDIS_ERROR


async def _serve(config, redis_url: str | None) -> int:
    from .supervisor import Supervisor

    supervisor = Supervisor(config, redis_url=redis_url)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_stop_signal, supervisor, signum)
    try:
        await supervisor.start()
        logger.info("serving %d queue(s); send SIGTERM or SIGINT to stop", len(config.queues))
        await supervisor.wait_stopped()
    except BaseException:
        if supervisor._started:
            await supervisor.stop()
        raise
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


def _on_stop_signal(supervisor, signum: int) -> None:
    logger.info("received %s", signal.Signals(signum).name)
    supervisor.request_stop()


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    configure_logging(args.log_level)
    return asyncio.run(demo())
