"""The watches (agents, agent health, one task), once, over the EventBus; nothing of gRPC here.

Every watch has the same shape, written once in `follow`: a `Snapshot` of the current state
(when the watcher starts from revision 0, or after a resync), or else the changes it missed since
its revision followed by `CaughtUp`; then every change as it is committed. When the watcher's
revision is no longer retained (compacted, in the future), or a watcher of every change falls too
far behind, it gets a `Resync` (the oldest revision kept and why) and a fresh snapshot. The
servicers map these items to their response messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from orchestrator.v1 import agent_pb2, discovery_pb2, event_pb2, task_pb2
from orchestrator_server.agents import DEREGISTERED
from orchestrator_server.discovery import Discovery
from orchestrator_server.events import CaughtUp, EventBus, EventFilter, EventKey, ResyncNeeded
from orchestrator_server.tasks import TERMINAL
from orchestrator_server.tasks.changes import merge
from orchestrator_server.validation import Violations

__all__ = [
    "AgentChange",
    "CaughtUp",
    "Changed",
    "Resync",
    "Snapshot",
    "TaskState",
    "follow",
    "watch_agent_health",
    "watch_agents",
    "watch_task",
]

T = TypeVar("T")

# The agent events that are health transitions (attribute updates are not).
TRANSITIONS = frozenset(
    {
        event_pb2.EVENT_TYPE_AGENT_REGISTERED,
        event_pb2.EVENT_TYPE_AGENT_STATUS_CHANGED,
        event_pb2.EVENT_TYPE_AGENT_DEREGISTERED,
    }
)


@dataclass(frozen=True)
class Snapshot(Generic[T]):
    """The whole current state at `revision`; the changes that follow are newer."""

    revision: int
    entries: Sequence[T]
    after_resync: bool


@dataclass(frozen=True)
class Changed:
    """One committed change the watcher is concerned with."""

    event: event_pb2.Event


@dataclass(frozen=True)
class Resync:
    """The watcher's history is gone: it drops what it knows; a Snapshot follows."""

    revision: int
    oldest_revision: int
    reason: str


WatchItem = Snapshot[T] | Changed | Resync | CaughtUp


def _check_start(violations: Violations, start_revision: int) -> None:
    if start_revision < 0:
        violations.add("start_revision", "must not be negative")


async def follow(
    bus: EventBus,
    start_revision: int,
    matches: EventFilter,
    snapshot: Callable[[], Awaitable[Sequence[T]]],
    *,
    latest_by: EventKey | None = None,
) -> AsyncGenerator[WatchItem[T], None]:
    """From `start_revision` 0: a Snapshot, then changes. Else the changes after it, CaughtUp, then
    live changes. A Resync (and a new Snapshot) when that history is not available; returns when
    the bus closes (the process is shutting down; the watcher resumes from its revision).

    `latest_by`: live changes keep only the latest of each key while the watcher is busy (a slow
    watcher skips intermediate states instead of being told to resync); see EventBus.watch_marked.
    """
    after = start_revision
    resynced = False
    while True:
        replaying = after != 0
        if not replaying:
            # The revision first: a change committed while the snapshot is read is replayed, not lost.
            after = bus.revision
            yield Snapshot(after, await snapshot(), resynced)
        try:
            async with contextlib.aclosing(bus.watch_marked(after, matches, latest_by=latest_by)) as stream:
                async for item in stream:
                    if isinstance(item, CaughtUp):
                        if replaying:
                            yield item  # a Snapshot is caught up already
                        continue
                    yield Changed(item)
        except ResyncNeeded as needed:
            resync = Resync(bus.revision, needed.oldest_revision, needed.reason)
        else:
            return
        yield resync
        after, resynced = 0, True


# -- DiscoveryService.WatchAgents -----------------------------------------------------------------


@dataclass(frozen=True)
class AgentChange:
    """A delta of a discovery watch: the agent after the change; `left_query` when it no longer
    matches the watcher's query (or was deregistered) and the watcher should forget it."""

    event: event_pb2.Event
    left_query: bool


async def watch_agents(
    bus: EventBus, query: discovery_pb2.AgentQuery, start_revision: int
) -> AsyncGenerator[Snapshot[agent_pb2.Agent] | AgentChange | Resync | CaughtUp, None]:
    """The agents matching `query` (any status but deregistered), then every change of them."""
    violations = Violations()
    query_filter = Discovery.query_filter(query, violations)
    _check_start(violations, start_revision)
    violations.raise_if_any()
    # Watchers see every status (DOWN is the news they wait for), deregistration included.
    watch_filter = dataclasses.replace(query_filter, include_deregistered=True)

    # Agents the watcher holds, to tell it when one stops matching. After a resume we do not know
    # its set, so every agent changed during the replay is reported, matching or leaving.
    known: set[str] = set()
    replaying = start_revision > 0

    def concerns(event: event_pb2.Event) -> bool:
        return event.HasField("agent") and (
            replaying or event.agent.agent_id in known or watch_filter.matches(event.agent)
        )

    async def snapshot() -> list[agent_pb2.Agent]:
        nonlocal known, replaying
        agents = [
            agent
            for agent in bus.committed_agents.values()
            if agent.status != DEREGISTERED and query_filter.matches(agent)
        ]
        known, replaying = {agent.agent_id for agent in agents}, False
        return agents

    async with contextlib.aclosing(follow(bus, start_revision, concerns, snapshot)) as items:
        async for item in items:
            if isinstance(item, Changed):
                agent_id = item.event.agent.agent_id
                matching = watch_filter.matches(item.event.agent)
                if matching:
                    known.add(agent_id)
                elif agent_id in known or replaying:
                    known.discard(agent_id)
                else:
                    continue  # queued while replaying; the watcher never had it
                yield AgentChange(item.event, left_query=not matching)
            else:
                if isinstance(item, CaughtUp):
                    replaying = False
                yield item


# -- HealthService.WatchAgentHealth ---------------------------------------------------------------


def _agent_id(event: event_pb2.Event) -> str:
    return event.agent.agent_id


def watch_agent_health(
    bus: EventBus, agent_type: str, start_revision: int
) -> AsyncGenerator[WatchItem[agent_pb2.Agent], None]:
    """The agents (of `agent_type`, or all) as they are, then their health transitions.

    As grpc.health.v1's Watch, a watcher that reads slower than agents change is not told to
    resync: it skips the intermediate transitions of an agent and always gets its latest one.
    What waits for it is at most one transition per agent (revision order is kept), so its memory
    is bounded by the number of agents, however often one of them flaps. A resume from a revision
    replays every transition since then, in full.
    """
    violations = Violations()
    violations.name("type", agent_type, required=False)
    _check_start(violations, start_revision)
    violations.raise_if_any()

    def concerns(event: event_pb2.Event) -> bool:
        return (
            event.type in TRANSITIONS
            and event.HasField("agent")
            and (not agent_type or event.agent.type == agent_type)
        )

    async def snapshot() -> list[agent_pb2.Agent]:
        return [
            agent
            for agent in bus.committed_agents.values()
            if agent.status != DEREGISTERED and (not agent_type or agent.type == agent_type)
        ]

    return follow(bus, start_revision, concerns, snapshot, latest_by=_agent_id)


# -- TasksService.WatchTask -----------------------------------------------------------------------


@dataclass(frozen=True)
class TaskState:
    """The task as of `revision`."""

    revision: int
    task: task_pb2.Task


async def watch_task(
    bus: EventBus, task_id: str, get: Callable[[str], Awaitable[task_pb2.Task]]
) -> AsyncGenerator[TaskState, None]:
    """The task now, then after every change, until it is finished. Missed changes that are no
    longer retained are summed up by the task's state at the latest revision."""

    async def current() -> list[task_pb2.Task]:
        # A copy: the scheduler changes its task in place while the watcher waits at `yield`.
        task = task_pb2.Task()
        task.CopyFrom(await get(task_id))
        return [task]

    (task,) = await current()
    yield TaskState(task.revision, task)
    if task.status in TERMINAL:
        return

    def concerns(event: event_pb2.Event) -> bool:
        return event.HasField("task") and event.task.task_id == task_id

    async with contextlib.aclosing(follow(bus, task.revision, concerns, current)) as items:
        async for item in items:
            if isinstance(item, Changed):
                # Events carry what changed; the watcher gets the whole task.
                task = merge(task, item.event.task)
                state = TaskState(item.event.revision, task)
            elif isinstance(item, Snapshot):
                task = item.entries[0]
                state = TaskState(item.revision, task)
            else:
                continue
            yield state
            if state.task.status in TERMINAL:
                return
