"""One change inside the PostgreSQL write transaction: its conditions, then its rows.

The same rules as sqlite_changes: every condition is checked before the change writes anything,
so a failed one needs no rollback. The rows a condition reads are locked (`FOR UPDATE`): the
revision counter lock already serialises every commit, and the row locks keep a claim sound even
against a writer that does not take the counter (none does today). A uniqueness collision is
found only by writing; it aborts the transaction, so the caller undoes the change (a savepoint),
then turns the `Collision` into AlreadyExists naming the owner.
"""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from orchestrator.v1 import agent_pb2, event_pb2, task_pb2
from orchestrator_server.errors import AlreadyExists
from orchestrator_server.store import Change, ConditionFailed, Expect, PlacementClaim
from orchestrator_server.store.postgres_schema import Connection
from orchestrator_server.store.sqlite_changes import DEREGISTERED, PLACED_STATUSES, placed_agent, stamp


class Collision(Exception):
    """A unique constraint refused an agent's name + instance or a task's idempotency key."""

    def __init__(
        self, *, agent: agent_pb2.Agent | None = None, task: task_pb2.Task | None = None, scope: str = ""
    ) -> None:
        super().__init__("unique constraint")
        self.agent = agent
        self.task = task
        self.scope = scope

    async def explain(self, conn: Connection) -> AlreadyExists:
        """The error for the caller; `conn` must be usable again (rolled back to a savepoint)."""
        if self.agent is not None:
            owner = await conn.fetchval(
                "SELECT agent_id FROM agents WHERE name = $1 AND instance_id = $2",
                self.agent.name,
                self.agent.instance_id,
            )
            return AlreadyExists(
                f"agent name {self.agent.name!r} instance {self.agent.instance_id!r} "
                f"is already registered as agent {owner}"
            )
        assert self.task is not None
        key = self.task.spec.idempotency_key
        owner = await conn.fetchval(
            "SELECT task_id FROM tasks WHERE idempotency_scope = $1 AND idempotency_key = $2", self.scope, key
        )
        return AlreadyExists(f"idempotency key {key!r} is already used by task {owner}")


async def apply_change(conn: Connection, change: Change, revision: int) -> list[event_pb2.Event]:
    """Checks the change's conditions, then writes its entities with revisions from `revision` + 1
    on; returns its events, stamped, for the caller to append (`insert_events`, once per batch: no
    condition reads the log). Raises ConditionFailed or ValueError before writing anything,
    Collision after writing part of the change (the transaction is then aborted)."""
    records = {record.task_id: record for record in change.task_records}
    orphans = records.keys() - {event.task.task_id for event in change.events if event.HasField("task")}
    if orphans:
        raise ValueError(f"task records without an event in the change: {sorted(orphans)}")
    for expect in change.expect:
        await _check_expect(conn, expect)
    if change.claims:
        await _check_claims(conn, change.claims)
    stored_tasks: dict[str, task_pb2.Task] = {}
    for event in change.events:
        revision += 1
        stamp(event, revision)
        if event.HasField("agent"):
            await _upsert_agent(conn, event.agent)
        if event.HasField("task"):
            record = records.get(event.task.task_id, event.task)
            record.revision = revision
            stored_tasks[record.task_id] = record
    for task in stored_tasks.values():
        await _upsert_task(conn, task, change.idempotency_scopes.get(task.task_id, ""))
    for agent_id, token_hash in change.agent_token_hashes.items():
        await conn.execute("UPDATE agents SET token_hash = $1 WHERE agent_id = $2", token_hash, agent_id)
    return change.events


async def insert_events(conn: Connection, events: list[event_pb2.Event]) -> None:
    """Appends a batch's events in one statement."""
    await conn.execute(
        "INSERT INTO events (revision, type, data) "
        "SELECT * FROM unnest($1::bigint[], $2::integer[], $3::bytea[])",
        [event.revision for event in events],
        [int(event.type) for event in events],
        [event.SerializeToString() for event in events],
    )


async def _check_expect(conn: Connection, expect: Expect) -> None:
    # An id names an agent or a task, never both; one round trip for either.
    actual = await conn.fetchval(
        "SELECT coalesce((SELECT revision FROM agents WHERE agent_id = $1 FOR UPDATE), "
        "(SELECT revision FROM tasks WHERE task_id = $1 FOR UPDATE))",
        expect.entity_id,
    )
    if actual is None:
        if expect.revision != 0:
            raise ConditionFailed(expect.entity_id, "does not exist", expected=expect.revision)
        return
    if expect.revision == 0:
        raise ConditionFailed(expect.entity_id, f"exists already (revision {actual})", actual=actual)
    if actual != expect.revision:
        raise ConditionFailed(
            expect.entity_id,
            f"changed: revision {actual}, expected {expect.revision}",
            expected=expect.revision,
            actual=actual,
        )


async def _check_claims(conn: Connection, claims: Iterable[PlacementClaim]) -> None:
    by_agent: dict[str, list[PlacementClaim]] = {}
    for claim in claims:
        by_agent.setdefault(claim.agent_id, []).append(claim)
    for agent_id, agent_claims in sorted(by_agent.items()):  # one lock order for every writer
        # The agent row is locked: a second claim on it waits here and then counts this one's task.
        row = await conn.fetchrow(
            "SELECT status, session_epoch, max_concurrent_tasks FROM agents WHERE agent_id = $1 FOR UPDATE",
            agent_id,
        )
        if row is None:
            raise ConditionFailed(agent_id, "agent does not exist")
        status, epoch, capacity = row["status"], row["session_epoch"], row["max_concurrent_tasks"]
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
        placed = await conn.fetchval(
            "SELECT count(*) FROM tasks WHERE agent_id = $1 AND status = ANY($2::integer[]) "
            "AND NOT (task_id = ANY($3::text[]))",
            agent_id,
            list(PLACED_STATUSES),
            claimed,
        )
        if placed + len(claimed) > capacity:
            raise ConditionFailed(
                agent_id,
                f"no free slot: {placed} of {capacity} tasks placed on it",
                expected=capacity,
                actual=int(placed),
            )


async def _upsert_agent(conn: Connection, agent: agent_pb2.Agent) -> None:
    try:
        await conn.execute(
            "INSERT INTO agents (agent_id, name, instance_id, data, revision, status, session_epoch, "
            "max_concurrent_tasks) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (agent_id) DO UPDATE "
            "SET data = excluded.data, revision = excluded.revision, status = excluded.status, "
            "session_epoch = excluded.session_epoch, max_concurrent_tasks = excluded.max_concurrent_tasks",
            agent.agent_id,
            agent.name,
            agent.instance_id,
            agent.SerializeToString(),
            agent.revision,
            int(agent.status),
            agent.session.epoch,
            agent.max_concurrent_tasks,
        )
    except asyncpg.UniqueViolationError as exc:
        raise Collision(agent=agent) from exc


async def _upsert_task(conn: Connection, task: task_pb2.Task, scope: str) -> None:
    try:
        await conn.execute(
            "INSERT INTO tasks (task_id, status, type, agent_id, priority, idempotency_key, idempotency_scope, "
            "revision, data) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (task_id) DO UPDATE SET "
            "status = excluded.status, agent_id = excluded.agent_id, revision = excluded.revision, "
            "data = excluded.data",
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
    except asyncpg.UniqueViolationError as exc:
        raise Collision(task=task, scope=scope) from exc
