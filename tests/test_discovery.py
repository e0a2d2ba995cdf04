"""DiscoveryService: discovery, endpoints, ResolveAgent strategies and the WatchAgents stream."""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from orchestrator.v1 import agent_pb2, discovery_pb2, event_pb2, health_pb2, registry_pb2
from tests.conftest import Running, Stubs
from tests.support import (
    DEGRADED,
    DOWN,
    DRAINING,
    READY,
    invalid_fields,
    open_session,
    read_message,
    rpc_error,
)

GRPC = agent_pb2.ENDPOINT_PROTOCOL_GRPC
HTTP = agent_pb2.ENDPOINT_PROTOCOL_HTTP
ROUND_ROBIN = discovery_pb2.LOAD_BALANCING_STRATEGY_ROUND_ROBIN
LEAST_LOADED = discovery_pb2.LOAD_BALANCING_STRATEGY_LEAST_LOADED
RANDOM = discovery_pb2.LOAD_BALANCING_STRATEGY_RANDOM
CONSISTENT_HASH = discovery_pb2.LOAD_BALANCING_STRATEGY_CONSISTENT_HASH


def endpoint(name: str, address: str, protocol: int = GRPC) -> agent_pb2.Endpoint:
    return agent_pb2.Endpoint(name=name, address=address, protocol=protocol)  # type: ignore[arg-type]


@dataclass
class Fleet:
    """r1..r3 READY workers, plus one DEGRADED, one DRAINING and one DOWN worker and a READY cache."""

    ids: dict[str, str]

    def __getitem__(self, name: str) -> str:
        return self.ids[name]

    def names(self, ids: Any) -> set[str]:
        by_id = {agent_id: name for name, agent_id in self.ids.items()}
        return {by_id[agent_id] for agent_id in ids}


@pytest.fixture
async def fleet(stubs: Stubs) -> Fleet:
    specs: dict[str, dict[str, Any]] = {
        # Endpoints deliberately not in name order.
        "r1": {
            "labels": {"zone": "a"},
            "capabilities": ["gpu", "cpu"],
            "endpoints": [endpoint("metrics", "r1:9100", HTTP), endpoint("api", "r1:50051")],
        },
        "r2": {"labels": {"zone": "b"}, "capabilities": ["cpu"], "endpoints": [endpoint("api", "r2:50051")]},
        "r3": {"labels": {"zone": "a"}, "endpoints": [endpoint("metrics", "r3:9100", HTTP)]},
        "deg": {
            "labels": {"zone": "a", "disk": "bad"},
            "capabilities": ["cpu"],
            "endpoints": [endpoint("api", "deg:1")],
        },
        "drn": {"endpoints": [endpoint("api", "drn:1")]},
        "down": {"endpoints": [endpoint("api", "down:1")]},
        "cache": {"type": "cache", "endpoints": [endpoint("api", "cache:1")]},
    }
    ids: dict[str, str] = {}
    tokens: dict[str, str] = {}
    for name, fields in specs.items():
        registered = await stubs.register(name, **fields)
        ids[name], tokens[name] = registered.agent.agent_id, registered.agent_token
    failing = agent_pb2.Check(name="disk", status=agent_pb2.CHECK_STATUS_FAILING)
    heartbeat = await stubs.registry.SendHeartbeat(
        registry_pb2.SendHeartbeatRequest(agent_id=ids["deg"], checks=[failing])
    )
    assert heartbeat.status == DEGRADED
    await stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=ids["drn"]))
    session = await open_session(stubs.registry, ids["down"], tokens["down"])
    await session.goodbye()
    down = (await stubs.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=ids["down"]))).agent
    assert down.status == DOWN
    return Fleet(ids)


def query(**fields: Any) -> discovery_pb2.AgentQuery:
    fields.setdefault("type", "worker")
    return discovery_pb2.AgentQuery(**fields)


async def discover(stubs: Stubs, **fields: Any) -> list[str]:
    response = await stubs.discovery.DiscoverAgents(
        discovery_pb2.DiscoverAgentsRequest(query=query(**fields))
    )
    assert response.next_page_token == ""
    return [agent.agent_id for agent in response.agents]


async def resolve(stubs: Stubs, **fields: Any) -> discovery_pb2.ResolveAgentResponse:
    request_query = query(**fields.pop("query", {}))
    return await stubs.discovery.ResolveAgent(  # type: ignore[no-any-return]
        discovery_pb2.ResolveAgentRequest(query=request_query, **fields)
    )


# -- DiscoverAgents -----------------------------------------------------------------------------


DISCOVERY_CASES: list[tuple[dict[str, Any], str]] = [
    ({}, "r1 r2 r3"),
    ({"include_degraded": True}, "r1 r2 r3 deg"),
    ({"type": ""}, "r1 r2 r3 cache"),
    ({"type": "cache"}, "cache"),
    ({"capabilities": ["cpu"]}, "r1 r2"),
    ({"capabilities": ["cpu", "gpu"]}, "r1"),
    ({"capabilities": ["cpu"], "include_degraded": True}, "r1 r2 deg"),
    ({"label_selector": "zone=a"}, "r1 r3"),
    ({"label_selector": "zone=a", "include_degraded": True}, "r1 r3 deg"),
    ({"label_selector": "zone notin (a)"}, "r2"),
]


async def test_discover_returns_ready_agents_only(
    stubs: Stubs, fleet: Fleet, subtests: pytest.Subtests
) -> None:
    for fields, expected in DISCOVERY_CASES:
        with subtests.test(query=repr(fields)):
            found = await discover(stubs, **fields)
            assert fleet.names(found) == set(expected.split())
            assert found == sorted(found)  # registration order


async def test_discover_pages(stubs: Stubs, fleet: Fleet) -> None:
    seen: list[str] = []
    token = ""
    while True:
        page = await stubs.discovery.DiscoverAgents(
            discovery_pb2.DiscoverAgentsRequest(query=query(type=""), page_size=1, page_token=token)
        )
        assert len(page.agents) == 1
        seen.extend(agent.agent_id for agent in page.agents)
        token = page.next_page_token
        if not token:
            break
    assert fleet.names(seen) == {"r1", "r2", "r3", "cache"} and len(seen) == 4


BAD_DISCOVERY: list[tuple[dict[str, Any], str]] = [
    ({"query": discovery_pb2.AgentQuery(label_selector="zone in a")}, "query.label_selector"),
    ({"query": discovery_pb2.AgentQuery(type="a b")}, "query.type"),
    ({"query": discovery_pb2.AgentQuery(capabilities=["ok", "not ok"])}, "query.capabilities[1]"),
    ({"page_size": 1001}, "page_size"),
    ({"page_token": "%%%"}, "page_token"),
]


async def test_discover_bad_arguments(stubs: Stubs, subtests: pytest.Subtests) -> None:
    for fields, field in BAD_DISCOVERY:
        with subtests.test(field=field):
            violations = await invalid_fields(
                stubs.discovery.DiscoverAgents(discovery_pb2.DiscoverAgentsRequest(**fields))
            )
            assert list(violations) == [field]


# -- ListEndpoints ------------------------------------------------------------------------------


async def list_endpoints(stubs: Stubs, **fields: Any) -> set[tuple[str, str]]:
    fields.setdefault("query", query())
    response = await stubs.discovery.ListEndpoints(discovery_pb2.ListEndpointsRequest(**fields))
    assert response.next_page_token == ""
    return {(entry.endpoint.address, entry.endpoint.name) for entry in response.endpoints}


async def test_list_endpoints_filters(stubs: Stubs, fleet: Fleet) -> None:
    everything = await list_endpoints(stubs)
    assert everything == {
        ("r1:9100", "metrics"),
        ("r1:50051", "api"),
        ("r2:50051", "api"),
        ("r3:9100", "metrics"),
    }
    assert await list_endpoints(stubs, endpoint_name="api") == {("r1:50051", "api"), ("r2:50051", "api")}
    assert await list_endpoints(stubs, protocol=HTTP) == {("r1:9100", "metrics"), ("r3:9100", "metrics")}
    assert await list_endpoints(stubs, endpoint_name="api", protocol=HTTP) == set()
    assert await list_endpoints(stubs, query=query(include_degraded=True), endpoint_name="api") == {
        ("r1:50051", "api"),
        ("r2:50051", "api"),
        ("deg:1", "api"),
    }
    response = await stubs.discovery.ListEndpoints(
        discovery_pb2.ListEndpointsRequest(query=query(label_selector="zone=b"))
    )
    (entry,) = response.endpoints
    assert (entry.agent_id, entry.agent_name, entry.agent_type) == (fleet["r2"], "r2", "worker")
    assert entry.status == READY and entry.endpoint.protocol == GRPC


async def test_list_endpoints_pages_over_every_endpoint_once(stubs: Stubs, fleet: Fleet) -> None:
    seen: list[tuple[str, str]] = []
    token = ""
    while True:
        page = await stubs.discovery.ListEndpoints(
            discovery_pb2.ListEndpointsRequest(query=query(), page_size=1, page_token=token)
        )
        seen.extend((entry.endpoint.address, entry.endpoint.name) for entry in page.endpoints)
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(await list_endpoints(stubs))
    # Two pages of three: the same endpoints again.
    first = await stubs.discovery.ListEndpoints(
        discovery_pb2.ListEndpointsRequest(query=query(), page_size=3)
    )
    second = await stubs.discovery.ListEndpoints(
        discovery_pb2.ListEndpointsRequest(query=query(), page_size=3, page_token=first.next_page_token)
    )
    assert len(first.endpoints) == 3 and len(second.endpoints) == 1 and not second.next_page_token
    # Repeated names and an order that is not name order: still each endpoint once.
    await stubs.register(
        "multi",
        type="multi",
        endpoints=[endpoint("b", "m:1"), endpoint("a", "m:2"), endpoint("a", "m:3"), endpoint("a", "m:4")],
    )
    addresses = []
    token = ""
    while True:
        page = await stubs.discovery.ListEndpoints(
            discovery_pb2.ListEndpointsRequest(query=query(type="multi"), page_size=1, page_token=token)
        )
        addresses.extend(entry.endpoint.address for entry in page.endpoints)
        if not (token := page.next_page_token):
            break
    assert addresses == ["m:1", "m:2", "m:3", "m:4"]


async def test_list_endpoints_bad_arguments(stubs: Stubs) -> None:
    violations = await invalid_fields(
        stubs.discovery.ListEndpoints(discovery_pb2.ListEndpointsRequest(protocol=9))
    )
    assert list(violations) == ["protocol"]
    violations = await invalid_fields(
        stubs.discovery.ListEndpoints(discovery_pb2.ListEndpointsRequest(page_size=-5))
    )
    assert list(violations) == ["page_size"]


# -- ResolveAgent -------------------------------------------------------------------------------


async def test_resolve_round_robin_cycles(stubs: Stubs, fleet: Fleet) -> None:
    picks = [(await resolve(stubs, strategy=ROUND_ROBIN)).agent.agent_id for _ in range(6)]
    assert fleet.names(picks[:3]) == {"r1", "r2", "r3"}
    assert picks[3:] == picks[:3]
    # The default strategy is round robin too and continues the same cycle.
    default = await resolve(stubs)
    assert default.agent.agent_id == picks[0] and default.candidates == 3


async def test_resolve_least_loaded(stubs: Stubs, fleet: Fleet) -> None:
    for name, cpu in (("r1", 0.9), ("r2", 0.1), ("r3", 0.5)):
        await stubs.registry.SendHeartbeat(
            registry_pb2.SendHeartbeatRequest(agent_id=fleet[name], load=agent_pb2.Load(cpu=cpu))
        )
    for _ in range(3):
        assert (await resolve(stubs, strategy=LEAST_LOADED)).agent.agent_id == fleet["r2"]
    await stubs.registry.SendHeartbeat(
        registry_pb2.SendHeartbeatRequest(agent_id=fleet["r2"], load=agent_pb2.Load(cpu=0.95))
    )
    assert (await resolve(stubs, strategy=LEAST_LOADED)).agent.agent_id == fleet["r3"]


async def test_resolve_random_picks_only_candidates(stubs: Stubs, fleet: Fleet) -> None:
    picks = collections.Counter(
        [
            (await resolve(stubs, strategy=RANDOM, query={"capabilities": ["cpu"]})).agent.agent_id
            for _ in range(60)
        ]
    )
    assert fleet.names(picks) == {"r1", "r2"}  # both, never anything else (1 in 2^59 to fail)


async def test_resolve_consistent_hash(stubs: Stubs, fleet: Fleet) -> None:
    keys = [f"customer-{index}" for index in range(40)]

    async def mapping() -> dict[str, str]:
        return {
            key: (await resolve(stubs, strategy=CONSISTENT_HASH, hash_key=key)).agent.agent_id for key in keys
        }

    before = await mapping()
    assert await mapping() == before  # same key, same agent
    assert fleet.names(before.values()) == {"r1", "r2", "r3"}  # 40 keys spread over all three
    # Removing one agent moves only its keys; every other key stays where it was.
    removed = fleet["r2"]
    await stubs.registry.DeregisterAgent(registry_pb2.DeregisterAgentRequest(agent_id=removed))
    after = await mapping()
    for key in keys:
        if before[key] != removed:
            assert after[key] == before[key], key
        else:
            assert after[key] in (fleet["r1"], fleet["r3"])


async def test_resolve_prefers_the_named_endpoint(stubs: Stubs, fleet: Fleet) -> None:
    only_r1 = {"capabilities": ["gpu"]}
    named = await resolve(stubs, query=only_r1, endpoint_name="api")
    assert named.endpoint.address == "r1:50051"
    fallback = await resolve(stubs, query=only_r1, endpoint_name="nope")
    assert fallback.endpoint.address == "r1:9100"  # the first declared
    bare = (await stubs.register("bare", type="bare")).agent
    response = await resolve(stubs, query={"type": "bare"}, endpoint_name="api")
    assert response.agent.agent_id == bare.agent_id
    assert not response.HasField("endpoint")


async def test_resolve_errors(stubs: Stubs, fleet: Fleet) -> None:
    missing_key = await invalid_fields(resolve(stubs, strategy=CONSISTENT_HASH))
    assert list(missing_key) == ["hash_key"]
    unknown_strategy = await invalid_fields(resolve(stubs, strategy=42))
    assert list(unknown_strategy) == ["strategy"]
    bad_selector = await invalid_fields(resolve(stubs, query={"label_selector": "zone in"}))
    assert list(bad_selector) == ["query.label_selector"]
    # Nobody matches, or only agents that are not ready match.
    await rpc_error(resolve(stubs, query={"type": "nothing"}), grpc.StatusCode.FAILED_PRECONDITION)
    only_degraded = {"label_selector": "disk"}
    await rpc_error(resolve(stubs, query=only_degraded), grpc.StatusCode.FAILED_PRECONDITION)
    chosen = await resolve(stubs, query={**only_degraded, "include_degraded": True})
    assert chosen.agent.agent_id == fleet["deg"]
    draining_or_down = {"label_selector": "!zone", "include_degraded": True}
    await rpc_error(resolve(stubs, query=draining_or_down), grpc.StatusCode.FAILED_PRECONDITION)


# -- WatchAgents --------------------------------------------------------------------------------


def update_labels(agent_id: str, **labels: str) -> registry_pb2.UpdateAgentRequest:
    return registry_pb2.UpdateAgentRequest(
        agent_id=agent_id,
        update=registry_pb2.AgentUpdate(labels=labels),
        update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
    )


async def read_deltas(watch: Any, count: int) -> list[discovery_pb2.WatchAgentsResponse]:
    messages = []
    for _ in range(count):
        message = await read_message(watch)
        assert message.HasField("delta"), message
        messages.append(message)
    return messages


async def test_watch_snapshot_then_deltas(stubs: Stubs) -> None:
    existing = (await stubs.register("existing")).agent
    gone = (await stubs.register("gone")).agent
    await stubs.registry.DeregisterAgent(registry_pb2.DeregisterAgentRequest(agent_id=gone.agent_id))
    watch = stubs.discovery.WatchAgents(discovery_pb2.WatchAgentsRequest())
    snapshot = await read_message(watch)
    assert snapshot.WhichOneof("kind") == "snapshot"
    assert [agent.agent_id for agent in snapshot.snapshot.agents] == [existing.agent_id]
    health = await stubs.health.GetSystemHealth(health_pb2.GetSystemHealthRequest())
    assert snapshot.revision == health.revision

    registered = (await stubs.register("new")).agent
    agent_id = registered.agent_id
    await stubs.registry.UpdateAgent(update_labels(agent_id, a="b"))
    await stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=agent_id))
    await stubs.registry.DeregisterAgent(registry_pb2.DeregisterAgentRequest(agent_id=agent_id))
    deltas = await read_deltas(watch, 4)
    assert [message.delta.type for message in deltas] == [
        event_pb2.EVENT_TYPE_AGENT_REGISTERED,
        event_pb2.EVENT_TYPE_AGENT_UPDATED,
        event_pb2.EVENT_TYPE_AGENT_STATUS_CHANGED,
        event_pb2.EVENT_TYPE_AGENT_DEREGISTERED,
    ]
    revisions = [message.revision for message in deltas]
    assert revisions == sorted(set(revisions)) and revisions[0] > snapshot.revision
    assert all(message.delta.agent.revision == message.revision for message in deltas)
    assert deltas[0].delta.agent.status == READY
    assert dict(deltas[1].delta.agent.labels) == {"a": "b"}
    assert deltas[2].delta.agent.status == DRAINING and deltas[2].delta.previous_status == READY
    assert deltas[3].delta.previous_status == DRAINING
    watch.cancel()


async def test_watch_with_a_query_sees_only_matching_agents(stubs: Stubs) -> None:
    watch = stubs.discovery.WatchAgents(discovery_pb2.WatchAgentsRequest(query=query(type="cache")))
    assert (await read_message(watch)).snapshot.agents == []
    await stubs.register("worker")
    cache = (await stubs.register("cache", type="cache")).agent
    delta = await read_message(watch)
    assert delta.delta.agent.agent_id == cache.agent_id
    watch.cancel()
    bad = stubs.discovery.WatchAgents(discovery_pb2.WatchAgentsRequest(start_revision=-1))
    violations = await invalid_fields(bad.read())
    assert list(violations) == ["start_revision"]


async def test_watch_resume_replays_exactly_the_missed_deltas(stubs: Stubs) -> None:
    agent_id = (await stubs.register()).agent.agent_id
    watch = stubs.discovery.WatchAgents(discovery_pb2.WatchAgentsRequest())
    last_seen = (await read_message(watch)).revision
    watch.cancel()
    missed = [
        (await stubs.registry.UpdateAgent(update_labels(agent_id, n=str(n)))).agent.revision for n in range(5)
    ]

    resumed = stubs.discovery.WatchAgents(discovery_pb2.WatchAgentsRequest(start_revision=last_seen))
    replayed = await read_deltas(resumed, 5)
    assert [message.revision for message in replayed] == missed
    assert missed == list(range(last_seen + 1, last_seen + 6))
    assert [message.delta.agent.labels["n"] for message in replayed] == ["0", "1", "2", "3", "4"]
    # Live deltas follow the replay without a gap.
    live = (await stubs.registry.UpdateAgent(update_labels(agent_id, n="live"))).agent.revision
    (message,) = await read_deltas(resumed, 1)
    assert message.revision == live == missed[-1] + 1
    resumed.cancel()


async def test_watch_from_a_future_revision_resyncs(stubs: Stubs) -> None:
    agent_id = (await stubs.register()).agent.agent_id
    watch = stubs.discovery.WatchAgents(discovery_pb2.WatchAgentsRequest(start_revision=10_000))
    resync = await read_message(watch)
    assert resync.WhichOneof("kind") == "resync"
    assert "future" in resync.resync.reason
    snapshot = await read_message(watch)
    assert [agent.agent_id for agent in snapshot.snapshot.agents] == [agent_id]
    assert snapshot.revision == resync.revision
    await stubs.registry.UpdateAgent(update_labels(agent_id, after="resync"))
    (delta,) = await read_deltas(watch, 1)
    assert delta.revision == snapshot.revision + 1
    watch.cancel()


async def test_watch_after_compaction(servers: Callable[..., Any]) -> None:
    running: Running = await servers(event_retention=100)
    stubs = running.stubs
    agent_id = (await stubs.register()).agent.agent_id
    # The store compacts every 500 commits down to the last 100 events; make it happen.
    revision = 0
    for n in range(620):
        revision = (await stubs.registry.UpdateAgent(update_labels(agent_id, n=str(n)))).agent.revision
    oldest = await running.server.store.oldest_revision()
    assert 1 < oldest <= revision - 100 + 1

    # Too old: an explicit resync, then a fresh snapshot, then live deltas.
    watch = stubs.discovery.WatchAgents(discovery_pb2.WatchAgentsRequest(start_revision=1))
    resync = await read_message(watch)
    assert resync.WhichOneof("kind") == "resync"
    assert resync.resync.oldest_revision == oldest and "compacted" in resync.resync.reason
    snapshot = await read_message(watch)
    assert snapshot.revision == revision
    (agent,) = snapshot.snapshot.agents
    assert agent.labels["n"] == "619"
    live = (await stubs.registry.UpdateAgent(update_labels(agent_id, n="live"))).agent.revision
    assert (await read_message(watch)).revision == live
    watch.cancel()

    # Still in the store's log but older than the in-memory window: replayed from the store.
    start = oldest + 10
    assert start < revision - 100
    resumed = stubs.discovery.WatchAgents(discovery_pb2.WatchAgentsRequest(start_revision=start))
    replayed = await read_deltas(resumed, live - start)
    assert [message.revision for message in replayed] == list(range(start + 1, live + 1))
    resumed.cancel()


async def test_an_agent_leaving_a_filtered_watch_is_reported(stubs: Stubs) -> None:
    registered = await stubs.register("mover", labels={"zone": "a"})
    agent_id = registered.agent.agent_id
    query = discovery_pb2.AgentQuery(label_selector="zone=a")
    watch = stubs.discovery.WatchAgents(discovery_pb2.WatchAgentsRequest(query=query))
    snapshot = await watch.read()
    assert [agent.agent_id for agent in snapshot.snapshot.agents] == [agent_id]
    await stubs.registry.UpdateAgent(
        registry_pb2.UpdateAgentRequest(
            agent_id=agent_id,
            update=registry_pb2.AgentUpdate(labels={"zone": "b"}),
            update_mask={"paths": ["labels"]},
        )
    )
    left = await watch.read()
    assert left.delta.agent.agent_id == agent_id and left.delta.left_query
    # Changes of an agent the watcher no longer holds are not sent.
    await stubs.registry.UpdateAgent(
        registry_pb2.UpdateAgentRequest(
            agent_id=agent_id,
            update=registry_pb2.AgentUpdate(version="2"),
            update_mask={"paths": ["version"]},
        )
    )
    other = await stubs.register("stayer", labels={"zone": "a"})
    joined = await watch.read()
    assert joined.delta.agent.agent_id == other.agent.agent_id and not joined.delta.left_query
    # A watcher resuming from before the move hears that the agent left.
    resumed = stubs.discovery.WatchAgents(
        discovery_pb2.WatchAgentsRequest(query=query, start_revision=snapshot.revision)
    )
    first = await resumed.read()
    assert first.delta.agent.agent_id == agent_id and first.delta.left_query
    watch.cancel()
    resumed.cancel()
