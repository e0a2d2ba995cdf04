"""The PostgreSQL schema, its migrations and the session settings of every connection.

Each entry of MIGRATIONS moves the schema from version i to i + 1 (the `schema_version` table);
never edit a released entry, append one. Every pending migration runs in one transaction that
first takes a transaction-scoped advisory lock, so processes opening the same database at once
migrate it exactly once (a second `CREATE TABLE IF NOT EXISTS` racing the first would otherwise
fail on the catalog's unique index).
"""

from __future__ import annotations

import logging
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger(__name__)

# A connection of its own or one lent by the pool: the store's statements run on either.
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

# pg_advisory_xact_lock key: "orch" in ASCII, any constant shared by every process works.
MIGRATION_LOCK = 0x6F726368

MIGRATIONS: tuple[str, ...] = (
    # The revision counter row (meta) is what orders writers: each write transaction locks it first
    # and takes its revisions from it, so revisions follow commit order (a sequence would not).
    # The columns next to each protobuf blob are what the commit conditions and the listings read.
    """
    CREATE TABLE agents (
        agent_id text PRIMARY KEY,
        name text NOT NULL,
        instance_id text NOT NULL,
        token_hash text NOT NULL DEFAULT '',
        data bytea NOT NULL,
        revision bigint NOT NULL,
        status integer NOT NULL,
        session_epoch bigint NOT NULL,
        max_concurrent_tasks integer NOT NULL,
        CONSTRAINT agents_name_instance UNIQUE (name, instance_id)
    );
    CREATE TABLE tasks (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        task_id text NOT NULL UNIQUE,
        status integer NOT NULL,
        type text NOT NULL,
        agent_id text NOT NULL DEFAULT '',
        priority integer NOT NULL DEFAULT 0,
        idempotency_key text,
        idempotency_scope text NOT NULL DEFAULT '',
        revision bigint NOT NULL,
        data bytea NOT NULL
    );
    CREATE UNIQUE INDEX tasks_idempotency ON tasks (idempotency_scope, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX tasks_active ON tasks (seq) WHERE status IN (1, 2, 3);
    CREATE INDEX tasks_placed ON tasks (agent_id) WHERE status IN (2, 3);
    CREATE INDEX tasks_by_status ON tasks (status, seq);
    CREATE INDEX tasks_by_type ON tasks (type, seq);
    CREATE INDEX tasks_by_agent ON tasks (agent_id, seq);
    CREATE TABLE events (
        revision bigint PRIMARY KEY,
        type integer NOT NULL,
        data bytea NOT NULL
    );
    CREATE TABLE meta (key text PRIMARY KEY, value bigint NOT NULL);
    INSERT INTO meta (key, value) VALUES ('revision', 0);
    CREATE TABLE leases (
        name text PRIMARY KEY,
        holder text NOT NULL,
        term bigint NOT NULL,
        expires_at double precision NOT NULL
    );
    """,
)


def session_settings(
    *, statement_timeout: float, lock_timeout: float, idle_in_transaction_timeout: float
) -> dict[str, str]:
    """Server settings of each connection (milliseconds). A statement or lock wait that runs past
    them fails (and the store answers Unavailable) instead of holding the writer forever; a
    connection left idle inside a transaction (a frozen process holding the counter row) is cut
    off by the server so the other processes' writers can go on."""
    return {
        "application_name": "orchestrator",
        "statement_timeout": str(int(statement_timeout * 1000)),
        "lock_timeout": str(int(lock_timeout * 1000)),
        "idle_in_transaction_session_timeout": str(int(idle_in_transaction_timeout * 1000)),
    }


async def migrate(conn: Connection) -> int:
    """Brings the schema up to date; returns its version."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        version = await conn.fetchval("SELECT version FROM schema_version")
        if version is None:
            version = 0
            await conn.execute("INSERT INTO schema_version (version) VALUES (0)")
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"database has schema version {version}, newer than this server ({len(MIGRATIONS)})"
            )
        for target, migration in enumerate(MIGRATIONS[version:], start=version + 1):
            await conn.execute(migration)
            await conn.execute("UPDATE schema_version SET version = $1", target)
            log.info("store migrated to schema version %d", target)
        return len(MIGRATIONS)
