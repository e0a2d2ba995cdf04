"""The SQLite store on its own: revisions, group commit, failures, compaction, reopening, schema."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from orchestrator.v1 import agent_pb2, event_pb2, task_pb2
from orchestrator_server.errors import Unavailable
from orchestrator_server.store import Change, TaskQuery, open_store
from orchestrator_server.store import sqlite as sqlite_store
from orchestrator_server.store.sqlite import MIGRATIONS, SqliteStore
from tests.conftest import async_wait_for

PENDING = task_pb2.TASK_STATUS_PENDING
RUNNING = task_pb2.TASK_STATUS_RUNNING
SUCCEEDED = task_pb2.TASK_STATUS_SUCCEEDED


def agent_event(
    agent_id: str, status: int = agent_pb2.AGENT_STATUS_READY, **fields: object
) -> event_pb2.Event:
    agent = agent_pb2.Agent(agent_id=agent_id, name=agent_id, instance_id="1", status=status, **fields)  # type: ignore[arg-type]
    return event_pb2.Event(type=event_pb2.EVENT_TYPE_AGENT_REGISTERED, agent=agent)


def task_event(
    task_id: str, status: int = PENDING, key: str = "", type: str = "job", agent_id: str = ""
) -> event_pb2.Event:
    task = task_pb2.Task(
        task_id=task_id, status=status, spec=task_pb2.TaskSpec(type=type, idempotency_key=key)
    )  # type: ignore[arg-type]
    if agent_id:
        task.attempts.add(attempt_id=f"{task_id}-1", agent_id=agent_id)
    return event_pb2.Event(type=event_pb2.EVENT_TYPE_TASK_CREATED, task=task)


class Recorder:
    """The on_commit listener: remembers each batch of committed events."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __call__(self, events: Sequence[event_pb2.Event]) -> None:
        self.batches.append([event.revision for event in events])

    @property
    def revisions(self) -> list[int]:
        return [revision for batch in self.batches for revision in batch]


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "store.db")


@pytest.fixture
async def store(db_path: str) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(db_path, synchronous="NORMAL")
    yield opened
    await opened.close()


class Gate:
    """Holds the store thread inside a read so that writes queue up behind it, then releases it:
    everything queued meanwhile is folded into one batch."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self._release = threading.Event()
        self._entered = threading.Event()

    async def __aenter__(self) -> Gate:
        def hold(conn: sqlite3.Connection) -> None:
            self._entered.set()
            self._release.wait(10)

        self._read = asyncio.ensure_future(self._store._read(hold))
        await asyncio.to_thread(self._entered.wait, 10)
        return self

    async def queued(self, count: int) -> None:
        await async_wait_for(lambda: self._store._jobs.qsize() >= count, what=f"{count} queued writes")

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        await self._read


async def test_commits_get_consecutive_revisions_and_the_listener_sees_them_first(store: SqliteStore) -> None:
    recorder = Recorder()
    loaded = await store.open(recorder)
    assert (loaded.revision, loaded.oldest_revision, loaded.agents, loaded.active_tasks) == (0, 1, [], [])

    change = Change(events=[agent_event("a1"), task_event("t1")])
    assert await store.commit(change) == 2
    # The events are stamped, and the listener heard of them before the caller was answered.
    assert [event.revision for event in change.events] == [1, 2]
    assert change.events[0].agent.revision == 1 and change.events[1].task.revision == 2
    assert change.events[0].HasField("time")
    assert recorder.revisions == [1, 2]
    assert await store.commit(Change(events=[agent_event("a2")])) == 3
    assert recorder.revisions == [1, 2, 3]
    # A change without events commits (credentials) and answers the current revision.
    assert await store.commit(Change(agent_token_hashes={"a1": "hash"})) == 3
    assert [event.revision for event in await store.events_after(0, 10)] == [1, 2, 3]
    assert await store.oldest_revision() == 1
    await store.ping()


async def test_concurrent_commits_are_grouped_and_all_land(store: SqliteStore) -> None:
    recorder = Recorder()
    await store.open(recorder)
    async with Gate(store) as gate:
        commits = [
            asyncio.ensure_future(store.commit(Change(events=[agent_event(f"a{n}")]))) for n in range(200)
        ]
        await gate.queued(200)
    revisions = await asyncio.gather(*commits)
    assert sorted(revisions) == list(range(1, 201))
    assert revisions == list(range(1, 201))  # queue order is commit order
    assert recorder.batches == [list(range(1, 201))]  # one transaction for all of them
    # And without holding the thread: still every one, unique and contiguous.
    more = await asyncio.gather(*(store.commit(Change(events=[task_event(f"t{n}")])) for n in range(200)))
    assert sorted(more) == list(range(201, 401))
    assert recorder.revisions == list(range(1, 401))


async def test_an_integrity_error_fails_only_its_own_caller(store: SqliteStore) -> None:
    recorder = Recorder()
    await store.open(recorder)
    changes = [
        Change(events=[agent_event("before")]),
        Change(events=[task_event("t1", key="same-key")]),
        Change(events=[agent_event("between")]),
        Change(events=[task_event("t2", key="same-key")]),  # another task, same idempotency key
        Change(events=[agent_event("after")]),
    ]
    async with Gate(store) as gate:
        commits = [asyncio.ensure_future(store.commit(change)) for change in changes]
        await gate.queued(len(changes))
    results = await asyncio.gather(*commits, return_exceptions=True)
    assert isinstance(results[3], sqlite3.IntegrityError)
    assert [results[index] for index in (0, 1, 2, 4)] == [1, 2, 3, 4]  # no gap where t2 failed
    assert recorder.revisions == [1, 2, 3, 4]
    found = await store.find_task_by_idempotency_key("same-key")
    assert found is not None and found.task_id == "t1"
    assert await store.get_task("t2") is None
    # The store carries on.
    assert await store.commit(Change(events=[agent_event("later")])) == 5


async def test_events_after_pages(store: SqliteStore) -> None:
    await store.open(Recorder())
    for n in range(30):
        await store.commit(Change(events=[agent_event(f"a{n}")]))
    pages = [[event.revision for event in await store.events_after(after, 10)] for after in (0, 10, 25, 30)]
    assert pages == [list(range(1, 11)), list(range(11, 21)), list(range(26, 31)), []]
    (event,) = await store.events_after(29, 10)
    assert event.agent.agent_id == "a29" and event.agent.revision == 30


async def test_compaction_keeps_the_retained_events(db_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "COMPACT_EVERY", 50)
    store = SqliteStore(db_path, synchronous="NORMAL", event_retention=20)
    await store.open(Recorder())
    for n in range(49):
        await store.commit(Change(events=[agent_event(f"a{n}")]))
    assert await store.oldest_revision() == 1  # not yet
    await store.commit(Change(events=[agent_event("a49")]))  # the 50th commit compacts
    kept = await store.events_after(0, 1000)
    assert [event.revision for event in kept] == list(range(31, 51))
    assert await store.oldest_revision() == 31
    await store.close()
    # Reopened, the log still starts there and the agents are all intact.
    reopened = SqliteStore(db_path)
    loaded = await reopened.open(Recorder())
    assert (loaded.revision, loaded.oldest_revision, len(loaded.agents)) == (50, 31, 50)
    await reopened.close()


async def test_reopening_restores_agents_tasks_and_revision(db_path: str) -> None:
    first = SqliteStore(db_path)
    await first.open(Recorder())
    labelled = agent_event("a1", labels={"zone": "a"})
    await first.commit(Change(events=[labelled], agent_token_hashes={"a1": "h1"}))
    await first.commit(Change(events=[agent_event("a2", status=agent_pb2.AGENT_STATUS_DOWN)]))
    await first.commit(Change(events=[task_event("t1", key="k1"), task_event("t2", type="other")]))
    await first.commit(Change(events=[task_event("t3", status=SUCCEEDED, agent_id="a1")]))
    # A later change of t1 replaces its row.
    await first.commit(Change(events=[task_event("t1", status=RUNNING, key="k1", agent_id="a2")]))
    await first.close()
    with pytest.raises(Unavailable):
        await first.commit(Change(events=[agent_event("late")]))
    with pytest.raises(Unavailable):
        await first.events_after(0, 1)

    second = SqliteStore(db_path)
    loaded = await second.open(Recorder())
    assert loaded.revision == 6 and loaded.oldest_revision == 1
    agents = {agent.agent_id: agent for agent in loaded.agents}
    assert set(agents) == {"a1", "a2"}
    assert dict(agents["a1"].labels) == {"zone": "a"} and agents["a1"].revision == 1
    assert agents["a2"].status == agent_pb2.AGENT_STATUS_DOWN
    assert loaded.agent_token_hashes == {"a1": "h1", "a2": ""}
    # Only unfinished tasks are loaded; finished ones stay readable.
    assert {task.task_id: task.status for task in loaded.active_tasks} == {"t1": RUNNING, "t2": PENDING}
    finished = await second.get_task("t3")
    assert finished is not None and finished.status == SUCCEEDED and finished.revision == 5
    # The next commit continues the revision sequence.
    assert await second.commit(Change(events=[agent_event("a3")])) == 7

    newest_first, position = await second.list_tasks(TaskQuery(page_size=2))
    assert [task.task_id for task in newest_first] == ["t3", "t2"] and position is not None
    rest, end = await second.list_tasks(TaskQuery(page_size=2, after_sequence=position))
    assert [task.task_id for task in rest] == ["t1"] and end is None
    by_status, _ = await second.list_tasks(TaskQuery(status=RUNNING))
    by_type, _ = await second.list_tasks(TaskQuery(type="other"))
    by_agent, _ = await second.list_tasks(TaskQuery(agent_id="a1"))
    assert [[task.task_id for task in page] for page in (by_status, by_type, by_agent)] == [
        ["t1"],
        ["t2"],
        ["t3"],
    ]
    await second.close()


async def test_schema_version_is_recorded_and_a_newer_one_refused(db_path: str) -> None:
    store = open_store(db_path)
    await store.open(Recorder())
    await store.close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    newer = SqliteStore(db_path)
    with pytest.raises(RuntimeError, match="newer"):
        await newer.open(Recorder())
    await newer.close()


async def test_memory_database(monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(":memory:", synchronous="OFF")
    recorder = Recorder()
    loaded = await store.open(recorder)
    assert loaded.revision == 0
    assert await store.commit(Change(events=[agent_event("a1"), task_event("t1", key="k")])) == 2
    assert recorder.revisions == [1, 2]
    task = await store.find_task_by_idempotency_key("k")
    assert task is not None and task.task_id == "t1"
    await store.close()
    await store.close()  # closing twice is harmless


async def test_a_failed_write_makes_the_store_unavailable(store: SqliteStore, db_path: str) -> None:
    await store.open(Recorder())
    await store.commit(Change(events=[agent_event("a1")]))
    # Someone breaks the database under the store's feet.
    with sqlite3.connect(db_path) as conn:
        conn.execute("DROP TABLE events")
    with pytest.raises(Unavailable, match="store write failed"):
        await store.commit(Change(events=[agent_event("a2")]))
    with pytest.raises(Unavailable, match="store failed"):
        await store.commit(Change(events=[agent_event("a3")]))
    with pytest.raises(sqlite3.OperationalError):
        await store.oldest_revision()  # reads report their own errors to their caller


async def test_a_cancelled_caller_does_not_undo_its_write(store: SqliteStore) -> None:
    recorder = Recorder()
    await store.open(recorder)
    async with Gate(store) as gate:
        abandoned = asyncio.ensure_future(store.commit(Change(events=[agent_event("a1")])))
        await gate.queued(1)
        abandoned.cancel()
    assert await store.commit(Change(events=[agent_event("a2")])) == 2
    assert recorder.revisions == [1, 2]
    assert abandoned.cancelled()
