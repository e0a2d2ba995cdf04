"""Two store instances in two processes on one database (a SQLite file, a PostgreSQL database): the
log, the conditions and the leases hold across them (the peer is `python -m
tests.store_contract.peer`)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator_server.store import Change, ConditionFailed, Expect, PlacementClaim, Store, TaskQuery
from tests.store_contract.builders import ASSIGNED, Recorder, agent_event, task_event
from tests.store_contract.conftest import Backend, StoreFactory
from tests.store_contract.peer import encode_change

pytestmark = pytest.mark.shared_database

REPLY_TIMEOUT = 60.0
# The peer runs as `python -m tests.store_contract.peer` from the repository root.
ROOT = Path(__file__).resolve().parents[2]


class Peer:
    """The other process: sends one request, awaits its one-line answer (with a deadline)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, database: str) -> Peer:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.store_contract.peer",
            database,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        peer = cls(process)
        assert await peer._answer() == "ready"
        return peer

    async def _answer(self) -> Any:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), REPLY_TIMEOUT)
        assert line, f"peer exited with {await self.process.wait()}"
        return json.loads(line)

    async def request(self, op: str, **fields: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
        await self.process.stdin.drain()
        return await self._answer()

    async def commit(self, *changes: Change) -> list[dict[str, Any]]:
        answers: list[dict[str, Any]] = await self.request(
            "commit", changes=[encode_change(change) for change in changes]
        )
        return answers

    async def stop(self) -> None:
        if self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.write(b'{"op": "quit"}\n')
            try:
                await asyncio.wait_for(self.process.wait(), REPLY_TIMEOUT)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@pytest.fixture
async def two(backend: Backend, store_factory: StoreFactory) -> AsyncIterator[tuple[Store, Recorder, Peer]]:
    """This process's store (opened first: it migrates the file) and a peer process on the same file."""
    store, recorder = store_factory(), Recorder()
    await store.open(recorder)
    peer = await Peer.start(backend.location)
    yield store, recorder, peer
    await peer.stop()


async def test_interleaved_commits_of_both_reach_both_listeners_in_order(
    two: tuple[Store, Recorder, Peer],
) -> None:
    store, recorder, peer = two
    for round_number in range(5):
        ours = [Change(events=[agent_event(f"here-{round_number}-{n}")]) for n in range(20)]
        theirs = [Change(events=[task_event(f"there-{round_number}-{n}")]) for n in range(20)]
        mine, answers = await asyncio.gather(
            asyncio.gather(*(store.commit(c) for c in ours)), peer.commit(*theirs)
        )
        # Each side answered only after its listener had caught up to its own commit.
        assert all(answer["seen"] >= answer["revision"] for answer in answers)
        assert recorder.last >= max(mine)
    # The peer's commits reach this listener while this store is idle too (it polls).
    await peer.commit(*(Change(events=[agent_event(f"idle-{n}")]) for n in range(10)))
    total = 5 * 40 + 10
    await recorder.reached(total)
    assert recorder.revisions == list(range(1, total + 1))
    assert [event.revision for event in await store.events_after(0, 1000)] == recorder.revisions
    for _ in range(3000):  # the peer's listener: every revision, in order (bounded wait)
        seen = await peer.request("seen")
        if len(seen) >= total:
            break
        await asyncio.sleep(0.01)
    assert seen == list(range(1, total + 1))
    # Both stores take the next revision from the database.
    assert await store.commit(Change(events=[agent_event("next")])) == total + 1
    (answer,) = await peer.commit(Change(events=[agent_event("after")]))
    assert answer["revision"] == total + 2


async def test_a_stale_expect_fails_across_processes(two: tuple[Store, Recorder, Peer]) -> None:
    store, recorder, peer = two
    created = await store.commit(Change(events=[agent_event("a1")]))
    (answer,) = await peer.commit(
        Change(events=[agent_event("a1", capacity=2)], expect=[Expect("a1", created)])
    )
    updated = answer["revision"]
    with pytest.raises(ConditionFailed) as failed:
        await store.commit(Change(events=[agent_event("a1", capacity=5)], expect=[Expect("a1", created)]))
    assert (failed.value.expected, failed.value.actual) == (created, updated)
    # Delivery before the answer holds for the other process's commit too.
    assert recorder.last >= updated
    assert recorder.events[updated - 1].agent.max_concurrent_tasks == 2
    (stale,) = await peer.commit(Change(events=[agent_event("a1")], expect=[Expect("a1", 0)]))
    assert "exists" in stale["failed"]


async def test_racing_claims_for_the_last_slot_exactly_one_wins(two: tuple[Store, Recorder, Peer]) -> None:
    store, _, peer = two
    for round_number in range(20):
        agent_id = f"agent-{round_number}"
        await store.commit(Change(events=[agent_event(agent_id, epoch=1, capacity=2)]))
        await store.commit(
            Change(
                events=[task_event(f"held-{round_number}", status=ASSIGNED, agent_id=agent_id)],
                claims=[PlacementClaim(f"held-{round_number}", agent_id, 1)],
            )
        )

        def place(task_id: str, agent_id: str = agent_id) -> Change:
            return Change(
                events=[task_event(task_id, status=ASSIGNED, agent_id=agent_id)],
                claims=[PlacementClaim(task_id, agent_id, 1)],
            )

        ours, (theirs,) = await asyncio.gather(
            store.commit(place(f"here-{round_number}")),
            peer.commit(place(f"there-{round_number}")),
            return_exceptions=True,
        )
        winners = [not isinstance(ours, ConditionFailed), "revision" in theirs]
        assert winners.count(True) == 1, (ours, theirs)
        if "failed" in theirs:
            assert "slot" in theirs["failed"]
        placed, _ = await store.list_tasks(TaskQuery(agent_id=agent_id, status=ASSIGNED))
        assert len(placed) == 2


async def test_lease_contention_across_processes(two: tuple[Store, Recorder, Peer]) -> None:
    store, _, peer = two
    for round_number in range(20):
        name = f"lease-{round_number}"
        ours, theirs = await asyncio.gather(
            store.acquire_lease(name, "here", 30), peer.request("acquire", name=name, holder="there", ttl=30)
        )
        assert (ours is None) != (theirs is None), (ours, theirs)
        if ours is not None:
            await store.release_lease(name, "here")
            taken = await peer.request("acquire", name=name, holder="there", ttl=30)
            assert taken == {"holder": "there", "term": 2}
        else:
            assert await store.acquire_lease(name, "here", 30) is None
            await peer.request("release", name=name, holder="there")
            lease = await store.acquire_lease(name, "here", 30)
            assert lease is not None and lease.term == 2


async def test_processes_opening_a_new_database_at_once_both_work(backend: Backend) -> None:
    """Whoever migrates a new database first, the other finds it migrated (no 'table already exists')."""
    for attempt in range(5):
        fresh = await backend.sibling(f".{attempt}")
        store, recorder = fresh.make(), Recorder()
        try:
            _, peer = await asyncio.gather(store.open(recorder), Peer.start(fresh.location))
        except BaseException:
            await store.close()
            raise
        try:
            (answer,) = await peer.commit(Change(events=[agent_event("there")]))
            assert answer["revision"] == 1
            assert await store.commit(Change(events=[agent_event("here")])) == 2
        finally:
            await peer.stop()
            await store.close()
