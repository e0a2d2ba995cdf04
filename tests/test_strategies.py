"""The placement strategies other than the default, each held to what it promises:
round_robin takes turns whatever the load, random ignores load but is not a rotation,
consistent_hash (or any task with a routing_key) keeps one key on one agent."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from orchestrator.v1 import task_pb2, tasks_pb2
from tests.conftest import Running, Stubs, async_wait_for
from tests.support import SessionClient

CAPACITY = 100


async def agents(stubs: Stubs, count: int) -> tuple[list[SessionClient], list[str]]:
    sessions, ids = [], []
    for index in range(count):
        registered = await stubs.register(f"agent-{index}", max_concurrent_tasks=CAPACITY)
        session = SessionClient(stubs.registry, registered.agent.agent_id, registered.agent_token)
        assert (await session.receive()).WhichOneof("message") == "welcome"
        sessions.append(session)
        ids.append(registered.agent.agent_id)
    return sessions, ids


async def placed(stubs: Stubs, count: int, **spec: Any) -> list[str]:
    """Creates `count` tasks one after the other; the agent each was placed on, in that order."""
    task_ids = []
    for _ in range(count):
        created = await stubs.tasks.CreateTask(
            tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="work", **spec))
        )
        task_ids.append(created.task.task_id)

    async def owners() -> list[str] | None:
        found = []
        for task_id in task_ids:
            task = (await stubs.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id))).task
            if task.status != task_pb2.TASK_STATUS_ASSIGNED:
                return None
            found.append(task.attempts[-1].agent_id)
        return found

    result: list[str] = await async_wait_for(owners, within=30, what=f"{count} tasks placed")
    return result


class Cluster:
    """Three agents, the first already holding 30 tasks aimed at it; the others idle."""

    def __init__(self, running: Running, sessions: list[SessionClient], ids: list[str]) -> None:
        self.running = running
        self.sessions = sessions  # held: a session dropped by the garbage collector would end
        self.ids = ids


async def loaded_cluster(servers: Callable[..., Any], strategy: str) -> Cluster:
    running: Running = await servers(scheduling_strategy=strategy)
    sessions, ids = await agents(running.stubs, 3)
    assert set(await placed(running.stubs, 30, target_agent_id=ids[0])) == {ids[0]}
    return Cluster(running, sessions, ids)


async def test_least_loaded_fills_the_idle_agents_first(servers: Callable[..., Any]) -> None:
    # The control for the two tests below: with the default, the busy agent gets nothing here.
    cluster = await loaded_cluster(servers, "least_loaded")
    owners = await placed(cluster.running.stubs, 45)
    assert cluster.ids[0] not in owners


async def test_round_robin_takes_turns_whatever_the_load(servers: Callable[..., Any]) -> None:
    cluster = await loaded_cluster(servers, "round_robin")
    owners = await placed(cluster.running.stubs, 45)
    assert Counter(owners) == dict.fromkeys(cluster.ids, 15)
    # A strict rotation: each agent's turn comes every third task.
    assert all(owners[index] == owners[index + 3] for index in range(len(owners) - 3))
    assert len(set(owners[:3])) == 3


async def test_random_ignores_load_and_does_not_rotate(servers: Callable[..., Any]) -> None:
    cluster = await loaded_cluster(servers, "random")
    owners = await placed(cluster.running.stubs, 45)
    counts = Counter(owners)
    # Uniform over three agents: each gets 15 on average; fewer than 4 has odds below 1e-4.
    assert all(counts[agent_id] >= 4 for agent_id in cluster.ids), counts
    rotation = all(owners[index] == owners[index + 3] for index in range(len(owners) - 3))
    assert not rotation, "random placement followed a strict rotation"


@pytest.mark.parametrize("strategy", ["consistent_hash", "least_loaded"])
async def test_one_routing_key_stays_on_one_agent(servers: Callable[..., Any], strategy: str) -> None:
    running: Running = await servers(scheduling_strategy=strategy)
    sessions, _ = await agents(running.stubs, 3)
    by_key = {
        f"key-{index}": await placed(running.stubs, 3, routing_key=f"key-{index}") for index in range(12)
    }
    for key, owners in by_key.items():
        assert len(set(owners)) == 1, f"{key} was spread over {set(owners)}"
    # Twelve keys over three agents: all on one agent has odds of 3**-11.
    assert len({owners[0] for owners in by_key.values()}) >= 2
    assert len(sessions) == 3


async def test_consistent_hash_without_a_key_spreads_by_task(servers: Callable[..., Any]) -> None:
    running: Running = await servers(scheduling_strategy="consistent_hash")
    sessions, ids = await agents(running.stubs, 3)
    counts = Counter(await placed(running.stubs, 45))
    assert set(counts) == set(ids), counts
    assert len(sessions) == 3
