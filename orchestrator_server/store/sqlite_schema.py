"""The SQLite schema and its migrations.

Each entry of MIGRATIONS moves the schema from version i to i + 1 (`PRAGMA user_version`); never
edit a released entry, append one. An entry is SQL, or a function for what SQL cannot do (reading
the protobuf blobs). Every pending migration runs in one IMMEDIATE transaction that first re-reads
the version, so processes opening the same file at once migrate it exactly once.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

from orchestrator.v1 import agent_pb2, task_pb2

log = logging.getLogger(__name__)

Migration = str | Callable[[sqlite3.Connection], None]


def _columns_from_blobs(conn: sqlite3.Connection) -> None:
    """Version 3 backfill: the columns the commit conditions read, from each stored record."""
    agents = conn.execute("SELECT agent_id, data FROM agents").fetchall()
    for agent_id, data in agents:
        agent = agent_pb2.Agent.FromString(data)
        conn.execute(
            "UPDATE agents SET revision = ?, status = ?, session_epoch = ?, max_concurrent_tasks = ? "
            "WHERE agent_id = ?",
            (agent.revision, agent.status, agent.session.epoch, agent.max_concurrent_tasks, agent_id),
        )
    tasks = conn.execute("SELECT task_id, data FROM tasks").fetchall()
    for task_id, data in tasks:
        conn.execute(
            "UPDATE tasks SET revision = ? WHERE task_id = ?",
            (task_pb2.Task.FromString(data).revision, task_id),
        )


MIGRATIONS: tuple[Migration, ...] = (
    """
    CREATE TABLE agents (
        agent_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        token_hash TEXT NOT NULL DEFAULT '',
        data BLOB NOT NULL,
        UNIQUE (name, instance_id)
    );
    CREATE TABLE tasks (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL UNIQUE,
        status INTEGER NOT NULL,
        type TEXT NOT NULL,
        agent_id TEXT NOT NULL DEFAULT '',
        priority INTEGER NOT NULL DEFAULT 0,
        idempotency_key TEXT,
        data BLOB NOT NULL
    );
    CREATE UNIQUE INDEX tasks_idempotency ON tasks (idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE INDEX tasks_queue ON tasks (priority DESC, seq) WHERE status = 1;
    CREATE INDEX tasks_active ON tasks (status) WHERE status IN (1, 2, 3);
    CREATE INDEX tasks_by_status ON tasks (status, seq);
    CREATE INDEX tasks_by_type ON tasks (type, seq);
    CREATE INDEX tasks_by_agent ON tasks (agent_id, seq);
    CREATE TABLE events (
        revision INTEGER PRIMARY KEY,
        type INTEGER NOT NULL,
        data BLOB NOT NULL
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('revision', 0);
    """,
    # Idempotency keys belong to the principal that created the task ('' for tasks created while
    # authentication was off, and for every task created before this version).
    """
    ALTER TABLE tasks ADD COLUMN idempotency_scope TEXT NOT NULL DEFAULT '';
    DROP INDEX tasks_idempotency;
    CREATE UNIQUE INDEX tasks_idempotency ON tasks (idempotency_scope, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    """,
    # Commit conditions: each entity's revision (Expect), and what a placement claim reads of an
    # agent (status, session epoch, capacity) plus the count of tasks placed on it (a partial index
    # over ASSIGNED and RUNNING). Leases fence work that must run once across processes.
    """
    ALTER TABLE agents ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN status INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN session_epoch INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN max_concurrent_tasks INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX tasks_placed ON tasks (agent_id) WHERE status IN (2, 3);
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        term INTEGER NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
    _columns_from_blobs,
)


def connect(path: str, synchronous: str) -> sqlite3.Connection:
    """Opens the database in WAL mode and brings its schema up to date."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    # Before anything that takes a lock: another process may be migrating the same file.
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    try:
        migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection, path: str) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"database {path} has schema version {version}, newer than this server ({len(MIGRATIONS)})"
            )
        for target, migration in enumerate(MIGRATIONS[version:], start=version + 1):
            if isinstance(migration, str):
                # Statement by statement: executescript would commit the transaction first.
                for statement in migration.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            else:
                migration(conn)
            conn.execute(f"PRAGMA user_version = {target}")
            log.info("store migrated to schema version %d", target)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
