"""Key configuration: formats, hashing, secure-by-default startup, rotation without restart."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator.v1 import health_pb2, health_pb2_grpc
from orchestrator_server.auth import (
    KeyFormatError,
    Role,
    check_security_config,
    digest,
    parse_key_list,
    parse_keys,
)
from orchestrator_server.config import Config, ConfigError
from tests.conftest import ROOT, Running, ServerProcess, async_wait_for
from tests.security.conftest import ADMIN_KEY, READER_KEY, bearer

OLD_KEY = "old-admin-key-0123456789"
NEW_KEY = "new-admin-key-0123456789"


def test_lines_plain_and_prehashed() -> None:
    hashed = hashlib.sha256(READER_KEY.encode()).hexdigest()
    keys = parse_keys(f"# operators\nadmin:{ADMIN_KEY}\n\n  reader:sha256:{hashed}  \n")
    assert [(key.role, key.digest) for key in keys] == [
        (Role.ADMIN, digest(ADMIN_KEY)),
        (Role.READER, digest(READER_KEY)),
    ]
    assert ADMIN_KEY not in repr(keys)


def test_json_with_names() -> None:
    text = json.dumps(
        {
            "keys": [
                {"role": "agent", "key": ADMIN_KEY, "name": "fleet"},
                {"role": "READER", "sha256": "ab" * 32},
            ]
        }
    )
    keys = parse_keys(text)
    assert [(key.role, key.label) for key in keys] == [(Role.AGENT, "fleet"), (Role.READER, "ab" * 6)]
    assert parse_keys(json.dumps([{"role": "admin", "key": ADMIN_KEY}]))[0].role is Role.ADMIN


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("root:0123456789abcdef0123", "line 1: unknown role"),
        ("admin:short", "at least 16 characters"),
        ("admin:sha256:xyz", "64 hex digits"),
        ("admin", "at least 16 characters"),
        ('{"keys": [{"role": "admin"}]}', "exactly one of key, sha256"),
        ('{"keys": [{"role": "admin", "key": "0123456789abcdef0", "extra": "x"}]}', "unknown fields extra"),
        ('{"keys": 3}', "must be a list"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_entries_are_refused_with_where_and_why(text: str, problem: str) -> None:
    with pytest.raises(KeyFormatError, match=problem) as raised:
        parse_keys(text)
    assert "0123456789abcdef0" not in str(raised.value)


def test_api_keys_list() -> None:
    keys = parse_key_list(f" admin:{ADMIN_KEY} , reader:{READER_KEY},")
    assert [key.role for key in keys] == [Role.ADMIN, Role.READER]
    with pytest.raises(KeyFormatError, match="entry 2"):
        parse_key_list(f"admin:{ADMIN_KEY},reader:x")


def startup_config(env: dict[str, str]) -> Config:
    """The environment parsed and checked as `orchestrator serve` does before starting."""
    config = Config.from_env(env)
    check_security_config(config)
    return config


def test_config_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"API_KEYS .*ENVIRONMENT=production") as raised:
        startup_config({"ENVIRONMENT": "production"})
    assert raised.value.variable == "API_KEYS"
    assert startup_config({"ENVIRONMENT": "production", "ALLOW_INSECURE_PRODUCTION": "true"})
    config = startup_config({"ENVIRONMENT": "production", "API_KEYS": f"admin:{ADMIN_KEY}"})
    assert ADMIN_KEY not in repr(config)
    cases = {
        "API_KEYS": {"API_KEYS": "admin:short"},
        "API_KEYS_FILE": {"API_KEYS_FILE": str(tmp_path / "missing")},
        "TLS_KEY_FILE": {"TLS_CERT_FILE": str(tmp_path / "cert.pem")},
        "TLS_CLIENT_CA_FILE": {"TLS_CLIENT_CA_FILE": str(tmp_path / "ca.pem")},
        "TLS_CERT_FILE": {
            "TLS_CERT_FILE": str(tmp_path / "cert.pem"),
            "TLS_KEY_FILE": str(tmp_path / "key.pem"),
        },
        "RATE_LIMIT_API_BURST": {"RATE_LIMIT_API_BURST": "0"},
        "ALLOW_INSECURE_PRODUCTION": {"ALLOW_INSECURE_PRODUCTION": "maybe"},
    }
    for variable, env in cases.items():
        with pytest.raises(ConfigError) as raised:
            startup_config(env)
        assert raised.value.variable == variable, env


def test_production_without_keys_refuses_to_start(tmp_path: Path) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("API_KEYS", "API_KEYS_FILE", "ALLOW_INSECURE_PRODUCTION")
    }
    env.update(
        {"ENVIRONMENT": "production", "GRPC_PORT": "0", "PORT": "0", "DATABASE_PATH": str(tmp_path / "db")}
    )
    finished = subprocess.run(
        [sys.executable, "-m", "orchestrator_server", "serve"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 2
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1, finished.stderr
    assert "API_KEYS" in lines[0] and "API_KEYS_FILE" in lines[0] and "ALLOW_INSECURE_PRODUCTION" in lines[0]
    assert not (tmp_path / "db").exists()


def test_production_with_the_opt_out_starts_and_warns(server_process: Callable[..., ServerProcess]) -> None:
    server = server_process(ENVIRONMENT="production", ALLOW_INSECURE_PRODUCTION="true").start()
    assert "authentication is OFF" in server.log()


def _write(path: Path, text: str) -> None:
    """Atomically, as configuration management tools replace files."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def _works(target: str, key: str) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthServiceStub(channel)
        try:
            await stub.GetSystemHealth(health_pb2.GetSystemHealthRequest(), metadata=bearer(key), timeout=5)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            return False
        return True


async def test_key_file_rotation_without_restart(
    servers: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"admin:{OLD_KEY}\n")
    running: Running = await servers(api_keys_file=str(keys), api_keys_reload_interval=0.05)
    assert await _works(running.target, OLD_KEY)
    assert not await _works(running.target, NEW_KEY)
    _write(keys, f"admin:{NEW_KEY}\n")
    await async_wait_for(lambda: _works(running.target, NEW_KEY), within=10, what="new key accepted")
    assert not await _works(running.target, OLD_KEY)
    # A broken file is not applied: the keys in force stay.
    _write(keys, "admin:too-short\n")

    async def refused() -> bool:
        # Each call may start the periodic check; the old keys answer meanwhile.
        return await _works(running.target, NEW_KEY) and "not reloaded" in caplog.text

    await async_wait_for(refused, within=10, what="broken key file refused")
    assert await _works(running.target, NEW_KEY)
    # An emptied file keeps authentication on and refuses everyone.
    _write(keys, "# nobody\n")
    await async_wait_for(lambda: _not(_works(running.target, NEW_KEY)), within=10, what="keys removed")


async def _not(result: Any) -> bool:
    return not await result


async def test_sighup_reloads_the_key_file(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"admin:{OLD_KEY}\n")
    # A reload interval of an hour: only the signal can make the new key work within the test.
    server = server_process(API_KEYS_FILE=keys, API_KEYS_RELOAD_INTERVAL=3600).start()
    assert await _works(server.target, OLD_KEY)
    _write(keys, f"admin:{NEW_KEY}\n")
    assert not await _works(server.target, NEW_KEY)
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)
    await async_wait_for(lambda: _works(server.target, NEW_KEY), within=10, what="key reloaded on SIGHUP")
    assert not await _works(server.target, OLD_KEY)
    assert "API keys reloaded" in server.log()
