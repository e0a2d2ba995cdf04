"""Revisions, delivery to the listener, uniqueness, the tail, compaction, full task records and
reopening: what the store guarantees about the log whoever writes it."""

from __future__ import annotations

import asyncio
import random

import pytest

from orchestrator.v1 import event_pb2, task_pb2
from orchestrator_server.errors import AlreadyExists
from orchestrator_server.store import Change, Expect, TaskQuery
from tests.store_contract.builders import RUNNING, Recorder, agent_event, task_event
from tests.store_contract.conftest import Backend, StoreFactory


async def test_revisions_are_contiguous_in_commit_order_under_concurrent_writers(
    store_factory: StoreFactory,
) -> None:
    store, recorder = store_factory(), Recorder()
    await store.open(recorder)
    chooser = random.Random(11)
    sizes = [chooser.randint(0, 3) for _ in range(300)]

    async def writer(index: int, size: int) -> tuple[int, list[int]]:
        await asyncio.sleep(0)  # interleave the writers
        change = Change(events=[task_event(f"t{index}-{n}") for n in range(size)])
        revision = await store.commit(change)
        # The listener saw this commit (and everything before it) before the answer came.
        assert recorder.last >= revision
        return revision, [event.revision for event in change.events]

    results = await asyncio.gather(*(writer(index, size) for index, size in enumerate(sizes)))
    stamped = sorted(revision for _, revisions in results for revision in revisions)
    assert stamped == list(range(1, sum(sizes) + 1))  # unique and contiguous
    for revision, revisions in results:
        assert revisions == list(range(revision - len(revisions) + 1, revision + 1))  # one block each
    assert recorder.revisions == stamped  # delivered in order, none skipped, none twice
    assert [event.revision for event in await store.events_after(0, 10_000)] == stamped


async def test_a_change_without_events_answers_the_current_revision(store_factory: StoreFactory) -> None:
    store = store_factory()
    await store.open(Recorder())
    assert await store.commit(Change(events=[agent_event("a1")])) == 1
    assert await store.commit(Change(agent_token_hashes={"a1": "hash"})) == 1


async def test_stamps_events_and_their_entities(store_factory: StoreFactory) -> None:
    store = store_factory()
    await store.open(Recorder())
    change = Change(events=[agent_event("a1"), task_event("t1")])
    assert await store.commit(change) == 2
    assert [event.revision for event in change.events] == [1, 2]
    assert change.events[0].agent.revision == 1 and change.events[1].task.revision == 2
    assert all(event.HasField("time") for event in change.events)
    await store.ping()


async def test_uniqueness_collisions_raise_already_exists_for_their_caller_only(
    store_factory: StoreFactory,
) -> None:
    store, recorder = store_factory(), Recorder()
    await store.open(recorder)
    await store.commit(
        Change(events=[agent_event("a1", name="cost", instance="i1"), task_event("t1", key="k")])
    )
    changes = [Change(events=[agent_event(f"ok{n}")]) for n in range(20)]
    changes[5] = Change(events=[agent_event("a2", name="cost", instance="i1")])
    changes[12] = Change(events=[task_event("t2", key="k")])
    results = await asyncio.gather(*(store.commit(change) for change in changes), return_exceptions=True)
    assert isinstance(results[5], AlreadyExists)
    assert "'cost'" in results[5].message and "'i1'" in results[5].message and "a1" in results[5].message
    assert isinstance(results[12], AlreadyExists)
    assert "'k'" in results[12].message and "t1" in results[12].message
    assert sorted(r for i, r in enumerate(results) if isinstance(r, int) and i not in (5, 12)) == list(
        range(3, 21)
    )
    assert recorder.revisions == list(range(1, 21))
    assert await store.get_task("t2") is None
    # Other scopes and other instances do not collide.
    await store.commit(Change(events=[task_event("t3", key="k")], idempotency_scopes={"t3": "principal-b"}))
    await store.commit(Change(events=[agent_event("a3", name="cost", instance="i2")]))
    found = await store.find_task_by_idempotency_key("k", scope="principal-b")
    assert found is not None and found.task_id == "t3"


async def test_task_records_are_stored_whole_while_events_stay_trimmed(store_factory: StoreFactory) -> None:
    store, recorder = store_factory(), Recorder()
    await store.open(recorder)
    full = task_event("t1", status=RUNNING, agent_id="a1").task
    full.spec.payload.update({"blob": "x" * 1000})
    for n in range(2, 6):
        full.attempts.add(attempt_id=f"t1-{n}", agent_id="a1")
    full.current_attempt_id = "t1-5"
    trimmed = task_pb2.Task(task_id="t1", status=RUNNING, current_attempt_id="t1-5")
    trimmed.attempts.add(attempt_id="t1-5", agent_id="a1")
    progress = event_pb2.Event(type=event_pb2.EVENT_TYPE_TASK_UPDATED, task=trimmed)
    started = event_pb2.Event(type=event_pb2.EVENT_TYPE_TASK_UPDATED, task=trimmed)
    revision = await store.commit(Change(events=[started, progress], task_records=[full]))
    assert full.revision == revision  # the record carries its last event's revision
    stored = await store.get_task("t1")
    assert stored == full and len(stored.attempts) == 5 and stored.spec.payload["blob"] == "x" * 1000
    (_, last) = await store.events_after(0, 10)
    assert last.task == progress.task and last.task.revision == revision
    assert len(last.task.attempts) == 1 and not last.task.spec.HasField("payload")
    assert recorder.events[-1].task == progress.task
    on_agent, _ = await store.list_tasks(TaskQuery(agent_id="a1"))
    assert [task.task_id for task in on_agent] == ["t1"]
    with pytest.raises(ValueError, match="t9"):
        await store.commit(Change(events=[task_event("t2")], task_records=[task_pb2.Task(task_id="t9")]))
    assert await store.get_task("t2") is None


async def test_events_after_is_the_tail_to_resume_from(store_factory: StoreFactory) -> None:
    store = store_factory()
    await store.open(Recorder())
    for n in range(30):
        await store.commit(Change(events=[agent_event(f"a{n}")]))
    pages = [[event.revision for event in await store.events_after(after, 10)] for after in (0, 10, 25, 30)]
    assert pages == [list(range(1, 11)), list(range(11, 21)), list(range(26, 31)), []]
    (event,) = await store.events_after(29, 10)
    assert event.agent.agent_id == "a29" and event.agent.revision == 30


async def test_compaction_keeps_the_retained_tail(store_factory: StoreFactory) -> None:
    store = store_factory(event_retention=20)
    loaded = await store.open(Recorder())
    assert (loaded.revision, loaded.oldest_revision) == (0, 1)
    assert await store.oldest_revision() == 1  # empty: the next revision
    for n in range(100):
        await store.commit(Change(events=[agent_event(f"a{n}")]))
    oldest = await store.oldest_revision()
    assert 1 < oldest <= 100 - 20 + 1
    kept = [event.revision for event in await store.events_after(0, 1000)]
    assert kept == list(range(oldest, 101))
    # Compaction drops events, never entities.
    assert await store.commit(Change(events=[agent_event("a0", capacity=1)], expect=[Expect("a0", 1)])) == 101


@pytest.mark.shared_database
async def test_reopening_keeps_revision_and_data(backend: Backend, store_factory: StoreFactory) -> None:
    first = store_factory()
    await first.open(Recorder())
    await first.commit(Change(events=[agent_event("a1", capacity=2)], agent_token_hashes={"a1": "h1"}))
    await first.commit(
        Change(events=[task_event("t1", key="k1"), task_event("t2", status=RUNNING, agent_id="a1")])
    )
    await first.close()
    second = store_factory()
    loaded = await second.open(Recorder())
    assert (loaded.revision, loaded.oldest_revision) == (3, 1)
    assert [agent.agent_id for agent in loaded.agents] == ["a1"] and loaded.agents[0].revision == 1
    assert loaded.agent_token_hashes == {"a1": "h1"}
    # Another process's credential is read by agent id (unknown ids are left out).
    assert await second.agent_token_hashes(["a1", "nobody"]) == {"a1": "h1"}
    revisions = {
        task_id: task_pb2.Task.FromString(record).revision for task_id, _, record in loaded.active_tasks
    }
    assert revisions == {"t1": 2, "t2": 3}
    # Conditions read the reopened rows; revisions continue.
    assert await second.commit(Change(events=[agent_event("a1")], expect=[Expect("a1", 1)])) == 4
    found = await second.find_task_by_idempotency_key("k1")
    assert found is not None and found.task_id == "t1"
