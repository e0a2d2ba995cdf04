"""RegistryService: every unary RPC's happy path and its error codes for each class of bad input."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from orchestrator.v1 import agent_pb2, discovery_pb2, event_pb2, registry_pb2
from tests.conftest import Running, Stubs, async_wait_for
from tests.support import (
    DEGRADED,
    DEREGISTERED,
    DOWN,
    DRAINING,
    READY,
    SessionClient,
    invalid_fields,
    open_session,
    rpc_error,
)

GRPC = agent_pb2.ENDPOINT_PROTOCOL_GRPC
HTTP = agent_pb2.ENDPOINT_PROTOCOL_HTTP


async def get_agent(stubs: Stubs, agent_id: str) -> agent_pb2.Agent:
    return (await stubs.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))).agent


async def list_ids(stubs: Stubs, **fields: Any) -> set[str]:
    response = await stubs.registry.ListAgents(registry_pb2.ListAgentsRequest(**fields))
    assert response.next_page_token == ""
    return {agent.agent_id for agent in response.agents}


async def wait_status(stubs: Stubs, agent_id: str, status: int, within: float = 10.0) -> agent_pb2.Agent:
    async def check() -> agent_pb2.Agent | None:
        agent = await get_agent(stubs, agent_id)
        return agent if agent.status == status else None

    agent: agent_pb2.Agent = await async_wait_for(
        check, within, f"agent {agent_id} {agent_pb2.AgentStatus.Name(status)}"
    )
    return agent


def update_request(agent_id: str, paths: list[str], **update: Any) -> registry_pb2.UpdateAgentRequest:
    return registry_pb2.UpdateAgentRequest(
        agent_id=agent_id,
        update=registry_pb2.AgentUpdate(**update),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )


# -- RegisterAgent ------------------------------------------------------------------------------


async def test_register_creates_an_agent_with_its_attributes(stubs: Stubs) -> None:
    response = await stubs.register(
        "cost-agent",
        "i-1",
        type="cost",
        version="1.2.3",
        capabilities=["gpu", "analyze", "gpu"],
        labels={"region": "eu", "tier": "gold"},
        endpoints=[agent_pb2.Endpoint(name="api", address="10.0.0.1:50051", protocol=GRPC)],
        max_concurrent_tasks=4,
    )
    assert response.created
    assert response.agent_token
    assert response.heartbeat_interval.ToMilliseconds() == 500
    assert response.heartbeat_timeout.ToSeconds() == 60  # the tests' default (conftest.make_config)
    agent = response.agent
    assert agent.agent_id.startswith("agt_")
    assert (agent.name, agent.instance_id, agent.type, agent.version) == (
        "cost-agent",
        "i-1",
        "cost",
        "1.2.3",
    )
    assert list(agent.capabilities) == ["analyze", "gpu"]  # sorted, duplicates dropped
    assert dict(agent.labels) == {"region": "eu", "tier": "gold"}
    assert agent.endpoints[0].address == "10.0.0.1:50051"
    assert agent.max_concurrent_tasks == 4
    # Registering is a sign of life: the agent is routable for one heartbeat timeout.
    assert agent.status == READY
    assert agent.revision > 0
    assert agent.HasField("registered_at")
    assert await get_agent(stubs, agent.agent_id) == agent


async def test_reregister_is_idempotent_and_rotates_the_credential(stubs: Stubs) -> None:
    first = await stubs.register("agent", "1", labels={"v": "1"})
    second = await stubs.register("agent", "1", labels={"v": "2"}, version="2")
    assert not second.created
    assert second.agent.agent_id == first.agent.agent_id
    assert second.agent_token != first.agent_token
    assert dict(second.agent.labels) == {"v": "2"} and second.agent.version == "2"
    assert second.agent.revision > first.agent.revision
    assert await list_ids(stubs) == {first.agent.agent_id}
    # The old credential no longer opens a session; the new one does.
    stale = SessionClient(stubs.registry, first.agent.agent_id, first.agent_token)
    await rpc_error(stale.receive(), grpc.StatusCode.UNAUTHENTICATED)
    session = await open_session(stubs.registry, second.agent.agent_id, second.agent_token)
    await session.goodbye()


async def test_concurrent_registrations_of_one_instance_make_one_agent(stubs: Stubs) -> None:
    responses = await asyncio.gather(*(stubs.register("racer", "1", version=str(n)) for n in range(10)))
    assert len({response.agent.agent_id for response in responses}) == 1
    assert sum(response.created for response in responses) == 1
    assert len({response.agent_token for response in responses}) == 10
    # Exactly one credential (the last one issued) opens a session; the others were rotated away.
    agent_id = responses[0].agent.agent_id
    opened = []
    for response in responses:
        session = SessionClient(stubs.registry, agent_id, response.agent_token)
        try:
            first = await session.receive()
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        else:
            assert first.HasField("welcome")
            opened.append(session)
    assert len(opened) == 1
    await opened[0].goodbye()


async def test_reregister_with_another_type_is_already_exists(stubs: Stubs) -> None:
    await stubs.register("agent", "1", type="cost")
    await rpc_error(stubs.register("agent", "1", type="perf"), grpc.StatusCode.ALREADY_EXISTS)
    # Another instance of the same name may have another type.
    assert (await stubs.register("agent", "2", type="perf")).created


def _many(count: int, pattern: str) -> list[str]:
    return [pattern.format(index) for index in range(count)]


BAD_REGISTRATIONS: list[tuple[dict[str, Any], str]] = [
    ({"name": ""}, "name"),
    ({"name": "-starts-with-dash"}, "name"),
    ({"name": "has space"}, "name"),
    ({"name": "x" * 129}, "name"),
    ({"instance_id": ""}, "instance_id"),
    ({"instance_id": "a/b"}, "instance_id"),
    ({"type": ""}, "type"),
    ({"type": "ty pe"}, "type"),
    ({"version": "v" * 129}, "version"),
    ({"capabilities": ["ok", "not ok"]}, "capabilities[1]"),
    ({"capabilities": _many(65, "cap{}")}, "capabilities"),
    ({"labels": {"bad key!": "v"}}, "labels[bad key!]"),
    ({"labels": {"-lead": "v"}}, "labels[-lead]"),
    ({"labels": {"k" * 129: "v"}}, "labels[" + "k" * 64 + "]"),
    ({"labels": {"region": "has space"}}, "labels[region]"),
    ({"labels": {"region": "v" * 129}}, "labels[region]"),
    ({"labels": {f"k{i}": "v" for i in range(65)}}, "labels"),
    ({"endpoints": [agent_pb2.Endpoint(address="h:1")]}, "endpoints[0].name"),
    ({"endpoints": [agent_pb2.Endpoint(name="api")]}, "endpoints[0].address"),
    ({"endpoints": [agent_pb2.Endpoint(name="api", address="h" * 513)]}, "endpoints[0].address"),
    (
        {"endpoints": [agent_pb2.Endpoint(name="api", address="h:1", protocol=99)]},
        "endpoints[0].protocol",
    ),
    (
        {"endpoints": [agent_pb2.Endpoint(name=f"e{i}", address="h:1") for i in range(33)]},
        "endpoints",
    ),
    ({"max_concurrent_tasks": -1}, "max_concurrent_tasks"),
    ({"max_concurrent_tasks": 100_001}, "max_concurrent_tasks"),
]


async def test_register_rejects_each_bad_field(stubs: Stubs, subtests: pytest.Subtests) -> None:
    for fields, field in BAD_REGISTRATIONS:
        with subtests.test(field=field, fields=repr(fields)[:80]):
            request: dict[str, Any] = {"name": "agent", "instance_id": "1", "type": "worker", **fields}
            violations = await invalid_fields(
                stubs.registry.RegisterAgent(registry_pb2.RegisterAgentRequest(**request))
            )
            assert list(violations) == [field], violations
            assert violations[field]
    assert await list_ids(stubs) == set()


async def test_register_names_every_bad_field_at_once(stubs: Stubs) -> None:
    violations = await invalid_fields(stubs.registry.RegisterAgent(registry_pb2.RegisterAgentRequest()))
    assert set(violations) == {"name", "instance_id", "type"}
    assert violations["name"] == "is required"
    # Nothing was registered.
    assert await list_ids(stubs) == set()


async def test_register_at_the_limits_is_accepted(stubs: Stubs) -> None:
    response = await stubs.register(
        "x" * 128,
        "y" * 128,
        capabilities=_many(64, "cap{}"),
        labels={f"k{i}": "v" * 128 for i in range(64)},
        endpoints=[agent_pb2.Endpoint(name=f"e{i}", address="h:1") for i in range(32)],
        max_concurrent_tasks=100_000,
    )
    assert response.created
    assert len(response.agent.labels) == 64 and len(response.agent.endpoints) == 32


# -- GetAgent -----------------------------------------------------------------------------------


async def test_get_agent_errors(stubs: Stubs) -> None:
    await rpc_error(
        stubs.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="agt_missing")),
        grpc.StatusCode.NOT_FOUND,
    )
    violations = await invalid_fields(stubs.registry.GetAgent(registry_pb2.GetAgentRequest()))
    assert list(violations) == ["agent_id"]


# -- ListAgents ---------------------------------------------------------------------------------


@pytest.fixture
async def fleet(stubs: Stubs) -> dict[str, str]:
    """Four agents: a, b, c alive; d draining."""
    specs: dict[str, dict[str, Any]] = {
        "a": {"labels": {"region": "eu", "tier": "gold"}, "capabilities": ["gpu", "cpu"]},
        "b": {"labels": {"region": "us", "tier": "silver", "spot": "true"}, "capabilities": ["cpu"]},
        "c": {"type": "cache", "labels": {"region": "eu"}},
        "d": {},
    }
    ids = {}
    for name, fields in specs.items():
        ids[name] = (await stubs.register(name, **fields)).agent.agent_id
    await stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=ids["d"]))
    return ids


LIST_FILTERS: list[tuple[dict[str, Any], str]] = [
    ({}, "abcd"),
    ({"type": "worker"}, "abd"),
    ({"type": "cache"}, "c"),
    ({"type": "nothing"}, ""),
    ({"status": DRAINING}, "d"),
    ({"status": READY}, "abc"),
    ({"status": DOWN}, ""),
    ({"capability": "gpu"}, "a"),
    ({"capability": "cpu"}, "ab"),
    ({"label_selector": "region=eu"}, "ac"),
    ({"label_selector": "region==eu"}, "ac"),
    ({"label_selector": "region!=eu"}, "bd"),
    ({"label_selector": "region in (eu, us)"}, "abc"),
    ({"label_selector": "tier notin (gold)"}, "bcd"),
    ({"label_selector": "spot"}, "b"),
    ({"label_selector": "!spot"}, "acd"),
    ({"label_selector": "region=eu, tier=gold"}, "a"),
    ({"label_selector": "region, !tier"}, "c"),
    ({"type": "worker", "capability": "cpu", "label_selector": "region=us"}, "b"),
]


async def test_list_agents_filters(stubs: Stubs, fleet: dict[str, str], subtests: pytest.Subtests) -> None:
    for filters, expected in LIST_FILTERS:
        with subtests.test(filters=repr(filters)):
            assert await list_ids(stubs, **filters) == {fleet[name] for name in expected}


BAD_SELECTORS = ["region in eu", "=eu", "region=eu=x", "tier in ()", "a in (b c)", "region=e u", "!", "a,,b"]

BAD_LIST_ARGUMENTS: list[tuple[dict[str, Any], str]] = [
    ({"page_size": 1001}, "page_size"),
    ({"page_size": -1}, "page_size"),
    ({"status": 99}, "status"),
    ({"type": "bad type"}, "type"),
    ({"capability": "bad cap"}, "capability"),
    ({"page_token": "!!!"}, "page_token"),
    *(({"label_selector": selector}, "label_selector") for selector in BAD_SELECTORS),
]


async def test_list_agents_bad_arguments(stubs: Stubs, subtests: pytest.Subtests) -> None:
    for fields, field in BAD_LIST_ARGUMENTS:
        with subtests.test(fields=repr(fields)):
            violations = await invalid_fields(
                stubs.registry.ListAgents(registry_pb2.ListAgentsRequest(**fields))
            )
            assert list(violations) == [field]


async def test_list_agents_pages(stubs: Stubs) -> None:
    registered = [(await stubs.register("agent", str(index))).agent.agent_id for index in range(25)]
    seen: list[str] = []
    sizes = []
    token = ""
    while True:
        page = await stubs.registry.ListAgents(registry_pb2.ListAgentsRequest(page_size=10, page_token=token))
        sizes.append(len(page.agents))
        seen.extend(agent.agent_id for agent in page.agents)
        token = page.next_page_token
        if not token:
            break
    assert sizes == [10, 10, 5]
    # Oldest registration first, every agent exactly once.
    assert seen == sorted(registered) and set(seen) == set(registered)
    everything = await stubs.registry.ListAgents(registry_pb2.ListAgentsRequest())
    assert len(everything.agents) == 25 and everything.next_page_token == ""
    exact = await stubs.registry.ListAgents(registry_pb2.ListAgentsRequest(page_size=25))
    assert len(exact.agents) == 25 and exact.next_page_token == ""
    at_limit = await stubs.registry.ListAgents(registry_pb2.ListAgentsRequest(page_size=1000))
    assert len(at_limit.agents) == 25


# -- UpdateAgent --------------------------------------------------------------------------------


async def test_update_applies_only_the_masked_fields(stubs: Stubs) -> None:
    registered = (await stubs.register(version="1", labels={"old": "x"}, max_concurrent_tasks=1)).agent
    watch = stubs.discovery.WatchAgents(discovery_pb2.WatchAgentsRequest(start_revision=registered.revision))
    updated = (
        await stubs.registry.UpdateAgent(
            update_request(
                registered.agent_id,
                ["labels", "max_concurrent_tasks"],
                version="ignored",
                labels={"new": "y"},
                max_concurrent_tasks=8,
                capabilities=["ignored"],
            )
        )
    ).agent
    assert dict(updated.labels) == {"new": "y"}
    assert updated.max_concurrent_tasks == 8
    assert updated.version == "1" and list(updated.capabilities) == []
    assert updated.revision > registered.revision
    assert await get_agent(stubs, registered.agent_id) == updated
    delta = await asyncio.wait_for(watch.read(), 10)
    assert delta.delta.type == event_pb2.EVENT_TYPE_AGENT_UPDATED
    assert delta.revision == updated.revision
    watch.cancel()

    again = (
        await stubs.registry.UpdateAgent(
            update_request(
                registered.agent_id,
                ["version", "capabilities", "endpoints"],
                version="2",
                capabilities=["b", "a"],
                endpoints=[agent_pb2.Endpoint(name="api", address="h:1", protocol=HTTP)],
            )
        )
    ).agent
    assert again.version == "2" and list(again.capabilities) == ["a", "b"]
    assert again.endpoints[0].protocol == HTTP
    assert dict(again.labels) == {"new": "y"} and again.max_concurrent_tasks == 8


async def test_update_errors(stubs: Stubs) -> None:
    agent_id = (await stubs.register()).agent.agent_id
    unknown = await invalid_fields(stubs.registry.UpdateAgent(update_request(agent_id, ["labels", "name"])))
    assert list(unknown) == ["update_mask"] and "'name'" in unknown["update_mask"]
    empty = await invalid_fields(stubs.registry.UpdateAgent(update_request(agent_id, [])))
    assert list(empty) == ["update_mask"]
    bad_values = await invalid_fields(
        stubs.registry.UpdateAgent(
            update_request(
                agent_id, ["labels", "max_concurrent_tasks"], labels={"a b": "c"}, max_concurrent_tasks=-3
            )
        )
    )
    assert set(bad_values) == {"update.labels[a b]", "update.max_concurrent_tasks"}
    missing_id = await invalid_fields(stubs.registry.UpdateAgent(update_request("", ["version"])))
    assert list(missing_id) == ["agent_id"]
    await rpc_error(
        stubs.registry.UpdateAgent(update_request("agt_missing", ["version"])), grpc.StatusCode.NOT_FOUND
    )
    await stubs.registry.DeregisterAgent(registry_pb2.DeregisterAgentRequest(agent_id=agent_id))
    await rpc_error(
        stubs.registry.UpdateAgent(update_request(agent_id, ["version"], version="2")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    # Nothing about a refused update was applied.
    assert (await get_agent(stubs, agent_id)).version == ""


# -- DrainAgent / UndrainAgent -------------------------------------------------------------------


async def test_drain_and_undrain_notify_the_session(stubs: Stubs) -> None:
    registered = await stubs.register()
    agent_id = registered.agent.agent_id
    session = await open_session(stubs.registry, agent_id, registered.agent_token)

    drained = (
        await stubs.registry.DrainAgent(
            registry_pb2.DrainAgentRequest(agent_id=agent_id, reason="maintenance")
        )
    ).agent
    assert drained.status == DRAINING and drained.draining
    assert drained.status_reason == "maintenance"
    notice = await session.receive_kind("drain")
    assert notice.drain.draining and notice.drain.reason == "maintenance"
    # Draining twice changes nothing.
    again = (await stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=agent_id))).agent
    assert again.revision == drained.revision and again.status == DRAINING
    # A drained agent still beats and is acked as DRAINING.
    session.send(beat=registry_pb2.SessionBeat(sequence=1))
    assert (await session.receive_kind("ack")).ack.status == DRAINING

    undrained = (await stubs.registry.UndrainAgent(registry_pb2.UndrainAgentRequest(agent_id=agent_id))).agent
    assert undrained.status == READY and not undrained.draining
    notice = await session.receive_kind("drain")
    assert not notice.drain.draining
    assert (await get_agent(stubs, agent_id)).status == READY
    await session.goodbye()
    # A DOWN agent may be drained: it stays DOWN, and comes back DRAINING.
    down = (await stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=agent_id))).agent
    assert down.status == DOWN and down.draining


async def test_drain_errors(stubs: Stubs) -> None:
    for rpc, request_type in (
        (stubs.registry.DrainAgent, registry_pb2.DrainAgentRequest),
        (stubs.registry.UndrainAgent, registry_pb2.UndrainAgentRequest),
    ):
        await rpc_error(rpc(request_type(agent_id="agt_missing")), grpc.StatusCode.NOT_FOUND)
        assert list(await invalid_fields(rpc(request_type()))) == ["agent_id"]
    agent_id = (await stubs.register()).agent.agent_id
    too_long = await invalid_fields(
        stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=agent_id, reason="r" * 257))
    )
    assert list(too_long) == ["reason"]
    await stubs.registry.DeregisterAgent(registry_pb2.DeregisterAgentRequest(agent_id=agent_id))
    await rpc_error(
        stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=agent_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


# -- DeregisterAgent ----------------------------------------------------------------------------


async def test_deregister_hides_keeps_history_and_reregister_revives(stubs: Stubs) -> None:
    registered = await stubs.register("agent", "1", type="cost", labels={"a": "b"})
    agent_id = registered.agent.agent_id
    other = (await stubs.register("other", "1")).agent.agent_id

    gone = (
        await stubs.registry.DeregisterAgent(registry_pb2.DeregisterAgentRequest(agent_id=agent_id))
    ).agent
    assert gone.status == DEREGISTERED and gone.status_reason == "deregistered"
    assert await list_ids(stubs) == {other}
    assert await list_ids(stubs, type="cost") == set()
    assert await list_ids(stubs, status=DEREGISTERED) == {agent_id}
    kept = await get_agent(stubs, agent_id)
    assert kept.status == DEREGISTERED and dict(kept.labels) == {"a": "b"}
    # Its credential is revoked.
    stale = SessionClient(stubs.registry, agent_id, registered.agent_token)
    await rpc_error(stale.receive(), grpc.StatusCode.NOT_FOUND)
    # Unary heartbeats of a deregistered agent are refused.
    await rpc_error(
        stubs.registry.SendHeartbeat(registry_pb2.SendHeartbeatRequest(agent_id=agent_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )

    # Registering the same name and instance brings it back, with the same id (any type now).
    revived = await stubs.register("agent", "1", type="perf")
    assert revived.agent.agent_id == agent_id
    assert revived.agent.status == READY and revived.agent.type == "perf"
    assert dict(revived.agent.labels) == {}
    assert await list_ids(stubs) == {agent_id, other}
    session = await open_session(stubs.registry, agent_id, revived.agent_token)
    await session.goodbye()


async def test_deregister_errors(stubs: Stubs) -> None:
    await rpc_error(
        stubs.registry.DeregisterAgent(registry_pb2.DeregisterAgentRequest(agent_id="agt_missing")),
        grpc.StatusCode.NOT_FOUND,
    )
    violations = await invalid_fields(stubs.registry.DeregisterAgent(registry_pb2.DeregisterAgentRequest()))
    assert list(violations) == ["agent_id"]


async def test_deregister_twice_is_a_no_op(stubs: Stubs) -> None:
    agent_id = (await stubs.register()).agent.agent_id
    first = (
        await stubs.registry.DeregisterAgent(registry_pb2.DeregisterAgentRequest(agent_id=agent_id))
    ).agent
    second = (
        await stubs.registry.DeregisterAgent(registry_pb2.DeregisterAgentRequest(agent_id=agent_id))
    ).agent
    assert second.status == DEREGISTERED
    assert second.revision == first.revision
    assert second.transitions == first.transitions


# -- SendHeartbeat ------------------------------------------------------------------------------


async def test_unary_heartbeat_keeps_a_ttl_lease(servers: Callable[..., Any]) -> None:
    # A timeout a loaded machine's stalls stay under, and beats ten times as often.
    timeout = 2.0
    running: Running = await servers(heartbeat_timeout=timeout, heartbeat_interval=0.2)
    stubs = running.stubs
    agent_id = (await stubs.register()).agent.agent_id
    # The lease granted by registration runs out.
    down = await wait_status(stubs, agent_id, DOWN)
    assert down.status_reason == "heartbeat timeout"

    beat_at = time.time()
    response = await stubs.registry.SendHeartbeat(
        registry_pb2.SendHeartbeatRequest(agent_id=agent_id, load=agent_pb2.Load(active_tasks=1, cpu=0.25))
    )
    assert response.status == READY
    assert response.heartbeat_interval.ToMilliseconds() == 200
    expires = response.lease_expires_at.ToNanoseconds() / 1e9
    assert beat_at + timeout - 0.1 <= expires <= time.time() + timeout + 0.1
    agent = await get_agent(stubs, agent_id)
    assert agent.status == READY and agent.load.cpu == pytest.approx(0.25)
    assert not agent.session.streaming
    transitions = agent.transitions

    # Beats at the interval keep it READY well past one timeout, without a single flap.
    until = time.monotonic() + 1.5 * timeout
    while True:
        sent = time.monotonic()
        beat = await stubs.registry.SendHeartbeat(registry_pb2.SendHeartbeatRequest(agent_id=agent_id))
        assert beat.status == READY
        if sent > until:
            break
        await asyncio.sleep(0.2)
    agent = await get_agent(stubs, agent_id)
    assert agent.status == READY
    assert agent.transitions == transitions, "the agent flapped while it beat in time"

    # Silence: DOWN once the lease (which runs from the last beat's arrival) runs out, not before.
    down = await wait_status(stubs, agent_id, DOWN)
    assert time.monotonic() - sent >= timeout - 0.1
    assert down.status_reason == "heartbeat timeout"
    assert down.transitions == transitions + 1


async def test_unary_heartbeat_reports_checks(stubs: Stubs) -> None:
    agent_id = (await stubs.register()).agent.agent_id
    failing = agent_pb2.Check(name="disk", status=agent_pb2.CHECK_STATUS_FAILING, message="full")
    response = await stubs.registry.SendHeartbeat(
        registry_pb2.SendHeartbeatRequest(agent_id=agent_id, checks=[failing])
    )
    assert response.status == DEGRADED
    agent = await get_agent(stubs, agent_id)
    assert agent.status == DEGRADED and "disk" in agent.status_reason
    # A unary beat replaces the set of checks, so an empty one clears them.
    assert (
        await stubs.registry.SendHeartbeat(registry_pb2.SendHeartbeatRequest(agent_id=agent_id))
    ).status == READY


BAD_BEATS: list[tuple[dict[str, Any], str]] = [
    ({"load": agent_pb2.Load(cpu=1.5)}, "load.cpu"),
    ({"load": agent_pb2.Load(memory=-0.1)}, "load.memory"),
    ({"load": agent_pb2.Load(active_tasks=-1)}, "load.active_tasks"),
    ({"checks": [agent_pb2.Check(name="bad name")]}, "checks[0].name"),
    ({"checks": [agent_pb2.Check(name="c", status=9)]}, "checks[0].status"),
    ({"checks": [agent_pb2.Check(name="c", message="m" * 513)]}, "checks[0].message"),
    ({"checks": [agent_pb2.Check(name=f"c{i}") for i in range(65)]}, "checks"),
]


async def test_unary_heartbeat_bad_input(stubs: Stubs, subtests: pytest.Subtests) -> None:
    agent_id = (await stubs.register()).agent.agent_id
    for fields, field in BAD_BEATS:
        with subtests.test(field=field):
            violations = await invalid_fields(
                stubs.registry.SendHeartbeat(registry_pb2.SendHeartbeatRequest(agent_id=agent_id, **fields))
            )
            assert list(violations) == [field]


async def test_unary_heartbeat_unknown_agent(stubs: Stubs) -> None:
    await rpc_error(
        stubs.registry.SendHeartbeat(registry_pb2.SendHeartbeatRequest(agent_id="agt_missing")),
        grpc.StatusCode.NOT_FOUND,
    )
    violations = await invalid_fields(stubs.registry.SendHeartbeat(registry_pb2.SendHeartbeatRequest()))
    assert list(violations) == ["agent_id"]
