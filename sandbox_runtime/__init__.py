"""sandbox-runtime: run BullMQ job processors in supervised child processes.

The public API is what this module exports; everything else is internal.
"""

from .cleanup import JobOutcome
from .config import (
    Config,
    EscalationSettings,
    QueueConfig,
    RedisSettings,
    SandboxSettings,
    SupervisorSettings,
    load_config,
)
from .errors import ChildStartError, ConfigError, SandboxRuntimeError
from .ladder import CancelCause, Step
from .supervisor import Supervisor

__all__ = [
    "CancelCause",
    "ChildStartError",
    "Config",
    "ConfigError",
    "EscalationSettings",
    "JobOutcome",
    "QueueConfig",
    "RedisSettings",
    "SandboxRuntimeError",
    "SandboxSettings",
    "Step",
    "Supervisor",
    "SupervisorSettings",
    "load_config",
]
