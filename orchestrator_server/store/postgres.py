"""PostgreSQL store (15+): the same contract as the SQLite store, for a database that several
processes share over the network. Selected by `DATABASE_URL=postgresql://...`.

**Driver: asyncpg.** Measured on this machine (tests/store_contract/bench_pg_drivers.py, 2,000
concurrent single-task commits, each with a must-not-exist condition, fsync on): with group commit
(the shape used here) asyncpg made 2,529 commits/s against psycopg 3.3's 1,870 (p99 777 ms vs
1,020 ms with all 2,000 submitted at once); one transaction per commit over a 10-connection pool,
394 vs 347 commits/s. asyncpg is ~35 % faster where it matters, ships its own pool (psycopg needs
psycopg-pool besides), and hands a connection's server settings to every pooled connection.
The store itself (postgres_changes: conditions read once per batch, set-based writes) takes
5,000 concurrent conditional commits at 7.7k-11.5k commits/s, p99 0.34-0.53 s (all submitted at
once; a statement per condition and per row made ~2k/s), where the SQLite store makes ~6.2k/s.

**Writes.** Callers queue their changes; one writer task folds every change waiting at that moment
into one transaction, commits once and answers each caller (group commit: the counter row makes
writers take turns, so one transaction per commit would queue on its lock, ~6x slower above).
The transaction first locks the revision counter row (`meta`) `FOR UPDATE`: writers of every
process take turns there, so revisions are contiguous and follow commit order (a sequence hands
out numbers at INSERT but they become visible at COMMIT, so a reader following "revision > n" would
skip some). Holding the lock, the writer reads the events other processes committed since it last
delivered, then applies each change (conditions checked against rows it locked, inside this
transaction; postgres_changes). A failed condition writes nothing; a uniqueness collision aborts
the transaction, which then runs again with a savepoint per change, so only its caller fails. Every event up to the commit is handed
to `on_commit` before any caller of the batch is answered.

**Tailing other processes.** Each write batch ends with one `pg_notify` (delivered at commit); a
LISTEN connection wakes the writer task, which reads the events table (the truth) past what it
delivered. Notifications are only a hint: the writer also polls every `poll_interval`, and the
LISTEN connection reconnects after losing the server.

**Leases** live in a table with absolute expiry times in Unix seconds from the caller's wall clock,
as in the SQLite store: holders compare `expires_at` with their own clock, so the hosts sharing a
database must keep their clocks synchronised (NTP), as they must for any lease.

**Failures.** Every connection has `statement_timeout`, `lock_timeout` and
`idle_in_transaction_session_timeout`; a lost connection or a timeout fails the calls involved
with `Unavailable`, and the next call takes a new connection from the pool, so the store recovers
by itself once the server is back (a restarted PostgreSQL included).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg

from orchestrator.v1 import agent_pb2, event_pb2, task_pb2
from orchestrator_server.errors import Unavailable
from orchestrator_server.store import (
    Change,
    CommitListener,
    ConditionFailed,
    Lease,
    LoadedState,
    Store,
    TaskQuery,
)
from orchestrator_server.store.postgres_changes import Batch, Rows, explain_collision
from orchestrator_server.store.postgres_changes import write as write_rows
from orchestrator_server.store.postgres_schema import Connection, migrate, session_settings

__all__ = ["PostgresStore"]

log = logging.getLogger(__name__)
T = TypeVar("T")

ACTIVE_TASK_STATUSES = [
    task_pb2.TASK_STATUS_PENDING,
    task_pb2.TASK_STATUS_ASSIGNED,
    task_pb2.TASK_STATUS_RUNNING,
]
MAX_BATCH = 2000
COMPACT_EVERY = 500
CHANNEL = "orchestrator_events"
# What a lost or refused connection looks like, whichever step meets it: the store is unavailable.
UNAVAILABLE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


@dataclass
class _Write:
    change: Change
    future: asyncio.Future[int]


_WAKE = object()
_STOP = object()


class PostgresStore(Store):
    def __init__(
        self,
        url: str,
        *,
        event_retention: int = 100_000,
        pool_size: int = 10,
        poll_interval: float = 1.0,
        compact_every: int | None = None,
        connect_timeout: float = 5.0,
        statement_timeout: float = 30.0,
        lock_timeout: float = 10.0,
        # A frozen process holding the revision counter stalls every writer until this cuts it off.
        idle_in_transaction_timeout: float = 10.0,
    ) -> None:
        self._url = url
        self._event_retention = event_retention
        self._pool_size = pool_size
        self._poll_interval = poll_interval
        self._compact_every = compact_every or COMPACT_EVERY
        self._connect_timeout = connect_timeout
        self._settings = session_settings(
            statement_timeout=statement_timeout,
            lock_timeout=lock_timeout,
            idle_in_transaction_timeout=idle_in_transaction_timeout,
        )
        self._pool: asyncpg.Pool | None = None
        # Set once the writer has stopped; until then queued writes still go through (close flushes).
        self._pool_closing = False
        self._jobs: asyncio.Queue[object] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._on_commit: CommitListener | None = None
        # The last revision handed to on_commit (or loaded by open); only the writer task moves it.
        self._delivered = 0
        self._commits = 0
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self, on_commit: CommitListener) -> LoadedState:
        self._on_commit = on_commit
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._connect_timeout,
                command_timeout=None,
                server_settings=self._settings,
            )
            async with self._pool.acquire() as conn:
                await migrate(conn)
                loaded = await self._load(conn)
        except UNAVAILABLE_ERRORS as exc:
            await self._close_pool()
            raise Unavailable(f"store cannot open the database: {exc}") from exc
        self._writer = asyncio.create_task(self._write_loop(), name="orchestrator-store-writer")
        self._listener = asyncio.create_task(self._listen_loop(), name="orchestrator-store-listener")
        return loaded

    async def close(self) -> None:
        if self._closed or self._pool is None:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._writer is not None:
            self._jobs.put_nowait(_STOP)
            await self._writer
        await self._close_pool()

    async def _close_pool(self) -> None:
        if self._pool is None:
            return
        self._pool_closing = True
        try:
            await asyncio.wait_for(self._pool.close(), self._connect_timeout)
        except (TimeoutError, *UNAVAILABLE_ERRORS):
            self._pool.terminate()

    # -- writes ------------------------------------------------------------------------------

    async def commit(self, change: Change) -> int:
        if self._closed or self._writer is None:
            raise Unavailable("store is closed")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait(_Write(change, future))
        return await future

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        now = time.time()
        # One statement: a new name starts at term 1; the holder renews (same term); another holder
        # takes it only once it has expired (next term); otherwise no row comes back.
        row = await self._run(
            lambda conn: conn.fetchrow(
                "INSERT INTO leases AS l (name, holder, term, expires_at) VALUES ($1, $2, 1, $4) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at, "
                "term = CASE WHEN l.holder = excluded.holder THEN l.term ELSE l.term + 1 END "
                "WHERE l.holder = excluded.holder OR l.expires_at <= $3 RETURNING term, expires_at",
                name,
                holder,
                now,
                now + ttl,
            )
        )
        return None if row is None else Lease(name, holder, int(row["term"]), float(row["expires_at"]))

    async def release_lease(self, name: str, holder: str) -> None:
        # Expired rather than deleted: the term must keep growing for whoever takes it next.
        await self._run(
            lambda conn: conn.execute(
                "UPDATE leases SET expires_at = LEAST(expires_at, $3) WHERE name = $1 AND holder = $2",
                name,
                holder,
                time.time(),
            )
        )

    async def live_leases(self, prefix: str) -> list[Lease]:
        rows = await self._run(
            lambda conn: conn.fetch(
                "SELECT name, holder, term, expires_at FROM leases "
                "WHERE left(name, $1) = $2 AND expires_at > $3 ORDER BY name",
                len(prefix),
                prefix,
                time.time(),
            )
        )
        return [Lease(r["name"], r["holder"], int(r["term"]), float(r["expires_at"])) for r in rows]

    async def agent_token_hashes(self, agent_ids: Sequence[str]) -> dict[str, str]:
        rows = await self._run(
            lambda conn: conn.fetch(
                "SELECT agent_id, token_hash FROM agents WHERE agent_id = ANY($1::text[])", list(agent_ids)
            )
        )
        return {row["agent_id"]: row["token_hash"] for row in rows}

    # -- reads -------------------------------------------------------------------------------

    async def events_after(self, revision: int, limit: int) -> list[event_pb2.Event]:
        rows = await self._run(
            lambda conn: conn.fetch(
                "SELECT data FROM events WHERE revision > $1 ORDER BY revision LIMIT $2", revision, limit
            )
        )
        return [event_pb2.Event.FromString(row["data"]) for row in rows]

    async def oldest_revision(self) -> int:
        return await self._run(_oldest_revision)

    async def get_task(self, task_id: str) -> task_pb2.Task | None:
        data = await self._run(
            lambda conn: conn.fetchval("SELECT data FROM tasks WHERE task_id = $1", task_id)
        )
        return task_pb2.Task.FromString(data) if data is not None else None

    async def find_task_by_idempotency_key(self, key: str, scope: str = "") -> task_pb2.Task | None:
        data = await self._run(
            lambda conn: conn.fetchval(
                "SELECT data FROM tasks WHERE idempotency_scope = $1 AND idempotency_key = $2", scope, key
            )
        )
        return task_pb2.Task.FromString(data) if data is not None else None

    async def list_tasks(self, query: TaskQuery) -> tuple[list[task_pb2.Task], int | None]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("status", query.status), ("type", query.type), ("agent_id", query.agent_id)):
            if value:
                params.append(value)
                clauses.append(f"{column} = ${len(params)}")
        if query.after_sequence is not None:
            params.append(query.after_sequence)
            clauses.append(f"seq < ${len(params)}")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(query.page_size + 1)
        sql = f"SELECT seq, data FROM tasks {where} ORDER BY seq DESC LIMIT ${len(params)}"
        rows = await self._run(lambda conn: conn.fetch(sql, *params))
        tasks = [task_pb2.Task.FromString(row["data"]) for row in rows[: query.page_size]]
        more = len(rows) > query.page_size
        return tasks, (int(rows[query.page_size - 1]["seq"]) if more else None)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.fetchval("SELECT 1"))

    async def _run(self, run: Callable[[Connection], Awaitable[T]]) -> T:
        async with self._connection() as conn:
            return await run(conn)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """A pooled connection; any database or network failure becomes Unavailable (the pool
        replaces a broken connection on the next acquire)."""
        if self._pool is None or self._pool_closing:
            raise Unavailable("store is closed")
        try:
            async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                yield conn
        except UNAVAILABLE_ERRORS as exc:
            raise Unavailable(f"store unavailable: {type(exc).__name__}: {exc}") from exc

    # -- the writer task ---------------------------------------------------------------------

    async def _write_loop(self) -> None:
        stop = False
        while not stop:
            try:
                jobs = [await asyncio.wait_for(self._jobs.get(), self._poll_interval)]
            except TimeoutError:
                jobs = [_WAKE]
            while len(jobs) < MAX_BATCH and not self._jobs.empty():
                jobs.append(self._jobs.get_nowait())
            stop = _STOP in jobs
            writes = [job for job in jobs if isinstance(job, _Write)]
            try:
                if writes:
                    await self._write_batch(writes)
                elif not stop:
                    await self._poll()
            except Exception as exc:  # a defect: its callers fail, the writer goes on
                log.exception("store writer failed")
                for write in writes:
                    _settle(write.future, exc=Unavailable(f"store write failed: {exc}"))
        # Whatever was queued behind the stop is refused rather than left waiting.
        while not self._jobs.empty():
            job = self._jobs.get_nowait()
            if isinstance(job, _Write):
                _settle(job.future, exc=Unavailable("store is closed"))

    async def _poll(self) -> None:
        """Delivers what other processes committed since the last look, if anything."""
        try:
            async with self._connection() as conn:
                current = await conn.fetchval("SELECT value FROM meta WHERE key = 'revision'")
                if current > self._delivered:
                    self._deliver(await self._events_upto(conn, current))
        except Unavailable as exc:
            log.warning("store could not read other processes' commits (%s); retrying", exc)

    async def _write_batch(self, writes: list[_Write]) -> None:
        try:
            async with self._connection() as conn:
                try:
                    outcomes, delivered = await self._apply_batch(conn, writes, isolate=False)
                except _Redo:
                    outcomes, delivered = await self._apply_batch(conn, writes, isolate=True)
        except Unavailable as exc:
            # Whether a lost COMMIT landed is unknown here; the events table says, and the next
            # poll delivers whatever did.
            log.warning("store write failed: %s", exc)
            for write in writes:
                _settle(write.future, exc=exc)
            return
        self._deliver(delivered)
        for write, outcome in zip(writes, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                _settle(write.future, exc=outcome)
            else:
                _settle(write.future, result=outcome)
        self._commits += 1
        if self._commits % self._compact_every == 0:
            try:
                await self._run(
                    lambda conn: conn.execute(
                        "DELETE FROM events WHERE revision <= $1", self._delivered - self._event_retention
                    )
                )
            except Unavailable:
                log.warning("store compaction failed", exc_info=True)

    async def _apply_batch(
        self, conn: Connection, writes: list[_Write], *, isolate: bool
    ) -> tuple[list[int | BaseException], list[event_pb2.Event]]:
        """One transaction for the batch: each change's revision or error, and the events to deliver.

        A failed condition writes nothing, so the common case writes the whole batch's rows at the
        end (a savepoint per change would cost a round trip each); a collision, found only by
        writing, makes the batch roll back and run again with `isolate`: each change written under
        a savepoint of its own, to undo that change alone."""
        outcomes: list[int | BaseException] = []
        async with conn.transaction():
            revision = await conn.fetchval("SELECT value FROM meta WHERE key = 'revision' FOR UPDATE")
            # Other processes' commits first: they precede this batch in revision order.
            delivered = await self._events_upto(conn, revision)
            first_own = len(delivered)
            batch = Batch(revision)
            await batch.read(conn, [write.change for write in writes])
            everything = Rows()
            for write in writes:
                try:
                    events, rows = batch.stage(write.change)
                except (ConditionFailed, ValueError) as exc:  # nothing staged
                    outcomes.append(exc)
                    continue
                if isolate:
                    savepoint = conn.transaction()
                    await savepoint.start()
                    try:
                        await write_rows(conn, rows, events)
                    except asyncpg.UniqueViolationError as exc:
                        await savepoint.rollback()
                        outcomes.append(await explain_collision(conn, rows, exc))
                        continue
                    await savepoint.commit()
                else:
                    everything.add(rows)
                batch.accept(events, rows)
                delivered.extend(events)
                outcomes.append(batch.revision)
            if not isolate:
                try:
                    await write_rows(conn, everything, delivered[first_own:])
                except asyncpg.UniqueViolationError as exc:
                    raise _Redo from exc
            if len(delivered) > first_own:
                await conn.execute("UPDATE meta SET value = $1 WHERE key = 'revision'", batch.revision)
                # Delivered at commit, once per batch: NOTIFY serialises notifying commits.
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(batch.revision))
        return outcomes, delivered

    async def _events_upto(self, conn: Connection, upto: int) -> list[event_pb2.Event]:
        if upto <= self._delivered:
            return []
        rows = await conn.fetch(
            "SELECT revision, data FROM events WHERE revision > $1 AND revision <= $2 ORDER BY revision",
            self._delivered,
            upto,
        )
        if rows and rows[0]["revision"] != self._delivered + 1:
            # Another process compacted them before this one read them: its projections miss them.
            log.error(
                "store missed revisions %d..%d (compacted by another process); projections are stale",
                self._delivered + 1,
                rows[0]["revision"] - 1,
            )
        return [event_pb2.Event.FromString(row["data"]) for row in rows]

    def _deliver(self, events: list[event_pb2.Event]) -> None:
        """Hands events to the listener before any caller of the batch is answered."""
        if not events:
            return
        self._delivered = events[-1].revision
        assert self._on_commit is not None
        try:
            self._on_commit(events)
        except Exception:  # the listener's defect must not stop the writer
            log.exception("store commit listener failed")

    # -- waking on other processes' commits --------------------------------------------------

    async def _listen_loop(self) -> None:
        """Keeps a LISTEN connection; each notification past what was delivered wakes the writer."""

        def notified(_conn: Connection, _pid: int, _channel: str, payload: object) -> None:
            if int(str(payload)) > self._delivered:
                self._jobs.put_nowait(_WAKE)

        while True:
            lost = asyncio.Event()
            conn: Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self._url, timeout=self._connect_timeout, server_settings=self._settings
                )
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, notified)
                # Whatever was committed while nobody listened is read now.
                self._jobs.put_nowait(_WAKE)
                await lost.wait()
                log.warning("store lost its LISTEN connection; reconnecting")
            except UNAVAILABLE_ERRORS as exc:
                log.warning(
                    "store cannot LISTEN (%s); polling every %.1f s meanwhile", exc, self._poll_interval
                )
            finally:
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(self._poll_interval)

    async def _load(self, conn: Connection) -> LoadedState:
        started = time.perf_counter()
        # One snapshot: another process may commit meanwhile.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            agents, hashes = [], {}
            for row in await conn.fetch("SELECT data, token_hash FROM agents ORDER BY agent_id"):
                agent = agent_pb2.Agent.FromString(row["data"])
                agents.append(agent)
                hashes[agent.agent_id] = row["token_hash"]
            tasks = [
                (row["task_id"], row["status"], row["data"])
                for row in await conn.fetch(
                    "SELECT task_id, status, data FROM tasks WHERE status = ANY($1::integer[]) ORDER BY seq",
                    ACTIVE_TASK_STATUSES,
                )
            ]
            revision = int(await conn.fetchval("SELECT value FROM meta WHERE key = 'revision'"))
            oldest = await _oldest_revision(conn)
        self._delivered = revision
        log.info(
            "store loaded %d agents and %d active tasks at revision %d in %.3f s",
            len(agents),
            len(tasks),
            revision,
            time.perf_counter() - started,
        )
        return LoadedState(agents, hashes, tasks, revision, oldest)


async def _oldest_revision(conn: Connection) -> int:
    oldest = await conn.fetchval("SELECT min(revision) FROM events")
    if oldest is not None:
        return int(oldest)
    return int(await conn.fetchval("SELECT value FROM meta WHERE key = 'revision'")) + 1


def _settle(future: asyncio.Future[int], *, result: int = 0, exc: BaseException | None = None) -> None:
    if future.done():  # the caller was cancelled; the write still happened (or not)
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class _Redo(Exception):
    """A change collided after writing part of itself: the batch must run again, isolated."""
