"""The committed agents, in memory: by id, by name + instance, in id order, by type, capability and
status, and the queries over them.

A projection: records change only when a committed event is applied (`AgentIndex.add` and
`AgentIndex.project`), from this process or another, except the soft fields a live session updates
between commits (load, checks and heartbeat time, ridden along in the next commit) and
`assigned_tasks` (the scheduler's). Type, capabilities and status are committed fields, so the
postings by type, capability and status are kept up to date there, one agent at a time: a query
walks the shortest posting list its filter names (the ready agents of a Discover, the agents of one
type) instead of every agent.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from orchestrator.v1 import agent_pb2
from orchestrator_server.agents.sessions import Session
from orchestrator_server.agents.status import ALIVE_STATUSES, DEREGISTERED
from orchestrator_server.errors import InvalidArgument
from orchestrator_server.selectors import Selector, parse_selector
from orchestrator_server.validation import Violations, decode_page_token, encode_page_token


@dataclass(eq=False)
class AgentState:
    """One agent: its record (committed, plus soft fields) and this process's view of its liveness."""

    agent: agent_pb2.Agent
    token_hash: str = ""
    # The agent's revision when `token_hash` was last read from the store (-1: never).
    hash_revision: int = -1
    session: Session | None = None
    # Loop time of the last sign of life (any message on the session, or a unary heartbeat).
    last_seen: float = 0.0
    # Loop time until which the agent counts as alive without a session (unary TTL, restart grace).
    lease_until: float = 0.0
    lease_timer: asyncio.TimerHandle | None = None
    # Serialises this process's commands on the agent, so they do not lose races to each other;
    # other processes' commands are caught by the store's revision check.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # A status refresh is queued in the background (coalesces refreshes asked for by beats).
    refresh_pending: bool = False
    # Another replica times this agent's liveness (it holds its session or got its last unary beat),
    # so here the agent is as alive as its committed status says.
    timed_elsewhere: bool = False
    # Set while this replica, as leader, times an agent whose owner replica was lost: its id.
    orphan_of: str | None = None
    # `agent`'s wire bytes, kept for list pages until it changes; whatever changes `agent` in place
    # calls `changed()` (a 100-agent REST list spent a fifth of its time serializing, issue 13).
    wire: bytes | None = None

    def encoded(self) -> bytes:
        wire = self.wire
        if wire is None:
            wire = self.wire = self.agent.SerializeToString()
        return wire

    def changed(self) -> None:
        self.wire = None

    @property
    def alive(self) -> bool:
        if self.session is not None or self.lease_until > asyncio.get_running_loop().time():
            return True
        return self.timed_elsewhere and self.agent.status in ALIVE_STATUSES


@dataclass(frozen=True)
class AgentFilter:
    type: str = ""
    status: int = 0
    capabilities: tuple[str, ...] = ()
    selector: Selector = field(default_factory=Selector)
    include_deregistered: bool = False
    #: Only agents in one of these statuses (Discovery: the ones that can be routed to); empty: any.
    statuses: frozenset[int] = frozenset()
    # Worked out once per query, not once per agent it looks at.
    _shows_deregistered: bool = field(init=False, repr=False, compare=False)
    _capability_set: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shows = self.include_deregistered or self.status == DEREGISTERED
        object.__setattr__(self, "_shows_deregistered", shows)
        object.__setattr__(self, "_capability_set", frozenset(self.capabilities))

    def matches(self, agent: agent_pb2.Agent) -> bool:
        status = agent.status
        if status == DEREGISTERED and not self._shows_deregistered:
            return False
        if self.type and agent.type != self.type:
            return False
        if self.status and status != self.status:
            return False
        if self.statuses and status not in self.statuses:
            return False
        if self._capability_set and not self._capability_set.issubset(agent.capabilities):
            return False
        return not self.selector.requirements or self.selector.matches(agent.labels)


def build_filter(
    violations: Violations,
    *,
    type: str = "",
    status: int = 0,
    capabilities: Iterable[str] = (),
    label_selector: str = "",
    selector_field: str = "label_selector",
) -> AgentFilter:
    if status and status not in agent_pb2.AgentStatus.values():
        violations.add("status", f"unknown status {status}")
    try:
        selector = parse_selector(label_selector, selector_field)
    except InvalidArgument as error:
        violations.items.extend(error.violations)
        selector = Selector()
    return AgentFilter(type=type, status=status, capabilities=tuple(capabilities), selector=selector)


def take_page(agents: Iterable[agent_pb2.Agent], page_size: int) -> tuple[list[agent_pb2.Agent], str]:
    """The first `page_size` agents and the token for the next page ("" when there is none)."""
    page = list(itertools.islice(agents, page_size + 1))
    if len(page) <= page_size:
        return page, ""
    return page[:page_size], encode_page_token(page[page_size - 1].agent_id)


def _newer_beat(cached: agent_pb2.Agent, committed: agent_pb2.Agent) -> bool:
    mine, theirs = cached.last_heartbeat_at, committed.last_heartbeat_at
    return (mine.seconds, mine.nanos) > (theirs.seconds, theirs.nanos)


_NO_IDS: list[str] = []


class _Postings:
    """Agent ids per key (a type, a capability, a status), each list sorted: ids sort by
    registration time, so a list is already in page order."""

    def __init__(self) -> None:
        self._ids: dict[Hashable, list[str]] = {}

    def add(self, key: Hashable, agent_id: str) -> None:
        bisect.insort(self._ids.setdefault(key, []), agent_id)

    def remove(self, key: Hashable, agent_id: str) -> None:
        ids = self._ids.get(key)
        if ids is None:
            return
        position = bisect.bisect_left(ids, agent_id)
        if position < len(ids) and ids[position] == agent_id:
            del ids[position]
            if not ids:
                del self._ids[key]

    def get(self, key: Hashable) -> list[str]:
        return self._ids.get(key, _NO_IDS)


def _keys(agent: agent_pb2.Agent) -> set[Hashable]:
    """The posting keys of an agent: its type, each capability and its status."""
    keys: set[Hashable] = {("type", agent.type), ("status", agent.status)}
    keys.update(("capability", capability) for capability in agent.capabilities)
    return keys


class AgentIndex:
    def __init__(self) -> None:
        self._records: dict[str, AgentState] = {}
        self._by_name: dict[tuple[str, str], AgentState] = {}
        # Every agent id, sorted: ids sort by registration time, and pages start after an id.
        self._ordered_ids: list[str] = []
        self._postings = _Postings()

    def get(self, agent_id: str) -> AgentState | None:
        return self._records.get(agent_id)

    def by_name(self, name: str, instance_id: str) -> AgentState | None:
        return self._by_name.get((name, instance_id))

    def records(self) -> Iterable[AgentState]:
        return self._records.values()

    def agents(self) -> Iterable[agent_pb2.Agent]:
        return (state.agent for state in self._records.values())

    def agents_after(self, after: str = "") -> Iterator[agent_pb2.Agent]:
        """Agents in registration (id) order, starting after the id `after`."""
        ids = self._ordered_ids
        for index in range(bisect.bisect_right(ids, after), len(ids)):
            yield self._records[ids[index]].agent

    def matching(self, query: AgentFilter, after: str = "") -> Iterator[agent_pb2.Agent]:
        """The agents `query` matches, in registration (id) order, after the id `after`. Only the
        agents of the shortest posting list the query names are looked at. Consume it before the
        next await: the lists change as events are applied."""
        ids = self._candidates(query)
        records, matches = self._records, query.matches
        for index in range(bisect.bisect_right(ids, after), len(ids)):
            agent = records[ids[index]].agent
            if matches(agent):
                yield agent

    def _candidates(self, query: AgentFilter) -> Sequence[str]:
        """The ids of the smallest set that holds every agent `query` can match, sorted."""
        postings = self._postings
        lists: list[Sequence[str]] = [self._ordered_ids]
        if query.type:
            lists.append(postings.get(("type", query.type)))
        lists.extend(postings.get(("capability", capability)) for capability in query.capabilities)
        if query.status:
            lists.append(postings.get(("status", query.status)))
        shortest = min(lists, key=len)
        if query.statuses:
            by_status = [postings.get(("status", status)) for status in query.statuses]
            if sum(map(len, by_status)) < len(shortest):
                return by_status[0] if len(by_status) == 1 else list(heapq.merge(*by_status))
        return shortest

    def page(self, query: AgentFilter, page_size: int, page_token: str) -> tuple[list[agent_pb2.Agent], str]:
        return take_page(self.matching(query, decode_page_token(page_token)), page_size)

    def add(self, committed: agent_pb2.Agent, token_hash: str = "") -> AgentState:
        """Indexes an agent not seen before (a copy of `committed`)."""
        agent = agent_pb2.Agent()
        agent.CopyFrom(committed)
        state = AgentState(agent, token_hash)
        self._records[agent.agent_id] = state
        self._by_name[(agent.name, agent.instance_id)] = state
        bisect.insort(self._ordered_ids, agent.agent_id)
        for key in _keys(agent):
            self._postings.add(key, agent.agent_id)
        return state

    def project(self, state: AgentState, committed: agent_pb2.Agent) -> None:
        """Makes the cached record the committed one, in place (the scheduler holds on to it),
        keeping the soft fields: `assigned_tasks`, and the latest beat (load, checks, heartbeat
        time) when the cached one is newer than the committed copy."""
        agent = state.agent
        state.changed()
        before = _keys(agent)
        assigned = agent.assigned_tasks
        beat = None
        if _newer_beat(agent, committed):
            beat = agent_pb2.Agent(
                load=agent.load, checks=agent.checks, last_heartbeat_at=agent.last_heartbeat_at
            )
        agent.CopyFrom(committed)
        agent.assigned_tasks = assigned
        if beat is not None:
            agent.load.CopyFrom(beat.load)
            del agent.checks[:]
            agent.checks.extend(beat.checks)
            agent.last_heartbeat_at.CopyFrom(beat.last_heartbeat_at)
        after = _keys(agent)
        if after != before:
            for key in before - after:
                self._postings.remove(key, agent.agent_id)
            for key in after - before:
                self._postings.add(key, agent.agent_id)
