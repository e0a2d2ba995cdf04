"""Fan-out of committed events to watchers, with resume from a revision.

The store calls `EventBus.publish` with committed events in revision order. Watchers subscribe
first and then replay what they missed (from a recent in-memory window, else from the store's log),
so nothing falls between replay and live delivery. A revision older than the retained log gets an
explicit resync. What a watcher has not read yet waits in one of two bounded buffers: a queue of
every event (past `SUBSCRIBER_BACKLOG` the watcher is told to resync instead of growing without
bound), or, for watchers that want only the latest state of each entity (as grpc.health.v1's Watch),
the latest event per key, which never overflows: it holds at most one event per entity.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from orchestrator.v1 import agent_pb2, event_pb2
from orchestrator_server.store import Store

log = logging.getLogger(__name__)

EventFilter = Callable[[event_pb2.Event], bool]
# The entity an event is about, for watchers that keep only the latest event of each.
EventKey = Callable[[event_pb2.Event], str]

# Events a watcher of every event may fall behind by before it is told to resync.
SUBSCRIBER_BACKLOG = 10_000
# Committed events kept in memory for cheap resumes.
RECENT_EVENTS = 20_000
# Events read from the store per page while replaying.
REPLAY_PAGE = 1_000


class ResyncNeeded(Exception):
    """The watcher's revision is no longer retained, or it fell too far behind."""

    def __init__(self, oldest_revision: int, reason: str) -> None:
        super().__init__(reason)
        self.oldest_revision = oldest_revision
        self.reason = reason


@dataclass(frozen=True)
class CaughtUp:
    """Marks the end of a replay: every matching event up to `revision` has been delivered."""

    revision: int


class _Backlog:
    """Every matching event in order, up to SUBSCRIBER_BACKLOG; past that it overflows."""

    def __init__(self, limit: int) -> None:
        self._events: collections.deque[event_pb2.Event] = collections.deque()
        self._limit = limit
        self.overflowed = False

    def add(self, event: event_pb2.Event) -> None:
        if len(self._events) >= self._limit:
            self.overflowed = True
        else:
            self._events.append(event)

    def take(self) -> event_pb2.Event | None:
        return self._events.popleft() if self._events else None

    def __len__(self) -> int:
        return len(self._events)


class _Latest:
    """The latest matching event of each key, oldest first: a newer event of a key replaces its
    older one and moves to the end, so events leave in revision order and at most one per key waits."""

    overflowed = False

    def __init__(self, key: EventKey) -> None:
        self._key = key
        self._events: collections.OrderedDict[str, event_pb2.Event] = collections.OrderedDict()

    def add(self, event: event_pb2.Event) -> None:
        key = self._key(event)
        self._events.pop(key, None)
        self._events[key] = event

    def take(self) -> event_pb2.Event | None:
        return self._events.popitem(last=False)[1] if self._events else None

    def __len__(self) -> int:
        return len(self._events)


@dataclass(eq=False)
class _Subscriber:
    matches: EventFilter
    buffer: _Backlog | _Latest
    closed: bool = False
    _ready: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def offer(self, event: event_pb2.Event) -> None:
        if not self.buffer.overflowed and self.matches(event):
            self.buffer.add(event)
            self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next(self) -> event_pb2.Event | None:
        """The next buffered event, waiting for one; None once the bus is closed."""
        while not self.closed:
            event = self.buffer.take()
            if event is not None:
                return event
            self._ready.clear()
            await self._ready.wait()
        return None


class EventBus:
    """Committed events, in revision order, to whoever watches."""

    def __init__(
        self, store: Store, revision: int, oldest_revision: int, recent: int = RECENT_EVENTS
    ) -> None:
        self._store = store
        self.revision = revision
        self._store_oldest = oldest_revision
        self._recent: collections.deque[event_pb2.Event] = collections.deque(maxlen=recent)
        self._subscribers: set[_Subscriber] = set()
        self._closed = False
        self._listeners: list[Callable[[event_pb2.Event], None]] = []
        # The committed state of every agent, for snapshots consistent with `revision`.
        self.committed_agents: dict[str, agent_pb2.Agent] = {}

    def seed_agents(self, agents: Sequence[agent_pb2.Agent]) -> None:
        for agent in agents:
            self.committed_agents[agent.agent_id] = agent

    def add_listener(self, listener: Callable[[event_pb2.Event], None]) -> None:
        """Calls `listener` synchronously for every committed event, in revision order."""
        self._listeners.append(listener)

    def close(self) -> None:
        """Ends every watch cleanly (the process is shutting down); watchers resume elsewhere."""
        self._closed = True
        for subscriber in self._subscribers:
            subscriber.close()

    def publish(self, events: Sequence[event_pb2.Event]) -> None:
        for event in events:
            self.revision = event.revision
            self._recent.append(event)
            if event.HasField("agent"):
                self.committed_agents[event.agent.agent_id] = event.agent
            for listener in self._listeners:
                try:
                    listener(event)
                except Exception:
                    # A listener's bug must not keep the event from the others (nor the rest of
                    # the batch from anyone): each projection stays as right as it can be.
                    log.exception("event listener %r failed on revision %d", listener, event.revision)
            for subscriber in self._subscribers:
                subscriber.offer(event)

    async def watch(self, after_revision: int, matches: EventFilter) -> AsyncIterator[event_pb2.Event]:
        """Matching events with revision > `after_revision`: the missed ones, then live ones.

        Raises ResyncNeeded when `after_revision` is older than the retained log, newer than the
        latest revision, or when the watcher falls too far behind.
        """
        async for item in self.watch_marked(after_revision, matches):
            if not isinstance(item, CaughtUp):
                yield item

    async def watch_marked(
        self, after_revision: int, matches: EventFilter, *, latest_by: EventKey | None = None
    ) -> AsyncGenerator[event_pb2.Event | CaughtUp, None]:
        """As `watch`, with one `CaughtUp` between the replayed events and the live ones.

        With `latest_by`, live events the watcher has not read yet are kept only as the latest one
        of each key: a slow watcher skips intermediate events of an entity but always gets its
        latest one, and is never told to resync for being slow (the replay is not thinned).
        """
        buffer = _Backlog(SUBSCRIBER_BACKLOG) if latest_by is None else _Latest(latest_by)
        subscriber = _Subscriber(matches, buffer, closed=self._closed)
        self._subscribers.add(subscriber)
        try:
            last = after_revision
            if after_revision > self.revision:
                raise ResyncNeeded(self._store_oldest, f"revision {after_revision} is in the future")
            replayed_to = [after_revision]
            async for event in self._replay(after_revision, matches, replayed_to):
                last = event.revision
                yield event
            # Every event up to replayed_to was considered; matching ones were yielded above.
            last = max(last, replayed_to[0])
            yield CaughtUp(last)
            while not subscriber.buffer.overflowed:
                live = await subscriber.next()
                if live is None:
                    return  # the bus closed
                if live.revision > last:
                    last = live.revision
                    yield live
            raise ResyncNeeded(last + 1, "watcher fell too far behind")
        finally:
            self._subscribers.discard(subscriber)

    async def _replay(
        self, after: int, matches: EventFilter, replayed_to: list[int]
    ) -> AsyncIterator[event_pb2.Event]:
        """Missed events; sets replayed_to[0] to the revision up to which it looked."""
        recent_oldest = self._recent[0].revision if self._recent else self.revision + 1
        if after < recent_oldest - 1:
            self._store_oldest = await self._store.oldest_revision()
            if after < self._store_oldest - 1:
                raise ResyncNeeded(self._store_oldest, f"revision {after} was compacted")
            cursor = after
            while cursor < recent_oldest - 1:
                page = await self._store.events_after(cursor, REPLAY_PAGE)
                if not page:
                    break
                for event in page:
                    if event.revision >= recent_oldest:
                        break
                    cursor = event.revision
                    if matches(event):
                        yield event
                else:
                    continue
                break
            after = cursor
        if self._recent and self._recent[0].revision > after + 1:
            raise ResyncNeeded(self._recent[0].revision, "too many changes while replaying")
        # Copy: the deque may grow while the consumer is suspended between yields.
        replayed_to[0] = max(after, self.revision)
        for event in [event for event in self._recent if event.revision > after]:
            if matches(event):
                yield event
