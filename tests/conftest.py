"""Shared fixtures: a real server (in process or as a subprocess) on an ephemeral loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator.v1 import (
    discovery_pb2_grpc,
    health_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    tasks_pb2_grpc,
)
from orchestrator_server.config import Config
from orchestrator_server.server import OrchestratorServer
from tests.support import SessionClient

ROOT = Path(__file__).resolve().parent.parent
AGENT_SCRIPT = Path(__file__).resolve().parent / "agent_process.py"


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    """A config for tests: loopback, ephemeral ports, a database in tmp_path, no gateway."""
    values: dict[str, Any] = {
        "grpc_port": 0,
        "http_port": 0,
        "bind_host": "127.0.0.1",
        "database_path": str(tmp_path / "orchestrator.db"),
        "db_synchronous": "NORMAL",
        "gateway_enabled": False,
        "heartbeat_timeout": 60.0,  # tests that need a short one say so
        "heartbeat_interval": 0.5,
        "failover_grace": 0.0,
        "shutdown_grace": 0.5,
        "retry_backoff_base": 0.05,
        "retry_backoff_max": 0.2,
    }
    values.update(overrides)
    return Config(**values)


@dataclass
class Stubs:
    """Typed stubs of the four services over one channel."""

    channel: grpc.aio.Channel
    registry: registry_pb2_grpc.RegistryServiceStub = field(init=False)
    health: health_pb2_grpc.HealthServiceStub = field(init=False)
    discovery: discovery_pb2_grpc.DiscoveryServiceStub = field(init=False)
    tasks: tasks_pb2_grpc.TasksServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.registry = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthServiceStub(self.channel)
        self.discovery = discovery_pb2_grpc.DiscoveryServiceStub(self.channel)
        self.tasks = tasks_pb2_grpc.TasksServiceStub(self.channel)

    async def register(
        self, name: str = "agent", instance: str = "1", **fields: Any
    ) -> registry_pb2.RegisterAgentResponse:
        fields.setdefault("type", "worker")
        fields.setdefault("max_concurrent_tasks", 4)
        return await self.registry.RegisterAgent(
            registry_pb2.RegisterAgentRequest(name=name, instance_id=instance, **fields)
        )


async def open_session(stubs: Stubs, name: str = "agent", **fields: Any) -> tuple[SessionClient, str]:
    """Registers an agent and opens its session by hand; returns the session and the agent id."""
    registered = await stubs.register(name, **fields)
    session = SessionClient(stubs.registry, registered.agent.agent_id, registered.agent_token)
    welcome = await session.receive()
    assert welcome.WhichOneof("message") == "welcome"
    return session, registered.agent.agent_id


class Running:
    """An in-process server plus stubs to reach it."""

    def __init__(self, server: OrchestratorServer, stubs: Stubs) -> None:
        self.server = server
        self.stubs = stubs

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Starts in-process servers with config overrides; stops them at the end of the test."""
    started: list[Running] = []

    async def start(**overrides: Any) -> Running:
        server = OrchestratorServer(make_config(tmp_path, **overrides))
        await server.start()
        running = Running(server, Stubs(grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")))
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stubs.channel.close()
        await running.server.stop(0.1)


@pytest.fixture
async def running(servers: Callable[..., Any]) -> Running:
    """One in-process server with the test defaults."""
    result: Running = await servers()
    return result


@pytest.fixture
def stubs(running: Running) -> Stubs:
    return running.stubs


# -- subprocesses ------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Polls `predicate` until it holds, failing the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


async def async_wait_for(predicate: Callable[[], Any], within: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)


class ServerProcess:
    """`python -m orchestrator_server serve` as a real process, restartable on the same database."""

    def __init__(self, workdir: Path, **env: Any) -> None:
        self.workdir = workdir
        self.env = {
            "GRPC_PORT": "0",
            "PORT": "0",
            "BIND_HOST": "127.0.0.1",
            "DATABASE_PATH": str(workdir / "orchestrator.db"),
            "GATEWAY_ENABLED": "false",
            "HEARTBEAT_TIMEOUT": "10",
            "HEARTBEAT_INTERVAL": "0.5",
            "FAILOVER_GRACE": "0",
            "LOG_LEVEL": "INFO",
        }
        self.env.update({key: str(value) for key, value in env.items()})
        self.process: subprocess.Popen[bytes] | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.starts = 0

    def start(self, timeout: float = 20.0) -> ServerProcess:
        self.starts += 1
        ready = self.workdir / f"ready-{self.starts}.json"
        env = {**os.environ, **self.env, "ORCHESTRATOR_READY_FILE": str(ready)}
        if self.grpc_port and self.env["GRPC_PORT"] == "0":
            env["GRPC_PORT"] = str(self.grpc_port)  # restart on the same port, as agents expect
        log = open(self.workdir / f"server-{self.starts}.log", "wb")  # noqa: SIM115 (kept open for the child)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator_server", "serve"], env=env, cwd=ROOT, stdout=log, stderr=log
        )
        process = self.process
        wait_for(lambda: ready.exists() or process.poll() is not None, timeout, "server ready file")
        if not ready.exists():
            pytest.fail(f"server exited with {process.returncode}: {self.log()}")
        info = json.loads(ready.read_text())
        self.grpc_port, self.http_port = info["grpc_port"], info["http_port"]
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return (self.workdir / f"server-{self.starts}.log").read_text(errors="replace")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        """Graceful when possible (so coverage of the child is saved), SIGKILL otherwise."""
        if self.process is not None and self.process.poll() is None:
            try:
                self.terminate(10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.asynccontextmanager
async def connect(server: ServerProcess) -> AsyncIterator[Stubs]:
    """Stubs on a channel of their own to a server process, closed on the way out."""
    channel = grpc.aio.insecure_channel(server.target)
    try:
        yield Stubs(channel)
    finally:
        await channel.close()


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    created: list[ServerProcess] = []

    def make(**env: Any) -> ServerProcess:
        process = ServerProcess(tmp_path, **env)
        created.append(process)
        return process

    yield make
    for process in created:
        process.stop()


class AgentProcess:
    """tests/agent_process.py: a raw agent holding a session, as a separate OS process."""

    def __init__(self, target: str, name: str, workdir: Path, *args: str) -> None:
        self.events = workdir / f"agent-{name}.jsonl"
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(AGENT_SCRIPT),
                "--target",
                target,
                "--name",
                name,
                "--events",
                str(self.events),
                *args,
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(workdir / f"agent-{name}.log", "wb"),  # noqa: SIM115
        )
        self.agent_id = ""

    def records(self) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        lines = self.events.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def wait_welcome(self, timeout: float = 20.0) -> str:
        def welcomed() -> bool:
            return (
                any(record["event"] == "welcome" for record in self.records())
                or self.process.poll() is not None
            )

        wait_for(welcomed, timeout, "agent welcome")
        welcomes = [record for record in self.records() if record["event"] == "welcome"]
        if not welcomes:
            pytest.fail(f"agent process exited with {self.process.returncode}")
        self.agent_id = welcomes[-1]["agent_id"]
        return self.agent_id

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)

    def drop_stream(self) -> None:
        """Cuts the agent's stream without a goodbye; it reconnects if started with --reconnect."""
        self.process.send_signal(signal.SIGUSR1)


@pytest.fixture
def agent_processes(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    created: list[AgentProcess] = []

    def spawn(target: str, name: str, *args: str) -> AgentProcess:
        agent = AgentProcess(target, name, tmp_path, *args)
        created.append(agent)
        return agent

    yield spawn
    for agent in created:
        agent.kill()
