"""Configuration from the environment: defaults, parsing, and a bad value naming its variable."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator_server.cli import JsonFormatter
from orchestrator_server.config import Config, ConfigError
from tests.conftest import ROOT


def test_defaults() -> None:
    config = Config.from_env({})
    assert (config.grpc_port, config.http_port, config.bind_host) == (50051, 8080, "0.0.0.0")
    assert config.environment == "development"
    assert (config.heartbeat_timeout, config.heartbeat_interval) == (60.0, 10.0)
    assert config.database_path == "orchestrator.db"
    assert config.db_synchronous == "FULL"
    assert config.event_retention == 100_000
    assert config.gateway_enabled
    assert (config.log_level, config.log_format) == ("INFO", "text")
    assert config.scheduling_strategy == "least_loaded"
    assert config.ready_file == ""
    assert config.process_id.endswith(f":{os.getpid()}")


def test_values_are_parsed() -> None:
    config = Config.from_env(
        {
            "GRPC_PORT": " 0 ",
            "PORT": "9090",
            "BIND_HOST": "127.0.0.1",
            "ENVIRONMENT": "Production",
            "HEARTBEAT_TIMEOUT": "1.5",
            "FAILOVER_GRACE": "0",
            "DATABASE_PATH": ":memory:",
            "DB_SYNCHRONOUS": "normal",
            "EVENT_RETENTION": "100",
            "GATEWAY_ENABLED": "off",
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": "JSON",
            "SCHEDULING_STRATEGY": "round_robin",
            "ORCHESTRATOR_READY_FILE": "/tmp/ready.json",
            "MASS_FAILURE_THRESHOLD": "1",
            # Production refuses to start without API keys unless told to (tests/security).
            "ALLOW_INSECURE_PRODUCTION": "true",
        }
    )
    assert (config.grpc_port, config.http_port, config.bind_host) == (0, 9090, "127.0.0.1")
    assert config.environment == "production"
    assert config.heartbeat_timeout == 1.5
    assert config.heartbeat_interval == pytest.approx(0.5)  # a third of the timeout unless set
    assert config.failover_grace == 0.0
    assert (config.database_path, config.db_synchronous, config.event_retention) == (
        ":memory:",
        "NORMAL",
        100,
    )
    assert not config.gateway_enabled
    assert (config.log_level, config.log_format) == ("DEBUG", "json")
    assert config.scheduling_strategy == "round_robin"
    assert config.ready_file == "/tmp/ready.json"
    assert config.mass_failure_threshold == 1.0
    # An empty value means the default.
    assert Config.from_env({"GRPC_PORT": "", "HEARTBEAT_TIMEOUT": "  "}).grpc_port == 50051
    for truthy in ("1", "true", "YES", "on"):
        assert Config.from_env({"GATEWAY_ENABLED": truthy}).gateway_enabled


BAD_VALUES: list[tuple[dict[str, str], str]] = [
    ({"GRPC_PORT": "abc"}, "GRPC_PORT"),
    ({"GRPC_PORT": "1.5"}, "GRPC_PORT"),
    ({"GRPC_PORT": "70000"}, "GRPC_PORT"),
    ({"GRPC_PORT": "-1"}, "GRPC_PORT"),
    ({"PORT": "http"}, "PORT"),
    ({"BIND_HOST": ""}, "BIND_HOST"),
    ({"ENVIRONMENT": "staging"}, "ENVIRONMENT"),
    ({"HEARTBEAT_TIMEOUT": "soon"}, "HEARTBEAT_TIMEOUT"),
    ({"HEARTBEAT_TIMEOUT": "0"}, "HEARTBEAT_TIMEOUT"),
    ({"HEARTBEAT_TIMEOUT": "-5"}, "HEARTBEAT_TIMEOUT"),
    ({"HEARTBEAT_TIMEOUT": "nan"}, "HEARTBEAT_TIMEOUT"),
    ({"HEARTBEAT_TIMEOUT": "inf"}, "HEARTBEAT_TIMEOUT"),
    ({"HEARTBEAT_INTERVAL": "0"}, "HEARTBEAT_INTERVAL"),
    ({"HEARTBEAT_TIMEOUT": "5", "HEARTBEAT_INTERVAL": "5"}, "HEARTBEAT_INTERVAL"),
    ({"FAILOVER_GRACE": "-1"}, "FAILOVER_GRACE"),
    ({"MASS_FAILURE_THRESHOLD": "1.5"}, "MASS_FAILURE_THRESHOLD"),
    ({"MASS_FAILURE_MIN_AGENTS": "0"}, "MASS_FAILURE_MIN_AGENTS"),
    ({"DATABASE_PATH": ""}, "DATABASE_PATH"),
    ({"DB_SYNCHRONOUS": "EXTRA"}, "DB_SYNCHRONOUS"),
    ({"EVENT_RETENTION": "10"}, "EVENT_RETENTION"),
    ({"GATEWAY_ENABLED": "maybe"}, "GATEWAY_ENABLED"),
    ({"LOG_LEVEL": "TRACE"}, "LOG_LEVEL"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    ({"SCHEDULING_STRATEGY": "fastest"}, "SCHEDULING_STRATEGY"),
    ({"TASK_MAX_ATTEMPTS": "0"}, "TASK_MAX_ATTEMPTS"),
    ({"TASK_RETRY_BACKOFF": "-0.1"}, "TASK_RETRY_BACKOFF"),
    ({"KEEPALIVE_TIME": "0"}, "KEEPALIVE_TIME"),
    ({"KEEPALIVE_TIMEOUT": "x"}, "KEEPALIVE_TIMEOUT"),
    ({"MAX_MESSAGE_BYTES": "10"}, "MAX_MESSAGE_BYTES"),
    ({"MAX_CONCURRENT_STREAMS": "0"}, "MAX_CONCURRENT_STREAMS"),
    ({"SHUTDOWN_GRACE": "-1"}, "SHUTDOWN_GRACE"),
]


@pytest.mark.parametrize(("env", "variable"), BAD_VALUES, ids=[f"{v}={e[v]!r}" for e, v in BAD_VALUES])
def test_a_bad_value_names_its_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_env(env)
    assert raised.value.variable == variable
    assert variable in str(raised.value)


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "orchestrator_server", "serve"],
        [str(Path(sys.executable).parent / "orchestrator"), "serve"],
    ],
    ids=["python -m orchestrator_server", "orchestrator"],
)
def test_serve_with_a_bad_value_exits_with_one_line_naming_it(command: list[str], tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HEARTBEAT_TIMEOUT": "soon",
        "DATABASE_PATH": str(tmp_path / "never.db"),
        "GRPC_PORT": "0",
        "PORT": "0",
    }
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert finished.returncode != 0
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1, finished.stderr
    assert "HEARTBEAT_TIMEOUT" in lines[0] and "'soon'" in lines[0]
    assert finished.stdout == ""
    assert not (tmp_path / "never.db").exists()  # nothing was started


def test_config_only_parses_and_never_imports_auth() -> None:
    """Whether a configuration is safe to run (keys in production, readable key and TLS files) is
    auth's question at startup (`orchestrator serve` asks it: test_keys.py); config.py parses, and
    depends on no other module of the server (auth imports config, not the other way round)."""
    code = (
        "import sys\n"
        "from orchestrator_server.config import Config\n"
        "config = Config.from_env({'ENVIRONMENT': 'production', 'API_KEYS_FILE': '/nonexistent'})\n"
        "print(config.environment, sorted(m for m in sys.modules if m.startswith('orchestrator_server.')))\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.split() == ["production", "['orchestrator_server.config']"]


def test_json_log_lines() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord(
        "orchestrator", logging.WARNING, __file__, 1, "agent %s is DOWN", ("a1",), None
    )
    record.request_id = "req-1"
    entry = json.loads(formatter.format(record))
    assert entry["level"] == "WARNING" and entry["logger"] == "orchestrator"
    assert entry["message"] == "agent a1 is DOWN" and entry["request_id"] == "req-1"
    assert entry["time"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(formatter.format(failed))["exception"]
