"""Exceptions raised by the supervisor side of sandbox-runtime.

Tree::

    SandboxRuntimeError
    ├── ConfigError                 invalid configuration file or value; names ``table.key``
    ├── ChildStartError             a child did not complete its READY handshake
    ├── MalformedControlMessage     a control-channel message was rejected (in ``control``)
    └── EmbeddedRedisError          the embedded redis-server did not start (in ``redis_server``)
        └── PortInUseError          the requested port is taken

A child that sends an invalid frame raises nothing in the supervisor: the job fails with
``child crashed: invalid protocol frame (...)``.

The exception raised *inside* a child to stop a processor lives in ``child.errors``
(``JobTerminated``, derived from ``BaseException``), because the child imports nothing from
this package.
"""

from __future__ import annotations


class SandboxRuntimeError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(SandboxRuntimeError, ValueError):
    """A configuration value is invalid.

    ``key`` is the dotted path of the offending setting, for example ``queues[0].concurrency``.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.detail = message


class ChildStartError(SandboxRuntimeError):
    """A child process exited or timed out before it reported READY."""
