"""Streamed (NDJSON) watches, probes, metrics and the gateway as a separate process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2

from orchestrator.v1 import agent_pb2, discovery_pb2, event_pb2, task_pb2, tasks_pb2
from orchestrator_server.gateway import GatewayOptions, RunningGateway, start_gateway
from tests.gateway.conftest import ScriptedBackend

REPO_ROOT = Path(__file__).resolve().parents[2]


class WatchScript:
    """A WatchAgents behaviour: a snapshot, then whatever the test puts in `deltas`; notes its end."""

    def __init__(self) -> None:
        self.deltas: asyncio.Queue[discovery_pb2.WatchAgentsResponse | None] = asyncio.Queue()
        self.ended = asyncio.Event()

    async def __call__(self, request: Any, context: Any) -> AsyncIterator[discovery_pb2.WatchAgentsResponse]:
        try:
            yield discovery_pb2.WatchAgentsResponse(
                revision=1, snapshot=discovery_pb2.AgentSnapshot(agents=[agent_pb2.Agent(agent_id="a-1")])
            )
            while (delta := await self.deltas.get()) is not None:
                yield delta
        finally:
            self.ended.set()


def _down(agent_id: str, revision: int) -> discovery_pb2.WatchAgentsResponse:
    return discovery_pb2.WatchAgentsResponse(
        revision=revision,
        delta=discovery_pb2.AgentDelta(
            type=event_pb2.EVENT_TYPE_AGENT_STATUS_CHANGED,
            agent=agent_pb2.Agent(agent_id=agent_id, status=agent_pb2.AGENT_STATUS_DOWN),
            previous_status=agent_pb2.AGENT_STATUS_READY,
        ),
    )


async def _next_line(response: aiohttp.ClientResponse) -> dict[str, Any]:
    line = await asyncio.wait_for(response.content.readline(), 5)
    assert line.endswith(b"\n")
    parsed: dict[str, Any] = json.loads(line)
    return parsed


async def test_watch_streams_ndjson_lines_as_they_happen(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    script = WatchScript()
    backend.streams["DiscoveryService/WatchAgents"] = script
    async with http.get("/discovery/watch", params={"query.type": "cost", "start_revision": "0"}) as response:
        assert response.status == 200
        assert response.content_type == "application/x-ndjson"
        assert response.headers["x-request-id"]
        first = await _next_line(response)
        assert first["snapshot"]["agents"][0]["agent_id"] == "a-1"
        await script.deltas.put(_down("a-1", 2))
        second = await _next_line(response)
        assert second["revision"] == "2"
        assert second["delta"]["agent"]["status"] == "AGENT_STATUS_DOWN"
        await script.deltas.put(None)  # the RPC ends: so does the HTTP response
        assert await asyncio.wait_for(response.content.read(), 5) == b""
    assert backend.last("DiscoveryService/WatchAgents").request.query.type == "cost"  # type: ignore[attr-defined]


async def test_client_going_away_cancels_the_grpc_stream(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    script = WatchScript()
    backend.streams["DiscoveryService/WatchAgents"] = script
    response = await http.get("/discovery/watch")
    await _next_line(response)
    assert not script.ended.is_set()
    response.close()  # drops the connection mid-stream
    await asyncio.wait_for(script.ended.wait(), 5)


async def test_stream_failing_before_its_first_message_is_a_plain_http_error(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    async def unknown_task(request: Any, context: Any) -> AsyncIterator[tasks_pb2.WatchTaskResponse]:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} not found")
        yield tasks_pb2.WatchTaskResponse()  # unreachable; makes this an async generator

    backend.streams["TasksService/WatchTask"] = unknown_task
    async with http.get("/tasks/t-404/watch") as response:
        assert response.status == 404
        body = await response.json()
    assert body["error"]["message"] == "task t-404 not found"


async def test_stream_failing_later_ends_with_an_error_line(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    async def then_fails(request: Any, context: Any) -> AsyncIterator[tasks_pb2.WatchTaskResponse]:
        yield tasks_pb2.WatchTaskResponse(task=task_pb2.Task(task_id=request.task_id), revision=5)
        await context.abort(grpc.StatusCode.ABORTED, "watch superseded")

    backend.streams["TasksService/WatchTask"] = then_fails
    async with http.get("/tasks/t-1/watch") as response:
        assert response.status == 200
        lines = [json.loads(line) for line in (await response.read()).splitlines()]
    assert lines[0]["task"]["task_id"] == "t-1"
    assert lines[1] == {
        "error": {"code": 409, "status": "ABORTED", "message": "watch superseded", "details": []}
    }


async def test_stopping_the_gateway_ends_open_watches(backend: ScriptedBackend) -> None:
    script = WatchScript()
    backend.streams["DiscoveryService/WatchAgents"] = script
    gateway = await start_gateway("127.0.0.1", 0, f"127.0.0.1:{backend.port}")
    async with aiohttp.ClientSession() as session:
        response = await session.get(f"http://127.0.0.1:{gateway.port}/discovery/watch")
        await _next_line(response)
        await asyncio.wait_for(gateway.stop(), 5)
        await asyncio.wait_for(script.ended.wait(), 5)
        # The HTTP response ends too (no client left hanging), and never like a finished watch:
        # either cut short, or closed after an error line that says why.
        try:
            rest = await asyncio.wait_for(response.content.read(), 5)
        except aiohttp.ClientPayloadError:
            pass
        else:
            lines = rest.splitlines()
            assert lines and "error" in json.loads(lines[-1]), rest
        response.close()


async def test_livez_and_readyz_follow_the_grpc_health_service(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    async with http.get("/livez") as response:
        assert response.status == 200
    async with http.get("/readyz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "SERVING"}
    await backend.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    async with http.get("/readyz") as response:
        assert response.status == 503
        assert await response.json() == {"status": "NOT_SERVING", "reason": "gRPC server reports NOT_SERVING"}


async def test_readyz_also_asks_the_readiness_callback(backend: ScriptedBackend) -> None:
    store_ok = True

    async def store_reachable() -> bool:
        return store_ok

    gateway = await start_gateway(
        "127.0.0.1", 0, f"127.0.0.1:{backend.port}", readiness_check=store_reachable
    )
    try:
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{gateway.port}") as session:
            async with session.get("/readyz") as response:
                assert response.status == 200
            store_ok = False
            async with session.get("/readyz") as response:
                assert response.status == 503
                assert (await response.json())["reason"] == "readiness check failed"
    finally:
        await gateway.stop()


async def test_metrics_count_requests_by_route_template_and_code(http: aiohttp.ClientSession) -> None:
    async def count(route: str, code: str) -> float:
        async with http.get("/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
        for line in text.splitlines():
            if (
                line.startswith("orchestrator_gateway_requests_total{")
                and f'route="{route}"' in line
                and f'code="{code}"' in line
                and 'method="GET"' in line
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = await count("/agents/{agent_id}", "200")
    async with http.get("/agents/a-1"):
        pass
    async with http.get("/agents/a-2"):
        pass
    assert await count("/agents/{agent_id}", "200") == before + 2
    unmatched_before = await count("unmatched", "404")
    async with http.get("/no/such/path"):
        pass
    assert await count("unmatched", "404") == unmatched_before + 1
    async with http.get("/metrics") as response:
        assert (
            'orchestrator_gateway_request_duration_seconds_bucket{le="0.005",method="GET",route="/agents/{agent_id}"}'
            in (await response.text())
        )


@pytest.mark.parametrize("gateway_options", [GatewayOptions(emit_defaults=False)])
async def test_defaults_can_be_left_out(backend: ScriptedBackend, http: aiohttp.ClientSession) -> None:
    async with http.get("/agents/list") as response:
        assert await response.json() == {}


async def _wait_for_file(path: Path, process: asyncio.subprocess.Process) -> dict[str, Any]:
    async def poll() -> dict[str, Any]:
        while not await asyncio.to_thread(path.exists):
            if process.returncode is not None:
                raise AssertionError(f"gateway exited with {process.returncode}")
            await asyncio.sleep(0.02)
        parsed: dict[str, Any] = json.loads(await asyncio.to_thread(path.read_text))
        return parsed

    return await asyncio.wait_for(poll(), 20)


async def test_gateway_runs_as_its_own_process_against_a_remote_target(
    backend: ScriptedBackend, tmp_path: Path
) -> None:
    ready_file = tmp_path / "ready.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator_server.gateway",
        "--grpc-target",
        f"127.0.0.1:{backend.port}",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--ready-file",
        str(ready_file),
        cwd=REPO_ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        ready = await _wait_for_file(ready_file, process)
        assert ready["pid"] == process.pid
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{ready['http_port']}") as session:
            async with session.get("/readyz") as response:
                assert response.status == 200
            async with session.get("/agents/a-7") as response:
                assert response.status == 200
        assert backend.last("RegistryService/GetAgent").request.agent_id == "a-7"  # type: ignore[attr-defined]
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"PORT": "eighty"}, [], "PORT must be a port number"),
        ({}, ["--port", "70000"], "--port / PORT must be a port number"),
        ({}, ["--tls-cert-file", "/nonexistent"], "go together"),
        ({}, ["--tls-ca-file", "/nonexistent/ca.pem"], "cannot read"),
    ],
)
async def test_bad_configuration_stops_the_process_with_a_message_naming_it(
    env: dict[str, str], args: list[str], message: str
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator_server.gateway",
        "--host",
        "127.0.0.1",
        *args,
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert message in stderr.decode()


async def test_start_gateway_releases_the_channel_when_the_port_is_taken(backend: ScriptedBackend) -> None:
    first: RunningGateway = await start_gateway("127.0.0.1", 0, f"127.0.0.1:{backend.port}")
    try:
        with pytest.raises(OSError):
            await start_gateway("127.0.0.1", first.port, f"127.0.0.1:{backend.port}")
    finally:
        await first.stop()
