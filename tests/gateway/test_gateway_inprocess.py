"""The gateway inside the server (issue 13): it calls the servicers in process, under the policy
the gRPC interceptors apply, and writes the same JSON json_format would, faster."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from orchestrator.v1 import agent_pb2, health_pb2, registry_pb2, task_pb2, tasks_pb2
from orchestrator_server.gateway import DEFAULT_SERVICES
from orchestrator_server.gateway.errors import GatewayError
from orchestrator_server.gateway.http_rules import build_route_table
from orchestrator_server.gateway.inprocess import _within
from orchestrator_server.gateway.proto_json import ProtoJsonWriter
from orchestrator_server.gateway.transcode import build_request
from orchestrator_server.server import OrchestratorServer
from tests.conftest import Running, make_config
from tests.security.conftest import ADMIN_KEY, API_KEYS, READER_KEY, bearer
from tests.support import SessionClient, rpc_error

ROUTES = build_route_table(DEFAULT_SERVICES)


def _base(running: Running) -> str:
    return f"http://127.0.0.1:{running.server.http_port}"


# -- item 2: no loopback channel ------------------------------------------------------------------


async def test_the_servers_gateway_dials_no_grpc_channel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dialled: list[str] = []
    insecure, secure = grpc.aio.insecure_channel, grpc.aio.secure_channel

    def spy_insecure(target: str, *args: Any, **kwargs: Any) -> grpc.aio.Channel:
        dialled.append(target)
        return insecure(target, *args, **kwargs)

    def spy_secure(target: str, *args: Any, **kwargs: Any) -> grpc.aio.Channel:
        dialled.append(target)
        return secure(target, *args, **kwargs)

    monkeypatch.setattr(grpc.aio, "insecure_channel", spy_insecure)
    monkeypatch.setattr(grpc.aio, "secure_channel", spy_secure)
    server = OrchestratorServer(make_config(tmp_path, gateway_enabled=True))
    await server.start()
    try:
        assert dialled == []  # the gateway used to dial the server's own gRPC port
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.http_port}") as http:
            body = {"name": "inproc", "instance_id": "1", "type": "worker", "max_concurrent_tasks": 1}
            async with http.post("/agents/register", json=body) as response:
                assert response.status == 200, await response.text()
                agent_id = (await response.json())["agent"]["agent_id"]
            async with http.post("/agents/heartbeat", json={"agent_id": agent_id}) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["status"] == "AGENT_STATUS_READY"
            async with http.get("/agents/list") as response:
                assert [agent["agent_id"] for agent in (await response.json())["agents"]] == [agent_id]
            async with http.get("/readyz") as response:
                assert response.status == 200, await response.text()
        assert dialled == []
    finally:
        await server.stop(0.1)


# -- items 1 and 3: one policy, the same answers on both transports ------------------------------


async def test_rest_and_grpc_draw_from_one_rate_limit_bucket(servers: Callable[..., Any]) -> None:
    running: Running = await servers(
        api_keys=API_KEYS, gateway_enabled=True, rate_limit_api_rate=0.1, rate_limit_api_burst=2
    )
    request = health_pb2.GetSystemHealthRequest()
    await running.stubs.health.GetSystemHealth(request, metadata=bearer(READER_KEY))
    async with aiohttp.ClientSession(base_url=_base(running)) as http:
        headers = {"x-api-key": READER_KEY}
        async with http.get("/health/system", headers=headers) as response:
            assert response.status == 200
        async with http.get("/health/system", headers=headers) as response:
            body = await response.json()
            assert response.status == 429, body
            assert int(response.headers["Retry-After"]) >= 1
            assert body["error"]["status"] == "RESOURCE_EXHAUSTED"
            assert any(detail["@type"].endswith("RetryInfo") for detail in body["error"]["details"])
    await rpc_error(
        running.stubs.health.GetSystemHealth(request, metadata=bearer(READER_KEY)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


async def test_rest_is_held_to_the_message_size_limit_like_grpc(servers: Callable[..., Any]) -> None:
    running: Running = await servers(gateway_enabled=True, max_message_bytes=4096)
    big = {"name": "big", "instance_id": "1", "type": "worker", "version": "x" * 8000}
    async with (
        aiohttp.ClientSession(base_url=_base(running)) as http,
        http.post("/agents/register", json=big) as response,
    ):
        body = await response.json()
        assert response.status == 429, body
        assert body["error"]["status"] == "RESOURCE_EXHAUSTED"
        assert "larger than max" in body["error"]["message"]
    await rpc_error(
        running.stubs.registry.RegisterAgent(json_format.ParseDict(big, registry_pb2.RegisterAgentRequest())),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


async def test_a_rest_call_is_audited_timed_and_logged_with_its_request_id(
    servers: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    running: Running = await servers(api_keys=API_KEYS, gateway_enabled=True)

    def created_count() -> float:
        value = REGISTRY.get_sample_value(
            "orchestrator_rpc_duration_seconds_count", {"method": "CreateTask", "code": "OK"}
        )
        return value or 0.0

    before = created_count()
    with caplog.at_level(logging.INFO, logger="orchestrator.audit"):
        async with aiohttp.ClientSession(base_url=_base(running)) as http:
            headers = {"x-api-key": ADMIN_KEY, "x-request-id": "rest-rid-13"}
            async with http.post(
                "/tasks/create", json={"spec": {"type": "job"}}, headers=headers
            ) as response:
                assert response.status == 200, await response.text()
                assert response.headers["x-request-id"] == "rest-rid-13"
    assert created_count() == before + 1
    [record] = [record for record in caplog.records if record.name == "orchestrator.audit"]
    assert record.request_id == "rest-rid-13"  # type: ignore[attr-defined]
    assert record.peer.startswith("ipv4:127.0.0.1:")  # type: ignore[attr-defined]
    assert "who=admin-key" in record.getMessage() and "result=OK" in record.getMessage()


async def test_a_watch_ends_at_its_deadline_and_frees_its_stream_slot(servers: Callable[..., Any]) -> None:
    running: Running = await servers(gateway_enabled=True, max_sessions_per_principal=1)
    created = await running.stubs.tasks.CreateTask(
        tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="job"))
    )
    path = f"/tasks/{created.task.task_id}/watch"
    async with aiohttp.ClientSession(base_url=_base(running)) as http:
        async with http.get(path, headers={"x-request-timeout": "0.5"}) as watch:
            assert watch.status == 200
            lines = [json.loads(line) for line in (await asyncio.wait_for(watch.read(), 30)).splitlines()]
        assert lines[0]["task"]["task_id"] == created.task.task_id
        assert lines[-1]["error"]["status"] == "DEADLINE_EXCEEDED"
        assert lines[-1]["error"]["code"] == 504
        # The one stream this caller may hold was given back when the watch ended.
        async with http.get(path, headers={"x-request-timeout": "0.2"}) as again:
            assert again.status == 200
            await asyncio.wait_for(again.read(), 30)


# -- item 2: proto3 JSON, fast and the same ------------------------------------------------------


def _json_format(message: Message) -> Any:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _agent(number: int) -> agent_pb2.Agent:
    agent = agent_pb2.Agent(
        agent_id=f"agt_{number}",
        name="cost",
        capabilities=["a"],
        labels={"zone": "eu"},
        status=agent_pb2.AGENT_STATUS_READY,
        load=agent_pb2.Load(active_tasks=number, cpu=0.5),
        revision=number,
    )
    agent.registered_at.FromNanoseconds(1_700_000_000_000_000_000 + number * 1_000)
    return agent


def test_list_answers_render_as_json_format_does_while_items_change() -> None:
    writer = ProtoJsonWriter(emit_defaults=True)
    answer = registry_pb2.ListAgentsResponse(agents=[_agent(number) for number in range(20)])
    for change in range(5):
        # Twice each: the second rendering comes from the caches and must not differ.
        for _ in range(2):
            assert json.loads(writer.to_json(answer)) == _json_format(answer)
        answer.agents[change].load.cpu = 0.75 + change
        answer.agents[change].last_heartbeat_at.GetCurrentTime()
    answer.next_page_token = "next"
    assert json.loads(writer.to_json(answer, "agents")) == _json_format(answer)["agents"]


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(0, 0), (1, 1_000_000), (1, 1_000), (1, 1), (-1, 999_999_999), (-62135596800, 0), (253402300799, 5)],
)
def test_timestamps_render_as_json_format_does(seconds: int, nanos: int) -> None:
    agent = agent_pb2.Agent()
    agent.registered_at.seconds, agent.registered_at.nanos = seconds, nanos
    assert ProtoJsonWriter(emit_defaults=False).to_dict(agent) == json_format.MessageToDict(
        agent, preserving_proto_field_name=True
    )


def test_an_invalid_timestamp_fails_as_json_format_does() -> None:
    agent = agent_pb2.Agent()
    agent.registered_at.seconds = 253402300800
    with pytest.raises(ValueError):
        ProtoJsonWriter(emit_defaults=False).to_dict(agent)


# -- request bodies: the plain shapes set directly, everything else as json_format parses it -----

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["AGENT_STATUS_READY", "ENDPOINT_PROTOCOL_GRPC", "NOPE", "1.5s", "12"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
_NAMES = st.sampled_from(
    [
        "agent_id",
        "agentId",
        "load",
        "checks",
        "name",
        "instance_id",
        "instanceId",
        "capabilities",
        "labels",
        "endpoints",
        "max_concurrent_tasks",
        "active_tasks",
        "cpu",
        "memory",
        "status",
        "spec",
        "type",
        "priority",
        "payload",
        "unknown",
    ]
)
_DOCUMENTS = st.dictionaries(
    _NAMES, st.one_of(_VALUES, st.dictionaries(_NAMES, _VALUES, max_size=4)), max_size=5
)
_BODY_ROUTES = [
    ROUTES.resolve("POST", path).route for path in ("/agents/heartbeat", "/agents/register", "/tasks/create")
]


def _by_json_format(route: Any, document: Any) -> Message | None:
    expected = json_format.ParseDict({}, type(build_request(route, {}, {}, b"{}"))())
    try:
        json_format.ParseDict(document if route.body == "*" else {route.body: document}, expected)
    except (json_format.ParseError, TypeError, ValueError, RecursionError):
        return None
    return expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=_DOCUMENTS, which=st.integers(min_value=0, max_value=len(_BODY_ROUTES) - 1))
def test_a_body_becomes_the_message_json_format_makes_or_the_same_refusal(
    document: dict[str, Any], which: int
) -> None:
    route = _BODY_ROUTES[which]
    assert route is not None
    raw = json.dumps(document).encode()
    expected = _by_json_format(route, json.loads(raw))
    try:
        built = build_request(route, {}, {}, raw)
    except GatewayError as error:
        assert expected is None, (document, error.message)
        assert error.http_status == 400
        return
    assert expected is not None, document
    assert built is not None
    # Bytes, not ==: a "NaN" string is a valid double, and NaN != NaN.
    assert built.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


async def test_a_closed_session_gives_back_its_stream_slot(servers: Callable[..., Any]) -> None:
    running: Running = await servers(max_sessions_per_principal=1)
    registered = await running.stubs.register("reconnecting")
    for _ in range(3):
        session = SessionClient(running.stubs.registry, registered.agent.agent_id, registered.agent_token)
        welcome = await session.receive()
        assert welcome.WhichOneof("message") == "welcome", welcome
        await session.goodbye()


# -- deadlines of in-process calls: armed only when a call waits ---------------------------------


async def test_a_call_that_never_waits_answers_without_a_deadline_timer() -> None:
    async def answer() -> str:
        return "at once"

    loop = asyncio.get_running_loop()
    timers_before = len(getattr(loop, "_scheduled", ()))
    assert await _within(answer(), 0.000001) == "at once"  # type: ignore[arg-type]
    assert len(getattr(loop, "_scheduled", ())) == timers_before


async def test_a_call_that_waits_gets_its_result_or_is_cancelled_at_its_deadline() -> None:
    loop = asyncio.get_running_loop()
    seen: list[str] = []

    async def waits(seconds: float) -> str:
        try:
            await asyncio.sleep(seconds)
            fut: asyncio.Future[str] = loop.create_future()
            loop.call_soon(fut.set_result, "after two waits")
            return await fut
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            raise

    assert await _within(waits(0.01), 10) == "after two waits"  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        await _within(waits(10), 0.05)  # type: ignore[arg-type]
    assert seen == ["cancelled inside"]


async def test_a_call_that_waits_fails_with_its_own_error_and_hears_a_cancellation() -> None:
    async def fails() -> str:
        await asyncio.sleep(0)
        raise ValueError("its own")

    with pytest.raises(ValueError, match="its own"):
        await _within(fails(), None)  # type: ignore[arg-type]
    started = asyncio.Event()
    cleaned = asyncio.Event()

    async def long() -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.set()
        return "never"

    task = asyncio.create_task(_within(long(), None))  # type: ignore[arg-type]
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set()


# -- list pages as bytes: the REST list builds no response message ------------------------------


@pytest.mark.parametrize(
    ("items", "token"),
    [
        (0, ""),
        (3, "next"),
        (20, "t" * 300),  # a token whose length takes a two-byte varint
    ],
)
def test_a_page_written_from_its_items_is_the_answer(items: int, token: str) -> None:
    from orchestrator.v1 import discovery_pb2
    from orchestrator_server.grpc_api.pages import PageEncoder

    agents = [_agent(number) for number in range(items)]
    if agents:
        agents[-1].labels.update({f"k{n}": "v" * 100 for n in range(200)})  # an item over 16 KiB
    for response_class in (registry_pb2.ListAgentsResponse, discovery_pb2.DiscoverAgentsResponse):
        encoded = PageEncoder(response_class.DESCRIPTOR).encode(agents, token)
        # Equal as messages (map entries may serialize in another order in a copy).
        assert response_class.FromString(encoded) == response_class(agents=agents, next_page_token=token)


async def test_rest_lists_and_discovers_without_building_the_answer_message(
    servers: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway takes a page's bytes (`encoded_methods`): the gRPC servicer methods, which build
    the message, are not called, and the JSON is json_format's of the gRPC answer."""
    running: Running = await servers(gateway_enabled=True)
    from orchestrator.v1 import discovery_pb2
    from orchestrator_server.grpc_api.discovery import DiscoveryServicer
    from orchestrator_server.grpc_api.registry import RegistryServicer

    for number in range(3):
        registered = await running.stubs.registry.RegisterAgent(
            registry_pb2.RegisterAgentRequest(name=f"p{number}", instance_id="1", type="pager")
        )
        await running.stubs.registry.SendHeartbeat(
            registry_pb2.SendHeartbeatRequest(agent_id=registered.agent.agent_id)
        )
    listed = await running.stubs.registry.ListAgents(registry_pb2.ListAgentsRequest(page_size=2))
    discovered = await running.stubs.discovery.DiscoverAgents(
        discovery_pb2.DiscoverAgentsRequest(query=discovery_pb2.AgentQuery(type="pager"), page_size=2)
    )

    async def built(*args: Any) -> Any:
        raise AssertionError("the REST gateway built the answer message")

    monkeypatch.setattr(RegistryServicer, "ListAgents", built)
    monkeypatch.setattr(DiscoveryServicer, "DiscoverAgents", built)
    async with aiohttp.ClientSession(base_url=_base(running)) as http:
        async with http.get("/agents/list", params={"page_size": "2"}) as response:
            assert response.status == 200, await response.text()
            assert await response.json() == _json_format(listed)
        async with http.get(
            "/discovery/agents", params={"query.type": "pager", "page_size": "2"}
        ) as response:
            assert response.status == 200, await response.text()
            assert await response.json() == _json_format(discovered)


async def test_rest_pages_follow_every_change_of_their_agents(servers: Callable[..., Any]) -> None:
    """An agent's bytes are kept for list pages until it changes (`AgentState.wire`): after each
    kind of change (unary beat, session beat with checks, drain, a task placed, its end) the REST
    page is the gRPC answer, built afresh from the messages."""
    from orchestrator.v1 import discovery_pb2
    from tests.support import open_session

    running: Running = await servers(gateway_enabled=True)
    registry, tasks = running.stubs.registry, running.stubs.tasks
    ids: list[str] = []
    tokens: list[str] = []
    for number in range(3):
        registered = await registry.RegisterAgent(
            registry_pb2.RegisterAgentRequest(
                name=f"w{number}", instance_id="1", type="pager", max_concurrent_tasks=2
            )
        )
        ids.append(registered.agent.agent_id)
        tokens.append(registered.agent_token)
    session = await open_session(registry, ids[0], tokens[0])

    async def same_pages(http: aiohttp.ClientSession, what: str) -> None:
        listed = await registry.ListAgents(registry_pb2.ListAgentsRequest(page_size=10))
        discovered = await running.stubs.discovery.DiscoverAgents(
            discovery_pb2.DiscoverAgentsRequest(query=discovery_pb2.AgentQuery(type="pager"))
        )
        async with http.get("/agents/list", params={"page_size": "10"}) as response:
            assert await response.json() == _json_format(listed), what
        async with http.get("/discovery/agents", params={"query.type": "pager"}) as response:
            assert await response.json() == _json_format(discovered), what

    async with aiohttp.ClientSession(base_url=_base(running)) as http:
        await same_pages(http, "registered")
        for load in (0.25, 0.75):
            await registry.SendHeartbeat(
                registry_pb2.SendHeartbeatRequest(agent_id=ids[1], load=agent_pb2.Load(cpu=load))
            )
            await same_pages(http, f"unary beat at cpu {load}")
        session.send(
            beat=registry_pb2.SessionBeat(
                sequence=1,
                load=agent_pb2.Load(cpu=0.5, active_tasks=1),
                checks=[agent_pb2.Check(name="disk", status=agent_pb2.CHECK_STATUS_PASSING)],
            )
        )
        await session.receive_kind("ack")
        await same_pages(http, "session beat with checks")
        await registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=ids[2], reason="test"))
        await same_pages(http, "drained")
        created = await tasks.CreateTask(
            tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="echo", target_agent_id=ids[0]))
        )
        assignment = await session.receive_kind("assignment")
        await same_pages(http, "task placed")
        assert (
            await registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=ids[0]))
        ).agent.assigned_tasks == 1
        await tasks.CompleteTask(
            tasks_pb2.CompleteTaskRequest(
                task_id=created.task.task_id, attempt_id=assignment.assignment.attempt_id
            )
        )
        await same_pages(http, "task completed")
    await session.goodbye()
