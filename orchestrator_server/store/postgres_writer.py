"""The PostgreSQL store's writer: group commit, and delivery of every process's commits in order.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import asyncpg

from orchestrator.v1 import event_pb2
from orchestrator_server.errors import Unavailable
from orchestrator_server.store import Change, CommitListener, ConditionFailed
from orchestrator_server.store.postgres_changes import Batch, Rows, explain_collision
from orchestrator_server.store.postgres_changes import write as write_rows
from orchestrator_server.store.postgres_schema import Connection

log = logging.getLogger(__name__)

MAX_BATCH = 2000
CHANNEL = "orchestrator_events"
# What a lost or refused connection looks like, whichever step meets it: the store is unavailable.
UNAVAILABLE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


@dataclass
class _Write:
    change: Change
    future: asyncio.Future[int]


_WAKE = object()
_STOP = object()


class ChangeWriter:
    """One task writes every queued change (a batch a transaction) and hands every event, this
    process's or another's, to the listener in revision order; another keeps a LISTEN connection
    that wakes it when another process commits."""

    def __init__(
        self,
        *,
        connection: Callable[[], AbstractAsyncContextManager[Connection]],
        listen_connection: Callable[[], Awaitable[Connection]],
        poll_interval: float,
        compact_every: int,
        event_retention: int,
    ) -> None:
        self._connection = connection
        self._listen_connection = listen_connection
        self._poll_interval = poll_interval
        self._compact_every = compact_every
        self._event_retention = event_retention
        self._jobs: asyncio.Queue[object] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._on_commit: CommitListener | None = None
        # The last revision handed to on_commit (or loaded by open); only the writer task moves it.
        self._delivered = 0
        self._commits = 0

    @property
    def started(self) -> bool:
        return self._writer is not None

    def start(self, on_commit: CommitListener, delivered: int) -> None:
        """Starts writing and tailing, past the revision the store loaded."""
        self._on_commit = on_commit
        self._delivered = delivered
        self._writer = asyncio.create_task(self._write_loop(), name="orchestrator-store-writer")
        self._listener = asyncio.create_task(self._listen_loop(), name="orchestrator-store-listener")

    async def submit(self, change: Change) -> int:
        """Queues the change for the next batch; its revision once committed."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait(_Write(change, future))
        return await future

    async def stop(self) -> None:
        """Stops listening, then writes what is queued and stops the writer."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._writer is not None:
            self._jobs.put_nowait(_STOP)
            await self._writer

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
                async with self._connection() as conn:
                    await conn.execute(
                        "DELETE FROM events WHERE revision <= $1", self._delivered - self._event_retention
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
                conn = await self._listen_connection()
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


def _settle(future: asyncio.Future[int], *, result: int = 0, exc: BaseException | None = None) -> None:
    if future.done():  # the caller was cancelled; the write still happened (or not)
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class _Redo(Exception):
    """A change collided after writing part of itself: the batch must run again, isolated."""
