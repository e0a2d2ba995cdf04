"""Creates with one idempotency key that really overlap: while the first is held in its commit by
another writer of the database file, the others arrive and must wait for it, not create their own."""

from __future__ import annotations

import asyncio
import sqlite3

from orchestrator.v1 import task_pb2, tasks_pb2
from tests.conftest import Running, async_wait_for


async def test_creates_racing_one_in_flight_get_its_task(running: Running) -> None:
    tasks = running.stubs.tasks
    request = tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="work", idempotency_key="held"))
    # A real second writer: holds SQLite's write lock, so the server's commit waits (its busy
    # timeout, 5 s, is far longer than the hold below).
    blocker = sqlite3.connect(running.server.config.database_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        first = asyncio.ensure_future(tasks.CreateTask(request))
        # The first create is in flight: it claimed the key and waits for the disk.
        await async_wait_for(
            lambda: ("", "held") in running.server.tasks._keys._creating, what="first create in flight"
        )
        racing = [asyncio.ensure_future(tasks.CreateTask(request)) for _ in range(20)]
        # Every racer has been answered by nothing yet: all are held behind the same commit.
        await asyncio.sleep(1.0)
        done = [call for call in racing if call.done()]
        assert not first.done() and not done, [call.exception() or call.result() for call in done][:2]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    responses = await asyncio.gather(first, *racing)
    assert len({response.task.task_id for response in responses}) == 1
    assert [response.created for response in responses] == [True] + [False] * 20
    listed = await tasks.ListTasks(tasks_pb2.ListTasksRequest())
    assert [task.spec.idempotency_key for task in listed.tasks] == ["held"]
