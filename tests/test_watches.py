"""The domain watches (orchestrator_server/watches.py) and the latest-status health watch.

The first tests drive the watches over a real store and bus, without gRPC; the last one drives
WatchAgentHealth on a real server through a client that stops reading while an agent flaps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from orchestrator.v1 import agent_pb2, event_pb2, health_pb2, health_pb2_grpc, registry_pb2
from orchestrator_server import events
from orchestrator_server.events import EventBus, ResyncNeeded, _Latest
from orchestrator_server.store import Change
from orchestrator_server.watches import CaughtUp, Changed, Resync, Snapshot, watch_agent_health
from tests.conftest import Running, async_wait_for
from tests.support import DRAINING, READY, read_message
from tests.test_events import Wired

STATUS_CHANGED = event_pb2.EVENT_TYPE_AGENT_STATUS_CHANGED
DEGRADED = agent_pb2.AGENT_STATUS_DEGRADED


def transition(
    agent_id: str, status: int, previous: int, event_type: int = STATUS_CHANGED
) -> event_pb2.Event:
    agent = agent_pb2.Agent(agent_id=agent_id, name=agent_id, instance_id="1", type="worker", status=status)  # type: ignore[arg-type]
    return event_pb2.Event(type=event_type, agent=agent, previous_status=previous)  # type: ignore[arg-type]


@pytest.fixture
async def wired() -> AsyncIterator[Wired]:
    result = Wired(recent=events.RECENT_EVENTS)
    await result.open()
    yield result
    await result.store.close()


async def take(stream: AsyncIterator[Any], count: int) -> list[Any]:
    return [await asyncio.wait_for(stream.__anext__(), 10) for _ in range(count)]


def latest_buffers(bus: EventBus) -> list[int]:
    """How many events wait for each latest-status watcher (private on purpose: no API needs it)."""
    return [
        len(subscriber.buffer) for subscriber in bus._subscribers if isinstance(subscriber.buffer, _Latest)
    ]


async def test_the_domain_watch_yields_snapshot_changes_caught_up_and_resync(wired: Wired) -> None:
    registered = event_pb2.EVENT_TYPE_AGENT_REGISTERED
    await wired.store.commit(Change(events=[transition("a1", READY, 0, registered)]))
    await wired.store.commit(Change(events=[transition("a2", READY, 0, registered)]))

    # From 0: the state now, then each change.
    fresh = watch_agent_health(wired.bus, "", 0)
    (snapshot,) = await take(fresh, 1)
    assert isinstance(snapshot, Snapshot) and snapshot.revision == 2 and not snapshot.after_resync
    assert [agent.agent_id for agent in snapshot.entries] == ["a1", "a2"]
    pending = asyncio.ensure_future(fresh.__anext__())
    await async_wait_for(lambda: wired.bus._subscribers, what="the watcher subscribed")
    await wired.store.commit(Change(events=[transition("a1", DRAINING, READY)]))
    changed = await asyncio.wait_for(pending, 10)
    assert isinstance(changed, Changed) and changed.event.revision == 3
    assert changed.event.agent.status == DRAINING and changed.event.previous_status == READY
    await fresh.aclose()
    assert not wired.bus._subscribers  # closing the watch ends its subscription at once

    # From a revision: what was missed, then CaughtUp at the revision it looked up to.
    resumed = watch_agent_health(wired.bus, "", 1)
    *missed, caught_up = await take(resumed, 3)
    assert [(item.event.revision, item.event.agent.agent_id) for item in missed] == [(2, "a2"), (3, "a1")]
    assert caught_up == CaughtUp(3)
    await resumed.aclose()

    # From a revision that does not exist yet: a Resync naming the oldest revision and why, then
    # a snapshot marked as following it.
    future = watch_agent_health(wired.bus, "", 99)
    resync, again = await take(future, 2)
    assert resync == Resync(revision=3, oldest_revision=1, reason="revision 99 is in the future")
    assert isinstance(again, Snapshot) and again.after_resync and again.revision == 3
    await future.aclose()


async def test_a_health_watcher_that_does_not_read_while_agents_flap_50_000_times_ends_on_their_latest_status(
    wired: Wired,
) -> None:
    """50,000 transitions (5x the old per-watcher backlog) reach a watcher that does not read: it
    holds at most one per agent, is never told to resync, and ends on every agent's last status."""
    agents = [f"a{n}" for n in range(10)]
    await wired.store.commit(
        Change(
            events=[
                transition(agent_id, READY, 0, event_pb2.EVENT_TYPE_AGENT_REGISTERED) for agent_id in agents
            ]
        )
    )
    watch = watch_agent_health(wired.bus, "", 0)
    (snapshot,) = await take(watch, 1)
    assert isinstance(snapshot, Snapshot) and len(snapshot.entries) == len(agents)
    first = asyncio.ensure_future(watch.__anext__())  # subscribes, then waits for a change
    await async_wait_for(lambda: wired.bus._subscribers, what="the watcher subscribed")
    # A watcher of every event, as discovery's: the same flood overflows its backlog.
    every_event = wired.bus.watch(wired.bus.revision, lambda event: True)
    every_first = asyncio.ensure_future(every_event.__anext__())
    await async_wait_for(lambda: len(wired.bus._subscribers) == 2, what="the second watcher subscribed")

    status = {agent_id: READY for agent_id in agents}
    flaps, batch = 50_000, 1_000
    largest = 0
    for start in range(0, flaps, batch):
        changes = []
        for n in range(start, start + batch):
            agent_id = agents[n % len(agents)]
            new = DEGRADED if status[agent_id] == READY else READY
            changes.append(transition(agent_id, new, status[agent_id]))
            status[agent_id] = new
        await wired.store.commit(Change(events=changes))
        largest = max(largest, latest_buffers(wired.bus)[0] if first.done() else 0)
    assert first.done()  # it took one change and then stopped reading
    assert flaps > events.SUBSCRIBER_BACKLOG
    assert largest <= len(agents)  # bounded by agents, not by events
    final_revision = wired.bus.revision

    # Now it reads: at most one change per agent, in revision order, ending on each agent's latest.
    received = [first.result()]
    while received[-1].event.revision < final_revision:
        (item,) = await take(watch, 1)
        assert isinstance(item, Changed), item
        received.append(item)
    assert len(received) <= 1 + len(agents)
    revisions = [item.event.revision for item in received]
    assert revisions == sorted(set(revisions))
    last_seen = {item.event.agent.agent_id: item.event.agent.status for item in received}
    assert last_seen == status
    await watch.aclose()

    # The watcher of every event fell behind and is told so, as before.
    await every_first
    with pytest.raises(ResyncNeeded, match="behind"):
        await take(every_event, flaps)


async def test_a_slow_health_watcher_on_a_real_server_gets_the_latest_status_and_no_resync(
    servers: Callable[..., Any],
) -> None:
    """A gRPC watcher whose client stops reading (a small HTTP/2 window, so the server really
    blocks) while one agent flaps more often than the old per-watcher backlog of 10,000 events:
    no resync, fewer messages than transitions, and the last one is the agent's final status."""
    # The flood is ours, on purpose. The agents never beat: their lease must outlast the flapping
    # (up to 300 s below on a loaded machine), or the flapper ends DOWN instead of DRAINING.
    running: Running = await servers(rate_limit_enabled=False, heartbeat_timeout=600.0)
    stubs = running.stubs
    bus = running.server.bus
    assert bus is not None
    flapper = (await stubs.register("flapper")).agent.agent_id
    steady = [(await stubs.register(f"steady-{n}")).agent.agent_id for n in range(2)]
    # No BDP probing and a 16 KiB window: the transport cannot absorb the flood for the watcher.
    slow = grpc.aio.insecure_channel(
        running.target, options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]
    )
    watch = health_pb2_grpc.HealthServiceStub(slow).WatchAgentHealth(health_pb2.WatchAgentHealthRequest())
    initial: list[health_pb2.WatchAgentHealthResponse] = []
    while not (message := await read_message(watch)).caught_up:
        initial.append(message)
    assert {message.health.agent_id for message in initial} == {flapper, *steady}
    await async_wait_for(lambda: bus._subscribers, what="the watcher subscribed")

    start = bus.revision
    goal = events.SUBSCRIBER_BACKLOG + 500
    started = time.monotonic()

    async def flap(phase: int) -> None:
        # Drain and undrain from several callers at once; each one that changes the status commits
        # one transition.
        n = phase
        while bus.revision - start < goal:
            if n % 2:
                await stubs.registry.UndrainAgent(registry_pb2.UndrainAgentRequest(agent_id=flapper))
            else:
                await stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=flapper))
            n += 1
            assert time.monotonic() - started < 300, "flapping took too long"

    await asyncio.gather(*(flap(phase) for phase in range(8)))
    final = (await stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=flapper))).agent
    transitions = bus.revision - start
    assert transitions > events.SUBSCRIBER_BACKLOG and final.status == DRAINING
    assert max(latest_buffers(bus)) <= 3  # one per agent at most, whatever the number of flaps

    received: list[health_pb2.WatchAgentHealthResponse] = []
    while not received or received[-1].revision < final.revision:
        received.append(await read_message(watch, within=60))
    assert not any(message.resync for message in received)
    assert len(received) < transitions  # it fell behind and skipped intermediate states
    last = received[-1]
    assert (last.revision, last.health.agent_id, last.health.status) == (final.revision, flapper, DRAINING)
    revisions = [message.revision for message in received]
    assert revisions == sorted(set(revisions))
    watch.cancel()
    await slow.close()
