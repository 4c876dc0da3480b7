"""Exceptions raised by the supervisor side of sandbox-runtime.

Tree::

    SandboxRuntimeError
    ├── ConfigError            a configuration file or value is invalid; names ``table.key``
    ├── ChildStartError        a child process did not complete its READY handshake
    └── ProtocolError          a child sent a frame the supervisor cannot decode

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


class ProtocolError(SandboxRuntimeError):
    """A frame from a child could not be decoded or had an unknown kind."""
