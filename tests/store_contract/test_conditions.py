"""Conditional commits: Expect and PlacementClaim, checked inside the commit; a failing change
writes nothing and fails only its own caller."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator_server.store import Change, ConditionFailed, Expect, PlacementClaim, Store
from tests.store_contract.builders import (
    ASSIGNED,
    DEREGISTERED,
    RUNNING,
    SUCCEEDED,
    Recorder,
    agent_event,
    task_event,
)
from tests.store_contract.conftest import StoreFactory


async def opened(store_factory: StoreFactory) -> tuple[Store, Recorder]:
    store, recorder = store_factory(), Recorder()
    await store.open(recorder)
    return store, recorder


async def test_expect_the_read_revision_commits_and_a_stale_one_fails(store_factory: StoreFactory) -> None:
    store, recorder = await opened(store_factory)
    created = await store.commit(Change(events=[agent_event("a1")], expect=[Expect("a1", 0)]))
    updated = await store.commit(
        Change(events=[agent_event("a1", capacity=3)], expect=[Expect("a1", created)])
    )
    assert updated == created + 1
    stale = Change(events=[agent_event("a1", capacity=9)], expect=[Expect("a1", created)])
    with pytest.raises(ConditionFailed) as failed:
        await store.commit(stale)
    assert (failed.value.entity_id, failed.value.expected, failed.value.actual) == ("a1", created, updated)
    assert "changed" in failed.value.reason
    # Nothing was written: no event, no revision used, the stored agent is the updated one.
    assert [event.revision for event in await store.events_after(0, 10)] == [created, updated]
    assert recorder.revisions == [created, updated]
    assert await store.commit(Change(events=[agent_event("a2")])) == updated + 1


async def test_expect_on_tasks_and_must_not_exist(store_factory: StoreFactory) -> None:
    store, _ = await opened(store_factory)
    created = await store.commit(Change(events=[task_event("t1")], expect=[Expect("t1", 0)]))
    with pytest.raises(ConditionFailed) as exists:
        await store.commit(Change(events=[task_event("t1")], expect=[Expect("t1", 0)]))
    assert (exists.value.entity_id, exists.value.expected, exists.value.actual) == ("t1", 0, created)
    assert "exists" in exists.value.reason
    with pytest.raises(ConditionFailed) as missing:
        await store.commit(Change(events=[task_event("t2", status=RUNNING)], expect=[Expect("t2", 7)]))
    assert (missing.value.entity_id, missing.value.expected, missing.value.actual) == ("t2", 7, 0)
    assert await store.get_task("t2") is None
    # Every condition of a change must hold, whichever entity it names.
    with pytest.raises(ConditionFailed):
        await store.commit(
            Change(events=[task_event("t1", status=RUNNING)], expect=[Expect("t1", created), Expect("a9", 1)])
        )
    stored = await store.get_task("t1")
    assert stored is not None and stored.revision == created and stored.status != RUNNING


async def test_placement_claims(store_factory: StoreFactory) -> None:
    store, _ = await opened(store_factory)
    await store.commit(
        Change(events=[agent_event("a1", epoch=3, capacity=2), agent_event("gone", capacity=5)])
    )

    def place(task_id: str, epoch: int = 3, agent_id: str = "a1") -> Change:
        return Change(
            events=[task_event(task_id, status=ASSIGNED, agent_id=agent_id)],
            claims=[PlacementClaim(task_id, agent_id, epoch)],
        )

    with pytest.raises(ConditionFailed) as old_epoch:
        await store.commit(place("t1", epoch=2))
    assert (old_epoch.value.entity_id, old_epoch.value.expected, old_epoch.value.actual) == ("a1", 2, 3)
    assert await store.get_task("t1") is None
    await store.commit(place("t1"))
    await store.commit(place("t2", epoch=0))  # 0: the epoch is not checked
    with pytest.raises(ConditionFailed) as full:
        await store.commit(place("t3"))
    assert (full.value.entity_id, full.value.expected, full.value.actual) == ("a1", 2, 2)
    assert "slot" in full.value.reason
    # A task already on the agent does not count against its own claim (e.g. ASSIGNED -> RUNNING).
    await store.commit(
        Change(
            events=[task_event("t1", status=RUNNING, agent_id="a1")], claims=[PlacementClaim("t1", "a1", 3)]
        )
    )
    # A finished task frees its slot.
    await store.commit(Change(events=[task_event("t2", status=SUCCEEDED, agent_id="a1")]))
    await store.commit(place("t3"))
    with pytest.raises(ConditionFailed):
        await store.commit(place("t4"))

    await store.commit(Change(events=[agent_event("gone", status=DEREGISTERED, capacity=5)]))
    with pytest.raises(ConditionFailed, match="deregistered"):
        await store.commit(place("t5", epoch=0, agent_id="gone"))
    with pytest.raises(ConditionFailed, match="does not exist"):
        await store.commit(place("t5", epoch=0, agent_id="nobody"))


async def test_claims_in_one_change_each_need_a_slot(store_factory: StoreFactory) -> None:
    store, _ = await opened(store_factory)
    await store.commit(Change(events=[agent_event("a1", capacity=1)]))
    both = Change(
        events=[task_event(f"t{n}", status=ASSIGNED, agent_id="a1") for n in (1, 2)],
        claims=[PlacementClaim(f"t{n}", "a1") for n in (1, 2)],
    )
    with pytest.raises(ConditionFailed, match="slot"):
        await store.commit(both)
    assert await store.get_task("t1") is None


async def test_a_failing_change_does_not_fail_its_neighbours(store_factory: StoreFactory) -> None:
    store, recorder = await opened(store_factory)
    base = await store.commit(Change(events=[agent_event("a1")]))
    changes = [Change(events=[task_event(f"t{n}")], expect=[Expect(f"t{n}", 0)]) for n in range(60)]
    changes[30] = Change(events=[agent_event("a1", capacity=1)], expect=[Expect("a1", base + 1000)])
    results = await asyncio.gather(*(store.commit(change) for change in changes), return_exceptions=True)
    assert isinstance(results[30], ConditionFailed)
    good = [result for result in results if isinstance(result, int)]
    assert sorted(good) == list(range(base + 1, base + 60))  # contiguous: no revision for the failure
    assert recorder.revisions == list(range(1, base + 60))
    assert all(await asyncio.gather(*(store.get_task(f"t{n}") for n in range(60) if n != 30)))


async def test_delivery_before_the_answer_also_for_a_failure(store_factory: StoreFactory) -> None:
    """Whoever resumes after commit (or after ConditionFailed) finds the listener already fed up to
    the conflicting commit, so it can decide again at once."""
    store, recorder = await opened(store_factory)
    created = await store.commit(Change(events=[agent_event("a1")]))
    assert recorder.last == created
    outcomes: list[str] = []

    async def update(capacity: int) -> None:
        change = Change(events=[agent_event("a1", capacity=capacity)], expect=[Expect("a1", created)])
        try:
            revision = await store.commit(change)
        except ConditionFailed as failed:
            assert recorder.last >= failed.actual > created
            assert any(event.revision == failed.actual for event in recorder.events)
            outcomes.append("failed")
        else:
            assert recorder.last >= revision
            outcomes.append("won")

    await asyncio.gather(*(update(n) for n in range(1, 11)))
    assert sorted(outcomes) == ["failed"] * 9 + ["won"]
