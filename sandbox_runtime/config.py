"""Configuration: frozen dataclasses with defaults, and the TOML loader that fills them.

Units are part of every key name (``_s`` seconds, ``_ms`` milliseconds, ``_mb`` MiB).
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import grp
import json
import keyword
import math
import os
import pwd
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, TextIO
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError

SHUTDOWN_POLICIES = ("drain", "cancel")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def redact_url(url: str | None) -> str | None:
    """Return ``url`` with any password replaced by ``***``."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class RedisSettings:
    """The Redis the supervisor uses. ``url`` None means: start an embedded Redis."""

    url: str | None = None
    prefix: str = "bull"

    def __repr__(self) -> str:
        return f"RedisSettings(url={redact_url(self.url)!r}, prefix={self.prefix!r})"


@dataclass(frozen=True)
class SupervisorSettings:
    """Process-wide behaviour of ``serve``."""

    shutdown: str = "drain"
    shutdown_timeout_s: float = 60.0
    hook_timeout_s: float = 10.0
    cancel_sweep_interval_s: float = 2.0
    cancel_record_ttl_s: int = 86400
    workdir_root: str | None = None
    log_level: str = "INFO"


@dataclass(frozen=True)
class EscalationSettings:
    """Deadlines of the cancellation ladder, and the job timeout."""

    cancel_grace_s: float = 10.0
    term_grace_s: float = 5.0
    job_timeout_s: float = 0.0


@dataclass(frozen=True)
class SandboxSettings:
    """Limits and environment of the child processes of one queue."""

    max_jobs_per_child: int = 0
    idle_timeout_s: float = 0.0
    memory_limit_mb: int = 0
    address_space_limit_mb: int = 0
    cpu_time_limit_s: float = 0.0
    start_timeout_s: float = 30.0
    user: str | None = None
    group: str | None = None
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    inherit_redis_env: bool = False
    core_dumps: bool = False
    python: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.env, MappingProxyType):
            object.__setattr__(self, "env", MappingProxyType(dict(self.env)))


@dataclass(frozen=True)
class QueueConfig:
    """One BullMQ queue served by the supervisor.

    ``processor`` is ``package.module:function``, ``path/to/file.py:function``, or (from the
    Python API only) a callable that is shipped to the child with cloudpickle.
    """

    name: str
    processor: str | Callable[..., Any]
    concurrency: int = 1
    lock_duration_ms: int = 30000
    stalled_interval_ms: int = 30000
    max_stalled_count: int = 1
    escalation: EscalationSettings = field(default_factory=EscalationSettings)
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
    cleanup: tuple[str | Callable[..., Any], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.cleanup, tuple):
            object.__setattr__(self, "cleanup", tuple(self.cleanup))


@dataclass(frozen=True)
class Config:
    """The whole effective configuration. ``source`` is the TOML file it came from, if any."""

    queues: tuple[QueueConfig, ...]
    redis: RedisSettings = field(default_factory=RedisSettings)
    supervisor: SupervisorSettings = field(default_factory=SupervisorSettings)
    source: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.queues, tuple):
            object.__setattr__(self, "queues", tuple(self.queues))

    def queue(self, name: str) -> QueueConfig:
        """Return the queue called ``name``; raise KeyError when there is none."""
        for queue in self.queues:
            if queue.name == name:
                return queue
        raise KeyError(name)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------
# TOML loader
#
# Every check raises ConfigError with the dotted key of the setting (``supervisor.shutdown``,
# ``queues[1].escalation.cancel_grace_s``) and a message of the form
# "invalid value <repr> (<TOML type>), expected <what is allowed>; <how to fix it>".
# ---------------------------------------------------------------------------

REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")
MAX_CONCURRENCY = 1000

# A validator takes the dotted key and the raw TOML value and returns the value to store.
Validator = Callable[[str, Any], Any]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SECRET_ENV_NAME = re.compile(r"PASS|SECRET|TOKEN|KEY|CREDENTIAL|AUTH", re.IGNORECASE)
_URL_USERINFO = re.compile(r"//[^/@]*@")
_UNITS = {"_s": "seconds", "_ms": "milliseconds", "_mb": "MiB"}
_PROCESSOR_FORMS = "'package.module:function' or 'path/to/file.py:function'"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read the TOML file at ``path`` and return its validated, merged :class:`Config`.

    Raises ConfigError with key ``file`` when the file cannot be read or is not valid TOML,
    and with the dotted key of the setting when a value is invalid.
    """
    file_path = Path(path).expanduser()
    data = _read_toml(file_path)
    return parse_config(data, source=file_path.resolve())


def _read_toml(path: Path) -> dict[str, Any]:
    quoted_path = repr(str(path))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        message = f"{quoted_path} not found; pass the path of an existing TOML file"
        raise ConfigError("file", message) from None
    except IsADirectoryError:
        raise ConfigError("file", f"{quoted_path} is a directory; pass the path of a TOML file") from None
    except OSError as exc:
        message = f"cannot read {quoted_path}: {exc.strerror}; check the path and its permissions"
        raise ConfigError("file", message) from exc

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        message = f"{quoted_path} is not valid UTF-8 (byte offset {exc.start}); save the file as UTF-8"
        raise ConfigError("file", message) from exc

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line L, column C)".
        message = f"{quoted_path} is not valid TOML: {exc}; fix the syntax at that position"
        raise ConfigError("file", message) from exc


def parse_config(data: Mapping[str, Any], source: Path | None = None) -> Config:
    """Validate parsed TOML ``data`` and return the effective :class:`Config`.

    A queue's ``escalation`` and ``sandbox`` values are merged over the top-level ``[escalation]``
    and ``[sandbox]`` tables, which are merged over the dataclass defaults. ``sandbox.env`` is
    merged variable by variable. A queue's effective ``cleanup`` is the top-level list followed
    by its own. Relative processor paths and ``workdir_root`` are resolved against the directory
    of ``source``, or against the current directory when ``source`` is None, and stored absolute
    because each job runs with its own working directory.
    """
    _require_table("file", data, "the top level of a TOML document is a table")
    _reject_unknown_keys("", data, _TOP_LEVEL_KEYS)
    base_dir = source.parent if source is not None else Path.cwd()

    redis = RedisSettings(**_parse_table("redis", data.get("redis", {}), _REDIS_FIELDS))
    supervisor = _parse_supervisor(data.get("supervisor", {}), base_dir)
    defaults = _QueueDefaults(
        escalation=_merge_escalation(EscalationSettings(), "escalation", data.get("escalation", {})),
        sandbox=_merge_sandbox(SandboxSettings(), "sandbox", data.get("sandbox", {})),
        cleanup=_parse_cleanup("cleanup", data.get("cleanup", [])),
    )
    queues = _parse_queues(data.get("queues"), defaults, base_dir)
    return Config(queues=queues, redis=redis, supervisor=supervisor, source=source)


def format_config(config: Config) -> str:
    """Render every effective setting of ``config`` as TOML-like text for ``check-config``.

    The Redis URL password is replaced by ``***``. So are URL passwords in ``sandbox.env``
    values and the whole value of variables whose names suggest a secret (PASS, SECRET, TOKEN,
    KEY, CREDENTIAL, AUTH).
    """
    source = config.source if config.source is not None else "(not loaded from a file)"
    lines = [f"# Effective configuration of {source}", ""]
    lines += _format_section("redis", config.redis)
    lines += _format_section("supervisor", config.supervisor)
    for queue in config.queues:
        lines += _format_section("queues", queue, array=True)
    return "\n".join(lines).rstrip("\n") + "\n"


def check_config_main(path: str, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``check-config``: print the effective settings of ``path`` and return the exit status.

    Returns 0 for a valid file. For an invalid one, writes ``error: <file>: <key>: <message>``
    on one line to ``err`` and returns 2. ``out`` and ``err`` default to the current
    ``sys.stdout`` and ``sys.stderr``.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        config = load_config(path)
        check_hooks_import(config)
    except ConfigError as exc:
        detail = " ".join(exc.detail.splitlines())
        print(f"error: {path}: {exc.key}: {detail}", file=err)
        return 2
    out.write(format_config(config))
    return 0


def check_hooks_import(config: Config) -> None:
    """Import every cleanup hook as ``serve`` does; raise ConfigError naming the first that fails.

    Processors are not imported here: they load in the children, with the children's environment.
    """
    from .cleanup import load_hook

    for index, queue in enumerate(config.queues):
        for position, reference in enumerate(queue.cleanup):
            load_hook(reference, f"queues[{index}].cleanup[{position}]")


# --- value validators -------------------------------------------------------------------------


def _integer(minimum: int, maximum: int | None = None, *, example: int) -> Validator:
    expected = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"

    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(key, value, _with_unit(key, expected), _integer_fix(key, value, example))
        if value < minimum or (maximum is not None and value > maximum):
            raise _invalid(key, value, _with_unit(key, expected), _example_fix(key, example))
        return value

    return check


def _number(minimum: float, *, exclusive: bool = False, example: float) -> Validator:
    expected = f"a finite number {'>' if exclusive else '>='} {minimum}"

    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _invalid(key, value, _with_unit(key, expected), _quoted_fix(key, value, float, example))
        try:
            number = float(value)
        except OverflowError:
            # TOML integers beyond the float range (tomllib sets no size limit) count as infinite.
            number = math.inf
        too_small = number <= minimum if exclusive else number < minimum
        if too_small or not math.isfinite(number):
            raise _invalid(key, value, _with_unit(key, expected), _example_fix(key, example))
        return number

    return check


def _boolean(*, example: bool) -> Validator:
    def check(key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _invalid(key, value, "true or false", _quoted_fix(key, value, _parse_toml_bool, example))
        return value

    return check


def _choice(choices: tuple[str, ...], *, example: str, upper_case: bool = False) -> Validator:
    """Build a validator for one of ``choices``.

    With ``upper_case``, any case is accepted and the value is stored upper-case.
    """
    expected = "one of " + ", ".join(repr(choice) for choice in choices)

    def check(key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise _invalid(key, value, expected, _example_fix(key, example))
        normalized = value.upper() if upper_case else value
        if normalized not in choices:
            raise _invalid(key, value, expected, _suggestion_fix(key, value, choices, example))
        return normalized

    return check


def _nonempty_string(description: str, *, example: str, forbidden: str = "") -> Validator:
    """Build a validator for a non-empty string without whitespace or any of ``forbidden``."""
    extra = "".join(f" or {char!r}" for char in forbidden)
    expected = f"a non-empty {description} without whitespace{extra}"

    def check(key: str, value: Any) -> str:
        is_valid = (
            isinstance(value, str)
            and value != ""
            and not any(char.isspace() for char in value)
            and not any(char in value for char in forbidden)
        )
        if not is_valid:
            raise _invalid(key, value, expected, _example_fix(key, example))
        return value

    return check


def _path_string(key: str, value: Any) -> str:
    if not isinstance(value, str) or value == "":
        raise _invalid(key, value, "a non-empty path", _example_fix(key, "/var/tmp/sandbox-runtime"))
    return value


def _interpreter(key: str, value: Any) -> str:
    """Check a Python interpreter path for the children: an existing executable file."""
    if not isinstance(value, str) or not os.path.isabs(value):
        raise _invalid(key, value, "an absolute path to a Python 3.11+ interpreter", _example_fix(key, "/usr/bin/python3.11"))
    if not (os.path.isfile(value) and os.access(value, os.X_OK)):
        raise ConfigError(key, f"invalid value {value!r}: no executable file at that path; install Python there or point {_leaf(key)} at one")
    return value


def _account(lookup: Callable[[str], Any], account_kind: str, *, example: str) -> Validator:
    """Build a validator for the name of an existing user account or group, checked with ``lookup``."""

    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or value == "":
            raise _invalid(key, value, f"the name of an existing {account_kind}", _example_fix(key, example))
        try:
            lookup(value)
        except (KeyError, ValueError):  # ValueError: the name contains a NUL character
            raise ConfigError(
                key,
                f"invalid value {value!r}: no {account_kind} of that name exists on this host; "
                f"create it or set {_leaf(key)} to an existing {account_kind} name",
            ) from None
        return value

    return check


def _redis_url(key: str, value: Any) -> str:
    expected = "a URL starting with " + ", ".join(REDIS_URL_SCHEMES)
    fix = 'for example url = "redis://127.0.0.1:6379/0", or remove url to start an embedded Redis'
    if not isinstance(value, str):
        raise _invalid(key, value, expected, fix)

    redacted_url = _redact_for_message(value)
    if not value.startswith(REDIS_URL_SCHEMES):
        raise ConfigError(key, f"invalid value {redacted_url!r} (string), expected {expected}; {fix}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError as exc:
        raise ConfigError(key, f"invalid Redis URL {redacted_url!r}: {exc}; {fix}") from exc
    if value.startswith("unix://") and not parts.path:
        fix = 'for example url = "unix:///run/redis.sock"'
        message = f"invalid Redis URL {redacted_url!r}: a unix:// URL needs a socket path; {fix}"
        raise ConfigError(key, message)
    return value


def _env_table(key: str, value: Any) -> dict[str, str]:
    _require_table(key, value, 'write env = { NAME = "value" } or an env sub-table')
    env = {}
    for name, item in value.items():
        item_key = _join(key, name)
        if name == "" or "=" in name or "\0" in name:
            expected = "expected a non-empty name without '=' or NUL"
            raise ConfigError(item_key, f"invalid environment variable name {name!r}, {expected}; rename it")
        if not isinstance(item, str) or "\0" in item:
            fix = f'write it as a string, for example {_toml_key(name)} = "1"'
            raise _invalid(item_key, item, "a string without NUL characters", fix)
        env[name] = item
    return env


def _import_target(key: str, value: Any, forms: str) -> tuple[str, str]:
    """Split a ``target:function`` string and check the function name. Return (target, function)."""
    if not isinstance(value, str):
        raise _invalid_target(key, value, forms, _example_fix(key, "examples.media:transcode"))
    target, separator, function = value.rpartition(":")
    if not separator or not target:
        raise _invalid_target(key, value, forms, "add ':' and the name of the function")
    if not _is_identifier(function):
        fix = f"the part after the last ':' ({function!r}) must be a Python identifier"
        raise _invalid_target(key, value, forms, fix)
    return target, function


def _invalid_target(key: str, value: Any, forms: str, fix: str) -> ConfigError:
    return _invalid(key, value, f"a string of the form {forms}", fix)


def _module_function(key: str, value: Any) -> str:
    """Check a cleanup hook, which the parent imports by module name, so file paths are rejected."""
    forms = "'package.module:function'"
    target, function = _import_target(key, value, forms)
    if target.endswith(".py") or "/" in target:
        fix = f"cleanup hooks take a module name, not a file path; for example {target.removesuffix('.py')!r}"
        raise _invalid_target(key, value, forms, fix)
    if not _is_dotted_name(target):
        fix = f"{target!r} is not a dotted Python module name; fix the module part"
        raise _invalid_target(key, value, forms, fix)
    return value


def _processor(key: str, value: Any, base_dir: Path) -> str:
    """Check a processor and return it, with the path of the ``file.py:function`` form made absolute."""
    forms = _PROCESSOR_FORMS
    target, function = _import_target(key, value, forms)
    if not (target.endswith(".py") or "/" in target):
        if not _is_dotted_name(target):
            fix = f"{target!r} is neither a dotted module name nor a .py path"
            raise _invalid_target(key, value, forms, fix)
        return value
    if not target.endswith(".py"):
        raise _invalid_target(key, value, forms, f"the path {target!r} must name a .py file")

    path = _resolve_path(target, base_dir)
    if not path.is_file():
        raise ConfigError(
            key,
            f"invalid value {value!r}: file {str(path)!r} not found, relative paths are resolved against "
            f"{str(base_dir)!r}; fix the path or make it absolute",
        )
    return f"{path}:{function}"


# --- tables -----------------------------------------------------------------------------------


_TOP_LEVEL_KEYS = ("redis", "supervisor", "escalation", "sandbox", "cleanup", "queues")

_REDIS_FIELDS: dict[str, Validator] = {
    "url": _redis_url,
    # The QueueBase constructor of Node BullMQ 5.81.5 rejects ':' in queue names but not in the
    # prefix, so the prefix may contain it.
    "prefix": _nonempty_string("key prefix", example="bull"),
}

_SUPERVISOR_FIELDS: dict[str, Validator] = {
    "shutdown": _choice(SHUTDOWN_POLICIES, example="drain"),
    "shutdown_timeout_s": _number(0, example=60),
    "hook_timeout_s": _number(0, exclusive=True, example=10),
    "cancel_sweep_interval_s": _number(0, exclusive=True, example=2),
    "cancel_record_ttl_s": _integer(1, example=86400),
    "workdir_root": _path_string,
    "log_level": _choice(LOG_LEVELS, example="INFO", upper_case=True),
}

_ESCALATION_FIELDS: dict[str, Validator] = {
    "cancel_grace_s": _number(0, example=10),
    "term_grace_s": _number(0, example=5),
    "job_timeout_s": _number(0, example=300),
}

_SANDBOX_FIELDS: dict[str, Validator] = {
    "max_jobs_per_child": _integer(0, example=100),
    "idle_timeout_s": _number(0, example=300),
    "memory_limit_mb": _integer(0, example=512),
    "address_space_limit_mb": _integer(0, example=4096),
    "cpu_time_limit_s": _number(0, example=60),
    "start_timeout_s": _number(0, exclusive=True, example=30),
    "user": _account(pwd.getpwnam, "user account", example="nobody"),
    "group": _account(grp.getgrnam, "group", example="nogroup"),
    "env": _env_table,
    "inherit_redis_env": _boolean(example=False),
    "core_dumps": _boolean(example=False),
    "python": _interpreter,
}

_QUEUE_NUMBER_FIELDS: dict[str, Validator] = {
    "concurrency": _integer(1, MAX_CONCURRENCY, example=4),
    "lock_duration_ms": _integer(100, example=30000),
    "stalled_interval_ms": _integer(100, example=30000),
    "max_stalled_count": _integer(0, example=1),
}

_QUEUE_KEYS = ("name", "processor", *_QUEUE_NUMBER_FIELDS, "escalation", "sandbox", "cleanup")

# BullMQ separates the parts of its Redis keys with ':', and Node BullMQ rejects it in queue names.
# The control channel name "{prefix}:{queue}:control" relies on that too.
_queue_name = _nonempty_string("queue name", example="media", forbidden=":")


@dataclass(frozen=True)
class _QueueDefaults:
    """The top-level settings that every queue starts from."""

    escalation: EscalationSettings
    sandbox: SandboxSettings
    cleanup: tuple[str, ...]


def _parse_table(key: str, table: Any, fields: Mapping[str, Validator]) -> dict[str, Any]:
    """Validate every entry of ``table`` with its validator in ``fields`` and return the converted values."""
    if "." in key:
        fix = f"write it as an inline table, for example {_leaf(key)} = {{ ... }}"
    else:
        fix = f"write it as a [{key}] table"
    _require_table(key, table, fix)
    _reject_unknown_keys(key, table, tuple(fields))
    return {name: fields[name](_join(key, name), value) for name, value in table.items()}


def _parse_supervisor(table: Any, base_dir: Path) -> SupervisorSettings:
    values = _parse_table("supervisor", table, _SUPERVISOR_FIELDS)
    if "workdir_root" in values:
        key = "supervisor.workdir_root"
        path = _resolve_path(values["workdir_root"], base_dir)
        if not path.is_dir():
            raise ConfigError(
                key,
                f"invalid value {values['workdir_root']!r}: directory {str(path)!r} not found; "
                "create it or point workdir_root at an existing directory",
            )
        values["workdir_root"] = str(path)
    return SupervisorSettings(**values)


def _merge_escalation(base: EscalationSettings, key: str, table: Any) -> EscalationSettings:
    return dataclasses.replace(base, **_parse_table(key, table, _ESCALATION_FIELDS))


def _merge_sandbox(base: SandboxSettings, key: str, table: Any) -> SandboxSettings:
    values = _parse_table(key, table, _SANDBOX_FIELDS)
    if "env" in values:
        values["env"] = {**base.env, **values["env"]}
    return dataclasses.replace(base, **values)


def _parse_cleanup(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        fix = f'for example {_leaf(key)} = ["myapp.hooks:after_job"]'
        raise _invalid(key, value, "an array of 'package.module:function' strings", fix)
    return tuple(_module_function(f"{key}[{index}]", entry) for index, entry in enumerate(value))


def _parse_queues(value: Any, defaults: _QueueDefaults, base_dir: Path) -> tuple[QueueConfig, ...]:
    add_queue = "add a [[queues]] table with name and processor"
    if value is None or (isinstance(value, (list, tuple)) and not value):
        raise ConfigError("queues", f"no queues configured, expected at least one; {add_queue}")
    if not isinstance(value, (list, tuple)):
        fix = "write each queue as a [[queues]] table, not [queues]"
        raise _invalid("queues", value, "an array of tables", fix)

    queues = []
    index_by_name: dict[str, int] = {}
    for index, table in enumerate(value):
        queue = _parse_queue(f"queues[{index}]", table, defaults, base_dir)
        if queue.name in index_by_name:
            first = index_by_name[queue.name]
            raise ConfigError(
                f"queues[{index}].name",
                f"duplicate queue name {queue.name!r}, already used by queues[{first}]; "
                "give each [[queues]] table a unique name",
            )
        index_by_name[queue.name] = index
        queues.append(queue)
    return tuple(queues)


def _parse_queue(key: str, table: Any, defaults: _QueueDefaults, base_dir: Path) -> QueueConfig:
    _require_table(key, table, "write each queue as a [[queues]] table")
    _reject_unknown_keys(key, table, _QUEUE_KEYS)

    name = _queue_name(f"{key}.name", _require_key(key, table, "name", '"media"'))
    processor_example = '"package.module:function" or "path/to/file.py:function"'
    processor_text = _require_key(key, table, "processor", processor_example)
    processor = _processor(f"{key}.processor", processor_text, base_dir)
    numbers = {
        field_name: validate(_join(key, field_name), table[field_name])
        for field_name, validate in _QUEUE_NUMBER_FIELDS.items()
        if field_name in table
    }

    escalation = _merge_escalation(defaults.escalation, f"{key}.escalation", table.get("escalation", {}))
    sandbox = _merge_sandbox(defaults.sandbox, f"{key}.sandbox", table.get("sandbox", {}))
    cleanup = defaults.cleanup + _parse_cleanup(f"{key}.cleanup", table.get("cleanup", []))
    return QueueConfig(
        name=name, processor=processor, escalation=escalation, sandbox=sandbox, cleanup=cleanup, **numbers
    )


def _require_key(key: str, table: Mapping[str, Any], name: str, example: str) -> Any:
    if name not in table:
        message = f"missing required key; add {name} = {example} to this [[queues]] table"
        raise ConfigError(_join(key, name), message)
    return table[name]


def _require_table(key: str, value: Any, fix: str) -> None:
    if not isinstance(value, Mapping):
        raise _invalid(key, value, "a table", fix)


def _reject_unknown_keys(key: str, table: Mapping[str, Any], known: tuple[str, ...]) -> None:
    for name in table:
        if name in known:
            continue
        close = difflib.get_close_matches(name.lower(), known, n=1)
        valid = ", ".join(known)
        if close:
            message = f"unknown key {name!r}; did you mean {close[0]!r}? (valid keys: {valid})"
        else:
            message = f"unknown key {name!r}; remove it or use one of the valid keys: {valid}"
        raise ConfigError(_join(key, name), message)


# --- message and path helpers -----------------------------------------------------------------


def _invalid(key: str, value: Any, expected: str, fix: str) -> ConfigError:
    return ConfigError(key, f"invalid value {value!r} ({_toml_type(value)}), expected {expected}; {fix}")


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    for python_type, name in ((int, "integer"), (float, "float"), (str, "string"), (Mapping, "table")):
        if isinstance(value, python_type):
            return name
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, (datetime.date, datetime.time)):
        return "date-time"
    return type(value).__name__


def _with_unit(key: str, expected: str) -> str:
    for suffix, unit in _UNITS.items():
        if key.endswith(suffix):
            return f"{expected} ({unit})"
    return expected


def _example_fix(key: str, example: Any) -> str:
    return f"for example {_leaf(key)} = {_toml_value(example)}"


def _quoted_fix(key: str, value: Any, parse: Callable[[str], Any], example: Any) -> str:
    """Suggest removing the quotes when a string contains a valid value of the expected type."""
    if isinstance(value, str):
        try:
            parsed = parse(value.strip())
        except ValueError:
            pass
        else:
            return f"remove the quotes: {_leaf(key)} = {_toml_value(parsed)}"
    return _example_fix(key, example)


def _integer_fix(key: str, value: Any, example: int) -> str:
    if isinstance(value, float) and value.is_integer():
        return f"write a whole number without a decimal point: {_leaf(key)} = {int(value)}"
    return _quoted_fix(key, value, int, example)


def _suggestion_fix(key: str, value: str, choices: tuple[str, ...], example: str) -> str:
    close = difflib.get_close_matches(value.lower(), [choice.lower() for choice in choices], n=1)
    if close:
        suggestion = choices[[choice.lower() for choice in choices].index(close[0])]
        return f"did you mean {_leaf(key)} = {_toml_value(suggestion)}?"
    return _example_fix(key, example)


def _parse_toml_bool(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError(text)
    return text == "true"


def _is_identifier(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name)


def _is_dotted_name(name: str) -> bool:
    return all(_is_identifier(part) for part in name.split("."))


def _resolve_path(text: str, base_dir: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def _join(key: str, name: str) -> str:
    return f"{key}.{_toml_key(name)}" if key else _toml_key(name)


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _redact_for_message(url: str) -> str:
    try:
        return redact_url(url) or url
    except ValueError:
        # An invalid port makes urlsplit raise, so hide the whole user-info part instead.
        return _URL_USERINFO.sub("//***@", url)


# --- format_config helpers --------------------------------------------------------------------


def _format_section(header: str, settings: Any, *, array: bool = False) -> list[str]:
    """Render one dataclass as a TOML table, with its dataclass fields as sub-tables ``[header.field]``."""
    lines = [f"[[{header}]]" if array else f"[{header}]"]
    subtables = []
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if dataclasses.is_dataclass(value):
            subtables.append((f"{header}.{item.name}", value))
        else:
            lines.append(f"{item.name} = {_format_setting(header, item.name, value)}")
    lines.append("")
    for sub_header, sub_settings in subtables:
        lines += _format_section(sub_header, sub_settings)
    return lines


def _format_setting(header: str, name: str, value: Any) -> str:
    if header == "redis" and name == "url":
        return "(embedded Redis)" if value is None else _toml_value(_redact_for_message(value))
    if value is None:
        return "(not set)"
    if name == "env" and isinstance(value, Mapping):
        return _toml_value(_redact_env(value))
    return _toml_value(value)


def _redact_env(env: Mapping[str, str]) -> dict[str, str]:
    redacted = {}
    for name, value in env.items():
        if _SECRET_ENV_NAME.search(name):
            redacted[name] = "***"
        elif "://" in value:
            redacted[name] = _redact_for_message(value)
        else:
            redacted[name] = value
    return redacted


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(name)} = {_toml_value(item)}" for name, item in value.items())
        return f"{{ {items} }}" if items else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if callable(value):
        name = getattr(value, "__qualname__", type(value).__qualname__)
        return f"(callable {getattr(value, '__module__', '?')}.{name})"
    return repr(value)


def _toml_key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)
