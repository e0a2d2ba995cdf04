"""Failover paths that only run when an agent stays away: work moves once FAILOVER_GRACE has run
out (not before), an agent back without its attempts loses them, and a restart moves the work of
agents that were already DOWN."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from orchestrator.v1 import registry_pb2, task_pb2, tasks_pb2
from tests.conftest import Running, Stubs, async_wait_for
from tests.support import DOWN, SessionClient

ASSIGNED = task_pb2.TASK_STATUS_ASSIGNED
RUNNING = task_pb2.TASK_STATUS_RUNNING
LOST = task_pb2.ATTEMPT_STATUS_LOST


async def connect(stubs: Stubs, name: str, running: tuple[str, ...] = ()) -> tuple[SessionClient, str, str]:
    """Registers `name` (or finds it again) and opens its session; (session, agent id, token)."""
    registered = await stubs.register(name)
    agent_id, token = registered.agent.agent_id, registered.agent_token
    session = SessionClient(stubs.registry, agent_id, token, running)
    assert (await session.receive()).WhichOneof("message") == "welcome"
    return session, agent_id, token


async def assignment(session: SessionClient, within: float = 20.0) -> registry_pb2.TaskAssignment:
    message = await session.receive_kind("assignment", within)
    return message.assignment


async def started(stubs: Stubs, session: SessionClient, task_id: str) -> str:
    """Reads the session's assignment of `task_id`, reports STARTED and waits until it is RUNNING."""
    assigned = await assignment(session)
    assert assigned.task.task_id == task_id
    session.send(
        task_update=registry_pb2.SessionTaskUpdate(
            task_id=task_id, attempt_id=assigned.attempt_id, kind=registry_pb2.TASK_UPDATE_KIND_STARTED
        )
    )
    await async_wait_for(lambda: status_of(stubs, task_id, RUNNING), what="task RUNNING")
    return assigned.attempt_id


async def get(stubs: Stubs, task_id: str) -> task_pb2.Task:
    return (await stubs.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id))).task


async def status_of(stubs: Stubs, task_id: str, status: int) -> bool:
    return (await get(stubs, task_id)).status == status


async def agent_down(stubs: Stubs, agent_id: str) -> bool:
    agent = (await stubs.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))).agent
    return agent.status == DOWN


async def create(stubs: Stubs) -> str:
    created = await stubs.tasks.CreateTask(tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="work")))
    return created.task.task_id


async def test_work_moves_only_after_the_failover_grace(servers: Callable[..., Any]) -> None:
    grace = 3.0
    running: Running = await servers(failover_grace=grace)
    stubs = running.stubs
    first, first_id, _ = await connect(stubs, "first")
    task_id = await create(stubs)
    first_attempt = await started(stubs, first, task_id)
    second, second_id, _ = await connect(stubs, "second")

    dropped_at = time.monotonic()
    first.call.cancel()  # no goodbye: a crash, not a planned exit
    await async_wait_for(lambda: agent_down(stubs, first_id), what="first agent DOWN")
    # Within the grace the work waits for the agent to come back.
    task = await get(stubs, task_id)
    if time.monotonic() - dropped_at < grace * 0.8:
        assert task.status == RUNNING and task.current_attempt_id == first_attempt

    moved = await assignment(second, within=grace + 20)
    waited = time.monotonic() - dropped_at
    assert moved.task.task_id == task_id and moved.attempt_id != first_attempt
    assert waited >= grace * 0.9, f"moved after {waited:.2f} s, before the {grace:g} s grace"
    task = await get(stubs, task_id)
    lost = next(attempt for attempt in task.attempts if attempt.attempt_id == first_attempt)
    assert lost.status == LOST and lost.agent_id == first_id
    assert "failover grace" in lost.error.message
    assert task.current_attempt_id == moved.attempt_id
    assert task.attempts[-1].agent_id == second_id
    await second.goodbye()


async def test_an_agent_back_without_its_attempt_loses_it(servers: Callable[..., Any]) -> None:
    running: Running = await servers(failover_grace=60.0)
    stubs = running.stubs
    session, agent_id, token = await connect(stubs, "forgetful")
    kept_task = await create(stubs)
    kept_attempt = await started(stubs, session, kept_task)
    forgotten_task = await create(stubs)
    forgotten_attempt = await started(stubs, session, forgotten_task)

    session.call.cancel()
    await async_wait_for(lambda: agent_down(stubs, agent_id), what="agent DOWN")
    # Back well within the grace, still running one attempt: the other was forgotten (a restart).
    again = SessionClient(stubs.registry, agent_id, token, running=(kept_attempt,))
    welcome = await again.receive_kind("welcome")
    assert list(welcome.welcome.kept_attempt_ids) == [kept_attempt]

    # The forgotten attempt is LOST and its task requeued: here, pushed to the only agent again.
    retry = await assignment(again)
    assert retry.task.task_id == forgotten_task and retry.attempt_id != forgotten_attempt
    task = await get(stubs, forgotten_task)
    lost = next(attempt for attempt in task.attempts if attempt.attempt_id == forgotten_attempt)
    assert lost.status == LOST and "reconnected without it" in lost.error.message
    kept = await get(stubs, kept_task)
    assert kept.status == RUNNING and kept.current_attempt_id == kept_attempt
    await again.goodbye()


async def test_a_restart_moves_the_work_of_agents_already_down(servers: Callable[..., Any]) -> None:
    # A grace far longer than the test: only the restart rule can move the work.
    first_server: Running = await servers(failover_grace=600.0)
    stubs = first_server.stubs
    session, agent_id, _ = await connect(stubs, "gone")
    task_id = await create(stubs)
    attempt_id = await started(stubs, session, task_id)
    session.call.cancel()
    await async_wait_for(lambda: agent_down(stubs, agent_id), what="agent DOWN")
    assert (await get(stubs, task_id)).current_attempt_id == attempt_id  # held through the grace
    await first_server.server.stop(0.5)

    second_server: Running = await servers(failover_grace=600.0)
    stubs = second_server.stubs
    task = await get(stubs, task_id)
    lost = next(attempt for attempt in task.attempts if attempt.attempt_id == attempt_id)
    assert lost.status == LOST and "down when the orchestrator restarted" in lost.error.message
    assert task.status == task_pb2.TASK_STATUS_PENDING
    other, _, _ = await connect(stubs, "other")
    moved = await assignment(other)
    assert moved.task.task_id == task_id and moved.attempt_id != attempt_id
    await other.goodbye()
