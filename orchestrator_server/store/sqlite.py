"""SQLite store: WAL, one connection on one thread, group commit.

Durable and fast are compatible only with group commit (an fsync costs ~0.2 ms here): callers put
their changes on a queue; the store thread folds every change waiting at that moment into one
transaction, commits once, then answers each caller. Reads go through the same thread, between
write batches, so the event loop never touches the disk and `:memory:` databases work too.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from orchestrator.v1 import agent_pb2, event_pb2, task_pb2
from orchestrator_server.errors import Unavailable
from orchestrator_server.metrics import STORE_COMMIT_ERRORS
from orchestrator_server.store import Change, CommitListener, LoadedState, Store, TaskQuery

log = logging.getLogger(__name__)
T = TypeVar("T")

ACTIVE_TASK_STATUSES = (
    task_pb2.TASK_STATUS_PENDING,
    task_pb2.TASK_STATUS_ASSIGNED,
    task_pb2.TASK_STATUS_RUNNING,
)
# Writes folded into one transaction at most; bounds the latency of the first caller in a batch.
MAX_BATCH = 2000
# Compact the event log every this many commits.
COMPACT_EVERY = 500

# Each entry migrates the schema from version i to i + 1; never edit a released entry, append one.
MIGRATIONS: tuple[str, ...] = (
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
)


@dataclass
class _Write:
    change: Change
    future: asyncio.Future[int]


@dataclass
class _Read:
    run: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


_STOP = object()


class SqliteStore(Store):
    def __init__(self, path: str, *, synchronous: str = "FULL", event_retention: int = 100_000) -> None:
        self._path = path
        self._synchronous = synchronous
        self._event_retention = event_retention
        self._jobs: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_commit: CommitListener | None = None
        self._revision = 0
        self._commits = 0
        self._closed = False
        self._failure: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self, on_commit: CommitListener) -> LoadedState:
        self._loop = asyncio.get_running_loop()
        self._on_commit = on_commit
        opened: Future[sqlite3.Connection] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(opened,), name="orchestrator-store", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(opened)
        return await self._read(self._load)

    async def close(self) -> None:
        if self._closed or self._thread is None:
            return
        self._closed = True
        self._jobs.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    # -- writes ------------------------------------------------------------------------------

    async def commit(self, change: Change) -> int:
        if self._closed:
            raise Unavailable("store is closed")
        if self._failure is not None:
            STORE_COMMIT_ERRORS.inc()
            raise Unavailable(f"store failed: {self._failure}")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._jobs.put(_Write(change, future))
        return await future

    # -- reads -------------------------------------------------------------------------------

    async def events_after(self, revision: int, limit: int) -> list[event_pb2.Event]:
        def run(conn: sqlite3.Connection) -> list[event_pb2.Event]:
            rows = conn.execute(
                "SELECT data FROM events WHERE revision > ? ORDER BY revision LIMIT ?", (revision, limit)
            ).fetchall()
            return [event_pb2.Event.FromString(row[0]) for row in rows]

        return await self._read(run)

    async def oldest_revision(self) -> int:
        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT MIN(revision) FROM events").fetchone()
            return int(row[0]) if row[0] is not None else self._revision + 1

        return await self._read(run)

    async def get_task(self, task_id: str) -> task_pb2.Task | None:
        def run(conn: sqlite3.Connection) -> task_pb2.Task | None:
            row = conn.execute("SELECT data FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            return task_pb2.Task.FromString(row[0]) if row else None

        return await self._read(run)

    async def find_task_by_idempotency_key(self, key: str, scope: str = "") -> task_pb2.Task | None:
        def run(conn: sqlite3.Connection) -> task_pb2.Task | None:
            row = conn.execute(
                "SELECT data FROM tasks WHERE idempotency_scope = ? AND idempotency_key = ?", (scope, key)
            ).fetchone()
            return task_pb2.Task.FromString(row[0]) if row else None

        return await self._read(run)

    async def list_tasks(self, query: TaskQuery) -> tuple[list[task_pb2.Task], int | None]:
        def run(conn: sqlite3.Connection) -> tuple[list[task_pb2.Task], int | None]:
            clauses, params = [], []
            for column, value in (
                ("status", query.status),
                ("type", query.type),
                ("agent_id", query.agent_id),
            ):
                if value:
                    clauses.append(f"{column} = ?")
                    params.append(value)
            if query.after_sequence is not None:
                clauses.append("seq < ?")
                params.append(query.after_sequence)
            where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
            rows = conn.execute(
                f"SELECT seq, data FROM tasks {where} ORDER BY seq DESC LIMIT ?",
                (*params, query.page_size + 1),
            ).fetchall()
            tasks = [task_pb2.Task.FromString(data) for _, data in rows[: query.page_size]]
            more = len(rows) > query.page_size
            return tasks, (int(rows[query.page_size - 1][0]) if more else None)

        return await self._read(run)

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def _read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise Unavailable("store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put(_Read(run, future))
        return await future

    # -- the store thread --------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=True)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"database {self._path} has schema version {version}, newer than this server ({len(MIGRATIONS)})"
            )
        for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {target}; COMMIT;")
            log.info("store migrated to schema version %d", target)
        self._revision = int(conn.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0])
        return conn

    def _run(self, opened: Future[sqlite3.Connection]) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:  # reported to open(), which raises it in the loop
            opened.set_exception(exc)
            return
        opened.set_result(conn)
        try:
            while True:
                jobs = [self._jobs.get()]
                while len(jobs) < MAX_BATCH:
                    try:
                        jobs.append(self._jobs.get_nowait())
                    except queue.Empty:
                        break
                stop = any(job is _STOP for job in jobs)
                self._write_batch(conn, [job for job in jobs if isinstance(job, _Write)])
                for job in jobs:
                    if isinstance(job, _Read):
                        self._answer_read(conn, job)
                if stop:
                    break
        finally:
            conn.close()

    def _answer_read(self, conn: sqlite3.Connection, job: _Read) -> None:
        try:
            result = job.run(conn)
        except Exception as exc:  # handed to the awaiting caller
            self._resolve(job.future, exc=exc)
        else:
            self._resolve(job.future, result=result)

    def _write_batch(self, conn: sqlite3.Connection, writes: list[_Write]) -> None:
        if not writes:
            return
        try:
            committed = self._apply(conn, writes)
        except sqlite3.IntegrityError:
            # One bad change must not fail its neighbours: retry them one transaction each.
            for write in writes:
                try:
                    self._publish([write], self._apply(conn, [write]))
                except sqlite3.Error as exc:
                    self._resolve(write.future, exc=exc)
            return
        except sqlite3.Error as exc:
            log.exception("store write failed")
            STORE_COMMIT_ERRORS.inc(len(writes))
            self._failure = exc
            for write in writes:
                self._resolve(write.future, exc=Unavailable(f"store write failed: {exc}"))
            return
        self._publish(writes, committed)
        self._commits += 1
        if self._commits % COMPACT_EVERY == 0:
            self._compact(conn)

    def _apply(self, conn: sqlite3.Connection, writes: list[_Write]) -> list[event_pb2.Event]:
        revision = self._revision
        committed: list[event_pb2.Event] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for write in writes:
                for event in write.change.events:
                    revision += 1
                    self._stamp(event, revision)
                    self._upsert_entity(conn, event, write.change.idempotency_scopes)
                    conn.execute(
                        "INSERT INTO events (revision, type, data) VALUES (?, ?, ?)",
                        (revision, event.type, event.SerializeToString()),
                    )
                    committed.append(event)
                for agent_id, token_hash in write.change.agent_token_hashes.items():
                    conn.execute(
                        "UPDATE agents SET token_hash = ? WHERE agent_id = ?", (token_hash, agent_id)
                    )
            conn.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (revision,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._revision = revision
        return committed

    @staticmethod
    def _stamp(event: event_pb2.Event, revision: int) -> None:
        event.revision = revision
        if event.HasField("agent"):
            event.agent.revision = revision
        if event.HasField("task"):
            event.task.revision = revision
        if not event.HasField("time"):
            event.time.GetCurrentTime()

    @staticmethod
    def _upsert_entity(conn: sqlite3.Connection, event: event_pb2.Event, scopes: dict[str, str]) -> None:
        if event.HasField("agent"):
            agent = event.agent
            conn.execute(
                "INSERT INTO agents (agent_id, name, instance_id, data) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (agent_id) DO UPDATE SET data = excluded.data",
                (agent.agent_id, agent.name, agent.instance_id, agent.SerializeToString()),
            )
        if event.HasField("task"):
            task = event.task
            last_agent = task.attempts[-1].agent_id if task.attempts else ""
            conn.execute(
                "INSERT INTO tasks (task_id, status, type, agent_id, priority, idempotency_key, "
                "idempotency_scope, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (task_id) DO UPDATE SET "
                "status = excluded.status, agent_id = excluded.agent_id, data = excluded.data",
                (
                    task.task_id,
                    task.status,
                    task.spec.type,
                    last_agent,
                    task.spec.priority,
                    task.spec.idempotency_key or None,
                    scopes.get(task.task_id, ""),
                    task.SerializeToString(),
                ),
            )

    def _compact(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM events WHERE revision <= ?", (self._revision - self._event_retention,))

    def _publish(self, writes: Sequence[_Write], committed: list[event_pb2.Event]) -> None:
        """Hands committed events to the listener, then answers callers, all in revision order."""
        loop = self._loop
        assert loop is not None
        if committed and self._on_commit is not None:
            loop.call_soon_threadsafe(self._on_commit, committed)
        for write in writes:
            last = write.change.events[-1].revision if write.change.events else self._revision
            self._resolve(write.future, result=last)

    def _resolve(
        self, future: asyncio.Future[Any], *, result: Any = None, exc: BaseException | None = None
    ) -> None:
        def settle() -> None:
            if future.done():  # the caller was cancelled; the write still happened
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(settle)

    def _load(self, conn: sqlite3.Connection) -> LoadedState:
        started = time.perf_counter()
        agents, hashes = [], {}
        for data, token_hash in conn.execute("SELECT data, token_hash FROM agents ORDER BY agent_id"):
            agent = agent_pb2.Agent.FromString(data)
            agents.append(agent)
            hashes[agent.agent_id] = token_hash
        placeholders = ",".join("?" * len(ACTIVE_TASK_STATUSES))
        tasks = [
            task_pb2.Task.FromString(row[0])
            for row in conn.execute(
                f"SELECT data FROM tasks WHERE status IN ({placeholders}) ORDER BY seq", ACTIVE_TASK_STATUSES
            )
        ]
        row = conn.execute("SELECT MIN(revision) FROM events").fetchone()
        oldest = int(row[0]) if row[0] is not None else self._revision + 1
        log.info(
            "store loaded %d agents and %d active tasks at revision %d in %.3f s",
            len(agents),
            len(tasks),
            self._revision,
            time.perf_counter() - started,
        )
        return LoadedState(agents, hashes, tasks, self._revision, oldest)
