"""HTTP ↔ gRPC transcoding against a scripted backend: bodies, paths, query parameters, responses."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from google.protobuf import struct_pb2

from orchestrator.v1 import agent_pb2, discovery_pb2, registry_pb2, task_pb2, tasks_pb2
from orchestrator_server.gateway import DEFAULT_SERVICES, GatewayOptions
from orchestrator_server.gateway.http_rules import build_route_table
from tests.gateway.conftest import ScriptedBackend


async def _error(response: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert error["code"] == response.status
    return error


async def test_every_route_reaches_its_rpc_with_the_documented_method(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    for route in build_route_table(DEFAULT_SERVICES).routes:
        path = route.template.openapi_path
        for variable in route.template.variables:
            path = path.replace("{" + variable.field_path + "}", "id-1")
        body = {} if route.body else None
        async with http.request(route.http_method, path, json=body) as response:
            assert response.status == 200, (route.http_method, path, await response.text())
        call = backend.last(f"{route.rpc.containing_service.name}/{route.rpc.name}")
        for variable in route.template.variables:
            assert getattr(call.request, variable.field_path) == "id-1"


async def test_body_is_parsed_as_proto3_json_with_either_field_name_style(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    body = {
        "name": "cost-agent",
        "instanceId": "i-1",
        "type": "cost",
        "capabilities": ["a", "b"],
        "labels": {"region": "eu"},
        "endpoints": [{"name": "api", "address": "127.0.0.1:9000", "protocol": "ENDPOINT_PROTOCOL_GRPC"}],
        "max_concurrent_tasks": 4,
    }
    async with http.post("/agents/register", json=body) as response:
        assert response.status == 200
    request = backend.last("RegistryService/RegisterAgent").request
    assert isinstance(request, registry_pb2.RegisterAgentRequest)
    assert request.instance_id == "i-1"
    assert list(request.capabilities) == ["a", "b"]
    assert dict(request.labels) == {"region": "eu"}
    assert request.endpoints[0].protocol == agent_pb2.ENDPOINT_PROTOCOL_GRPC
    assert request.max_concurrent_tasks == 4


async def test_struct_payload_and_durations_round_trip(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    async def echo(request: Any, context: Any) -> tasks_pb2.CreateTaskResponse:
        return tasks_pb2.CreateTaskResponse(task=task_pb2.Task(task_id="t1", spec=request.spec), created=True)

    backend.unary["TasksService/CreateTask"] = echo
    spec = {
        "type": "report",
        "payload": {"n": 1.5, "tags": ["x"], "deep": {"ok": True}},
        "run_timeout": "2.5s",
    }
    async with http.post("/tasks/create", json={"spec": spec}) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["task"]["spec"]["payload"] == spec["payload"]
    assert answer["task"]["spec"]["run_timeout"] == "2.500s"
    assert answer["created"] is True
    sent = backend.last("TasksService/CreateTask").request
    assert isinstance(sent, tasks_pb2.CreateTaskRequest)
    assert sent.spec.payload == struct_pb2.Struct(
        fields={
            "n": struct_pb2.Value(number_value=1.5),
            "tags": struct_pb2.Value(
                list_value=struct_pb2.ListValue(values=[struct_pb2.Value(string_value="x")])
            ),
            "deep": struct_pb2.Value(
                struct_value=struct_pb2.Struct(fields={"ok": struct_pb2.Value(bool_value=True)})
            ),
        }
    )


async def test_query_parameters_map_to_nested_repeated_enum_and_bool_fields(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    query = [
        ("query.type", "cost"),
        ("query.capabilities", "a"),
        ("query.capabilities", "b"),
        ("query.include_degraded", "true"),
        ("strategy", "LOAD_BALANCING_STRATEGY_LEAST_LOADED"),
        ("hashKey", "k"),  # lowerCamelCase names are accepted too
    ]
    async with http.get("/discovery/resolve", params=query) as response:
        assert response.status == 200
    request = backend.last("DiscoveryService/ResolveAgent").request
    assert isinstance(request, discovery_pb2.ResolveAgentRequest)
    assert request.query.type == "cost"
    assert list(request.query.capabilities) == ["a", "b"]
    assert request.query.include_degraded is True
    assert request.strategy == discovery_pb2.LOAD_BALANCING_STRATEGY_LEAST_LOADED
    assert request.hash_key == "k"


@pytest.mark.parametrize("status", ["AGENT_STATUS_DOWN", "4"])
async def test_enum_query_parameters_accept_names_and_numbers(
    backend: ScriptedBackend, http: aiohttp.ClientSession, status: str
) -> None:
    async with http.get(
        "/agents/list", params={"status": status, "page_size": "7", "page_token": "p"}
    ) as response:
        assert response.status == 200
    request = backend.last("RegistryService/ListAgents").request
    assert isinstance(request, registry_pb2.ListAgentsRequest)
    assert request.status == agent_pb2.AGENT_STATUS_DOWN
    assert request.page_size == 7
    assert request.page_token == "p"


async def test_get_task_by_query_parameter_and_by_path_reach_the_same_rpc(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    async with http.get("/tasks/status", params={"task_id": "t-9"}) as response:
        assert response.status == 200
    assert backend.last("TasksService/GetTask").request.task_id == "t-9"  # type: ignore[attr-defined]
    async with http.get("/tasks/t-10") as response:
        assert response.status == 200
    assert backend.last("TasksService/GetTask").request.task_id == "t-10"  # type: ignore[attr-defined]


async def test_responses_are_proto3_json_with_snake_case_names_and_defaults(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    async def agent(request: Any, context: Any) -> registry_pb2.GetAgentResponse:
        return registry_pb2.GetAgentResponse(
            agent=agent_pb2.Agent(agent_id=request.agent_id, status=agent_pb2.AGENT_STATUS_READY, revision=42)
        )

    backend.unary["RegistryService/GetAgent"] = agent
    async with http.get("/agents/a-1") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        body = await response.json()
    assert body["agent"]["agent_id"] == "a-1"
    assert body["agent"]["status"] == "AGENT_STATUS_READY"
    assert body["agent"]["revision"] == "42"  # int64 is a string in proto3 JSON
    assert body["agent"]["max_concurrent_tasks"] == 0  # defaults are written
    assert body["agent"]["capabilities"] == []


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "expected_in_message", "field"),
    [
        ("POST", "/agents/register", {"data": b'{"name": '}, "malformed JSON", None),
        ("POST", "/agents/register", {"data": b"\xff\xfe"}, "not UTF-8", None),
        ("POST", "/agents/register", {"data": b"[1, 2]"}, "must be a JSON object", None),
        ("POST", "/agents/register", {"data": b"[" * 100_000 + b"]" * 100_000}, "JSON", None),
        ("POST", "/agents/register", {"json": {"name": "a", "bogus": 1}}, "bogus", None),
        (
            "POST",
            "/agents/register",
            {"json": {"max_concurrent_tasks": "many"}},
            "max_concurrent_tasks",
            None,
        ),
        ("POST", "/agents/register", {"json": {"max_concurrent_tasks": 2**40}}, "max_concurrent_tasks", None),
        ("POST", "/agents/register", {"json": {"capabilities": "a"}}, "capabilities", None),
        ("POST", "/agents/register", {}, "body is required", None),
        ("POST", "/agents/register", {"json": {"name": "a"}, "params": {"x": "1"}}, "unexpected query", "x"),
        ("POST", "/agents/a-1/drain", {"json": {"agent_id": "a-2"}}, "in the path", "agent_id"),
        ("GET", "/agents/list", {"params": {"bogus": "1"}}, "unknown query parameter 'bogus'", "bogus"),
        ("GET", "/agents/list", {"params": {"page_size": "ten"}}, "page_size", "page_size"),
        ("GET", "/agents/list", {"params": {"page_size": "99999999999"}}, "page_size", "page_size"),
        ("GET", "/agents/list", {"params": {"status": "SLEEPY"}}, "status", "status"),
        ("GET", "/agents/list", {"params": [("type", "a"), ("type", "b")]}, "not repeated", "type"),
        ("GET", "/discovery/agents", {"params": {"query.include_degraded": "yes"}}, "true or false", None),
        ("GET", "/discovery/agents", {"params": {"query.nothing": "1"}}, "unknown", "query.nothing"),
        ("GET", "/discovery/agents", {"params": {"page_size.x": "1"}}, "not a message field", "page_size.x"),
        ("GET", "/agents/a-1", {"params": {"agent_id": "a-2"}}, "already given by the path", "agent_id"),
    ],
)
async def test_bad_input_is_a_400_that_says_what_is_wrong(
    backend: ScriptedBackend,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    expected_in_message: str,
    field: str | None,
) -> None:
    async with http.request(method, path, **kwargs) as response:
        assert response.status == 400
        error = await _error(response)
    assert error["status"] == "INVALID_ARGUMENT"
    assert expected_in_message in error["message"]
    if field is not None:
        violations = error["details"][0]["field_violations"]
        assert violations[0]["field"] == field
    assert backend.calls == [], "bad input must not reach the gRPC server"


async def test_an_action_on_a_resource_may_omit_its_body(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    async with http.post("/agents/a-1/drain") as response:
        assert response.status == 200
    assert backend.last("RegistryService/DrainAgent").request.agent_id == "a-1"  # type: ignore[attr-defined]


@pytest.mark.parametrize("gateway_options", [GatewayOptions(max_body_bytes=1024)])
async def test_oversized_body_is_a_400(backend: ScriptedBackend, http: aiohttp.ClientSession) -> None:
    oversized = {"name": "x" * 2048}
    async with http.post("/agents/register", json=oversized) as response:
        assert response.status == 400
        assert "exceeds the limit of 1024 bytes" in (await _error(response))["message"]

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(4):
            yield b" " * 512  # chunked: no Content-Length, the limit applies while reading

    async with http.post("/agents/register", data=chunks()) as response:
        assert response.status == 400
    assert backend.calls == []


async def test_the_console_answers_the_paths_under_ui_and_only_reads(http: aiohttp.ClientSession) -> None:
    async with http.get("/ui", allow_redirects=False) as response:
        assert response.status == 301
        assert response.headers["Location"] == "/ui/"
    async with http.get("/ui/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    async with http.head("/ui/app.js") as response:
        assert response.status == 200
        assert response.content_type == "text/javascript"
        assert await response.read() == b""
    async with http.get("/ui/nothing.js") as response:
        assert response.status == 404
    async with http.post("/ui/app.js") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET, HEAD"
        assert (await _error(response))["status"] == "METHOD_NOT_ALLOWED"


async def test_unknown_path_is_404_and_wrong_method_is_405_with_allow(http: aiohttp.ClientSession) -> None:
    async with http.get("/nothing/here") as response:
        assert response.status == 404
        assert (await _error(response))["status"] == "NOT_FOUND"
    async with http.put("/agents/a-1") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "DELETE, GET, PATCH"
        await _error(response)
    async with http.get("/agents/heartbeat") as response:  # not GetAgent("heartbeat")
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
    async with http.post("/livez") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET"
