"""The task write path: command -> conditional commit -> event -> projection.

Nothing a command decides is visible before its commit lands; a change committed by another
process (here: committed straight into the store, as another replica would) takes effect through
the same projection (the agent's session hears of it); events carry what changed, bounded.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator.v1 import event_pb2, registry_pb2, task_pb2, tasks_pb2
from orchestrator_server.server import OrchestratorServer
from orchestrator_server.store import Change, Expect, PlacementClaim
from orchestrator_server.store.sqlite import SqliteStore
from orchestrator_server.tasks import transitions
from orchestrator_server.tasks.changes import event_for
from tests.conftest import Running, Stubs, async_wait_for, make_config, open_session
from tests.support import rpc_error
from tests.test_failover_paths import assignment, get, started

PENDING = task_pb2.TASK_STATUS_PENDING
CANCELLED = task_pb2.TASK_STATUS_CANCELLED
FAILED = task_pb2.TASK_STATUS_FAILED


class GatedStore(SqliteStore):
    """The real SQLite store, whose commits (or only those `gated` picks) wait while the gate is
    closed. `elsewhere` commits past the gate, as another process sharing the database would."""

    def __init__(self, path: str) -> None:
        super().__init__(path, synchronous="NORMAL")
        self.gate = asyncio.Event()
        self.gate.set()
        self.gated: Callable[[Change], bool] = lambda change: True
        self.waiting = 0

    async def commit(self, change: Change) -> int:
        if not self.gate.is_set() and self.gated(change):
            self.waiting += 1
            await self.gate.wait()
        return await super().commit(change)

    async def elsewhere(self, task: task_pb2.Task, claims: list[PlacementClaim] | None = None) -> int:
        """Commits `task` on its revision past the gate, as another process would."""
        change = Change(
            events=[event_for(task, event_pb2.EVENT_TYPE_TASK_UPDATED)],
            task_records=[task],
            expect=[Expect(task.task_id, task.revision)],
            claims=claims or [],
        )
        return await super().commit(change)


@pytest.fixture
async def gated(tmp_path: Path) -> AsyncIterator[tuple[Running, GatedStore]]:
    store = GatedStore(str(tmp_path / "orchestrator.db"))
    server = OrchestratorServer(make_config(tmp_path), store=store)
    await server.start()
    running = Running(server, Stubs(grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")))
    yield running, store
    store.gate.set()
    await running.stubs.channel.close()
    await server.stop(0.1)


async def create(stubs: Stubs, **fields: object) -> task_pb2.Task:
    spec = task_pb2.TaskSpec(type=str(fields.pop("type", "job")), **fields)  # type: ignore[arg-type]
    spec.payload.update({"blob": "x" * 1000})
    return (await stubs.tasks.CreateTask(tasks_pb2.CreateTaskRequest(spec=spec))).task


async def test_a_cancel_shows_only_once_its_commit_lands(gated: tuple[Running, GatedStore]) -> None:
    running, store = gated
    task = await create(running.stubs)
    store.gate.clear()
    cancelling = asyncio.ensure_future(
        running.stubs.tasks.CancelTask(tasks_pb2.CancelTaskRequest(task_id=task.task_id, reason="stop"))
    )
    await async_wait_for(lambda: store.waiting >= 1, what="the cancel's commit held at the gate")
    assert (await get(running.stubs, task.task_id)).status == PENDING  # decided, not committed
    assert running.server.tasks.workload().pending_tasks == 1
    store.gate.set()
    assert (await cancelling).task.status == CANCELLED
    assert (await get(running.stubs, task.task_id)).status == CANCELLED
    assert running.server.tasks.workload().pending_tasks == 0


async def test_a_report_decided_on_a_stale_task_is_decided_again(gated: tuple[Running, GatedStore]) -> None:
    running, store = gated
    stubs = running.stubs
    session, _agent_id = await open_session(stubs, "worker")
    task = await create(stubs)
    attempt_id = await started(stubs, session, task.task_id)
    store.gate.clear()
    completing = asyncio.ensure_future(
        stubs.tasks.CompleteTask(tasks_pb2.CompleteTaskRequest(task_id=task.task_id, attempt_id=attempt_id))
    )
    await async_wait_for(lambda: store.waiting >= 1, what="the completion's commit held at the gate")
    # Meanwhile another process cancels the task: the completion was decided on a stale revision.
    draft = await get(stubs, task.task_id)
    transitions.cancel(draft, "cancelled on another replica", "CANCELLED")
    await store.elsewhere(draft)
    # The store answers only once the projection has the cancel.
    assert (await get(stubs, task.task_id)).status == CANCELLED
    store.gate.set()
    refused = await rpc_error(completing, grpc.StatusCode.FAILED_PRECONDITION)
    assert "CANCELLED" in (refused.details() or "")
    final = await get(stubs, task.task_id)
    assert final.status == CANCELLED and not final.HasField("result")


async def test_a_slot_taken_elsewhere_is_never_booked_twice(gated: tuple[Running, GatedStore]) -> None:
    running, store = gated
    stubs = running.stubs
    session, agent_id = await open_session(stubs, "worker", max_concurrent_tasks=1, task_types=["job"])
    other = await create(stubs, type="other")  # this process never places it (the agent lacks the type)
    store.gated = lambda change: bool(change.claims)
    store.gate.clear()
    mine = await create(stubs)
    await async_wait_for(lambda: store.waiting >= 1, what="this process's placement held at the gate")
    # Another process books the agent's only slot first.
    draft = await get(stubs, other.task_id)
    transitions.place(draft, agent_id, "att_elsewhere0002")
    await store.elsewhere(draft, [PlacementClaim(other.task_id, agent_id)])
    assert (await assignment(session)).task.task_id == other.task_id
    store.gate.set()
    await async_wait_for(
        lambda: running.server.tasks.workload().pending_tasks == 1,
        what="the refused placement back in the queue",
    )
    waiting = await get(stubs, mine.task_id)
    assert waiting.status == PENDING and waiting.attempt_count == 0
    assert waiting.pending_reason.at_capacity == 1
    # The slot frees: the queued task takes it.
    await stubs.tasks.CompleteTask(
        tasks_pb2.CompleteTaskRequest(task_id=other.task_id, attempt_id="att_elsewhere0002")
    )
    assert (await assignment(session)).task.task_id == mine.task_id


async def commit_elsewhere(running: Running, task: task_pb2.Task) -> None:
    """Commits `task` as another process would: straight into the store, on its revision."""
    await running.server.store.commit(
        Change(
            events=[event_for(task, event_pb2.EVENT_TYPE_TASK_UPDATED)],
            task_records=[task],
            expect=[Expect(task.task_id, task.revision)],
        )
    )


async def test_a_cancel_committed_elsewhere_reaches_the_agent(running: Running) -> None:
    stubs = running.stubs
    session, _agent_id = await open_session(stubs, "worker")
    task = await create(stubs)
    await started(stubs, session, task.task_id)
    draft = await get(stubs, task.task_id)
    attempt_id = draft.current_attempt_id
    transitions.cancel(draft, "cancelled on another replica", "CANCELLED")
    await commit_elsewhere(running, draft)
    cancellation = (await session.receive_kind("cancellation", 10.0)).cancellation
    assert (cancellation.task_id, cancellation.attempt_id) == (task.task_id, attempt_id)
    assert cancellation.reason == "cancelled on another replica"
    assert (await get(stubs, task.task_id)).status == CANCELLED
    assert running.server.tasks.workload().running_tasks == 0


async def test_a_placement_committed_elsewhere_is_pushed_down_the_local_session(running: Running) -> None:
    stubs = running.stubs
    # The agent handles "job" only, so this process's own pass never places an "other" task.
    session, agent_id = await open_session(stubs, "worker", task_types=["job"])
    task = await create(stubs, type="other")
    draft = await get(stubs, task.task_id)
    assert draft.status == PENDING
    transitions.place(draft, agent_id, "att_elsewhere0001")
    await commit_elsewhere(running, draft)
    pushed = await assignment(session)
    assert (pushed.task.task_id, pushed.attempt_id) == (task.task_id, "att_elsewhere0001")
    assert pushed.task.spec.payload["blob"] == "x" * 1000  # the event had no payload; the projection did
    assert running.server.tasks.workload().running_tasks == 1


async def test_events_carry_what_changed_and_records_keep_the_rest(
    servers: Callable[..., Any], tmp_path: Path
) -> None:
    first: Running = await servers()
    stubs = first.stubs
    session, _agent_id = await open_session(stubs, "worker")
    task = await create(stubs, max_attempts=20)
    for _ in range(19):
        pushed = await assignment(session)
        await stubs.tasks.FailTask(
            tasks_pb2.FailTaskRequest(
                task_id=task.task_id,
                attempt_id=pushed.attempt_id,
                error=task_pb2.TaskError(message="again " + "e" * 400),
            )
        )
    last = await assignment(session)
    session.send(
        task_update=registry_pb2.SessionTaskUpdate(
            task_id=task.task_id, attempt_id=last.attempt_id, kind=registry_pb2.TASK_UPDATE_KIND_STARTED
        )
    )
    live = await async_wait_for(
        lambda: _running_task(stubs, task.task_id), what="the twentieth attempt running"
    )
    assert live.attempt_count == 20 and len(live.attempts) == 16
    await first.server.stop(0.1)

    with sqlite3.connect(tmp_path / "orchestrator.db") as db:
        rows = [
            event_pb2.Event.FromString(row[0])
            for row in db.execute("SELECT data FROM events ORDER BY revision")
        ]
    about = [event for event in rows if event.task.task_id == task.task_id]
    created = [event for event in about if event.type == event_pb2.EVENT_TYPE_TASK_CREATED]
    assert len(created) == 1 and created[0].task.spec.payload["blob"] == "x" * 1000
    updates = [event for event in about if event.type == event_pb2.EVENT_TYPE_TASK_UPDATED]
    assert len(updates) >= 39  # 19 placements (the first rode with the creation), 19 failures, a start
    assert all(not event.task.spec.HasField("payload") and len(event.task.attempts) <= 1 for event in updates)
    assert max(event.ByteSize() for event in updates) < 2_000

    second: Running = await servers()
    restored = await get(second.stubs, task.task_id)
    assert restored.spec.payload["blob"] == "x" * 1000
    assert [attempt.number for attempt in restored.attempts] == list(range(5, 21))
    assert restored.status == task_pb2.TASK_STATUS_RUNNING


async def _running_task(stubs: Stubs, task_id: str) -> task_pb2.Task | None:
    task = await get(stubs, task_id)
    return task if task.status == task_pb2.TASK_STATUS_RUNNING else None
