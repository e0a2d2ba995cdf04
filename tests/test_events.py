"""The event bus on a real store: replay from the log and from memory, live delivery, resyncs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from orchestrator.v1 import agent_pb2, event_pb2
from orchestrator_server import events
from orchestrator_server.events import CaughtUp, EventBus, ResyncNeeded
from orchestrator_server.store import Change
from orchestrator_server.store.sqlite import SqliteStore
from tests.conftest import async_wait_for


def agent_event(index: int) -> event_pb2.Event:
    agent = agent_pb2.Agent(agent_id=f"a{index % 3}", name=f"a{index % 3}", instance_id="1")
    agent.labels["n"] = str(index)
    return event_pb2.Event(type=event_pb2.EVENT_TYPE_AGENT_UPDATED, agent=agent)


class Wired:
    """A store whose commits feed a bus, as in the server."""

    def __init__(self, recent: int) -> None:
        self.store = SqliteStore(":memory:")
        self.bus = EventBus(self.store, 0, 1, recent=recent)
        self.heard: list[int] = []
        self.bus.add_listener(lambda event: self.heard.append(event.revision))

    async def open(self) -> None:
        def publish(committed: Sequence[event_pb2.Event]) -> None:
            self.bus.publish(committed)

        await self.store.open(publish)

    async def commit(self, count: int) -> None:
        for _ in range(count):
            await self.store.commit(Change(events=[agent_event(self.bus.revision + 1)]))


@pytest.fixture
async def wired() -> AsyncIterator[Wired]:
    result = Wired(recent=10)
    await result.open()
    yield result
    await result.store.close()


async def take(stream: AsyncIterator[Any], count: int) -> list[Any]:
    return [await asyncio.wait_for(stream.__anext__(), 10) for _ in range(count)]


def everything(event: event_pb2.Event) -> bool:
    return True


async def test_replay_reads_the_log_then_memory_then_goes_live(
    wired: Wired, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "REPLAY_PAGE", 7)  # several pages from the store
    await wired.commit(50)
    assert wired.heard == list(range(1, 51))
    assert wired.bus.committed_agents["a2"].labels["n"] == "50"

    stream = wired.bus.watch_marked(5, everything)
    replayed = await take(stream, 45)
    assert [event.revision for event in replayed] == list(range(6, 51))  # 6..40 from the log
    marker = await take(stream, 1)
    assert marker == [CaughtUp(50)]
    await wired.commit(1)
    (live,) = await take(stream, 1)
    assert live.revision == 51
    await stream.aclose()

    # A filter sees only its events, from the log and from memory alike.
    evens = wired.bus.watch(0, lambda event: event.revision % 2 == 0)
    assert [event.revision for event in await take(evens, 25)] == list(range(2, 52, 2))
    await evens.aclose()


async def test_resync_answers(wired: Wired, monkeypatch: pytest.MonkeyPatch) -> None:
    await wired.commit(3)
    with pytest.raises(ResyncNeeded, match="future"):
        await take(wired.bus.watch(4, everything), 1)
    # Compacted away: the log (pretend) starts at 5, memory holds 14..23.
    await wired.commit(20)
    monkeypatch.setattr(wired.store, "oldest_revision", _returns(5))
    with pytest.raises(ResyncNeeded, match="compacted") as raised:
        await take(wired.bus.watch(2, everything), 1)
    assert raised.value.oldest_revision == 5
    # Resuming from just before the oldest retained event is fine.
    resumed = await take(wired.bus.watch(4, everything), 19)
    assert [event.revision for event in resumed] == list(range(5, 24))


def _returns(value: int) -> Any:
    async def answer() -> int:
        return value

    return answer


async def test_a_watcher_that_falls_behind_is_told_to_resync(
    wired: Wired, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "SUBSCRIBER_BACKLOG", 5)
    stream = wired.bus.watch(0, everything)
    first = asyncio.ensure_future(stream.__anext__())
    await async_wait_for(lambda: wired.bus._subscribers, what="the watcher subscribed")
    await wired.commit(12)  # the watcher does not read meanwhile
    assert (await first).revision == 1
    with pytest.raises(ResyncNeeded, match="behind") as raised:
        await take(stream, 10)
    assert raised.value.oldest_revision >= 2
    # Its subscription is gone; others are unaffected.
    assert not wired.bus._subscribers


async def test_changes_racing_a_long_replay_ask_for_a_resync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "REPLAY_PAGE", 3)
    wired = Wired(recent=5)
    await wired.open()
    await wired.commit(20)  # memory holds 16..20; 1..15 only in the log
    stream = wired.bus.watch(2, everything)
    (first,) = await take(stream, 1)
    assert first.revision == 3
    await wired.commit(10)  # while replaying, memory moves on to 26..30
    with pytest.raises(ResyncNeeded, match="while replaying"):
        await take(stream, 30)
    await wired.store.close()


async def test_a_failing_listener_keeps_no_event_from_the_others(wired: Wired) -> None:
    def broken(event: event_pb2.Event) -> None:
        raise RuntimeError("a listener's bug")

    after_it: list[int] = []
    wired.bus.add_listener(broken)
    wired.bus.add_listener(lambda event: after_it.append(event.revision))
    await wired.commit(3)
    assert wired.heard == [1, 2, 3]
    assert after_it == [1, 2, 3]
