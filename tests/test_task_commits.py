"""How few commits a task takes, without giving up what each commit guarantees.

A task created while an agent is free is placed in its creating commit; a placement the store
refuses there leaves the task waiting in the queue like any other (never on two agents).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2

from orchestrator.v1 import event_pb2, registry_pb2, task_pb2, tasks_pb2
from orchestrator_server.store import PlacementClaim
from orchestrator_server.tasks import commands, transitions
from tests.conftest import Running, async_wait_for, open_session
from tests.support import SessionClient, rpc_error
from tests.test_failover_paths import assignment, get, started
from tests.test_task_write_path import GatedStore, create, gated

__all__ = ["gated"]  # the fixture, shared with the write-path tests

PENDING = task_pb2.TASK_STATUS_PENDING
ASSIGNED = task_pb2.TASK_STATUS_ASSIGNED
RUNNING = task_pb2.TASK_STATUS_RUNNING
SUCCEEDED = task_pb2.TASK_STATUS_SUCCEEDED


def events_about(db_path: Path, task_id: str) -> list[event_pb2.Event]:
    with sqlite3.connect(db_path) as db:
        rows = [
            event_pb2.Event.FromString(row[0])
            for row in db.execute("SELECT data FROM events ORDER BY revision")
        ]
    return [event for event in rows if event.task.task_id == task_id]


async def test_a_task_created_while_an_agent_is_free_is_placed_in_its_creating_commit(
    running: Running, tmp_path: Path
) -> None:
    stubs = running.stubs
    session, agent_id = await open_session(stubs, "worker")
    task = await create(stubs)
    pushed = await assignment(session)
    assert pushed.task.task_id == task.task_id and pushed.task.spec.payload["blob"] == "x" * 1000
    assert task.status == ASSIGNED and task.attempts[0].agent_id == agent_id
    about = events_about(tmp_path / "orchestrator.db", task.task_id)
    # One commit: the creation carries the placement (and the payload, as every creation does).
    assert [event.type for event in about] == [event_pb2.EVENT_TYPE_TASK_CREATED]
    assert about[0].task.status == ASSIGNED and about[0].task.current_attempt_id == pushed.attempt_id


async def test_a_new_task_whose_slot_went_elsewhere_waits_in_the_queue(
    gated: tuple[Running, GatedStore],
) -> None:
    running, store = gated
    stubs = running.stubs
    session, agent_id = await open_session(stubs, "worker", max_concurrent_tasks=1)
    store.gated = lambda change: bool(change.claims)
    store.gate.clear()
    creating = asyncio.ensure_future(create(stubs))
    await async_wait_for(lambda: store.waiting >= 1, what="the creation, placed, held at the gate")
    # Another process creates a task on the agent's only slot first.
    theirs = task_pb2.Task(task_id="tsk_elsewhere0001", status=PENDING)
    theirs.spec.type = "job"
    theirs.spec.max_attempts = 3
    theirs.created_at.GetCurrentTime()
    transitions.place(theirs, agent_id, "att_elsewhere0001")
    await store.elsewhere(theirs, [PlacementClaim(theirs.task_id, agent_id)])
    assert (await assignment(session)).task.task_id == theirs.task_id
    store.gate.set()
    mine = await creating
    assert mine.status == PENDING and mine.attempt_count == 0  # created all the same, to wait
    assert (await get(stubs, mine.task_id)).pending_reason.at_capacity == 1
    # The slot frees: the queued task takes it.
    await stubs.tasks.CompleteTask(
        tasks_pb2.CompleteTaskRequest(task_id=theirs.task_id, attempt_id="att_elsewhere0001")
    )
    assert (await assignment(session)).task.task_id == mine.task_id


def updates_after_creation(db_path: Path, task_id: str) -> list[task_pb2.Task]:
    about = events_about(db_path, task_id)
    assert about[0].type == event_pb2.EVENT_TYPE_TASK_CREATED
    return [event.task for event in about[1:]]


async def test_a_started_report_and_the_completion_after_it_share_one_commit(
    running: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wide window, so that the completion surely comes while the STARTED waits for company.
    monkeypatch.setattr(commands, "FOLD_WINDOW", 30.0)
    stubs = running.stubs
    session, _agent_id = await open_session(stubs, "worker")
    task = await create(stubs)
    pushed = await assignment(session)
    session.send(
        task_update=registry_pb2.SessionTaskUpdate(
            task_id=task.task_id, attempt_id=pushed.attempt_id, kind=registry_pb2.TASK_UPDATE_KIND_STARTED
        )
    )
    entry = running.server.tasks._active[task.task_id]
    await async_wait_for(lambda: bool(entry.commands), what="the STARTED waiting for company")
    assert (await get(stubs, task.task_id)).status == ASSIGNED  # decided on nothing yet, committed nothing
    done = await stubs.tasks.CompleteTask(
        tasks_pb2.CompleteTaskRequest(task_id=task.task_id, attempt_id=pushed.attempt_id)
    )
    assert done.task.status == SUCCEEDED
    (update,) = updates_after_creation(tmp_path / "orchestrator.db", task.task_id)
    attempt = update.attempts[0]
    assert update.status == SUCCEEDED and attempt.HasField("started_at") and attempt.HasField("finished_at")


async def test_commands_waiting_for_a_commit_are_folded_and_answered_one_by_one(
    gated: tuple[Running, GatedStore], tmp_path: Path
) -> None:
    running, store = gated
    stubs = running.stubs
    session, _agent_id = await open_session(stubs, "worker")
    task = await create(stubs)
    attempt_id = await started(stubs, session, task.task_id)
    store.gate.clear()

    def progress(message: str) -> Any:
        return stubs.tasks.ReportTaskProgress(
            tasks_pb2.ReportTaskProgressRequest(
                task_id=task.task_id, attempt_id=attempt_id, progress=task_pb2.TaskProgress(message=message)
            )
        )

    first = asyncio.ensure_future(progress("one"))
    await async_wait_for(lambda: store.waiting >= 1, what="the first report's commit held at the gate")
    second = asyncio.ensure_future(progress("two"))
    stale = asyncio.ensure_future(
        stubs.tasks.CompleteTask(
            tasks_pb2.CompleteTaskRequest(task_id=task.task_id, attempt_id="att_not_mine")
        )
    )
    completing = asyncio.ensure_future(
        stubs.tasks.CompleteTask(tasks_pb2.CompleteTaskRequest(task_id=task.task_id, attempt_id=attempt_id))
    )
    entry = running.server.tasks._active[task.task_id]
    await async_wait_for(lambda: len(entry.commands) == 3, what="three commands waiting for the task")
    store.gate.set()
    assert (await first).task.progress.message == "one"
    assert (await second).task.progress.message == "two"
    await rpc_error(stale, grpc.StatusCode.FAILED_PRECONDITION)  # refused alone
    assert (await completing).task.status == SUCCEEDED
    updates = updates_after_creation(tmp_path / "orchestrator.db", task.task_id)
    # STARTED; the first report; then the second report and the completion, in one commit.
    assert [(update.status, update.progress.message) for update in updates] == [
        (RUNNING, ""),
        (RUNNING, "one"),
        (SUCCEEDED, "two"),
    ]


async def completion_held_behind_a_report(
    running: Running, store: GatedStore, **spec: Any
) -> tuple[SessionClient, task_pb2.Task, str, asyncio.Future[Any]]:
    """A RUNNING task whose agent's progress report is held at the gate (only task commits wait
    there) and whose completion, with a result, waits behind it for the next commit."""
    stubs = running.stubs
    session, _agent_id = await open_session(stubs, "worker")
    task = await create(stubs, **spec)
    attempt_id = await started(stubs, session, task.task_id)
    store.gated = lambda change: any(event.HasField("task") for event in change.events)
    store.gate.clear()
    reporting = asyncio.ensure_future(
        stubs.tasks.ReportTaskProgress(
            tasks_pb2.ReportTaskProgressRequest(
                task_id=task.task_id, attempt_id=attempt_id, progress=task_pb2.TaskProgress(message="one")
            )
        )
    )
    await async_wait_for(lambda: store.waiting >= 1, what="the report's commit held at the gate")
    result = struct_pb2.Struct()
    result.update({"answer": 42})
    completing = asyncio.ensure_future(
        stubs.tasks.CompleteTask(
            tasks_pb2.CompleteTaskRequest(task_id=task.task_id, attempt_id=attempt_id, result=result)
        )
    )
    entry = running.server.tasks._active[task.task_id]
    await async_wait_for(lambda: len(entry.commands) == 1, what="the completion waiting for the task")
    completing.add_done_callback(lambda _: reporting.cancel())  # answered together or not at all
    return session, task, attempt_id, completing


async def assert_completed_once(running: Running, task_id: str, completing: asyncio.Future[Any]) -> None:
    answer = (await completing).task
    assert answer.status == SUCCEEDED and answer.result["answer"] == 42
    stored = await get(running.stubs, task_id)
    assert stored.status == SUCCEEDED and stored.result["answer"] == 42
    assert [attempt.status for attempt in stored.attempts] == [task_pb2.ATTEMPT_STATUS_SUCCEEDED]


async def test_a_run_timeout_decided_after_a_folded_completion_finds_the_task_finished(
    gated: tuple[Running, GatedStore],
) -> None:
    running, store = gated
    _, task, _, completing = await completion_held_behind_a_report(
        running, store, run_timeout=duration_pb2.Duration(seconds=1)
    )
    entry = running.server.tasks._active[task.task_id]
    # The run timer fires while the completion waits: the timeout is decided after it, on its draft.
    await async_wait_for(lambda: len(entry.commands) == 2, what="the run timeout waiting for the task")
    store.gate.set()
    await assert_completed_once(running, task.task_id, completing)


async def test_a_failover_decided_after_a_folded_completion_finds_the_task_finished(
    gated: tuple[Running, GatedStore],
) -> None:
    running, store = gated
    session, task, _, completing = await completion_held_behind_a_report(running, store)
    entry = running.server.tasks._active[task.task_id]
    # The agent leaves while the completion waits: its work moves, decided after the completion.
    await session.goodbye()
    await async_wait_for(lambda: len(entry.commands) == 2, what="the failover waiting for the task")
    store.gate.set()
    await assert_completed_once(running, task.task_id, completing)
