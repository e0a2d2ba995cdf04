"""Processes the harness starts: the orchestrator, the echo and FastAPI baselines; CPU and RSS readings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

READY_POLL_S = 0.005  # polling a file with a deadline, as CONVENTIONS prescribe for ready files


class ProcessFailed(RuntimeError):
    """A managed process exited or never became ready."""


@dataclass(frozen=True)
class Usage:
    """CPU seconds and RSS of a process at one instant (monotonic wall clock)."""

    wall: float
    cpu: float
    rss: int


def usage(pid: int) -> Usage:
    proc = psutil.Process(pid)
    with proc.oneshot():
        times = proc.cpu_times()
        rss = proc.memory_info().rss
    return Usage(time.perf_counter(), times.user + times.system, rss)


def cpu_share(before: Usage, after: Usage) -> float:
    """Cores used between two readings (1.0 = one core fully busy)."""
    wall = after.wall - before.wall
    return (after.cpu - before.cpu) / wall if wall > 0 else 0.0


_LIVE: set[ManagedProcess] = set()


def kill_all() -> None:
    """SIGKILL every managed process still running (interrupted run)."""
    for process in list(_LIVE):
        process.kill_now()


class ManagedProcess:
    """A child process that announces readiness by writing a JSON file (temp file + rename)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.workdir = workdir
        self.ready_file = workdir / f"{name}.ready.json"
        self.log_path = workdir / f"{name}.log"
        self.env = {**os.environ, **env, "ORCHESTRATOR_READY_FILE": str(self.ready_file)}
        self._proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}
        self.started_at = 0.0  # monotonic time just before exec
        self.ready_at = 0.0  # monotonic time the ready file was seen

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise ProcessFailed(f"{self.name} not started")
        return self._proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def start(self, within: float = 30.0) -> dict[str, Any]:
        self.ready_file.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self.started_at = time.perf_counter()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL
            )
        finally:
            log.close()
        _LIVE.add(self)
        deadline = self.started_at + within
        while time.perf_counter() < deadline:
            if self._proc.returncode is not None:
                raise ProcessFailed(f"{self.name} exited with {self._proc.returncode}:\n{self.log_tail()}")
            if self.ready_file.exists():
                with contextlib.suppress(json.JSONDecodeError):
                    self.info = json.loads(self.ready_file.read_text())
                    self.ready_at = time.perf_counter()
                    return self.info
            await asyncio.sleep(READY_POLL_S)
        await self.kill()
        raise ProcessFailed(f"{self.name} not ready within {within} s:\n{self.log_tail()}")

    async def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after ``grace`` seconds; returns the exit code."""
        if self._proc is None or self._proc.returncode is not None:
            return None if self._proc is None else self._proc.returncode
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self._proc.wait(), grace)
        except TimeoutError:
            await self.kill()
            return None
        finally:
            _LIVE.discard(self)

    def kill_now(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    async def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 10)

    def usage(self) -> Usage:
        return usage(self.pid)


def orchestrator(
    workdir: Path, extra_env: dict[str, str] | None = None, name: str = "orchestrator"
) -> ManagedProcess:
    """The product as users start it (``python -m orchestrator_server serve``), on loopback, port 0."""
    env = {
        "GRPC_PORT": "0",
        "PORT": "0",
        "BIND_HOST": "127.0.0.1",
        "DATABASE_PATH": str(workdir / "orchestrator.db"),
        "ENVIRONMENT": "development",
        "LOG_LEVEL": "WARNING",
        "HEARTBEAT_INTERVAL": "1",
        "HEARTBEAT_TIMEOUT": "10",
        # The limiter stays in the path (its cost is measured) but never throttles: the figures measure
        # capacity, and one load generator is one principal (a limiter would rightly stop it).
        "RATE_LIMIT_API_RATE": "1000000",
        "RATE_LIMIT_API_BURST": "1000000",
        "RATE_LIMIT_SESSION_RATE": "1000000",
        "RATE_LIMIT_SESSION_BURST": "1000000",
    }
    env.update(extra_env or {})
    return ManagedProcess(name, [sys.executable, "-m", "orchestrator_server", "serve"], env, workdir)


def echo_server(workdir: Path, unary_response_bytes: int) -> ManagedProcess:
    argv = [sys.executable, "-m", "bench.echo_server", "--unary-response-bytes", str(unary_response_bytes)]
    return ManagedProcess("echo", argv, {}, workdir)


def fastapi_server(workdir: Path, agents: int) -> ManagedProcess:
    argv = [sys.executable, "-m", "bench.fastapi_app", "--agents", str(agents)]
    return ManagedProcess("fastapi", argv, {}, workdir)
