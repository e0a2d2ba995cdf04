"""SQLite store: WAL, one connection on one thread, group commit, shared by any number of processes.

Durable and fast are compatible only with group commit (an fsync costs ~0.2 ms here): callers put
their changes on a queue; the store thread folds every change waiting at that moment into one
transaction, commits once, then answers each caller. Each change runs inside a SAVEPOINT, so a
change whose condition fails (or that collides with a unique key) is undone alone and its
neighbours commit. Reads go through the same thread, between write batches, so the event loop
never touches the disk and `:memory:` databases work too.

Several processes may open the same file. `BEGIN IMMEDIATE` serializes their writers; each write
transaction takes its revisions from the database and first delivers the events other processes
committed since this one last looked, so `on_commit` sees every revision, in order. While idle the
thread polls `PRAGMA data_version` (it changes when another connection commits) to deliver them
without waiting for a write of its own.
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
from orchestrator_server.errors import AlreadyExists, Unavailable
from orchestrator_server.metrics import STORE_COMMIT_ERRORS
from orchestrator_server.store import (
    Change,
    CommitListener,
    ConditionFailed,
    Lease,
    LoadedState,
    Store,
    TaskQuery,
)
from orchestrator_server.store.sqlite_changes import apply_change
from orchestrator_server.store.sqlite_schema import MIGRATIONS, connect

__all__ = ["MIGRATIONS", "SqliteStore"]

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
    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        event_retention: int = 100_000,
        poll_interval: float = 0.025,
        compact_every: int | None = None,
    ) -> None:
        self._path = path
        self._synchronous = synchronous
        self._event_retention = event_retention
        # How long the idle store thread waits for a job before it looks for other processes'
        # commits; a private in-memory database has no other writers to wait for.
        self._poll_interval = None if path == ":memory:" else poll_interval
        self._compact_every = compact_every
        self._jobs: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_commit: CommitListener | None = None
        # The last revision handed to on_commit (or loaded by open); the store thread owns it.
        self._delivered = 0
        self._data_version = 0
        # Other processes' commits are delivered only once open() has handed out the loaded state.
        self._tailing = False
        self._commits = 0
        self._closed = False
        self._failure: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self, on_commit: CommitListener) -> LoadedState:
        self._loop = asyncio.get_running_loop()
        self._on_commit = on_commit
        opened: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(opened,), name="orchestrator-store", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(opened)
        loaded = await self._read(self._load)
        self._tailing = True
        return loaded

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

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        def run(conn: sqlite3.Connection) -> Lease | None:
            now = time.time()
            with _immediate(conn):
                row = conn.execute(
                    "SELECT holder, term, expires_at FROM leases WHERE name = ?", (name,)
                ).fetchone()
                if row is None:
                    term = 1
                else:
                    current, term, expires_at = row
                    if current != holder:
                        if expires_at > now:
                            return None
                        term += 1
                lease = Lease(name, holder, int(term), now + ttl)
                conn.execute(
                    "INSERT INTO leases (name, holder, term, expires_at) VALUES (?, ?, ?, ?) ON CONFLICT (name) "
                    "DO UPDATE SET holder = excluded.holder, term = excluded.term, expires_at = excluded.expires_at",
                    (name, holder, lease.term, lease.expires_at),
                )
            return lease

        return await self._read(run)

    async def release_lease(self, name: str, holder: str) -> None:
        def run(conn: sqlite3.Connection) -> None:
            # Expired rather than deleted: the term must keep growing for whoever takes it next.
            conn.execute(
                "UPDATE leases SET expires_at = MIN(expires_at, ?) WHERE name = ? AND holder = ?",
                (time.time(), name, holder),
            )

        await self._read(run)

    async def live_leases(self, prefix: str) -> list[Lease]:
        def run(conn: sqlite3.Connection) -> list[Lease]:
            rows = conn.execute(
                "SELECT name, holder, term, expires_at FROM leases WHERE substr(name, 1, ?) = ? "
                "AND expires_at > ? ORDER BY name",
                (len(prefix), prefix, time.time()),
            ).fetchall()
            return [Lease(name, holder, int(term), float(expires)) for name, holder, term, expires in rows]

        return await self._read(run)

    async def agent_token_hashes(self, agent_ids: Sequence[str]) -> dict[str, str]:
        def run(conn: sqlite3.Connection) -> dict[str, str]:
            found: dict[str, str] = {}
            ids = list(agent_ids)
            for start in range(0, len(ids), 500):  # SQLite bounds the parameters of one statement
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT agent_id, token_hash FROM agents WHERE agent_id IN ({marks})"
                found.update(conn.execute(query, chunk).fetchall())
            return found

        return await self._read(run)

    # -- reads -------------------------------------------------------------------------------

    async def events_after(self, revision: int, limit: int) -> list[event_pb2.Event]:
        def run(conn: sqlite3.Connection) -> list[event_pb2.Event]:
            rows = conn.execute(
                "SELECT data FROM events WHERE revision > ? ORDER BY revision LIMIT ?", (revision, limit)
            ).fetchall()
            return [event_pb2.Event.FromString(row[0]) for row in rows]

        return await self._read(run)

    async def oldest_revision(self) -> int:
        return await self._read(_oldest_revision)

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
        # A store whose writes failed for good answers reads but cannot serve: not ready.
        if self._failure is not None:
            raise Unavailable(f"store failed: {self._failure}")
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def _read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise Unavailable("store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put(_Read(run, future))
        return await future

    # -- the store thread --------------------------------------------------------------------

    def _run(self, opened: Future[None]) -> None:
        try:
            conn = connect(self._path, self._synchronous)
        except BaseException as exc:  # reported to open(), which raises it in the loop
            opened.set_exception(exc)
            return
        opened.set_result(None)
        try:
            while True:
                try:
                    jobs = [self._jobs.get(timeout=self._poll_interval)]
                except queue.Empty:
                    self._poll(conn)
                    continue
                while len(jobs) < MAX_BATCH:
                    try:
                        jobs.append(self._jobs.get_nowait())
                    except queue.Empty:
                        break
                stop = any(job is _STOP for job in jobs)
                writes = [job for job in jobs if isinstance(job, _Write)]
                if writes:
                    self._write_batch(conn, writes)
                else:
                    self._poll(conn)
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

    def _poll(self, conn: sqlite3.Connection) -> None:
        """Delivers what other processes committed since the last look, if anything."""
        if not self._tailing or self._failure is not None:
            return
        try:
            # Read before the events: a commit landing in between changes it again for next time.
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return
            self._data_version = version
            self._deliver(self._events_since_delivered(conn, None))
        except sqlite3.Error:
            log.warning("store could not read other processes' commits; retrying", exc_info=True)

    def _events_since_delivered(self, conn: sqlite3.Connection, upto: int | None) -> list[event_pb2.Event]:
        if upto is not None and upto <= self._delivered:
            return []
        rows = conn.execute(
            "SELECT revision, data FROM events WHERE revision > ? AND revision <= ? ORDER BY revision",
            (self._delivered, upto if upto is not None else 2**62),
        ).fetchall()
        if rows and rows[0][0] != self._delivered + 1:
            # Another process compacted them before this one read them: its projections miss them.
            log.error(
                "store missed revisions %d..%d (compacted by another process); projections are stale",
                self._delivered + 1,
                rows[0][0] - 1,
            )
        return [event_pb2.Event.FromString(data) for _, data in rows]

    def _write_batch(self, conn: sqlite3.Connection, writes: list[_Write]) -> None:
        try:
            try:
                outcomes, delivered = self._apply_batch(conn, writes, isolate=False)
            except _Redo:
                outcomes, delivered = self._apply_batch(conn, writes, isolate=True)
        except sqlite3.Error as exc:
            STORE_COMMIT_ERRORS.inc(len(writes))
            busy = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
            if not busy:  # another process holding the write lock too long is transient
                log.exception("store write failed")
                self._failure = exc
            for write in writes:
                self._resolve(write.future, exc=Unavailable(f"store write failed: {exc}"))
            return
        self._deliver(delivered)
        for write, outcome in zip(writes, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                self._resolve(write.future, exc=outcome)
            else:
                self._resolve(write.future, result=outcome)
        self._commits += 1
        if self._commits % (self._compact_every or COMPACT_EVERY) == 0:
            try:
                conn.execute(
                    "DELETE FROM events WHERE revision <= ?", (self._delivered - self._event_retention,)
                )
            except sqlite3.Error:  # e.g. another process held the lock too long; next time then
                log.warning("store compaction failed", exc_info=True)

    def _apply_batch(
        self, conn: sqlite3.Connection, writes: list[_Write], *, isolate: bool
    ) -> tuple[list[int | BaseException], list[event_pb2.Event]]:
        """One transaction for the batch: each change's revision or error, and the events to deliver.

        A failed condition writes nothing, so the common case needs no savepoint (they cost about
        a third of the throughput); a collision, found only by writing, makes the batch roll back
        and run again with `isolate`: a savepoint per change, to undo that change alone."""
        outcomes: list[int | BaseException] = []
        with _immediate(conn):
            (revision,) = conn.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
            # Other processes' commits first: they precede this batch in revision order.
            delivered = self._events_since_delivered(conn, revision)
            first_own = len(delivered)
            for write in writes:
                if isolate:
                    conn.execute("SAVEPOINT change")
                try:
                    events = apply_change(conn, write.change, revision)
                except (ConditionFailed, ValueError) as exc:  # raised before writing
                    outcomes.append(exc)
                except AlreadyExists as exc:
                    if not isolate:
                        raise _Redo from exc
                    conn.execute("ROLLBACK TO change")
                    outcomes.append(exc)
                else:
                    revision += len(events)
                    delivered.extend(events)
                    outcomes.append(revision)
                if isolate:
                    conn.execute("RELEASE change")
            if len(delivered) > first_own:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (revision,))
        return outcomes, delivered

    def _deliver(self, events: list[event_pb2.Event]) -> None:
        """Hands events to the listener; scheduled before any answer that follows, so a caller
        resumes after its projections have seen its commit and everything before it."""
        if not events:
            return
        self._delivered = events[-1].revision
        assert self._loop is not None and self._on_commit is not None
        self._loop.call_soon_threadsafe(self._on_commit, events)

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
        # Read before the snapshot: a commit after it makes the first poll look again.
        self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]
        conn.execute("BEGIN")  # one snapshot: another process may commit meanwhile
        try:
            agents, hashes = [], {}
            for data, token_hash in conn.execute("SELECT data, token_hash FROM agents ORDER BY agent_id"):
                agent = agent_pb2.Agent.FromString(data)
                agents.append(agent)
                hashes[agent.agent_id] = token_hash
            placeholders = ",".join("?" * len(ACTIVE_TASK_STATUSES))
            tasks = conn.execute(
                f"SELECT task_id, status, data FROM tasks WHERE status IN ({placeholders}) ORDER BY seq",
                ACTIVE_TASK_STATUSES,
            ).fetchall()
            revision = _current_revision(conn)
            oldest = _oldest_revision(conn)
        finally:
            conn.execute("COMMIT")
        self._delivered = revision
        log.info(
            "store loaded %d agents and %d active tasks at revision %d in %.3f s",
            len(agents),
            len(tasks),
            revision,
            time.perf_counter() - started,
        )
        return LoadedState(agents, hashes, tasks, revision, oldest)


def _current_revision(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0])


def _oldest_revision(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT MIN(revision) FROM events").fetchone()
    return int(row[0]) if row[0] is not None else _current_revision(conn) + 1


class _Redo(Exception):
    """A change collided after writing part of itself: the batch must run again, isolated."""


class _immediate:
    """A write transaction: `BEGIN IMMEDIATE` takes the database's write lock at once, which is what
    orders writers across processes (waiting up to the busy timeout)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self._conn.execute("COMMIT")
        elif self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
