"""A batch of changes inside the PostgreSQL write transaction: their conditions, then their rows.

A round trip to the server costs far more than the work of one change (the writer spent most of
its time waiting on the socket when each condition and each row was a statement of its own), so a
batch reads every row its conditions need once, locked `FOR UPDATE`, at its start; checks each
change against that state, kept up to date in memory as the batch's earlier changes are applied
(the same rules as sqlite_changes, in the same order, so a later change sees an earlier one); and
writes all the rows in a few set-based statements at the end. The revision counter lock already
serialises every commit; the row locks keep the conditions sound even against a writer that would
not take it.

A uniqueness collision is found only by writing and aborts the transaction: the batch then runs
again writing each change under a savepoint of its own (`write` per change), so only the
colliding change fails, with AlreadyExists naming the owner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import asyncpg

from orchestrator.v1 import event_pb2, task_pb2
from orchestrator_server.errors import AlreadyExists
from orchestrator_server.store import Change, ConditionFailed, Expect, PlacementClaim, check_expect
from orchestrator_server.store.postgres_schema import Connection
from orchestrator_server.store.sqlite_changes import DEREGISTERED, PLACED_STATUSES, placed_agent, stamp


@dataclass
class _Agent:
    """What a placement claim reads of an agent."""

    status: int
    epoch: int
    capacity: int


class AgentRow(NamedTuple):
    agent_id: str
    name: str
    instance_id: str
    data: bytes
    revision: int
    status: int
    session_epoch: int
    max_concurrent_tasks: int


class TaskRow(NamedTuple):
    task_id: str
    status: int
    type: str
    agent_id: str
    priority: int
    idempotency_key: str | None
    idempotency_scope: str
    revision: int
    data: bytes


@dataclass
class Rows:
    """The rows a change (or a whole batch) writes, one per entity: the last write wins."""

    agents: dict[str, AgentRow] = field(default_factory=dict)
    tasks: dict[str, TaskRow] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)

    def add(self, other: Rows) -> None:
        for agent_id, row in other.agents.items():
            first = self.agents.get(agent_id)
            # An agent's name and instance are set by its first insert (the upsert keeps them).
            self.agents[agent_id] = (
                row if first is None else row._replace(name=first.name, instance_id=first.instance_id)
            )
        self.tasks.update(other.tasks)
        self.tokens.update(other.tokens)


class Batch:
    def __init__(self, revision: int) -> None:
        self.revision = revision
        # Entity id -> its revision, for every id an Expect of the batch names or the batch wrote.
        self._revisions: dict[str, int] = {}
        self._agents: dict[str, _Agent] = {}
        # Agent id -> tasks ASSIGNED or RUNNING on it (complete for every agent a claim names),
        # and task id -> the agent it is placed on.
        self._placed: dict[str, set[str]] = {}
        self._placed_on: dict[str, str] = {}

    async def read(self, conn: Connection, changes: list[Change]) -> None:
        """Reads (and locks, in id order) every row the batch's conditions look at."""
        expected = sorted({expect.entity_id for change in changes for expect in change.expect})
        claimed = sorted({claim.agent_id for change in changes for claim in change.claims})
        agent_ids = sorted({*expected, *claimed})
        if agent_ids:
            for row in await conn.fetch(
                "SELECT agent_id, revision, status, session_epoch, max_concurrent_tasks FROM agents "
                "WHERE agent_id = ANY($1::text[]) ORDER BY agent_id FOR UPDATE",
                agent_ids,
            ):
                self._revisions[row["agent_id"]] = row["revision"]
                self._agents[row["agent_id"]] = _Agent(
                    row["status"], row["session_epoch"], row["max_concurrent_tasks"]
                )
        if expected:
            for row in await conn.fetch(
                "SELECT task_id, revision FROM tasks WHERE task_id = ANY($1::text[]) ORDER BY task_id FOR UPDATE",
                expected,
            ):
                self._revisions[row["task_id"]] = row["revision"]
        if claimed:
            for agent_id in claimed:
                self._placed[agent_id] = set()
            for row in await conn.fetch(
                "SELECT agent_id, task_id FROM tasks WHERE agent_id = ANY($1::text[]) "
                "AND status = ANY($2::integer[])",
                claimed,
                list(PLACED_STATUSES),
            ):
                self._placed[row["agent_id"]].add(row["task_id"])
                self._placed_on[row["task_id"]] = row["agent_id"]

    def stage(self, change: Change) -> tuple[list[event_pb2.Event], Rows]:
        """Checks the change's conditions against the batch so far; stamps its events with the
        next revisions and returns them with its rows. Raises ConditionFailed or ValueError,
        having changed nothing. The batch takes the change into account only on `accept`."""
        records = {record.task_id: record for record in change.task_records}
        orphans = records.keys() - {event.task.task_id for event in change.events if event.HasField("task")}
        if orphans:
            raise ValueError(f"task records without an event in the change: {sorted(orphans)}")
        for expect in change.expect:
            self._check_expect(expect)
        if change.claims:
            self._check_claims(change.claims)
        rows = Rows()
        revision = self.revision
        for event in change.events:
            revision += 1
            stamp(event, revision)
            if event.HasField("agent"):
                agent = event.agent
                rows.agents[agent.agent_id] = AgentRow(
                    agent.agent_id,
                    agent.name,
                    agent.instance_id,
                    agent.SerializeToString(),
                    agent.revision,
                    int(agent.status),
                    agent.session.epoch,
                    agent.max_concurrent_tasks,
                )
            if event.HasField("task"):
                record = records.get(event.task.task_id, event.task)
                record.revision = revision
                rows.tasks[record.task_id] = _task_row(
                    record, change.idempotency_scopes.get(record.task_id, "")
                )
        rows.tokens.update(change.agent_token_hashes)
        return change.events, rows

    def accept(self, events: list[event_pb2.Event], rows: Rows) -> None:
        """The staged change was written: later changes of the batch see it."""
        self.revision += len(events)
        for agent_id, agent in rows.agents.items():
            self._revisions[agent_id] = agent.revision
            self._agents[agent_id] = _Agent(agent.status, agent.session_epoch, agent.max_concurrent_tasks)
        for task_id, task in rows.tasks.items():
            self._revisions[task_id] = task.revision
            before = self._placed_on.pop(task_id, None)
            if before is not None:
                self._placed[before].discard(task_id)
            if task.status in PLACED_STATUSES and task.agent_id:
                self._placed.setdefault(task.agent_id, set()).add(task_id)
                self._placed_on[task_id] = task.agent_id

    def _check_expect(self, expect: Expect) -> None:
        check_expect(expect, self._revisions.get(expect.entity_id))

    def _check_claims(self, claims: list[PlacementClaim]) -> None:
        by_agent: dict[str, list[PlacementClaim]] = {}
        for claim in claims:
            by_agent.setdefault(claim.agent_id, []).append(claim)
        for agent_id, agent_claims in by_agent.items():
            agent = self._agents.get(agent_id)
            if agent is None:
                raise ConditionFailed(agent_id, "agent does not exist")
            if agent.status == DEREGISTERED:
                raise ConditionFailed(agent_id, "agent is deregistered")
            for claim in agent_claims:
                if claim.session_epoch and claim.session_epoch != agent.epoch:
                    raise ConditionFailed(
                        agent_id,
                        f"session epoch is {agent.epoch}, expected {claim.session_epoch}",
                        expected=claim.session_epoch,
                        actual=agent.epoch,
                    )
            # Several claims on one agent in one change each need a slot of their own.
            claimed = {claim.task_id for claim in agent_claims}
            placed = len(self._placed.get(agent_id, set()) - claimed)
            if placed + len(claimed) > agent.capacity:
                raise ConditionFailed(
                    agent_id,
                    f"no free slot: {placed} of {agent.capacity} tasks placed on it",
                    expected=agent.capacity,
                    actual=placed,
                )


def _task_row(task: task_pb2.Task, scope: str) -> TaskRow:
    return TaskRow(
        task.task_id,
        int(task.status),
        task.spec.type,
        placed_agent(task),
        task.spec.priority,
        task.spec.idempotency_key or None,
        scope,
        task.revision,
        task.SerializeToString(),
    )


def _columns(rows: dict[str, AgentRow] | dict[str, TaskRow]) -> list[list[object]]:
    return [list(column) for column in zip(*rows.values(), strict=True)]


async def write(conn: Connection, rows: Rows, events: list[event_pb2.Event]) -> None:
    """Writes the rows and appends the events, a statement per table. Raises
    asyncpg.UniqueViolationError on a collision (the transaction is then aborted)."""
    if rows.agents:
        await conn.execute(
            "INSERT INTO agents (agent_id, name, instance_id, data, revision, status, session_epoch, "
            "max_concurrent_tasks) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], "
            "$5::bigint[], $6::integer[], $7::bigint[], $8::integer[]) ON CONFLICT (agent_id) DO UPDATE "
            "SET data = excluded.data, revision = excluded.revision, status = excluded.status, "
            "session_epoch = excluded.session_epoch, max_concurrent_tasks = excluded.max_concurrent_tasks",
            *_columns(rows.agents),
        )
    if rows.tasks:
        await conn.execute(
            "INSERT INTO tasks (task_id, status, type, agent_id, priority, idempotency_key, idempotency_scope, "
            "revision, data) SELECT * FROM unnest($1::text[], $2::integer[], $3::text[], $4::text[], "
            "$5::integer[], $6::text[], $7::text[], $8::bigint[], $9::bytea[]) ON CONFLICT (task_id) "
            "DO UPDATE SET status = excluded.status, agent_id = excluded.agent_id, "
            "revision = excluded.revision, data = excluded.data",
            *_columns(rows.tasks),
        )
    if rows.tokens:
        await conn.execute(
            "UPDATE agents SET token_hash = t.hash FROM unnest($1::text[], $2::text[]) AS t (id, hash) "
            "WHERE agents.agent_id = t.id",
            list(rows.tokens),
            list(rows.tokens.values()),
        )
    if events:
        await conn.execute(
            "INSERT INTO events (revision, type, data) "
            "SELECT * FROM unnest($1::bigint[], $2::integer[], $3::bytea[])",
            [event.revision for event in events],
            [int(event.type) for event in events],
            [event.SerializeToString() for event in events],
        )


async def explain_collision(conn: Connection, rows: Rows, exc: asyncpg.UniqueViolationError) -> AlreadyExists:
    """The error for the caller whose rows collided; `conn` must be usable again (rolled back to
    the change's savepoint)."""
    if exc.constraint_name == "agents_name_instance":
        for agent in rows.agents.values():
            owner = await conn.fetchval(
                "SELECT agent_id FROM agents WHERE name = $1 AND instance_id = $2 AND agent_id <> $3",
                agent.name,
                agent.instance_id,
                agent.agent_id,
            )
            if owner is not None:
                return AlreadyExists(
                    f"agent name {agent.name!r} instance {agent.instance_id!r} "
                    f"is already registered as agent {owner}"
                )
    if exc.constraint_name == "tasks_idempotency":
        for task in rows.tasks.values():
            if task.idempotency_key is None:
                continue
            owner = await conn.fetchval(
                "SELECT task_id FROM tasks WHERE idempotency_scope = $1 AND idempotency_key = $2 "
                "AND task_id <> $3",
                task.idempotency_scope,
                task.idempotency_key,
                task.task_id,
            )
            if owner is not None:
                return AlreadyExists(
                    f"idempotency key {task.idempotency_key!r} is already used by task {owner}"
                )
    raise exc  # a constraint this store does not map: a defect, not the caller's collision
