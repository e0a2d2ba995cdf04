"""One change inside the SQLite write transaction: its conditions, then its rows.

The conditions read the stored rows, so they see every change committed before, by this process
(earlier in the same batch included) or by another one. They are all checked before the change
writes anything, so a failed one needs no rollback; a uniqueness collision is found only by
writing, and then the caller must undo the change's earlier writes (a savepoint).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable

from orchestrator.v1 import agent_pb2, event_pb2, task_pb2
from orchestrator_server.errors import AlreadyExists
from orchestrator_server.store import Change, ConditionFailed, Expect, PlacementClaim, check_expect

DEREGISTERED = agent_pb2.AGENT_STATUS_DEREGISTERED
# The statuses that occupy one of an agent's slots; the `tasks_placed` partial index covers them.
PLACED_STATUSES = (task_pb2.TASK_STATUS_ASSIGNED, task_pb2.TASK_STATUS_RUNNING)


def apply_change(conn: sqlite3.Connection, change: Change, revision: int) -> list[event_pb2.Event]:
    """Checks the change's conditions, then writes it with revisions from `revision` + 1 on;
    returns its events, stamped. Raises ConditionFailed or ValueError before writing anything,
    AlreadyExists after writing part of the change (which the caller must undo)."""
    records = {record.task_id: record for record in change.task_records}
    if records:
        orphans = records.keys() - {event.task.task_id for event in change.events if event.HasField("task")}
        if orphans:
            raise ValueError(f"task records without an event in the change: {sorted(orphans)}")
    for expect in change.expect:
        _check_expect(conn, expect)
    if change.claims:
        _check_claims(conn, change.claims)
    # Task id -> its record, once per task, stamped with the revision of its last event.
    stored_tasks: dict[str, task_pb2.Task] = {}
    for event in change.events:
        revision += 1
        stamp(event, revision)
        if event.HasField("agent"):
            _upsert_agent(conn, event.agent)
        if event.HasField("task"):
            record = records.get(event.task.task_id, event.task)
            record.revision = revision
            stored_tasks[record.task_id] = record
        conn.execute(
            "INSERT INTO events (revision, type, data) VALUES (?, ?, ?)",
            (revision, event.type, event.SerializeToString()),
        )
    for task in stored_tasks.values():
        _upsert_task(conn, task, change.idempotency_scopes.get(task.task_id, ""))
    for agent_id, token_hash in change.agent_token_hashes.items():
        conn.execute("UPDATE agents SET token_hash = ? WHERE agent_id = ?", (token_hash, agent_id))
    return change.events


def stamp(event: event_pb2.Event, revision: int) -> None:
    event.revision = revision
    if event.HasField("agent"):
        event.agent.revision = revision
    if event.HasField("task"):
        event.task.revision = revision
    if not event.HasField("time"):
        # Not GetCurrentTime: it goes through a datetime and costs ten times as much.
        event.time.FromNanoseconds(time.time_ns())


def _check_expect(conn: sqlite3.Connection, expect: Expect) -> None:
    row = conn.execute(
        "SELECT revision FROM agents WHERE agent_id = ? UNION ALL SELECT revision FROM tasks WHERE task_id = ?",
        (expect.entity_id, expect.entity_id),
    ).fetchone()
    check_expect(expect, int(row[0]) if row is not None else None)


def _check_claims(conn: sqlite3.Connection, claims: Iterable[PlacementClaim]) -> None:
    by_agent: dict[str, list[PlacementClaim]] = {}
    for claim in claims:
        by_agent.setdefault(claim.agent_id, []).append(claim)
    for agent_id, agent_claims in by_agent.items():
        row = conn.execute(
            "SELECT status, session_epoch, max_concurrent_tasks FROM agents WHERE agent_id = ?", (agent_id,)
        ).fetchone()
        if row is None:
            raise ConditionFailed(agent_id, "agent does not exist")
        status, epoch, capacity = (int(value) for value in row)
        if status == DEREGISTERED:
            raise ConditionFailed(agent_id, "agent is deregistered")
        for claim in agent_claims:
            if claim.session_epoch and claim.session_epoch != epoch:
                raise ConditionFailed(
                    agent_id,
                    f"session epoch is {epoch}, expected {claim.session_epoch}",
                    expected=claim.session_epoch,
                    actual=epoch,
                )
        # Several claims on one agent in one change each need a slot of their own.
        claimed = sorted({claim.task_id for claim in agent_claims})
        placeholders = ",".join("?" * len(claimed))
        (placed,) = conn.execute(
            f"SELECT COUNT(*) FROM tasks WHERE agent_id = ? AND status IN {PLACED_STATUSES} "
            f"AND task_id NOT IN ({placeholders})",
            (agent_id, *claimed),
        ).fetchone()
        if placed + len(claimed) > capacity:
            raise ConditionFailed(
                agent_id,
                f"no free slot: {placed} of {capacity} tasks placed on it",
                expected=capacity,
                actual=int(placed),
            )


def _upsert_agent(conn: sqlite3.Connection, agent: agent_pb2.Agent) -> None:
    try:
        conn.execute(
            "INSERT INTO agents (agent_id, name, instance_id, data, revision, status, session_epoch, "
            "max_concurrent_tasks) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (agent_id) DO UPDATE SET "
            "data = excluded.data, revision = excluded.revision, status = excluded.status, "
            "session_epoch = excluded.session_epoch, max_concurrent_tasks = excluded.max_concurrent_tasks",
            (
                agent.agent_id,
                agent.name,
                agent.instance_id,
                agent.SerializeToString(),
                agent.revision,
                agent.status,
                agent.session.epoch,
                agent.max_concurrent_tasks,
            ),
        )
    except sqlite3.IntegrityError as exc:
        owner = conn.execute(
            "SELECT agent_id FROM agents WHERE name = ? AND instance_id = ?", (agent.name, agent.instance_id)
        ).fetchone()
        if owner is None:
            raise
        raise AlreadyExists(
            f"agent name {agent.name!r} instance {agent.instance_id!r} is already registered as agent {owner[0]}"
        ) from exc


def placed_agent(task: task_pb2.Task) -> str:
    """The agent of the current attempt, or else of the last one (ListTasks filters by it, and the
    placement count reads it for ASSIGNED and RUNNING tasks)."""
    if task.current_attempt_id:
        for attempt in reversed(task.attempts):
            if attempt.attempt_id == task.current_attempt_id:
                return attempt.agent_id
    return task.attempts[-1].agent_id if task.attempts else ""


def _upsert_task(conn: sqlite3.Connection, task: task_pb2.Task, scope: str) -> None:
    try:
        conn.execute(
            "INSERT INTO tasks (task_id, status, type, agent_id, priority, idempotency_key, idempotency_scope, "
            "revision, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (task_id) DO UPDATE SET "
            "status = excluded.status, agent_id = excluded.agent_id, revision = excluded.revision, "
            "data = excluded.data",
            (
                task.task_id,
                task.status,
                task.spec.type,
                placed_agent(task),
                task.spec.priority,
                task.spec.idempotency_key or None,
                scope,
                task.revision,
                task.SerializeToString(),
            ),
        )
    except sqlite3.IntegrityError as exc:
        key = task.spec.idempotency_key
        owner = conn.execute(
            "SELECT task_id FROM tasks WHERE idempotency_scope = ? AND idempotency_key = ?", (scope, key)
        ).fetchone()
        if owner is None:
            raise
        raise AlreadyExists(f"idempotency key {key!r} is already used by task {owner[0]}") from exc
