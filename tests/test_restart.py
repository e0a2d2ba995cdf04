"""The server as a real process: killed and restarted on the same database, and drained by SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2 as grpc_health_pb2
from grpc_health.v1 import health_pb2_grpc as grpc_health_pb2_grpc

from orchestrator.v1 import agent_pb2, discovery_pb2, event_pb2, health_pb2, registry_pb2
from orchestrator_server.server import OrchestratorServer
from tests.conftest import ServerProcess, Stubs, async_wait_for, connect, make_config
from tests.support import (
    DEREGISTERED,
    DOWN,
    DRAINING,
    READY,
    SessionClient,
    keep_beating,
    open_session,
    read_message,
)

ServerFactory = Callable[..., ServerProcess]


async def start(server: ServerProcess) -> None:
    await asyncio.to_thread(server.start)


async def get_agent(stubs: Stubs, agent_id: str) -> agent_pb2.Agent:
    return (await stubs.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))).agent


async def system_revision(stubs: Stubs) -> int:
    return (await stubs.health.GetSystemHealth(health_pb2.GetSystemHealthRequest())).revision


def durable_view(agent: agent_pb2.Agent) -> agent_pb2.Agent:
    """The agent without its soft state (load, heartbeat time, live-session flag)."""
    view = agent_pb2.Agent()
    view.CopyFrom(agent)
    view.ClearField("load")
    view.ClearField("last_heartbeat_at")
    view.session.streaming = False
    return view


async def test_kill_and_restart_keeps_agents_revisions_and_watch_resume(
    server_process: ServerFactory,
) -> None:
    server = server_process()
    await start(server)
    async with connect(server) as stubs:
        alive = await stubs.register(
            "alive",
            type="cost",
            version="1.0",
            capabilities=["gpu", "analyze"],
            labels={"region": "eu", "tier": "gold"},
            endpoints=[agent_pb2.Endpoint(name="api", address="10.0.0.1:50051", protocol=1)],
            max_concurrent_tasks=3,
        )
        session = await open_session(stubs.registry, alive.agent.agent_id, alive.agent_token)
        drained = (await stubs.register("drained", labels={"x": "y"})).agent.agent_id
        await stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=drained, reason="maint"))
        gone = (await stubs.register("gone")).agent.agent_id
        await stubs.registry.DeregisterAgent(registry_pb2.DeregisterAgentRequest(agent_id=gone))
        already_down = await stubs.register("down")
        down_session = await open_session(
            stubs.registry, already_down.agent.agent_id, already_down.agent_token
        )
        await down_session.goodbye()
        returning = await stubs.register("returning")
        returning_session = await open_session(
            stubs.registry, returning.agent.agent_id, returning.agent_token
        )
        ids = [alive.agent.agent_id, drained, gone, returning.agent.agent_id, already_down.agent.agent_id]
        before = {agent_id: await get_agent(stubs, agent_id) for agent_id in ids}
        assert [before[agent_id].status for agent_id in ids] == [READY, DRAINING, DEREGISTERED, READY, DOWN]
        # A watcher that has seen everything up to here.
        watch = stubs.discovery.WatchAgents(discovery_pb2.WatchAgentsRequest())
        last_seen = (await read_message(watch)).revision
        assert last_seen == await system_revision(stubs)

        await asyncio.to_thread(server.kill)
        watch.cancel()
        session.call.cancel()
        returning_session.call.cancel()

    # Second life, on the same database file and port, with a short heartbeat timeout.
    # Short, so the test does not wait long for the DOWNs, yet longer than a loaded machine takes to
    # read the agents back after the restart (they must still be READY then).
    server.env.update(HEARTBEAT_TIMEOUT="5", HEARTBEAT_INTERVAL="0.5")
    await start(server)
    async with connect(server) as stubs:
        after = {agent_id: await get_agent(stubs, agent_id) for agent_id in ids}
        # Everything durable survived; the agents that were alive are still counted alive.
        for agent_id in ids:
            assert durable_view(after[agent_id]) == durable_view(before[agent_id])
        assert after[alive.agent.agent_id].status == READY
        assert after[drained].status == DRAINING
        assert await system_revision(stubs) == last_seen
        listed = await stubs.registry.ListAgents(registry_pb2.ListAgentsRequest())
        assert {agent.agent_id for agent in listed.agents} == {
            alive.agent.agent_id,
            drained,
            returning.agent.agent_id,
            already_down.agent.agent_id,
        }
        assert after[already_down.agent.agent_id].status == DOWN  # no grace for the already dead

        # One agent comes back in time with the credential it had: a new session epoch.
        resumed_session = SessionClient(stubs.registry, returning.agent.agent_id, returning.agent_token)
        welcome = await resumed_session.receive_kind("welcome")
        assert welcome.welcome.epoch == before[returning.agent.agent_id].session.epoch + 1
        beating = asyncio.create_task(keep_beating(resumed_session))

        # The watcher resumes from its last revision and hears exactly what happened since.
        resumed = stubs.discovery.WatchAgents(discovery_pb2.WatchAgentsRequest(start_revision=last_seen))
        updated = await stubs.registry.UpdateAgent(
            registry_pb2.UpdateAgentRequest(
                agent_id=drained,
                update=registry_pb2.AgentUpdate(version="2"),
                update_mask=field_mask_pb2.FieldMask(paths=["version"]),
            )
        )
        # The two that did not come back go DOWN once HEARTBEAT_TIMEOUT has passed.
        deltas = []
        downs: set[str] = set()
        # Under load the timeouts may fire before the update commits: read until both are seen.
        while len(downs) < 2 or deltas[-1].revision < updated.agent.revision:
            message = await read_message(resumed, 15)
            assert message.HasField("delta")
            deltas.append(message)
            if message.delta.agent.status == DOWN:
                downs.add(message.delta.agent.agent_id)
        assert downs == {alive.agent.agent_id, drained}
        revisions = [message.revision for message in deltas]
        assert revisions == list(range(last_seen + 1, last_seen + 1 + len(deltas)))
        assert updated.agent.revision in revisions
        for message in deltas:
            if message.delta.agent.status == DOWN:
                assert message.delta.type == event_pb2.EVENT_TYPE_AGENT_STATUS_CHANGED
                # The reason names the replica (the killed process) whose agents they were.
                assert message.delta.agent.status_reason.startswith("heartbeat timeout")
        assert (await get_agent(stubs, returning.agent.agent_id)).status == READY
        beating.cancel()
        resumed.cancel()
        await resumed_session.goodbye()


async def test_sigterm_drains(server_process: ServerFactory) -> None:
    server = server_process(LOG_FORMAT="json")
    await start(server)
    async with connect(server) as stubs:
        registered = await stubs.register("agent")
        agent_id = registered.agent.agent_id
        session = await open_session(stubs.registry, agent_id, registered.agent_token)
        health = grpc_health_pb2_grpc.HealthStub(stubs.channel)
        health_watch = health.Watch(grpc_health_pb2.HealthCheckRequest(service=""))
        assert (await read_message(health_watch)).status == grpc_health_pb2.HealthCheckResponse.SERVING

        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        # Health flips to NOT_SERVING while draining.
        assert (await read_message(health_watch)).status == grpc_health_pb2.HealthCheckResponse.NOT_SERVING
        health_watch.cancel()  # an open watch would hold the drain for the whole grace
        # The agent is told to reconnect before its stream ends.
        reconnect = await session.receive_kind("reconnect")
        assert "shutting down" in reconnect.reconnect.reason
        # As an agent would: it closes this stream (no goodbye: it means to come back) and
        # the server finishes the call.
        session.close()
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await asyncio.wait_for(session.call.read(), 10) is not grpc.aio.EOF:
                pass
        exit_code = await asyncio.to_thread(server.process.wait, 20)
        assert exit_code == 0, server.log()
        logged = [json.loads(line) for line in server.log().splitlines()]
        assert any(entry["message"] == "SIGTERM received: draining" for entry in logged)
        assert all({"time", "level", "logger", "message"} <= set(entry) for entry in logged)

    # A drain is a restart like any other: the agent that was alive gets its grace after it.
    server.env.update(HEARTBEAT_TIMEOUT="5", HEARTBEAT_INTERVAL="0.5")
    await start(server)
    async with connect(server) as stubs:
        agent = await get_agent(stubs, agent_id)
        assert agent.status == READY, agent.status_reason
        session = await open_session(stubs.registry, agent_id, registered.agent_token)
        await session.goodbye()
        await async_wait_for(lambda: _is_down(stubs, agent_id), what="agent DOWN after its goodbye")


async def _is_down(stubs: Stubs, agent_id: str) -> bool:
    return (await get_agent(stubs, agent_id)).status == DOWN


async def test_sigterm_ends_open_watches_cleanly_and_quickly(
    server_process: Callable[..., ServerProcess],
) -> None:
    server = server_process(SHUTDOWN_GRACE="30").start()
    async with grpc.aio.insecure_channel(server.target) as channel:
        stubs = Stubs(channel)
        watch = stubs.discovery.WatchAgents(discovery_pb2.WatchAgentsRequest())
        assert (await watch.read()).HasField("snapshot")
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        # The watch ends with OK, well before the 30 s grace would cut it.
        assert await asyncio.wait_for(watch.read(), 20) is grpc.aio.EOF
        assert await watch.code() == grpc.StatusCode.OK
        assert time.monotonic() - started < 20
    assert await asyncio.to_thread(server.process.wait, 30) == 0  # type: ignore[union-attr]


async def test_ready_once_grpc_serves_before_the_gateway_starts(tmp_path: Path) -> None:
    """Issue 14 (restart): readiness no longer waits for the REST gateway (aiohttp's import and
    start took ~0.5-0.7 s of the startup, while reconnecting agents' hellos were already being
    served). The ready file names the REST port, bound before; REST answers once the gateway runs."""
    ready_file = tmp_path / "ready.json"
    seen: dict[str, Any] = {}

    class Observed(OrchestratorServer):
        async def _start_gateway(self, *args: Any) -> Any:
            seen["ready"] = json.loads(ready_file.read_text()) if ready_file.exists() else None
            async with grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
                health = await Stubs(channel).health.GetSystemHealth(
                    health_pb2.GetSystemHealthRequest(), timeout=10
                )
            seen["serving"] = health.store_status
            return await super()._start_gateway(*args)

    server = Observed(make_config(tmp_path, gateway_enabled=True, ready_file=str(ready_file)))
    await server.start()
    try:
        assert seen["ready"] == {
            "grpc_port": server.grpc_port,
            "http_port": server.http_port,
            "pid": os.getpid(),
        }
        assert server.http_port != 0
        assert seen["serving"]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
        writer.write(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        await server.stop(0.1)
