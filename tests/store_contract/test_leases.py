"""Leases: named, absolute expiry, a term that grows with each new holder."""

from __future__ import annotations

import asyncio
import time

from orchestrator_server.store import Lease, Store
from tests.store_contract.builders import Recorder
from tests.store_contract.conftest import StoreFactory


async def acquire_within(store: Store, name: str, holder: str, ttl: float, within: float = 30.0) -> Lease:
    """Tries until the lease is free (an expiry is awaited by polling with a deadline)."""
    deadline = time.monotonic() + within
    while True:
        lease = await store.acquire_lease(name, holder, ttl)
        if lease is not None:
            return lease
        assert time.monotonic() < deadline, f"{holder} did not get {name} within {within} s"
        await asyncio.sleep(0.01)


async def test_take_renew_refuse_take_over_and_release(store_factory: StoreFactory) -> None:
    store = store_factory()
    await store.open(Recorder())
    before = time.time()
    first = await store.acquire_lease("scheduler", "p1", 30)
    assert first is not None and (first.name, first.holder, first.term) == ("scheduler", "p1", 1)
    assert before + 30 <= first.expires_at <= time.time() + 30  # absolute wall-clock time
    renewed = await store.acquire_lease("scheduler", "p1", 60)
    assert renewed is not None and renewed.term == 1 and renewed.expires_at > first.expires_at
    assert await store.acquire_lease("scheduler", "p2", 30) is None  # held
    assert await store.acquire_lease("other", "p2", 30) is not None  # names are independent

    # p1 stops renewing with a short ttl; p2 takes over once it has expired, with the next term.
    short = await store.acquire_lease("scheduler", "p1", 0.2)
    assert short is not None and short.term == 1
    taken = await acquire_within(store, "scheduler", "p2", 30)
    assert taken.term == 2 and taken.holder == "p2"
    assert time.time() >= short.expires_at
    assert await store.acquire_lease("scheduler", "p1", 30) is None

    await store.release_lease("scheduler", "p1")  # not the holder: nothing happens
    assert await store.acquire_lease("scheduler", "p1", 30) is None
    await store.release_lease("scheduler", "p2")
    again = await store.acquire_lease("scheduler", "p1", 30)
    assert again is not None and again.term == 3  # released at once, and the term still grows


async def test_live_leases_by_prefix(store_factory: StoreFactory) -> None:
    """What a replica lists to see its peers: unexpired leases under a prefix, by name."""
    store = store_factory()
    await store.open(Recorder())
    await store.acquire_lease("replica/b", "b", 30)
    await store.acquire_lease("replica/a", "a", 30)
    await store.acquire_lease("leader", "a", 30)
    short = await store.acquire_lease("replica/c", "c", 0.2)
    assert short is not None
    assert [lease.holder for lease in await store.live_leases("replica/")] == ["a", "b", "c"]
    deadline = time.monotonic() + 30
    while len(await store.live_leases("replica/")) == 3:
        assert time.monotonic() < deadline, "an expired lease is still listed"
        await asyncio.sleep(0.05)
    assert [lease.name for lease in await store.live_leases("replica/")] == ["replica/a", "replica/b"]
    await store.release_lease("replica/a", "a")
    assert [lease.holder for lease in await store.live_leases("replica/")] == ["b"]
    assert await store.live_leases("nothing/") == []
