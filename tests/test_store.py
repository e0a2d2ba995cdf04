"""The SQLite store on its own: group commit, savepoints, failures, compaction, reopening, schema
and its migrations. What every backend must do is in tests/store_contract/."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.v1 import agent_pb2, task_pb2
from orchestrator_server.errors import AlreadyExists, Unavailable
from orchestrator_server.store import Change, ConditionFailed, Expect, PlacementClaim, TaskQuery, open_store
from orchestrator_server.store import sqlite as sqlite_store
from orchestrator_server.store.sqlite import MIGRATIONS, SqliteStore
from tests.conftest import async_wait_for
from tests.store_contract.builders import (
    ASSIGNED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    Recorder,
    agent_event,
    task_event,
)


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


async def test_failing_changes_are_undone_alone_inside_one_batch(store: SqliteStore) -> None:
    """A collision or a failed condition rolls back to its change's savepoint: its neighbours
    commit in the same transaction (one batch, no retry one by one) with no gap in revisions."""
    recorder = Recorder()
    await store.open(recorder)
    changes = [
        Change(events=[agent_event("before")]),
        Change(events=[task_event("t1", key="same-key")]),
        Change(events=[agent_event("between")]),
        Change(events=[task_event("t2", key="same-key")]),  # another task, same idempotency key
        Change(events=[agent_event("between", capacity=2)], expect=[Expect("between", 1)]),  # stale
        Change(events=[agent_event("after")]),
    ]
    async with Gate(store) as gate:
        commits = [asyncio.ensure_future(store.commit(change)) for change in changes]
        await gate.queued(len(changes))
    results = await asyncio.gather(*commits, return_exceptions=True)
    assert isinstance(results[3], AlreadyExists) and "same-key" in results[3].message
    assert isinstance(results[4], ConditionFailed) and results[4].actual == 3
    assert [results[index] for index in (0, 1, 2, 5)] == [1, 2, 3, 4]
    assert recorder.batches == [[1, 2, 3, 4]]
    found = await store.find_task_by_idempotency_key("same-key")
    assert found is not None and found.task_id == "t1"
    assert await store.get_task("t2") is None
    # The store carries on.
    assert await store.commit(Change(events=[agent_event("later")])) == 5


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
    assert {task_id: status for task_id, status, _ in loaded.active_tasks} == {"t1": RUNNING, "t2": PENDING}
    assert [task_pb2.Task.FromString(record).task_id for _, _, record in loaded.active_tasks] == ["t1", "t2"]
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


async def test_a_version_2_database_gets_the_condition_columns_from_its_records(db_path: str) -> None:
    with sqlite3.connect(db_path) as conn:
        conn.executescript(f"BEGIN; {MIGRATIONS[0]}; {MIGRATIONS[1]}; PRAGMA user_version = 2; COMMIT;")
        agent = agent_event("a1", epoch=4, capacity=1).agent
        agent.revision = 5
        conn.execute(
            "INSERT INTO agents (agent_id, name, instance_id, data) VALUES ('a1', 'a1', '1', ?)",
            (agent.SerializeToString(),),
        )
        task = task_event("t1", status=ASSIGNED, agent_id="a1").task
        task.revision = 6
        conn.execute(
            "INSERT INTO tasks (task_id, status, type, agent_id, data) VALUES ('t1', 2, 'job', 'a1', ?)",
            (task.SerializeToString(),),
        )
        conn.execute("UPDATE meta SET value = 6 WHERE key = 'revision'")
    store = SqliteStore(db_path, synchronous="NORMAL")
    assert (await store.open(Recorder())).revision == 6

    def place(task_id: str, epoch: int) -> Change:
        return Change(
            events=[task_event(task_id, status=ASSIGNED, agent_id="a1")],
            claims=[PlacementClaim(task_id, "a1", epoch)],
        )

    with pytest.raises(ConditionFailed, match="epoch is 4"):
        await store.commit(place("t2", 3))
    with pytest.raises(ConditionFailed, match="slot"):  # t1 holds the only slot
        await store.commit(place("t2", 4))
    with pytest.raises(ConditionFailed) as stale:
        await store.commit(Change(events=[task_event("t1", status=PENDING)], expect=[Expect("t1", 5)]))
    assert stale.value.actual == 6
    assert await store.commit(Change(events=[agent_event("a1", capacity=2)], expect=[Expect("a1", 5)])) == 7
    assert await store.commit(place("t2", 0)) == 8
    await store.close()
