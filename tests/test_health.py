"""HealthService: per-agent health, the system view and the WatchAgentHealth stream."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

import orchestrator_server
from orchestrator.v1 import agent_pb2, health_pb2, registry_pb2, task_pb2, tasks_pb2
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

FAILING = agent_pb2.Check(name="disk", status=agent_pb2.CHECK_STATUS_FAILING, message="full")


async def make_degraded(stubs: Stubs, name: str, **fields: Any) -> str:
    agent_id = (await stubs.register(name, **fields)).agent.agent_id
    await stubs.registry.SendHeartbeat(
        registry_pb2.SendHeartbeatRequest(
            agent_id=agent_id, checks=[FAILING], load=agent_pb2.Load(active_tasks=3, cpu=0.7, memory=0.2)
        )
    )
    return agent_id


async def make_down(stubs: Stubs, name: str, **fields: Any) -> str:
    registered = await stubs.register(name, **fields)
    session = await open_session(stubs.registry, registered.agent.agent_id, registered.agent_token)
    await session.goodbye()
    return registered.agent.agent_id


async def test_get_agent_health(stubs: Stubs) -> None:
    agent_id = await make_degraded(stubs, "sick", type="cost")
    health = (await stubs.health.GetAgentHealth(health_pb2.GetAgentHealthRequest(agent_id=agent_id))).health
    assert (health.agent_id, health.name, health.type) == (agent_id, "sick", "cost")
    assert health.status == DEGRADED and "disk" in health.status_reason
    assert [(check.name, check.status, check.message) for check in health.checks] == [
        ("disk", agent_pb2.CHECK_STATUS_FAILING, "full")
    ]
    assert health.load.active_tasks == 3 and health.load.cpu == pytest.approx(0.7)
    assert health.transitions == 2  # DOWN -> READY (registered) -> DEGRADED
    assert health.HasField("last_heartbeat_at") and health.HasField("status_changed_at")
    assert not health.streaming

    registered = await stubs.register("streaming")
    session = await open_session(stubs.registry, registered.agent.agent_id, registered.agent_token)
    streaming = (
        await stubs.health.GetAgentHealth(
            health_pb2.GetAgentHealthRequest(agent_id=registered.agent.agent_id)
        )
    ).health
    assert streaming.streaming and streaming.status == READY
    await session.goodbye()


async def test_get_agent_health_errors(stubs: Stubs) -> None:
    await rpc_error(
        stubs.health.GetAgentHealth(health_pb2.GetAgentHealthRequest(agent_id="agt_missing")),
        grpc.StatusCode.NOT_FOUND,
    )
    violations = await invalid_fields(stubs.health.GetAgentHealth(health_pb2.GetAgentHealthRequest()))
    assert list(violations) == ["agent_id"]


async def test_list_agent_health_filters_and_pages(stubs: Stubs) -> None:
    ready = [(await stubs.register(f"ready-{index}")).agent.agent_id for index in range(5)]
    degraded = await make_degraded(stubs, "sick", type="cost")
    down = await make_down(stubs, "gone", type="cost")

    async def listed(**fields: Any) -> list[str]:
        response = await stubs.health.ListAgentHealth(health_pb2.ListAgentHealthRequest(**fields))
        assert response.next_page_token == ""
        return [entry.agent_id for entry in response.agents]

    assert await listed() == sorted([*ready, degraded, down])
    assert await listed(status=DEGRADED) == [degraded]
    assert await listed(status=DOWN) == [down]
    assert await listed(type="cost") == sorted([degraded, down])
    assert await listed(type="cost", status=READY) == []

    pages: list[list[str]] = []
    token = ""
    while True:
        response = await stubs.health.ListAgentHealth(
            health_pb2.ListAgentHealthRequest(page_size=3, page_token=token)
        )
        pages.append([entry.agent_id for entry in response.agents])
        if not (token := response.next_page_token):
            break
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [agent_id for page in pages for agent_id in page] == sorted([*ready, degraded, down])


async def test_list_agent_health_bad_arguments(stubs: Stubs, subtests: pytest.Subtests) -> None:
    for fields, field in (
        ({"page_size": 1001}, "page_size"),
        ({"status": 42}, "status"),
        ({"page_token": "***"}, "page_token"),
    ):
        with subtests.test(field=field):
            violations = await invalid_fields(
                stubs.health.ListAgentHealth(health_pb2.ListAgentHealthRequest(**fields))
            )
            assert list(violations) == [field]


async def test_system_health_counts(stubs: Stubs) -> None:
    empty = await stubs.health.GetSystemHealth(health_pb2.GetSystemHealthRequest())
    assert empty.status == "SERVING" and empty.total_agents == 0 and empty.revision == 0
    assert {count.status: count.count for count in empty.agents_by_status} == {
        READY: 0,
        DEGRADED: 0,
        DRAINING: 0,
        DOWN: 0,
    }

    for index in range(2):
        await stubs.register(f"ready-{index}")
    await make_degraded(stubs, "sick")
    drained = (await stubs.register("drained")).agent.agent_id
    await stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=drained))
    await make_down(stubs, "down")
    gone = (await stubs.register("gone")).agent.agent_id
    last = (await stubs.registry.DeregisterAgent(registry_pb2.DeregisterAgentRequest(agent_id=gone))).agent
    # A task nobody can run waits in the queue.
    await stubs.tasks.CreateTask(
        tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="job", required_capabilities=["nobody"]))
    )

    health = await stubs.health.GetSystemHealth(health_pb2.GetSystemHealthRequest())
    assert health.status == "SERVING"
    assert {count.status: count.count for count in health.agents_by_status} == {
        READY: 2,
        DEGRADED: 1,
        DRAINING: 1,
        DOWN: 1,
    }
    assert health.total_agents == 5  # deregistered excluded
    assert health.pending_tasks == 1 and health.running_tasks == 0
    assert health.store_status == "ok"
    assert health.version == orchestrator_server.__version__
    assert health.revision > last.revision  # the task's creation came after
    assert not health.failover_paused
    assert health.HasField("uptime")


async def test_system_health_reports_a_store_that_does_not_answer(running: Running) -> None:
    await running.server.store.close()
    health = await running.stubs.health.GetSystemHealth(health_pb2.GetSystemHealthRequest())
    assert health.status == "NOT_SERVING"
    assert health.store_status.startswith("error:") and "closed" in health.store_status


# -- WatchAgentHealth ---------------------------------------------------------------------------


async def read_initial(watch: Any) -> tuple[list[health_pb2.WatchAgentHealthResponse], int]:
    """The initial state: messages up to the caught_up marker, and the marker's revision."""
    messages = []
    while True:
        message = await read_message(watch)
        if message.caught_up:
            assert not message.HasField("health")
            return messages, message.revision
        messages.append(message)


async def test_watch_health_initial_state_then_transitions(stubs: Stubs) -> None:
    ready = (await stubs.register("ready", type="cost")).agent.agent_id
    degraded = await make_degraded(stubs, "sick", type="cost")
    await stubs.register("other-type", type="perf")
    gone = (await stubs.register("gone", type="cost")).agent.agent_id
    await stubs.registry.DeregisterAgent(registry_pb2.DeregisterAgentRequest(agent_id=gone))

    watch = stubs.health.WatchAgentHealth(health_pb2.WatchAgentHealthRequest(type="cost"))
    initial, revision = await read_initial(watch)
    assert all(message.initial and not message.resync for message in initial)
    assert {message.health.agent_id: message.health.status for message in initial} == {
        ready: READY,
        degraded: DEGRADED,
    }
    assert all(message.revision == revision for message in initial)
    system = await stubs.health.GetSystemHealth(health_pb2.GetSystemHealthRequest())
    assert revision == system.revision

    # Attribute updates are not transitions; status changes are, with the status before.
    await stubs.registry.UpdateAgent(
        registry_pb2.UpdateAgentRequest(
            agent_id=ready,
            update=registry_pb2.AgentUpdate(version="2"),
            update_mask=field_mask_pb2.FieldMask(paths=["version"]),
        )
    )
    await stubs.register("perf-2", type="perf")
    await stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=ready))
    drained = await read_message(watch)
    assert not drained.initial and not drained.caught_up
    assert drained.health.agent_id == ready
    assert (drained.previous_status, drained.health.status) == (READY, DRAINING)
    assert drained.revision > revision

    fresh = (await stubs.register("fresh", type="cost")).agent.agent_id
    registered = await read_message(watch)
    assert registered.health.agent_id == fresh and registered.health.status == READY
    assert registered.previous_status == DOWN  # a new agent starts DOWN until it shows life
    await stubs.registry.DeregisterAgent(registry_pb2.DeregisterAgentRequest(agent_id=fresh))
    deregistered = await read_message(watch)
    assert deregistered.health.agent_id == fresh and deregistered.previous_status == READY
    assert deregistered.revision > registered.revision > drained.revision
    watch.cancel()


async def test_watch_health_resume_replays_missed_transitions_then_catches_up(stubs: Stubs) -> None:
    agent_id = (await stubs.register("a")).agent.agent_id
    watch = stubs.health.WatchAgentHealth(health_pb2.WatchAgentHealthRequest())
    _, last_seen = await read_initial(watch)
    watch.cancel()

    await stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=agent_id))
    await stubs.registry.UndrainAgent(registry_pb2.UndrainAgentRequest(agent_id=agent_id))

    resumed = stubs.health.WatchAgentHealth(health_pb2.WatchAgentHealthRequest(start_revision=last_seen))
    replayed, caught_up_at = await read_initial(resumed)
    assert [(m.previous_status, m.health.status) for m in replayed] == [(READY, DRAINING), (DRAINING, READY)]
    assert not any(message.initial for message in replayed)
    assert replayed[0].revision > last_seen and caught_up_at >= replayed[-1].revision
    # Then live transitions.
    await stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=agent_id))
    live = await read_message(resumed)
    assert live.health.status == DRAINING and live.revision > caught_up_at
    resumed.cancel()


async def test_watch_health_from_a_future_revision_resyncs(stubs: Stubs) -> None:
    agent_id = (await stubs.register("a")).agent.agent_id
    watch = stubs.health.WatchAgentHealth(health_pb2.WatchAgentHealthRequest(start_revision=999))
    first = await read_message(watch)
    assert first.resync and not first.HasField("health")
    initial, _ = await read_initial(watch)
    assert [(m.health.agent_id, m.initial, m.resync) for m in initial] == [(agent_id, True, True)]
    watch.cancel()


async def test_watch_health_bad_arguments(stubs: Stubs) -> None:
    for request in (
        health_pb2.WatchAgentHealthRequest(start_revision=-1),
        health_pb2.WatchAgentHealthRequest(type="no spaces allowed"),
    ):
        watch = stubs.health.WatchAgentHealth(request)
        violations = await invalid_fields(watch.read())
        assert len(violations) == 1
