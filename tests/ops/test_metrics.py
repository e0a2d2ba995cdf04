"""The metrics the alerts and the dashboard need (deploy/prometheus, deploy/grafana), on a real
in-process server: open sessions, failed store commits, rate-limited heartbeats, no `_created`."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import REGISTRY, generate_latest

from orchestrator.v1 import registry_pb2
from tests.conftest import Running, async_wait_for, open_session
from tests.support import rpc_error
from tests.test_tasks import create, next_assignment


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_open_sessions_are_a_gauge(running: Running) -> None:
    assert "# TYPE orchestrator_sessions gauge" in generate_latest(REGISTRY).decode()

    def sessions() -> float:
        return sample("orchestrator_sessions")

    before = sessions()
    # A registered agent without a session (one beating by unary calls) is no session.
    await running.stubs.register("unary-only")
    first, _ = await open_session(running.stubs, "first")
    await async_wait_for(lambda: sessions() == before + 1, what="the first session counted")
    second, _ = await open_session(running.stubs, "second")
    await async_wait_for(lambda: sessions() == before + 2, what="the second session counted")
    assert running.server.open_sessions() == 2  # the gauge is this server's own count

    await first.goodbye()
    await async_wait_for(lambda: sessions() == before + 1, what="a goodbye uncounted")
    second.call.cancel()  # the stream breaks without a goodbye
    await async_wait_for(lambda: sessions() == before, what="a broken stream uncounted")
    assert running.server.open_sessions() == 0


def test_no_created_series_and_known_labels_start_at_zero() -> None:
    exposition = generate_latest(REGISTRY).decode()
    assert "_created" not in exposition
    # Exported before anything happens, so increase() in an alert sees the first event.
    assert 'orchestrator_heartbeats_total{kind="stream"}' in exposition
    assert 'orchestrator_rate_limited_total{budget="heartbeats"}' in exposition
    assert 'orchestrator_agent_transitions_total{status="down"}' in exposition
    assert 'orchestrator_tasks_finished_total{status="timed_out"}' in exposition
    assert "orchestrator_store_commit_errors_total" in exposition


async def test_rate_limited_heartbeats_are_counted(servers: Callable[..., Any]) -> None:
    running: Running = await servers(rate_limit_session_rate=5, rate_limit_session_burst=2)
    refused_before = sample("orchestrator_rate_limited_total", budget="heartbeats")
    paced_before = sample("orchestrator_rate_limited_total", budget="session_messages")

    registered = await running.stubs.register("unary")
    beat = registry_pb2.SendHeartbeatRequest(agent_id=registered.agent.agent_id)
    bearer = (("authorization", f"Bearer {registered.agent_token}"),)
    await running.stubs.registry.SendHeartbeat(beat, metadata=bearer)
    await running.stubs.registry.SendHeartbeat(beat, metadata=bearer)
    await rpc_error(
        running.stubs.registry.SendHeartbeat(beat, metadata=bearer), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert sample("orchestrator_rate_limited_total", budget="heartbeats") == refused_before + 1

    session, _ = await open_session(running.stubs, "streaming")
    for sequence in range(4):
        session.send(beat=registry_pb2.SessionBeat(sequence=sequence))
    for _ in range(4):
        await session.receive_kind("ack")
    assert sample("orchestrator_rate_limited_total", budget="session_messages") > paced_before
    await session.goodbye()


async def test_failed_store_commits_are_counted(running: Running, tmp_path: Path) -> None:
    """Another process holding the database's write lock past the busy timeout (5 s) fails the
    store's commit: a real SQLite error, counted once per failed write."""
    before = sample("orchestrator_store_commit_errors_total")
    locked = threading.Event()
    release = threading.Event()

    def hold_write_lock() -> None:
        with sqlite3.connect(tmp_path / "orchestrator.db", isolation_level=None) as other:
            other.execute("BEGIN IMMEDIATE")
            locked.set()
            release.wait(30)
            other.execute("ROLLBACK")

    holder = threading.Thread(target=hold_write_lock)
    holder.start()
    try:
        assert await asyncio.to_thread(locked.wait, 10)
        await rpc_error(running.stubs.register("blocked"), grpc.StatusCode.UNAVAILABLE)
    finally:
        release.set()
        await asyncio.to_thread(holder.join, 10)
    assert sample("orchestrator_store_commit_errors_total") == before + 1
    # A lock held too long is another process's doing, not a broken store: once it is released,
    # writes work again and nothing more is counted.
    await running.stubs.register("after")
    assert sample("orchestrator_store_commit_errors_total") == before + 1


async def test_a_failover_pause_is_counted(servers: Callable[..., Any]) -> None:
    """Two of three agents holding work drop at once: failover pauses (for MASS_FAILURE_WINDOW after
    the last drop, often shorter than a scrape interval) and the counter keeps it for the alert."""
    running: Running = await servers(mass_failure_min_agents=2, mass_failure_threshold=0.5)
    before = sample("orchestrator_failover_pauses_total")
    sessions = [
        (await open_session(running.stubs, f"agent-{index}", max_concurrent_tasks=1))[0] for index in range(3)
    ]
    for _ in sessions:
        await create(running.stubs)
    for session in sessions:
        await next_assignment(session)
    for session in sessions[:2]:
        session.call.cancel()
    await async_wait_for(lambda: sample("orchestrator_failover_paused") == 1, what="failover paused")
    assert sample("orchestrator_failover_pauses_total") == before + 1
    await sessions[2].goodbye()
