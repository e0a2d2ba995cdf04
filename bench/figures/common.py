"""What every figure shares: sizes, the run context, servers, profiling, merging worker answers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench import proc, profiling
from bench.report import Figure
from bench.stats import Summary, summarize


@dataclass(frozen=True)
class Sizes:
    """How big each figure is; ``full`` is what BRIEF §4 and issue 7 ask for, ``quick`` runs in < 2 min."""

    kills: int
    kill_batch: int
    # Figure 3: SIGKILLs while the largest level of sessions beats (detection under load).
    loaded_kills: int
    failover_tasks: int
    failover_rounds: int
    capacity_levels: tuple[int, ...]
    capacity_workers: int
    capacity_window_s: float
    saturation_streams: int
    saturation_s: float
    saturation_rounds: int
    unary_seq: int
    closed_s: float
    closed_concurrency: int
    task_rate: float
    task_rate_count: int
    rest_duration_s: int
    rest_connections: int
    restart_agents: int
    restart_tasks: int
    replica_sessions: int
    replica_window_s: float
    replica_kill_agents: int
    replica_kill_rate: float
    replica_kill_s: float


FULL = Sizes(
    kills=60,
    kill_batch=20,
    loaded_kills=40,
    failover_tasks=100,
    failover_rounds=3,
    capacity_levels=(1000, 5000, 10000),
    capacity_workers=4,
    capacity_window_s=10.0,
    saturation_streams=64,
    saturation_s=4.0,
    saturation_rounds=3,
    unary_seq=2000,
    closed_s=5.0,
    closed_concurrency=50,
    task_rate=500.0,
    task_rate_count=5000,
    rest_duration_s=10,
    rest_connections=50,
    restart_agents=10000,
    restart_tasks=100000,
    replica_sessions=2000,
    replica_window_s=10.0,
    replica_kill_agents=200,
    replica_kill_rate=200.0,
    replica_kill_s=6.0,
)

QUICK = Sizes(
    kills=8,
    kill_batch=8,
    loaded_kills=4,
    failover_tasks=100,
    failover_rounds=1,
    capacity_levels=(200, 500),
    capacity_workers=2,
    capacity_window_s=2.0,
    saturation_streams=16,
    saturation_s=1.5,
    saturation_rounds=1,
    unary_seq=200,
    closed_s=1.5,
    closed_concurrency=20,
    task_rate=200.0,
    task_rate_count=300,
    rest_duration_s=2,
    rest_connections=16,
    restart_agents=200,
    restart_tasks=2000,
    replica_sessions=100,
    replica_window_s=1.5,
    replica_kill_agents=20,
    replica_kill_rate=50.0,
    replica_kill_s=3.0,
)


@dataclass
class Context:
    """State of one run shared by the figures."""

    sizes: Sizes
    workdir: Path
    profile_dir: Path | None
    echo: proc.ManagedProcess | None = None
    interrupted: bool = False
    baselines: dict[str, Any] = field(default_factory=dict)
    _servers: list[proc.ManagedProcess] = field(default_factory=list)

    async def start_server(self, name: str, env: dict[str, str] | None = None) -> proc.ManagedProcess:
        directory = self.workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        server = proc.orchestrator(directory, env)
        self._servers.append(server)
        await server.start(within=60)
        return server

    async def stop_servers(self) -> None:
        for server in self._servers:
            await server.stop()
        self._servers.clear()

    @contextlib.asynccontextmanager
    async def profiled(self, fig: Figure, server: proc.ManagedProcess, label: str) -> AsyncIterator[None]:
        """py-spy the server during the block when ``--profile`` was given; findings go in the figure."""
        if self.profile_dir is None:
            yield
            return
        out = self.profile_dir / f"{fig.key}-{label}"
        async with profiling.record(server.pid, out) as result:
            yield
        fig.details.setdefault("profiles", {})[label] = result.summary
        fig.notes.append(f"profile {label}: {result.headline}")

    @property
    def echo_target(self) -> str:
        assert self.echo is not None, "echo baseline not started"
        return f"127.0.0.1:{self.echo.info['grpc_port']}"


def target_of(server: proc.ManagedProcess) -> str:
    return f"127.0.0.1:{server.info['grpc_port']}"


def merged(results: Iterable[dict[str, Any]], key: str) -> list[Any]:
    out: list[Any] = []
    for r in results:
        out.extend(r.get(key, []))
    return out


def merged_dicts(results: Iterable[dict[str, Any]], key: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in results:
        out.update(r.get(key, {}))
    return out


def summary_dict(values: Iterable[float]) -> dict[str, float] | None:
    s = summarize(values)
    return s.as_dict() if s else None


def p(s: Summary | None, attr: str) -> float | None:
    return getattr(s, attr) if s else None


def unimplemented(exc: BaseException) -> bool:
    """True when the server lacks the service or method (the product is still being built)."""
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNIMPLEMENTED
