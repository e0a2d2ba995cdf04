"""The gateway in front of the real orchestrator: every documented path, parity with gRPC, watches."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from orchestrator.v1 import (
    agent_pb2,
    discovery_pb2,
    health_pb2,
    registry_pb2,
    task_pb2,
    tasks_pb2,
)
from orchestrator_server.gateway.errors import HTTP_STATUS_BY_GRPC_CODE
from tests.conftest import Running, Stubs, open_session


@pytest.fixture
async def live(servers: Callable[..., Any]) -> Running:
    """The in-process server with its REST gateway, as `orchestrator serve` runs them."""
    running: Running = await servers(gateway_enabled=True)
    assert running.server.http_port
    return running


@pytest.fixture
async def rest(live: Running) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{live.server.http_port}") as session:
        yield session


async def _json(response: aiohttp.ClientResponse, status: int = 200) -> dict[str, Any]:
    body: dict[str, Any] = await response.json()
    assert response.status == status, body
    return body


async def test_every_path_of_the_original_document_answers_with_its_method(
    live: Running, rest: aiohttp.ClientSession
) -> None:
    registration = {
        "name": "cost-agent",
        "instance_id": "i-1",
        "type": "cost",
        "capabilities": ["analyze"],
        "endpoints": [{"name": "api", "address": "127.0.0.1:9000", "protocol": "ENDPOINT_PROTOCOL_HTTP"}],
        "max_concurrent_tasks": 1,
    }
    async with rest.post("/agents/register", json=registration) as response:
        registered = await _json(response)
    agent_id, token = registered["agent"]["agent_id"], registered["agent_token"]
    assert registered["created"] is True
    bearer = {"authorization": f"Bearer {token}"}

    async with rest.post(
        "/agents/heartbeat", json={"agent_id": agent_id, "load": {"cpu": 0.5}}, headers=bearer
    ) as r:
        beat = await _json(r)
    assert beat["status"] == "AGENT_STATUS_READY"
    assert beat["lease_expires_at"]

    async with rest.get("/agents/list") as response:
        assert [agent["agent_id"] for agent in (await _json(response))["agents"]] == [agent_id]
    async with rest.get("/health/agents") as response:
        assert [health["agent_id"] for health in (await _json(response))["agents"]] == [agent_id]
    async with rest.get("/health/system") as response:
        system = await _json(response)
    assert system["total_agents"] == "1"
    assert system["store_status"] == "ok"
    async with rest.get(f"/health/{agent_id}") as response:
        assert (await _json(response))["health"]["status"] == "AGENT_STATUS_READY"
    async with rest.get("/discovery/agents", params={"query.type": "cost"}) as response:
        assert [agent["agent_id"] for agent in (await _json(response))["agents"]] == [agent_id]
    async with rest.get("/discovery/endpoints") as response:
        endpoints = (await _json(response))["endpoints"]
    assert endpoints[0]["endpoint"]["address"] == "127.0.0.1:9000"

    async with rest.post(
        "/tasks/create", json={"spec": {"type": "analyze", "payload": {"n": 1}}}
    ) as response:
        task_id = (await _json(response))["task"]["task_id"]
    async with rest.get("/tasks/status", params={"task_id": task_id}) as response:
        assert (await _json(response))["task"]["status"] == "TASK_STATUS_PENDING"
    # The legacy flow: an operator places the task on a REST-only agent, which finds it by listing
    # its assigned tasks (no session to push down) and reports the result over REST.
    async with rest.post("/tasks/assign", json={"task_id": task_id, "agent_id": agent_id}) as response:
        assigned = (await _json(response))["task"]
    assert assigned["status"] == "TASK_STATUS_ASSIGNED"
    params = {"agent_id": agent_id, "status": "TASK_STATUS_ASSIGNED"}
    async with rest.get("/tasks/list", params=params) as response:
        mine = (await _json(response))["tasks"]
    assert [task["task_id"] for task in mine] == [task_id]
    attempt_id = mine[0]["current_attempt_id"]
    async with rest.post(
        f"/tasks/{task_id}/complete", json={"attempt_id": attempt_id, "result": {"ok": True}}, headers=bearer
    ) as response:
        assert (await _json(response))["task"]["status"] == "TASK_STATUS_SUCCEEDED"
    # A second assignment of a finished task is refused: FAILED_PRECONDITION maps to 400.
    async with rest.post("/tasks/assign", json={"task_id": task_id, "agent_id": agent_id}) as response:
        refused = await _json(response, 400)
    assert task_id in refused["error"]["message"]

    async with rest.delete(f"/agents/{agent_id}") as response:
        assert (await _json(response))["agent"]["status"] == "AGENT_STATUS_DEREGISTERED"
    async with rest.get("/agents/list") as response:
        assert (await _json(response))["agents"] == []


async def test_the_rest_of_the_rest_surface_over_a_session_agent(
    live: Running, rest: aiohttp.ClientSession
) -> None:
    session, agent_id = await open_session(live.stubs, "worker", max_concurrent_tasks=1, capabilities=["run"])
    async with rest.get(f"/agents/{agent_id}") as response:
        assert (await _json(response))["agent"]["session"]["streaming"] is True
    patch = {"update": {"labels": {"zone": "a"}}, "update_mask": "labels"}
    async with rest.patch(f"/agents/{agent_id}", json=patch) as response:
        assert (await _json(response))["agent"]["labels"] == {"zone": "a"}
    async with rest.post(f"/agents/{agent_id}/drain", json={"reason": "maintenance"}) as response:
        assert (await _json(response))["agent"]["status"] == "AGENT_STATUS_DRAINING"
    async with rest.post(f"/agents/{agent_id}/undrain") as response:
        assert (await _json(response))["agent"]["status"] == "AGENT_STATUS_READY"
    async with rest.get(
        "/discovery/resolve", params={"strategy": "LOAD_BALANCING_STRATEGY_ROUND_ROBIN"}
    ) as r:
        assert (await _json(r))["agent"]["agent_id"] == agent_id

    async with rest.post(
        "/tasks/create", json={"spec": {"type": "job", "required_capabilities": ["run"]}}
    ) as r:
        task_id = (await _json(r))["task"]["task_id"]
    pushed = await session.receive()
    while pushed.WhichOneof("message") != "assignment":
        pushed = await session.receive()
    attempt_id = pushed.assignment.attempt_id
    async with rest.get(f"/tasks/{task_id}") as response:
        assert (await _json(response))["task"]["current_attempt_id"] == attempt_id
    async with rest.get("/tasks/list", params={"agent_id": agent_id}) as response:
        assert [task["task_id"] for task in (await _json(response))["tasks"]] == [task_id]

    async with rest.get(f"/tasks/{task_id}/watch") as watch:
        assert watch.status == 200
        first = json.loads(await asyncio.wait_for(watch.content.readline(), 10))
        assert first["task"]["status"] == "TASK_STATUS_ASSIGNED"
        async with rest.post(
            f"/tasks/{task_id}/complete", json={"attempt_id": attempt_id, "result": {"ok": True}}
        ) as response:
            completed = await _json(response)
        assert completed["task"]["status"] == "TASK_STATUS_SUCCEEDED"
        assert completed["task"]["result"] == {"ok": True}
        rest_of_stream = [
            json.loads(line) for line in (await asyncio.wait_for(watch.read(), 10)).splitlines()
        ]
    assert rest_of_stream[-1]["task"]["status"] == "TASK_STATUS_SUCCEEDED"  # the watch ends at terminal

    async with rest.post("/tasks/create", json={"spec": {"type": "job"}}) as response:
        second = (await _json(response))["task"]["task_id"]
    pushed = await session.receive()
    while pushed.WhichOneof("message") != "assignment":
        pushed = await session.receive()
    failure = {
        "attempt_id": pushed.assignment.attempt_id,
        "error": {"message": "boom", "non_retryable": True},
    }
    async with rest.post(f"/tasks/{second}/fail", json=failure) as response:
        assert (await _json(response))["task"]["status"] == "TASK_STATUS_FAILED"
    async with rest.post(
        "/tasks/create", json={"spec": {"type": "job", "target_agent_id": "nobody"}}
    ) as response:
        third = (await _json(response))["task"]["task_id"]
    async with rest.post(f"/tasks/{third}/cancel", json={"reason": "changed my mind"}) as response:
        assert (await _json(response))["task"]["status"] == "TASK_STATUS_CANCELLED"
    session.close()


def _rest_json(message: Message) -> Any:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


async def _grpc_outcome(call: Any) -> tuple[grpc.StatusCode, Any]:
    try:
        reply = await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, _rest_json(reply)


async def _rest_outcome(response: aiohttp.ClientResponse) -> tuple[int, Any]:
    body = await response.json()
    if response.status == 200:
        return 200, body
    return response.status, body["error"]["message"]


async def test_parity_same_result_and_mapped_code_over_grpc_and_rest(
    live: Running, rest: aiohttp.ClientSession
) -> None:
    stubs: Stubs = live.stubs
    registered = await stubs.register("parity", labels={"tier": "gold"})
    agent_id = registered.agent.agent_id
    created = await stubs.tasks.CreateTask(tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="x")))
    task_id = created.task.task_id

    cases: list[tuple[str, Any, Callable[[], Any]]] = [
        ("get agent", stubs.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id)),
         lambda: rest.get(f"/agents/{agent_id}")),
        ("unknown agent", stubs.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="agt_missing")),
         lambda: rest.get("/agents/agt_missing")),
        ("list by selector", stubs.registry.ListAgents(registry_pb2.ListAgentsRequest(label_selector="tier=gold")),
         lambda: rest.get("/agents/list", params={"label_selector": "tier=gold"})),
        ("bad selector", stubs.registry.ListAgents(registry_pb2.ListAgentsRequest(label_selector="tier in (")),
         lambda: rest.get("/agents/list", params={"label_selector": "tier in ("})),
        ("page too large", stubs.registry.ListAgents(registry_pb2.ListAgentsRequest(page_size=5000)),
         lambda: rest.get("/agents/list", params={"page_size": "5000"})),
        ("register without name", stubs.registry.RegisterAgent(registry_pb2.RegisterAgentRequest(type="t")),
         lambda: rest.post("/agents/register", json={"type": "t"})),
        ("agent health", stubs.health.GetAgentHealth(health_pb2.GetAgentHealthRequest(agent_id=agent_id)),
         lambda: rest.get(f"/health/{agent_id}")),
        ("discover", stubs.discovery.DiscoverAgents(
            discovery_pb2.DiscoverAgentsRequest(query=discovery_pb2.AgentQuery(type="worker"))),
         lambda: rest.get("/discovery/agents", params={"query.type": "worker"})),
        ("hash without key", stubs.discovery.ResolveAgent(discovery_pb2.ResolveAgentRequest(
            strategy=discovery_pb2.LOAD_BALANCING_STRATEGY_CONSISTENT_HASH)),
         lambda: rest.get("/discovery/resolve", params={"strategy": "LOAD_BALANCING_STRATEGY_CONSISTENT_HASH"})),
        ("get task", stubs.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id)),
         lambda: rest.get("/tasks/status", params={"task_id": task_id})),
        ("unknown task", stubs.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id="tsk_missing")),
         lambda: rest.get("/tasks/tsk_missing")),
        ("assign to an unknown agent", stubs.tasks.AssignTask(tasks_pb2.AssignTaskRequest(
            task_id=task_id, agent_id="agt_missing")),
         lambda: rest.post("/tasks/assign", json={"task_id": task_id, "agent_id": "agt_missing"})),
        ("complete a foreign attempt", stubs.tasks.CompleteTask(tasks_pb2.CompleteTaskRequest(
            task_id=task_id, attempt_id="att_nope")),
         lambda: rest.post(f"/tasks/{task_id}/complete", json={"attempt_id": "att_nope"})),
        ("drain unknown", stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id="agt_missing")),
         lambda: rest.post("/agents/agt_missing/drain")),
    ]  # fmt: skip
    seen_codes = set()
    for name, grpc_call, rest_call in cases:
        code, grpc_result = await _grpc_outcome(grpc_call)
        async with rest_call() as response:
            status, rest_result = await _rest_outcome(response)
        assert status == HTTP_STATUS_BY_GRPC_CODE[code], name
        assert rest_result == grpc_result, name
        seen_codes.add(code)
    assert {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT} <= seen_codes
    assert grpc.StatusCode.FAILED_PRECONDITION in seen_codes


async def test_rest_heartbeat_keeps_an_agent_alive_by_ttl(servers: Callable[..., Any]) -> None:
    # A timeout a loaded machine's stalls stay under; the beats come fifteen times as often.
    timeout = 3.0
    running: Running = await servers(gateway_enabled=True, heartbeat_timeout=timeout)
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{running.server.http_port}") as rest:
        body = {"name": "legacy", "instance_id": "1", "type": "cron"}
        async with rest.post("/agents/register", json=body) as response:
            registered = await _json(response)
        agent_id = registered["agent"]["agent_id"]
        bearer = {"authorization": f"Bearer {registered['agent_token']}"}

        async def status() -> str:
            async with rest.get(f"/agents/{agent_id}") as response:
                return str((await _json(response))["agent"]["status"])

        deadline = time.monotonic() + 1.5 * timeout  # beating keeps it READY throughout
        while time.monotonic() < deadline:
            async with rest.post(
                "/agents/heartbeat", json={"agent_id": agent_id}, headers=bearer
            ) as response:
                await _json(response)
            assert await status() == "AGENT_STATUS_READY"
            await asyncio.sleep(0.2)  # the beat interval of this legacy caller
        silence_started = time.monotonic()
        while await status() != "AGENT_STATUS_DOWN":
            assert time.monotonic() - silence_started < 10, "silent agent never went DOWN"
            await asyncio.sleep(0.05)


async def test_watch_over_http_sees_a_killed_agent_process_go_down(
    server_process: Callable[..., Any], agent_processes: Callable[..., Any]
) -> None:
    server = await asyncio.to_thread(lambda: server_process(GATEWAY_ENABLED="true").start())
    assert server.http_port
    agent = agent_processes(server.target, "victim")
    agent_id = await asyncio.to_thread(agent.wait_welcome)
    async with (
        aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.http_port}") as rest,
        rest.get("/discovery/watch") as discovery,
        rest.get("/health/watch") as health,
    ):
        assert discovery.status == health.status == 200
        snapshot = json.loads(await asyncio.wait_for(discovery.content.readline(), 10))
        assert [a["agent_id"] for a in snapshot["snapshot"]["agents"]] == [agent_id]
        assert snapshot["snapshot"]["agents"][0]["status"] == "AGENT_STATUS_READY"
        while not json.loads(await asyncio.wait_for(health.content.readline(), 10)).get("caught_up"):
            pass

        killed_at = time.monotonic()
        await asyncio.to_thread(agent.kill)

        async def down_in(stream: aiohttp.ClientResponse, pick: Callable[[dict[str, Any]], Any]) -> float:
            while True:
                line = json.loads(await asyncio.wait_for(stream.content.readline(), 10))
                item = pick(line)
                if item and item["agent_id"] == agent_id and item["status"] == "AGENT_STATUS_DOWN":
                    return time.monotonic() - killed_at

        discovery_seconds = await down_in(discovery, lambda line: line.get("delta", {}).get("agent"))
        health_seconds = await down_in(health, lambda line: line.get("health"))
    # The session ends within milliseconds of the kill; a generous bound keeps a loaded CI green.
    assert discovery_seconds < 5 and health_seconds < 5


async def test_readyz_follows_the_server_draining(live: Running, rest: aiohttp.ClientSession) -> None:
    async with rest.get("/readyz") as response:
        assert response.status == 200
    await live.server.health.enter_graceful_shutdown()
    async with rest.get("/readyz") as response:
        assert response.status == 503


async def test_enum_filters_by_number_and_name_agree(live: Running, rest: aiohttp.ClientSession) -> None:
    await live.stubs.register("enum")
    status = agent_pb2.AGENT_STATUS_READY
    async with rest.get("/agents/list", params={"status": str(status)}) as by_number:
        numbered = await _json(by_number)
    async with rest.get("/agents/list", params={"status": agent_pb2.AgentStatus.Name(status)}) as by_name:
        named = await _json(by_name)
    assert numbered == named
    assert len(named["agents"]) == 1
