"""A progress report by the unary call (the agent's REST-style path), and a task watch that starts
from a revision the store has compacted away and answers with an explicit resync."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from orchestrator.v1 import registry_pb2, task_pb2, tasks_pb2
from tests.conftest import Running, Stubs
from tests.support import read_message
from tests.test_failover_paths import assignment, connect


async def create(stubs: Stubs) -> str:
    created = await stubs.tasks.CreateTask(tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="work")))
    return created.task.task_id


async def test_a_unary_progress_report_marks_the_attempt_running(running: Running) -> None:
    stubs = running.stubs
    session, agent_id, _ = await connect(stubs, "reporter")
    task_id = await create(stubs)
    assigned = await assignment(session)
    response = await stubs.tasks.ReportTaskProgress(
        tasks_pb2.ReportTaskProgressRequest(
            task_id=task_id,
            attempt_id=assigned.attempt_id,
            progress=task_pb2.TaskProgress(fraction=0.25, message="a quarter"),
        )
    )
    assert response.task.status == task_pb2.TASK_STATUS_RUNNING
    assert response.task.attempts[-1].status == task_pb2.ATTEMPT_STATUS_RUNNING
    assert response.task.attempts[-1].agent_id == agent_id
    assert (response.task.progress.fraction, response.task.progress.message) == (0.25, "a quarter")
    assert response.task.progress.HasField("reported_at")
    # Committed, not only answered: a reader sees the same.
    stored = (await stubs.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id))).task
    assert stored.progress == response.task.progress and stored.revision == response.task.revision
    await session.goodbye()


async def test_watching_a_task_last_changed_before_compaction_resyncs(servers: Callable[..., Any]) -> None:
    running: Running = await servers(event_retention=100)
    stubs = running.stubs
    task_id = await create(stubs)
    created_revision = (await stubs.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id))).task.revision
    agent_id = (await stubs.register("noisy")).agent.agent_id
    # The store compacts every 500 commits down to the last 100 events, and the in-memory window
    # is as short: the task's own revision is gone from both.
    mask = field_mask_pb2.FieldMask(paths=["labels"])
    for n in range(620):
        await stubs.registry.UpdateAgent(
            registry_pb2.UpdateAgentRequest(
                agent_id=agent_id, update=registry_pb2.AgentUpdate(labels={"n": str(n)}), update_mask=mask
            )
        )
    assert await running.server.store.oldest_revision() > created_revision + 1
    latest = running.server.bus.revision

    watch = stubs.tasks.WatchTask(tasks_pb2.WatchTaskRequest(task_id=task_id))
    first = await read_message(watch)
    assert first.revision == created_revision
    resync = await read_message(watch)
    # The missed changes summed up by the task's state now, at the bus's revision.
    assert resync.revision == latest > created_revision
    assert resync.task.task_id == task_id and resync.task.status == task_pb2.TASK_STATUS_PENDING
    # And live from there: the cancellation is the last message.
    await stubs.tasks.CancelTask(tasks_pb2.CancelTaskRequest(task_id=task_id))
    cancelled = await read_message(watch)
    assert cancelled.task.status == task_pb2.TASK_STATUS_CANCELLED and cancelled.revision > latest
    assert await watch.read() is grpc.aio.EOF
    assert await watch.code() == grpc.StatusCode.OK
