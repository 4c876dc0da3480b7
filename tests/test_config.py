"""Tests of the TOML configuration loader, its error messages and ``check-config``."""

from __future__ import annotations

import dataclasses
import grp
import io
import math
import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sandbox_runtime.config import (
    Config,
    EscalationSettings,
    QueueConfig,
    RedisSettings,
    SandboxSettings,
    SupervisorSettings,
    check_config_main,
    format_config,
    load_config,
    parse_config,
)
from sandbox_runtime.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).resolve().parent / "configs"
BROKEN = CONFIGS / "broken"
PROCESSOR = "examples.media:transcode"


def queue_table(**overrides: Any) -> dict[str, Any]:
    """Return a valid [[queues]] entry with ``overrides`` applied."""
    return {"name": "media", "processor": PROCESSOR, **overrides}


def config_data(queue: dict[str, Any] | None = None, **tables: Any) -> dict[str, Any]:
    """Return parsed-TOML data with one queue and the given top-level tables."""
    return {**tables, "queues": [queue if queue is not None else queue_table()]}


def config_error(data: dict[str, Any], source: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source)
    return caught.value


# --- valid files ---------------------------------------------------------------------------------


def test_full_file_top_level_values() -> None:
    config = load_config(CONFIGS / "full.toml")

    assert config.source == CONFIGS / "full.toml"
    assert config.redis.url == "redis://:s3cret-pass@127.0.0.1:6390/2"
    assert config.redis.prefix == "jobs"
    assert config.supervisor == SupervisorSettings(
        shutdown="cancel",
        shutdown_timeout_s=30.0,
        hook_timeout_s=2.5,
        cancel_sweep_interval_s=1.0,
        cancel_record_ttl_s=3600,
        workdir_root=str(CONFIGS),
        log_level="DEBUG",
    )
    assert [queue.name for queue in config.queues] == ["media", "reports"]


def test_full_file_queue_overrides() -> None:
    media = load_config(CONFIGS / "full.toml").queue("media")

    assert media.processor == PROCESSOR
    assert media.concurrency == 4
    assert media.lock_duration_ms == 60000
    assert media.stalled_interval_ms == 15000
    assert media.max_stalled_count == 3
    assert media.escalation == EscalationSettings(cancel_grace_s=30.0, term_grace_s=3.0, job_timeout_s=600.0)
    assert media.sandbox.memory_limit_mb == 2048
    assert media.sandbox.max_jobs_per_child == 50
    assert media.sandbox.cpu_time_limit_s == 120.0
    assert media.sandbox.start_timeout_s == 15.0
    assert media.sandbox.inherit_redis_env is True
    assert media.sandbox.core_dumps is True
    assert dict(media.sandbox.env) == {"LANG": "C.UTF-8", "MODE": "media", "CODEC": "h264"}
    assert media.cleanup == ("tests.cleanup_hooks:record", "tests.cleanup_hooks:record_async")


def test_full_file_queue_inherits_top_level() -> None:
    reports = load_config(CONFIGS / "full.toml").queue("reports")

    assert reports.processor == f"{CONFIGS / 'processors' / 'echo.py'}:run"
    assert reports.concurrency == 1
    assert reports.escalation == EscalationSettings(
        cancel_grace_s=20.0, term_grace_s=3.0, job_timeout_s=600.0
    )
    assert reports.sandbox == SandboxSettings(
        max_jobs_per_child=50,
        memory_limit_mb=1024,
        cpu_time_limit_s=120.0,
        start_timeout_s=15.0,
        env={"LANG": "C.UTF-8", "MODE": "shared"},
        inherit_redis_env=True,
        core_dumps=True,
    )
    assert reports.cleanup == ("tests.cleanup_hooks:record",)


def test_minimal_file_uses_defaults() -> None:
    config = load_config(CONFIGS / "minimal.toml")

    expected = Config(
        queues=(QueueConfig(name="default", processor=PROCESSOR),), source=CONFIGS / "minimal.toml"
    )
    assert config == expected
    assert config.redis == RedisSettings(url=None, prefix="bull")
    assert config.supervisor == SupervisorSettings()
    assert config.queues[0].escalation == EscalationSettings()
    assert config.queues[0].sandbox == SandboxSettings()
    assert config.queues[0].cleanup == ()


def test_merge_order_queue_over_top_over_default() -> None:
    data = config_data(
        queue_table(escalation={"cancel_grace_s": 1}, sandbox={"max_jobs_per_child": 3}),
        escalation={"cancel_grace_s": 7, "term_grace_s": 2},
        sandbox={"max_jobs_per_child": 9, "memory_limit_mb": 256},
    )
    queue = parse_config(data).queues[0]

    assert queue.escalation.cancel_grace_s == 1.0
    assert queue.escalation.term_grace_s == 2.0
    assert queue.escalation.job_timeout_s == EscalationSettings().job_timeout_s
    assert queue.sandbox.max_jobs_per_child == 3
    assert queue.sandbox.memory_limit_mb == 256
    assert queue.sandbox.start_timeout_s == SandboxSettings().start_timeout_s


def test_override_does_not_leak_to_other_queue() -> None:
    data = {
        "escalation": {"cancel_grace_s": 7},
        "queues": [
            queue_table(name="a", escalation={"cancel_grace_s": 1}),
            queue_table(name="b"),
        ],
    }
    config = parse_config(data)

    assert config.queue("a").escalation.cancel_grace_s == 1.0
    assert config.queue("b").escalation.cancel_grace_s == 7.0


def test_cleanup_top_level_entries_come_first() -> None:
    data = config_data(
        queue_table(cleanup=["app.hooks:third"]), cleanup=["app.hooks:first", "app.hooks:second"]
    )

    assert parse_config(data).queues[0].cleanup == ("app.hooks:first", "app.hooks:second", "app.hooks:third")


def test_env_merged_variable_by_variable() -> None:
    data = config_data(
        queue_table(sandbox={"env": {"B": "queue", "C": "queue"}}),
        sandbox={"env": {"A": "top", "B": "top"}},
    )

    assert dict(parse_config(data).queues[0].sandbox.env) == {"A": "top", "B": "queue", "C": "queue"}


def test_integers_accepted_for_float_fields() -> None:
    escalation = parse_config(config_data(escalation={"cancel_grace_s": 3})).queues[0].escalation

    assert escalation.cancel_grace_s == 3.0
    assert type(escalation.cancel_grace_s) is float


def test_zero_values_allowed_where_documented() -> None:
    data = config_data(
        queue_table(max_stalled_count=0),
        escalation={"cancel_grace_s": 0, "term_grace_s": 0, "job_timeout_s": 0},
        sandbox={"max_jobs_per_child": 0, "memory_limit_mb": 0, "cpu_time_limit_s": 0},
        supervisor={"shutdown_timeout_s": 0},
    )
    config = parse_config(data)

    assert config.queues[0].max_stalled_count == 0
    assert config.queues[0].escalation == EscalationSettings(0.0, 0.0, 0.0)
    assert config.supervisor.shutdown_timeout_s == 0.0


@pytest.mark.parametrize("level", ["debug", "Info", "WARNING", "error"])
def test_log_level_stored_upper_case(level: str) -> None:
    config = parse_config(config_data(supervisor={"log_level": level}))

    assert config.supervisor.log_level == level.upper()


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6390/0", "rediss://user:pw@example.test:6380", "unix:///run/redis.sock"]
)
def test_redis_url_schemes_accepted(url: str) -> None:
    assert parse_config(config_data(redis={"url": url})).redis.url == url


def test_existing_user_and_group_accepted() -> None:
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    sandbox = parse_config(config_data(sandbox={"user": user, "group": group})).queues[0].sandbox

    assert sandbox.user == user
    assert sandbox.group == group


def test_processor_path_resolved_against_config_dir(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "work.py").write_text("def run(job):\n    return 1\n")
    source = tmp_path / "sandbox.toml"

    queue = parse_config(config_data(queue_table(processor="jobs/work.py:run")), source).queues[0]

    assert queue.processor == f"{tmp_path / 'jobs' / 'work.py'}:run"


def test_processor_path_resolved_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a source file, relative processor paths are resolved against the current directory."""
    (tmp_path / "work.py").write_text("def run(job):\n    return 1\n")
    monkeypatch.chdir(tmp_path)

    queue = parse_config(config_data(queue_table(processor="work.py:run"))).queues[0]

    assert queue.processor == f"{tmp_path / 'work.py'}:run"


def test_processor_absolute_path_kept(tmp_path: Path) -> None:
    script = tmp_path / "work.py"
    script.write_text("def run(job):\n    return 1\n")

    queue = parse_config(config_data(queue_table(processor=f"{script}:run")), CONFIGS / "x.toml").queues[0]

    assert queue.processor == f"{script}:run"


def test_workdir_root_resolved_against_config_dir(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    config = parse_config(config_data(supervisor={"workdir_root": "work"}), tmp_path / "sandbox.toml")

    assert config.supervisor.workdir_root == str(tmp_path / "work")


# --- invalid files -------------------------------------------------------------------------------

BROKEN_FILES = [
    ("unknown_escalation_key.toml", "escalation.cancel_grace", ["'cancel_grace'", "did you mean 'cancel_grace_s'"]),
    ("concurrency_string.toml", "queues[0].concurrency", ["'4'", "string", "integer from 1 to 1000", "remove the quotes"]),
    ("bool_for_number.toml", "supervisor.shutdown_timeout_s", ["True", "boolean", "number >= 0"]),
    ("negative_queue_grace.toml", "queues[0].escalation.cancel_grace_s", ["-1", ">= 0", "cancel_grace_s = "]),
    ("bad_shutdown.toml", "supervisor.shutdown", ["'graceful'", "'drain', 'cancel'"]),
    ("missing_processor.toml", "queues[0].processor", ["missing", "add processor = "]),
    ("duplicate_queue_names.toml", "queues[2].name", ["'media'", "queues[0]", "unique name"]),
    ("syntax_error.toml", "file", ["syntax_error.toml", "line 3, column 20", "not valid TOML"]),
    ("bad_redis_url.toml", "redis.url", ["redis://, rediss://, unix://", "http://"]),
    ("unknown_queue_key.toml", "queues[0].concurency", ["'concurency'", "did you mean 'concurrency'"]),
]


@pytest.mark.parametrize(
    ("file_name", "key", "fragments"), BROKEN_FILES, ids=[case[0] for case in BROKEN_FILES]
)
def test_broken_file_names_key(file_name: str, key: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(BROKEN / file_name)

    assert caught.value.key == key
    for fragment in fragments:
        assert fragment in caught.value.detail


INVALID_DATA = [
    # (case id, data, key, fragments of the message)
    ("unknown top-level key", {"queue": [queue_table()]}, "queue", ["did you mean 'queues'"]),
    ("unknown key no suggestion", config_data(redis={"zzz": 1}), "redis.zzz", ["remove it", "url, prefix"]),
    ("unknown sandbox key", config_data(sandbox={"memory_limit": 5}), "sandbox.memory_limit", ["'memory_limit_mb'"]),
    ("unknown queue sandbox key", config_data(queue_table(sandbox={"cores": True})), "queues[0].sandbox.cores", ["unknown key"]),
    ("table given a scalar", config_data(escalation=5), "escalation", ["5 (integer)", "a table"]),
    ("queue escalation scalar", config_data(queue_table(escalation=30)), "queues[0].escalation", ["a table"]),
    ("concurrency zero", config_data(queue_table(concurrency=0)), "queues[0].concurrency", ["0 (integer)", "from 1 to 1000"]),
    ("concurrency too large", config_data(queue_table(concurrency=1001)), "queues[0].concurrency", ["1001"]),
    ("concurrency float", config_data(queue_table(concurrency=4.0)), "queues[0].concurrency", ["4.0 (float)", "concurrency = 4"]),
    ("concurrency bool", config_data(queue_table(concurrency=True)), "queues[0].concurrency", ["True (boolean)"]),
    ("lock duration small", config_data(queue_table(lock_duration_ms=99)), "queues[0].lock_duration_ms", [">= 100", "milliseconds"]),
    ("stalled interval small", config_data(queue_table(stalled_interval_ms=50)), "queues[0].stalled_interval_ms", [">= 100"]),
    ("max stalled negative", config_data(queue_table(max_stalled_count=-1)), "queues[0].max_stalled_count", [">= 0"]),
    ("term grace nan", config_data(escalation={"term_grace_s": math.nan}), "escalation.term_grace_s", ["nan", "finite"]),
    ("job timeout inf", config_data(escalation={"job_timeout_s": math.inf}), "escalation.job_timeout_s", ["inf", "finite"]),
    ("job timeout huge integer", config_data(escalation={"job_timeout_s": 10**400}), "escalation.job_timeout_s", ["finite"]),
    ("job timeout string", config_data(escalation={"job_timeout_s": "30"}), "escalation.job_timeout_s", ["job_timeout_s = 30.0"]),
    ("shutdown timeout negative", config_data(supervisor={"shutdown_timeout_s": -5}), "supervisor.shutdown_timeout_s", ["-5"]),
    ("hook timeout zero", config_data(supervisor={"hook_timeout_s": 0}), "supervisor.hook_timeout_s", ["> 0", "seconds"]),
    ("sweep interval zero", config_data(supervisor={"cancel_sweep_interval_s": 0}), "supervisor.cancel_sweep_interval_s", ["> 0"]),
    ("record ttl zero", config_data(supervisor={"cancel_record_ttl_s": 0}), "supervisor.cancel_record_ttl_s", [">= 1"]),
    ("record ttl float", config_data(supervisor={"cancel_record_ttl_s": 1.5}), "supervisor.cancel_record_ttl_s", ["1.5 (float)"]),
    ("log level unknown", config_data(supervisor={"log_level": "warn"}), "supervisor.log_level", ["'warn'", 'log_level = "WARNING"']),
    ("log level number", config_data(supervisor={"log_level": 10}), "supervisor.log_level", ["10 (integer)"]),
    ("shutdown wrong case", config_data(supervisor={"shutdown": "Drain"}), "supervisor.shutdown", ['shutdown = "drain"']),
    ("workdir root missing", config_data(supervisor={"workdir_root": "/nonexistent/sr"}), "supervisor.workdir_root", ["not found"]),
    ("workdir root empty", config_data(supervisor={"workdir_root": ""}), "supervisor.workdir_root", ["non-empty path"]),
    ("start timeout zero", config_data(sandbox={"start_timeout_s": 0}), "sandbox.start_timeout_s", ["> 0"]),
    ("max jobs negative", config_data(sandbox={"max_jobs_per_child": -1}), "sandbox.max_jobs_per_child", [">= 0"]),
    ("memory negative", config_data(sandbox={"memory_limit_mb": -1}), "sandbox.memory_limit_mb", [">= 0", "MiB"]),
    ("cpu time negative", config_data(sandbox={"cpu_time_limit_s": -0.5}), "sandbox.cpu_time_limit_s", ["-0.5"]),
    ("bool field integer", config_data(sandbox={"core_dumps": 1}), "sandbox.core_dumps", ["1 (integer)", "true or false"]),
    ("bool field string", config_data(sandbox={"inherit_redis_env": "true"}), "sandbox.inherit_redis_env", ["remove the quotes"]),
    ("unknown user", config_data(sandbox={"user": "no-such-user-sr"}), "sandbox.user", ["'no-such-user-sr'", "no user account"]),
    ("unknown group", config_data(sandbox={"group": "no-such-group-sr"}), "sandbox.group", ["no group"]),
    ("user with NUL", config_data(sandbox={"user": "ro\0ot"}), "sandbox.user", ["no user account"]),
    ("user not string", config_data(sandbox={"user": 0}), "sandbox.user", ["0 (integer)"]),
    ("env not table", config_data(sandbox={"env": ["A=1"]}), "sandbox.env", ["a table"]),
    ("env value integer", config_data(sandbox={"env": {"PORT": 8080}}), "sandbox.env.PORT", ["8080 (integer)", 'PORT = "1"']),
    ("env name with equals", config_data(sandbox={"env": {"A=B": "1"}}), 'sandbox.env."A=B"', ["'A=B'"]),
    ("queue env value", config_data(queue_table(sandbox={"env": {"X": True}})), "queues[0].sandbox.env.X", ["True"]),
    ("redis url not string", config_data(redis={"url": 6379}), "redis.url", ["6379 (integer)"]),
    ("redis url bad port", config_data(redis={"url": "redis://host:port/0"}), "redis.url", ["invalid Redis URL", "port"]),
    ("redis unix without path", config_data(redis={"url": "unix://"}), "redis.url", ["socket path"]),
    ("prefix empty", config_data(redis={"prefix": ""}), "redis.prefix", ["non-empty"]),
    ("prefix whitespace", config_data(redis={"prefix": "my jobs"}), "redis.prefix", ["'my jobs'", "whitespace"]),
    ("queues missing", {}, "queues", ["at least one", "[[queues]]"]),
    ("queues empty", {"queues": []}, "queues", ["at least one"]),
    ("queues as table", {"queues": {"name": "media"}}, "queues", ["array of tables", "[[queues]]"]),
    ("queue entry not table", {"queues": ["media"]}, "queues[0]", ["'media' (string)", "a table"]),
    ("missing name", {"queues": [{"processor": PROCESSOR}]}, "queues[0].name", ["missing", "add name = "]),
    ("name empty", config_data(queue_table(name="")), "queues[0].name", ["''", "non-empty"]),
    ("name with colon", config_data(queue_table(name="a:b")), "queues[0].name", ["'a:b'", "':'"]),
    ("name with space", config_data(queue_table(name="a b")), "queues[0].name", ["whitespace"]),
    ("processor not string", config_data(queue_table(processor=5)), "queues[0].processor", ["5 (integer)"]),
    ("processor no colon", config_data(queue_table(processor="examples.media")), "queues[0].processor", ["add ':'"]),
    ("processor no function", config_data(queue_table(processor="examples.media:")), "queues[0].processor", ["identifier"]),
    ("processor bad function", config_data(queue_table(processor="m:1run")), "queues[0].processor", ["'1run'", "identifier"]),
    ("processor keyword function", config_data(queue_table(processor="m:class")), "queues[0].processor", ["identifier"]),
    ("processor bad module", config_data(queue_table(processor="my-app.jobs:run")), "queues[0].processor", ["'my-app.jobs'"]),
    ("processor path not py", config_data(queue_table(processor="jobs/run.sh:run")), "queues[0].processor", [".py file"]),
    ("cleanup not array", config_data(cleanup="app.hooks:done"), "cleanup", ["array", 'cleanup = ["']),
    ("cleanup entry path", config_data(cleanup=["hooks.py:done"]), "cleanup[0]", ["module name, not a file path"]),
    ("cleanup entry bad module", config_data(cleanup=["my-app:done"]), "cleanup[0]", ["not a dotted Python module name"]),
    ("cleanup entry number", config_data(queue_table(cleanup=["a.b:c", 3])), "queues[0].cleanup[1]", ["3 (integer)"]),
]


@pytest.mark.parametrize(
    ("data", "key", "fragments"), [case[1:] for case in INVALID_DATA], ids=[case[0] for case in INVALID_DATA]
)
def test_invalid_value_names_key(data: dict[str, Any], key: str, fragments: list[str]) -> None:
    error = config_error(data)

    assert error.key == key
    for fragment in fragments:
        assert fragment in error.detail


def test_invalid_value_error_names_later_queue() -> None:
    data = {"queues": [queue_table(name="a"), queue_table(name="b", concurrency=-2)]}

    assert config_error(data).key == "queues[1].concurrency"


def test_missing_processor_file_names_resolved_path(tmp_path: Path) -> None:
    error = config_error(config_data(queue_table(processor="jobs/missing.py:run")), tmp_path / "sandbox.toml")

    assert error.key == "queues[0].processor"
    assert str(tmp_path / "jobs" / "missing.py") in error.detail


def test_missing_file_raises_file_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.toml")

    assert caught.value.key == "file"
    assert "absent.toml" in caught.value.detail
    assert "not found" in caught.value.detail


def test_directory_path_raises_file_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)

    assert caught.value.key == "file"
    assert "is a directory" in caught.value.detail


def test_non_utf8_file_raises_file_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[redis]\nprefix = "caf\xe9"\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.key == "file"
    assert "UTF-8" in caught.value.detail


def test_config_error_is_value_error() -> None:
    assert isinstance(config_error({}), ValueError)


# --- secrets and output --------------------------------------------------------------------------


def test_redis_repr_redacts_password() -> None:
    text = repr(RedisSettings(url="redis://:secret@h:1/0"))

    assert "secret" not in text
    assert "redis://:***@h:1/0" in text


def test_format_config_redacts_password() -> None:
    config = parse_config(config_data(redis={"url": "redis://:secret@h:1/0"}))

    text = format_config(config)

    assert "secret" not in text
    assert 'url = "redis://:***@h:1/0"' in text


def test_bad_redis_url_error_redacts_password() -> None:
    error = config_error(config_data(redis={"url": "http://user:secret@h:1/0"}))

    assert "secret" not in str(error)


def test_bad_redis_port_error_redacts_password() -> None:
    error = config_error(config_data(redis={"url": "redis://:secret@h:port/0"}))

    assert "secret" not in str(error)


def test_format_config_redacts_secret_env_values() -> None:
    env = {"API_TOKEN": "tok-secret", "DB_URL": "postgres://app:secret@db/app", "LANG": "C"}
    text = format_config(parse_config(config_data(sandbox={"env": env})))

    assert "secret" not in text
    assert 'LANG = "C"' in text
    assert 'API_TOKEN = "***"' in text


def test_format_config_shows_embedded_redis() -> None:
    text = format_config(parse_config(config_data()))

    assert "url = (embedded Redis)" in text


def test_format_config_lists_every_effective_value() -> None:
    config = load_config(CONFIGS / "full.toml")
    text = format_config(config)

    for settings in (config.redis, config.supervisor):
        for item in dataclasses.fields(settings):
            assert f"\n{item.name} = " in text
    queue_fields = dataclasses.fields(QueueConfig) + dataclasses.fields(EscalationSettings)
    for item in queue_fields + dataclasses.fields(SandboxSettings):
        if item.name not in ("escalation", "sandbox"):
            assert f"\n{item.name} = " in text
    assert text.count("[[queues]]") == 2
    assert "[queues.escalation]\ncancel_grace_s = 30.0\n" in text
    assert "[queues.escalation]\ncancel_grace_s = 20.0\n" in text
    assert 'cleanup = ["tests.cleanup_hooks:record", "tests.cleanup_hooks:record_async"]' in text
    assert 'log_level = "DEBUG"' in text


def test_check_config_main_valid_file() -> None:
    out, err = io.StringIO(), io.StringIO()

    status = check_config_main(str(CONFIGS / "full.toml"), out=out, err=err)

    assert status == 0
    assert err.getvalue() == ""
    assert out.getvalue() == format_config(load_config(CONFIGS / "full.toml"))


def test_check_config_main_broken_file() -> None:
    out, err = io.StringIO(), io.StringIO()
    path = str(BROKEN / "negative_queue_grace.toml")

    status = check_config_main(path, out=out, err=err)

    assert status == 2
    assert out.getvalue() == ""
    assert err.getvalue().startswith(f"error: {path}: queues[0].escalation.cancel_grace_s: invalid value -1")
    assert err.getvalue().count("\n") == 1


# --- command line --------------------------------------------------------------------------------

CLI_MISSING = not (REPO_ROOT / "sandbox_runtime" / "cli.py").exists()
CLI_CASES = [
    ("unknown_escalation_key.toml", "escalation.cancel_grace"),
    ("concurrency_string.toml", "queues[0].concurrency"),
    ("negative_queue_grace.toml", "queues[0].escalation.cancel_grace_s"),
    ("duplicate_queue_names.toml", "queues[2].name"),
    ("syntax_error.toml", "file"),
]


def run_check_config(path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "sandbox_runtime", "check-config", str(path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(CLI_MISSING, reason="sandbox_runtime/cli.py does not exist")
@pytest.mark.parametrize(("file_name", "key"), CLI_CASES, ids=[case[0] for case in CLI_CASES])
def test_cli_check_config_broken_file(file_name: str, key: str) -> None:
    result = run_check_config(BROKEN / file_name)

    assert result.returncode == 2, result.stderr
    assert f": {key}: " in result.stderr
    assert result.stdout == ""


@pytest.mark.skipif(CLI_MISSING, reason="sandbox_runtime/cli.py does not exist")
def test_cli_check_config_valid_file() -> None:
    result = run_check_config(CONFIGS / "full.toml")

    assert result.returncode == 0, result.stderr
    assert "[[queues]]" in result.stdout
    assert "s3cret" not in result.stdout
