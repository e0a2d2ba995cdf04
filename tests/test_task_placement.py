"""Task types, rejections and "why is my task pending" (issue 10, item 1).

Real SDK agent processes (tests/task_types_agent.py) against an in-process server; the database
file is read directly to check that a task rejected over and over leaves small, few rows.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from orchestrator.v1 import agent_pb2, event_pb2, registry_pb2, task_pb2, tasks_pb2
from orchestrator_server.tasks import MAX_KEPT_ATTEMPTS, MAX_REJECTIONS
from tests.conftest import Running, Stubs, async_wait_for, open_session
from tests.support import invalid_fields, rpc_error
from tests.test_tasks import create, get, next_assignment, wait_status

AGENT_SCRIPT = str(Path(__file__).resolve().parent / "task_types_agent.py")
PENDING = task_pb2.TASK_STATUS_PENDING
FAILED = task_pb2.TASK_STATUS_FAILED
SUCCEEDED = task_pb2.TASK_STATUS_SUCCEEDED
TERMINAL = {SUCCEEDED, FAILED, task_pb2.TASK_STATUS_CANCELLED, task_pb2.TASK_STATUS_TIMED_OUT}


@pytest.fixture
def sdk_agents() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def spawn(target: str, name: str, *handles: str) -> subprocess.Popen[bytes]:
        args = [sys.executable, AGENT_SCRIPT, "--target", target, "--name", name]
        for task_type in handles:
            args += ["--handles", task_type]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(process)
        return process

    yield spawn
    for process in started:
        process.kill()
        process.wait(10)


async def ready_agent(stubs: Stubs, name: str) -> agent_pb2.Agent:
    """The agent `name` once it is READY with an open session."""

    async def ready() -> agent_pb2.Agent | None:
        listed = await stubs.registry.ListAgents(registry_pb2.ListAgentsRequest())
        for agent in listed.agents:
            if (
                agent.name == name
                and agent.status == agent_pb2.AGENT_STATUS_READY
                and agent.session.streaming
            ):
                return agent
        return None

    found: agent_pb2.Agent = await async_wait_for(ready, 30, f"agent {name} ready")
    return found


async def pending_reason(stubs: Stubs, task_id: str) -> task_pb2.Task:
    async def explained() -> task_pb2.Task | None:
        task = await get(stubs, task_id)
        assert task.status == PENDING, task
        return task if task.pending_reason.agents_evaluated else None

    task: task_pb2.Task = await async_wait_for(explained, 20, "a pending reason")
    return task


def task_rows(database: Path, task_id: str) -> tuple[list[int], int]:
    """Sizes of the events carrying the task, and of its task row, read from the SQLite file."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        sizes = [
            len(data)
            for (data,) in conn.execute("SELECT data FROM events")
            if event_pb2.Event.FromString(data).task.task_id == task_id
        ]
        (row,) = conn.execute("SELECT length(data) FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
    return sizes, int(row)


async def test_a_type_nobody_handles_waits_and_says_why(
    servers: Callable[..., Any], sdk_agents: Callable[..., subprocess.Popen[bytes]]
) -> None:
    running: Running = await servers(gateway_enabled=True)
    stubs = running.stubs
    sdk_agents(running.target, "estimator", "estimate")
    agent = await ready_agent(stubs, "estimator")
    assert list(agent.task_types) == ["estimate"]  # the SDK declared its handlers

    typo = await create(stubs, type="estimat")
    waiting = await pending_reason(stubs, typo.task_id)
    reason = waiting.pending_reason
    assert reason.agents_evaluated == 1 and reason.filtered_by_type == 1
    assert reason.message == "no agent handles task type 'estimat' (1 agent evaluated)"
    url = f"http://127.0.0.1:{running.server.http_port}/tasks/{typo.task_id}"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        body = await response.json()
    shown = body["task"]["pending_reason"]
    assert shown["message"] == reason.message, body
    listed = await stubs.tasks.ListTasks(tasks_pb2.ListTasksRequest(status=PENDING))
    assert [task.pending_reason.message for task in listed.tasks] == [reason.message]

    # The agent that does handle its type runs the other task; the typo was never offered to it.
    done = await wait_status(stubs, (await create(stubs, type="estimate")).task_id, TERMINAL)
    assert done.status == SUCCEEDED and done.result["handled"] == "estimate"
    still = await get(stubs, typo.task_id)
    assert still.status == PENDING and still.attempt_count == 0 and not still.attempts

    # Teaching the agent the type (UpdateAgent, mask task_types) places it, and clears the reason.
    await stubs.registry.UpdateAgent(
        registry_pb2.UpdateAgentRequest(
            agent_id=agent.agent_id,
            update=registry_pb2.AgentUpdate(task_types=["estimat", "estimate"]),
            update_mask=field_mask_pb2.FieldMask(paths=["task_types"]),
        )
    )
    placed = await wait_status(stubs, typo.task_id, {task_pb2.TASK_STATUS_ASSIGNED, *TERMINAL})
    assert not placed.HasField("pending_reason")


async def test_a_task_rejected_over_and_over_fails_with_small_rows(
    running: Running, tmp_path: Path, sdk_agents: Callable[..., subprocess.Popen[bytes]]
) -> None:
    stubs = running.stubs
    # No handlers at all: it declares no types, so it is offered everything, and refuses it.
    sdk_agents(running.target, "refuser")
    await ready_agent(stubs, "refuser")
    task = await create(stubs, type="estimat", max_attempts=100, payload={"hours": 3})
    final = await wait_status(stubs, task.task_id, TERMINAL, within=60)
    assert final.status == FAILED and final.error.reason == "REJECTED", final.error
    assert final.rejection_count == MAX_REJECTIONS == final.attempt_count
    assert len(final.attempts) <= MAX_KEPT_ATTEMPTS
    assert all(a.status == task_pb2.ATTEMPT_STATUS_REJECTED for a in final.attempts)
    # Backed off between refusals: the attempts are spread out, not 50 a second.
    first, last = final.attempts[0].assigned_at.ToDatetime(), final.attempts[-1].assigned_at.ToDatetime()
    assert (last - first).total_seconds() >= 0.05 * (MAX_REJECTIONS - 1) / 2

    sizes, row = task_rows(tmp_path / "orchestrator.db", task.task_id)
    # created + per attempt (placed, rejected) + the last started/finished: a few dozen at most.
    assert len(sizes) <= 3 * MAX_REJECTIONS + 2, len(sizes)
    assert max(sizes) < 8192 and row < 8192, (max(sizes), row)


async def test_a_targeted_task_refused_by_its_target_fails_after_the_rejection_budget(
    running: Running, sdk_agents: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """max_attempts=1 and a target that refuses: bounded refusals with backoff, then FAILED. Refusals
    do not use max_attempts (a shutting-down agent's refusal must not fail a task)."""
    stubs = running.stubs
    sdk_agents(running.target, "refuser")
    agent = await ready_agent(stubs, "refuser")
    task = await create(stubs, type="estimat", target_agent_id=agent.agent_id, max_attempts=1)
    final = await wait_status(stubs, task.task_id, TERMINAL, within=60)
    assert (final.status, final.error.reason) == (FAILED, "REJECTED")
    assert final.attempt_count == final.rejection_count == MAX_REJECTIONS and final.failure_count == 0
    assert "no handler" in final.error.message


async def test_pending_reason_counts_each_constraint(stubs: Stubs) -> None:
    """One agent filtered by each constraint; the counts add up to the agents evaluated."""
    await open_session(stubs, name="typed", task_types=["other"])
    await open_session(stubs, name="bare", capabilities=[])
    await open_session(stubs, name="gpu-eu", capabilities=["gpu"], labels={"zone": "eu"})
    full, _ = await open_session(
        stubs, name="gpu-us", capabilities=["gpu"], labels={"zone": "us"}, max_concurrent_tasks=1
    )
    await stubs.register("silent", capabilities=["gpu"], labels={"zone": "us"})  # no session
    _, drained_id = await open_session(stubs, name="drained", capabilities=["gpu"], labels={"zone": "us"})
    await stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=drained_id))
    # Fill gpu-us, the only agent that fits.
    first = await create(stubs, required_capabilities=["gpu"], label_selector="zone=us")
    assert (await next_assignment(full)).task.task_id == first.task_id
    task = await create(stubs, required_capabilities=["gpu"], label_selector="zone=us")

    async def settled() -> task_pb2.PendingReason | None:
        reason = (await pending_reason(stubs, task.task_id)).pending_reason
        return reason if reason.agents_evaluated == 6 and reason.at_capacity == 1 else None

    reason = await async_wait_for(settled, 20, "all six agents explained")
    counts = (
        reason.filtered_by_type,
        reason.filtered_by_capability,
        reason.filtered_by_selector,
        reason.not_ready,
        reason.draining,
        reason.at_capacity,
    )
    assert counts == (1, 1, 1, 1, 1, 1), reason
    assert reason.message.startswith("no agent can take it now: 1 do not handle the type"), reason.message


async def test_a_queue_timeout_says_what_the_task_waited_for(stubs: Stubs) -> None:
    await open_session(stubs, name="typed", task_types=["other"])
    task = await create(stubs, type="job", queue_timeout=duration_pb2.Duration(nanos=300_000_000))
    final = await wait_status(stubs, task.task_id, TERMINAL)
    assert final.status == task_pb2.TASK_STATUS_TIMED_OUT
    assert final.error.message == (
        "waited longer than its queue timeout; no agent handles task type 'job' (1 agent evaluated)"
    )
    assert not final.HasField("pending_reason")


async def test_task_types_are_validated_like_capabilities(stubs: Stubs) -> None:
    fields = await invalid_fields(stubs.register("bad", task_types=["ok", "not a name!"]))
    assert set(fields) == {"task_types[1]"}
    fields = await invalid_fields(stubs.register("many", task_types=[f"t{i}" for i in range(65)]))
    assert "more than 64" in fields["task_types"]
    registered = await stubs.register("fine", task_types=["b", "a", "b"])
    assert list(registered.agent.task_types) == ["a", "b"]
    fields = await invalid_fields(
        stubs.registry.UpdateAgent(
            registry_pb2.UpdateAgentRequest(
                agent_id=registered.agent.agent_id,
                update=registry_pb2.AgentUpdate(task_types=[""]),
                update_mask=field_mask_pb2.FieldMask(paths=["task_types"]),
            )
        )
    )
    assert set(fields) == {"update.task_types[0]"}


async def test_attempt_history_is_bounded_and_numbering_and_fencing_hold(stubs: Stubs) -> None:
    session, _ = await open_session(stubs, name="flaky")
    task = await create(stubs, max_attempts=MAX_KEPT_ATTEMPTS + 4)
    seen: list[str] = []
    for number in range(1, MAX_KEPT_ATTEMPTS + 4):
        assignment = await next_assignment(session)
        seen.append(assignment.attempt_id)
        assert assignment.task.attempts[-1].number == number
        error = task_pb2.TaskError(message="x" * 4000, reason="BOOM")
        await stubs.tasks.FailTask(
            tasks_pb2.FailTaskRequest(task_id=task.task_id, attempt_id=assignment.attempt_id, error=error)
        )
    last = await next_assignment(session)
    current = await get(stubs, task.task_id)
    assert current.attempt_count == MAX_KEPT_ATTEMPTS + 4 and current.failure_count == MAX_KEPT_ATTEMPTS + 3
    assert [a.number for a in current.attempts] == list(range(5, MAX_KEPT_ATTEMPTS + 5))
    assert all(len(a.error.message) <= 512 for a in current.attempts)
    # Old attempts, listed or long dropped, are fenced: only the current one may report.
    for stale in (seen[0], seen[-1]):
        await rpc_error(
            stubs.tasks.CompleteTask(tasks_pb2.CompleteTaskRequest(task_id=task.task_id, attempt_id=stale)),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
    done = await stubs.tasks.CompleteTask(
        tasks_pb2.CompleteTaskRequest(task_id=task.task_id, attempt_id=last.attempt_id)
    )
    assert done.task.status == SUCCEEDED and done.task.attempts[-1].number == MAX_KEPT_ATTEMPTS + 4
