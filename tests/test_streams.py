"""Watch streams against state that changes while a message is in flight.

A server stream is suspended at each `yield` until gRPC has written the message; the state it
yielded from may change meanwhile. These tests drive the servicers' generators directly to
make that interleaving deterministic.
"""

from __future__ import annotations

import asyncio
from typing import Any

from orchestrator.v1 import registry_pb2, task_pb2, tasks_pb2
from orchestrator_server.grpc_api.tasks import TasksServicer
from tests.conftest import Running
from tests.support import SessionClient, open_session


async def next_assignment(session: SessionClient) -> registry_pb2.TaskAssignment:
    return (await session.receive_kind("assignment")).assignment


async def test_watch_task_sends_the_terminal_state_that_lands_while_the_first_message_is_written(
    running: Running,
) -> None:
    stubs = running.stubs
    registered = await stubs.register(max_concurrent_tasks=1)
    session = await open_session(stubs.registry, registered.agent.agent_id, registered.agent_token)
    task = (
        await stubs.tasks.CreateTask(tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="job")))
    ).task
    assignment = await next_assignment(session)

    assert running.server.bus is not None
    servicer = TasksServicer(running.server.tasks, running.server.bus)
    context: Any = None
    watch = servicer.WatchTask(tasks_pb2.WatchTaskRequest(task_id=task.task_id), context).__aiter__()
    first = await watch.__anext__()
    assert first.task.status == task_pb2.TASK_STATUS_ASSIGNED
    # The task completes while the first message is "on the wire" (the generator is suspended).
    await stubs.tasks.CompleteTask(
        tasks_pb2.CompleteTaskRequest(task_id=task.task_id, attempt_id=assignment.attempt_id)
    )
    rest = [message async for message in _bounded(watch)]
    assert [message.task.status for message in rest] == [task_pb2.TASK_STATUS_SUCCEEDED]
    assert rest[0].revision > first.revision
    await session.goodbye()


async def _bounded(stream: Any, within: float = 10.0) -> Any:
    while True:
        try:
            yield await asyncio.wait_for(stream.__anext__(), within)
        except StopAsyncIteration:
            return
