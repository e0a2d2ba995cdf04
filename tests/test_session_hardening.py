"""Sessions under odd and hostile use: frozen peers, killed clients, silent streams, pushes that
cannot be written, second holders of one identity, draining servers (issue 10)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from orchestrator.v1 import discovery_pb2, registry_pb2
from orchestrator_server.agents import Session
from orchestrator_server.grpc_api.reflection import V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME
from orchestrator_server.grpc_api.registry import StreamPort
from tests.conftest import ROOT, AgentProcess, Running, ServerProcess, Stubs, async_wait_for, open_session
from tests.support import DOWN, READY, SessionClient, error_detail
from tests.test_sessions import next_status


async def watch_until_ready(stubs: Stubs, agent_id: str) -> Any:
    watch = stubs.discovery.WatchAgents(discovery_pb2.WatchAgentsRequest())
    snapshot = await asyncio.wait_for(watch.read(), 10)
    if not any(a.agent_id == agent_id and a.status == READY for a in snapshot.snapshot.agents):
        await next_status(watch, agent_id, READY)
    return watch


async def test_frozen_peer_is_found_by_server_keepalive(
    servers: Callable[..., Any], agent_processes: Callable[..., AgentProcess]
) -> None:
    # HEARTBEAT_TIMEOUT 60: only keepalive can find the frozen peer within the bound.
    running: Running = await servers(keepalive_time=1.0, keepalive_timeout=1.0, heartbeat_timeout=60.0)
    agent = agent_processes(running.target, "frozen")
    agent_id = await asyncio.to_thread(agent.wait_welcome)
    watch = await watch_until_ready(running.stubs, agent_id)
    frozen_at = time.monotonic()
    os.kill(agent.process.pid, signal.SIGSTOP)
    try:
        delta = await next_status(watch, agent_id, DOWN)
        elapsed = time.monotonic() - frozen_at
    finally:
        os.kill(agent.process.pid, signal.SIGCONT)
        agent.kill()
        watch.cancel()
    print(f"SIGSTOP -> DOWN at watcher: {elapsed:.2f} s")
    assert elapsed < 15.0, delta


def assert_quiet(log_text: str) -> None:
    for marker in ("ERROR", "Task was destroyed", "Traceback", "never retrieved", "cannot reuse"):
        assert marker not in log_text, log_text


async def test_killed_and_cancelled_clients_log_no_errors(
    server_process: Callable[..., ServerProcess], agent_processes: Callable[..., AgentProcess]
) -> None:
    server = await asyncio.to_thread(server_process(SHUTDOWN_DELAY=0).start)
    victims = [agent_processes(server.target, f"victim-{n}", "--interval", "0.005") for n in range(21)]
    for victim in victims:
        await asyncio.to_thread(victim.wait_welcome)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stubs = Stubs(channel)
        cancelled = []
        for n in range(6):
            session, _ = await open_session(stubs, f"cancelled-{n}")
            cancelled.append(session)
        silent = [SilentStream(stubs) for _ in range(6)]
        for victim in victims:
            victim.kill()
        for session in cancelled:
            session.call.cancel()
        for stream in silent:
            stream.call.cancel()  # gone before its hello

        async def all_down() -> bool:
            agents = (await stubs.registry.ListAgents(registry_pb2.ListAgentsRequest())).agents
            return len(agents) == 27 and all(agent.status == DOWN for agent in agents)

        await async_wait_for(all_down, 20, "every killed or cancelled agent DOWN")
    # Ending the process collects whatever tasks the sessions left behind: they would be reported now.
    assert await asyncio.to_thread(server.terminate) == 0
    assert_quiet(server.log())


async def test_sessions_cut_by_shutdown_log_no_errors(
    servers: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    running: Running = await servers()
    stubs = running.stubs
    # Sessions that ignore the reconnect request (the grace runs out and cuts them), and streams
    # that never sent their hello.
    sessions = [(await open_session(stubs, f"stubborn-{n}"))[0] for n in range(4)]
    silent = [SilentStream(stubs) for _ in range(4)]
    await async_wait_for(lambda: running.server.sessions.pending_hellos == 4, 15, "silent streams")
    with caplog.at_level(logging.WARNING):
        await running.server.stop(0.3)
        gc.collect()  # a task left pending is reported when it is collected
    for call in [session.call for session in sessions] + [stream.call for stream in silent]:
        call.cancel()
    problems = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert not problems, [record.getMessage() for record in problems]


def deeply_nested(depth: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    level = root
    for _ in range(depth):
        level["a"] = {}
        level = level["a"]
    return root


async def test_a_push_that_cannot_be_written_ends_the_session_visibly(servers: Callable[..., Any]) -> None:
    running: Running = await servers(max_message_bytes=64 * 1024)
    stubs = running.stubs
    session, agent_id = await open_session(stubs, "zombie")
    watch = await watch_until_ready(stubs, agent_id)
    # Larger than the server may send: the write fails, and the agent must not stay READY.
    poison = registry_pb2.HeartbeatResponse()
    poison.assignment.task.spec.payload.update({"blob": "x" * 100_000})
    server_session = running.server.registry.session_of(agent_id)
    assert server_session is not None
    push_raw(server_session, poison)
    delta = await next_status(watch, agent_id, DOWN)
    watch.cancel()
    assert running.server.registry.session_of(agent_id) is None, delta
    session.call.cancel()


async def test_a_push_the_agent_cannot_parse_ends_the_session_visibly(running: Running) -> None:
    stubs = running.stubs
    session, agent_id = await open_session(stubs, "zombie")
    watch = await watch_until_ready(stubs, agent_id)
    # Written fine by the server, refused by the client's parser (nested too deep).
    poison = registry_pb2.HeartbeatResponse()
    poison.assignment.task.spec.payload.update(deeply_nested(60))
    server_session = running.server.registry.session_of(agent_id)
    assert server_session is not None
    push_raw(server_session, poison)
    try:
        while True:
            await session.receive()
    except grpc.aio.AioRpcError as error:
        print("client saw", error.code(), error.details())
    delta = await next_status(watch, agent_id, DOWN)
    watch.cancel()
    assert running.server.registry.session_of(agent_id) is None, delta


def push_raw(session: Session, message: registry_pb2.HeartbeatResponse) -> None:
    """Queues `message` on the session's stream as it is, past the domain's port methods."""
    port = session.port
    assert isinstance(port, StreamPort)
    port.push(message)


class SilentStream:
    """A Heartbeat stream that never sends its hello."""

    def __init__(self, stubs: Stubs) -> None:
        self._hold = asyncio.Event()
        self.call = stubs.registry.Heartbeat(self._nothing())

    async def _nothing(self) -> Any:
        await self._hold.wait()
        if False:  # an async generator that yields nothing
            yield registry_pb2.HeartbeatRequest()

    async def status(self, within: float = 15.0) -> grpc.StatusCode:
        try:
            await asyncio.wait_for(self.call.read(), within)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK


async def test_streams_waiting_for_a_hello_are_capped(servers: Callable[..., Any]) -> None:
    running: Running = await servers(max_pending_hellos=3, hello_timeout=30.0)
    silent = [SilentStream(running.stubs) for _ in range(3)]

    await async_wait_for(lambda: running.server.sessions.pending_hellos == 3, 15, "three silent streams")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await SilentStream(running.stubs).call.read()
    refused = raised.value
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "MAX_PENDING_HELLOS" in (refused.details() or "")
    for stream in silent:
        stream.call.cancel()
    # Cancelled streams free their places: a real session opens again.
    session, _ = await async_wait_for(lambda: _try_session(running.stubs), 15, "a session after the cap")
    session.call.cancel()


async def _try_session(stubs: Stubs) -> Any:
    try:
        return await open_session(stubs, "after-cap")
    except grpc.aio.AioRpcError:
        return None


async def test_a_silent_stream_is_closed_after_the_hello_timeout(servers: Callable[..., Any]) -> None:
    running: Running = await servers(hello_timeout=0.5, heartbeat_timeout=60.0)
    started = time.monotonic()
    code = await SilentStream(running.stubs).status()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.4 <= time.monotonic() - started < 10.0


async def test_reflection_is_served_under_v1_as_well_as_v1alpha(running: Running) -> None:
    # The v1 protocol is v1alpha's, byte for byte: v1alpha messages speak it.
    call = running.stubs.channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    listed = await asyncio.wait_for(call.read(), 10)
    names = {service.name for service in listed.list_services_response.service}
    assert {"orchestrator.v1.TasksService", V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME} <= names
    await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=V1_SERVICE_NAME))
    found = await asyncio.wait_for(call.read(), 10)
    file = descriptor_pb2.FileDescriptorProto.FromString(
        found.file_descriptor_response.file_descriptor_proto[0]
    )
    assert file.package == "grpc.reflection.v1"
    assert file.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    await call.done_writing()
    call.cancel()


async def test_sigterm_drain_turns_readiness_off_refuses_new_sessions_and_keeps_serving(
    server_process: Callable[..., ServerProcess],
) -> None:
    server = server_process(GATEWAY_ENABLED="true", SHUTDOWN_DELAY=2, SHUTDOWN_GRACE=10)
    await asyncio.to_thread(server.start)
    base = f"http://127.0.0.1:{server.http_port}"
    async with grpc.aio.insecure_channel(server.target) as channel, aiohttp.ClientSession() as http:
        stubs = Stubs(channel)
        health = health_pb2_grpc.HealthStub(channel)
        session, agent_id = await open_session(stubs, "held")
        async with http.get(f"{base}/readyz") as response:
            assert response.status == 200
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        async def not_ready() -> bool:
            async with http.get(f"{base}/readyz") as response:
                return response.status == 503

        await async_wait_for(not_ready, 10, "/readyz 503 after SIGTERM")
        # Still serving within the delay: REST, unary gRPC, the open session's beats.
        assert time.monotonic() - signalled < 2.0, "the delay ran out before the checks"
        async with http.get(f"{base}/agents/list") as response:
            assert response.status == 200
        check = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        session.send(beat=registry_pb2.SessionBeat(sequence=1))
        assert (await session.receive_kind("ack")).ack.sequence == 1
        # A new session is refused with a hint to come back, not welcomed into a dying server.
        registered = await stubs.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))
        assert registered.agent.status == READY
        newcomer = SessionClient(stubs.registry, agent_id, "any-token")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await newcomer.receive()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_detail(refused.value, error_details_pb2.RetryInfo) is not None
        # After the delay the held session is asked to reconnect; leaving lets the process exit.
        await session.receive_kind("reconnect", within=15)
        session.call.cancel()
        assert await asyncio.to_thread(server.process.wait, 15) == 0
        assert time.monotonic() - signalled < 9.0  # well within SHUTDOWN_GRACE: nothing stranded


@pytest.mark.parametrize("variable", ["GRPC_PORT", "PORT"])
def test_a_port_in_use_stops_startup_with_one_line(tmp_path: Path, variable: str) -> None:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {
            **os.environ,
            "GRPC_PORT": "0",
            "PORT": "0",
            "GATEWAY_ENABLED": "true",
            "BIND_HOST": "127.0.0.1",
            "DATABASE_PATH": str(tmp_path / "orchestrator.db"),
            variable: str(port),
        }
        finished = subprocess.run(
            [sys.executable, "-m", "orchestrator_server", "serve"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert finished.returncode == 1
    lines = finished.stderr.strip().splitlines()
    assert lines == [
        f"orchestrator: port {port} is in use: stop the process holding it or set {variable} to another port"
    ]


class IncarnatedSession(SessionClient):
    """A hand-driven session whose hello names the agent process (SessionHello.incarnation)."""

    def __init__(self, stubs: Stubs, agent_id: str, token: str, incarnation: str) -> None:
        self.outbox = asyncio.Queue()
        hello = registry_pb2.SessionHello(agent_id=agent_id, agent_token=token, incarnation=incarnation)
        self.outbox.put_nowait(registry_pb2.HeartbeatRequest(hello=hello))
        self.call = stubs.registry.Heartbeat(self._requests())


def error_reason(error: grpc.aio.AioRpcError) -> str:
    info = error_detail(error, error_details_pb2.ErrorInfo)
    return info.reason if info is not None else ""


async def test_a_live_session_of_another_process_keeps_its_identity(servers: Callable[..., Any]) -> None:
    running: Running = await servers(heartbeat_interval=0.2, heartbeat_timeout=60.0)
    stubs = running.stubs
    registered = await stubs.register("shared")
    agent_id, token = registered.agent.agent_id, registered.agent_token
    holder = IncarnatedSession(stubs, agent_id, token, "process-a")
    assert (await holder.receive()).welcome.epoch == 1
    holder.send(beat=registry_pb2.SessionBeat(sequence=1))
    await holder.receive_kind("ack")
    # Another process: refused with a reason the SDK stops on; the holder is untouched.
    intruder = IncarnatedSession(stubs, agent_id, token, "process-b")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await intruder.receive()
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(refused.value) == "IDENTITY_IN_USE"
    assert "instance id" in (refused.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as register_refused:
        await stubs.register("shared")
    assert register_refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    holder.send(beat=registry_pb2.SessionBeat(sequence=2))
    assert (await holder.receive_kind("ack")).ack.status == READY
    # The same process reconnecting (its old stream not yet seen to end) fences its old session.
    resumed = IncarnatedSession(stubs, agent_id, token, "process-a")
    assert (await resumed.receive()).welcome.epoch == 2
    with pytest.raises(grpc.aio.AioRpcError) as fenced:
        while True:
            await holder.receive()
    assert fenced.value.code() == grpc.StatusCode.ABORTED
    # A session silent for longer than two beat intervals is presumed dead: a newcomer takes over.
    started = time.monotonic()

    async def takes_over() -> int:
        newcomer = IncarnatedSession(stubs, agent_id, token, "process-c")
        try:
            return (await newcomer.receive()).welcome.epoch
        except grpc.aio.AioRpcError:
            return 0

    assert await async_wait_for(takes_over, 15, "a newcomer to take over a silent session") == 3
    assert time.monotonic() - started >= 0.4
