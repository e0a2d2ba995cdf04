"""The projection of committed agent events, and the queries over it.

`AgentProjection.apply` is registered as a listener of committed events (EventBus) and called for
every one in revision order, whichever process committed it: it is the only way the cached agents
change, apart from the soft state documented in `index`. Status transitions notify the metrics hook
and the scheduler (`AgentObserver`) from here, so another process's writes notify them too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from orchestrator.v1 import agent_pb2, event_pb2, registry_pb2
from orchestrator_server.agents import credentials
from orchestrator_server.agents.index import AgentFilter, AgentIndex, AgentState, build_filter
from orchestrator_server.agents.sessions import CloseReason, Leases, Session
from orchestrator_server.agents.status import ALIVE_STATUSES, DEREGISTERED, DOWN, GOODBYE
from orchestrator_server.cluster import Cluster
from orchestrator_server.config import Config
from orchestrator_server.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from orchestrator_server.store import Store
from orchestrator_server.validation import Violations

log = logging.getLogger(__name__)

#: How often a hello reads its agent's credential when the agent keeps changing during the read.
FRESH_CREDENTIAL_READS = 3


class AgentObserver(Protocol):
    """What the task scheduler needs to hear from the registry."""

    def agent_available(self, agent_id: str) -> None:
        """The agent may take (more) work: it came up, left drain or its capacity changed."""

    def agent_lost(self, agent_id: str, *, graceful: bool) -> None:
        """The agent went DOWN (graceful: it said goodbye or was deregistered)."""

    def agent_reattached(self, agent_id: str, running_attempt_ids: Sequence[str]) -> list[str]:
        """A session opened; returns the attempts the agent still holds."""


class AgentProjection:
    """The committed agents in memory, with this process's view of their liveness."""

    def __init__(self, config: Config, store: Store, cluster: Cluster) -> None:
        self._config = config
        self._store = store
        self.cluster = cluster
        self._me = cluster.process_id
        self._was_serving = True
        self._index = AgentIndex()
        # Agents whose credential hash is to be read from the store (issued by another replica),
        # read together in the background.
        self._hashes_wanted: set[str] = set()
        self._leases = Leases(config.heartbeat_timeout, self._lease_expired)
        # Status commits running in the background (beats and timers do not wait for them).
        self._background: set[asyncio.Task[None]] = set()
        self.observer: AgentObserver | None = None
        # Set while the process shuts down: sessions then end without taking their agents DOWN,
        # so after the restart they get a heartbeat timeout to come back and keep their work.
        self._closing = False
        # Called with every committed status transition, for metrics.
        self.on_transition: Callable[[agent_pb2.Agent, int], None] | None = None

    # -- startup -------------------------------------------------------------------------------

    def restore(self, agents: Sequence[agent_pb2.Agent], token_hashes: dict[str, str]) -> None:
        """Rebuilds the cache after a restart. Agents that were alive and whose replica is gone
        (this process before its restart, or another) are orphans: the leader gives them a full
        heartbeat timeout to reconnect before they count as DOWN (`_time_liveness`)."""
        for stored in agents:
            state = self._index.add(stored, token_hashes.get(stored.agent_id, ""))
            state.agent.assigned_tasks = 0
            if not self.cluster.alive(state.agent.session.owner):
                state.agent.session.streaming = False  # its stream ended with its replica
            self._time_liveness(state)

    def cluster_changed(self) -> None:
        """The replicas, this replica's leadership or its membership changed: who times which agent
        is decided again; a replica that lost its membership asks its agents to go elsewhere."""
        serving = self.cluster.serving
        if not serving and self._was_serving and not self._closing:
            for state in self._index.records():
                if state.session is not None:
                    message = "this replica lost the database; reconnect to another"
                    state.session.reconnect(message)
                    state.session.close(CloseReason.SHUTDOWN, message)
        self._was_serving = serving
        for state in self._index.records():
            self._time_liveness(state)

    def _time_liveness(self, state: AgentState) -> None:
        """Decides whether this replica times the agent's liveness (see "Replicas" in
        docs/ARCHITECTURE.md): the replica named as its session's owner does (it holds the stream,
        or got the latest unary heartbeat); an agent whose owner replica is gone is an orphan, which
        the leader gives one heartbeat timeout (as after a restart) to reconnect anywhere."""
        if state.session is not None or self._closing:
            return  # its stream is here: its lease was armed when the session opened
        agent = state.agent
        owner = agent.session.owner
        if agent.status not in ALIVE_STATUSES:
            self._not_timed_here(state, timed_elsewhere=False)
        elif owner == self._me and self.cluster.serving:
            state.timed_elsewhere, state.orphan_of = False, None
            if state.last_seen == 0.0:  # not timed here yet: restored, or serving again
                self._leases.grant_until(
                    state, asyncio.get_running_loop().time() + self._config.heartbeat_timeout
                )
        elif owner != self._me and self.cluster.alive(owner):
            self._not_timed_here(state)
        elif self.cluster.leader:
            if state.orphan_of is None:
                state.timed_elsewhere, state.orphan_of = False, owner
                self._leases.grant_until(
                    state, asyncio.get_running_loop().time() + self._config.heartbeat_timeout
                )
        else:
            self._not_timed_here(state)  # the leader times it

    def _not_timed_here(self, state: AgentState, *, timed_elsewhere: bool = True) -> None:
        self._leases.cancel(state)
        state.lease_until = state.last_seen = 0.0
        state.timed_elsewhere, state.orphan_of = timed_elsewhere, None

    # -- the projection ------------------------------------------------------------------------

    def apply(self, event: event_pb2.Event) -> None:
        """Applies one committed event (from this process or another), in revision order."""
        if not event.HasField("agent"):
            return
        committed = event.agent
        state = self._index.get(committed.agent_id)
        if state is None:
            state = self._index.add(committed)
            previous = DOWN  # what a new record starts as
            if committed.session.owner != self._me:
                self._want_hash(state)  # registered by another replica: its credential is read
        elif committed.revision and committed.revision <= state.agent.revision:
            return  # already applied
        else:
            previous = state.agent.status
            was_draining = state.agent.draining
            # Another process's commit (none of this process's commands on the agent is running)
            # that may have issued a new credential (a registration stamps updated_at).
            rotated = not state.lock.locked() and committed.updated_at != state.agent.updated_at
            self._index.project(state, committed)
            if rotated:
                self._want_hash(state)
            if state.agent.draining != was_draining and state.session is not None:
                # Whichever process committed the drain, the agent hears it on its session here.
                state.session.drain(state.agent.draining, state.agent.status_reason)
            self._fence_stale_session(state)
        self._time_liveness(state)
        agent = state.agent
        if agent.status != previous:
            if self.on_transition is not None:
                self.on_transition(agent, previous)
            if previous in ALIVE_STATUSES and agent.status == DOWN:
                log.info("agent %s (%s) is DOWN: %s", agent.agent_id, agent.name, agent.status_reason)
        if agent.status == DEREGISTERED:
            self._forget_liveness(state)
        if self.observer is None:
            return
        if agent.status in ALIVE_STATUSES:
            self.observer.agent_available(agent.agent_id)
        elif agent.status != previous and (previous in ALIVE_STATUSES or agent.status == DEREGISTERED):
            graceful = agent.status == DEREGISTERED or agent.status_reason == GOODBYE
            self.observer.agent_lost(agent.agent_id, graceful=graceful)

    def _fence_stale_session(self, state: AgentState) -> None:
        """A newer session committed by another process (the agent reconnected there while its old
        stream here looked alive) fences this one, as a newer session here would: the stream ends
        ABORTED and this process stops timing the agent's lease (its owner does)."""
        local, committed = state.session, state.agent.session
        if local is None or committed.epoch <= local.epoch:
            return
        state.session = None
        self._leases.cancel(state)
        owner = committed.owner or "another process"
        local.close(CloseReason.FENCED, f"superseded by a newer session (epoch {committed.epoch}) on {owner}")

    def _forget_liveness(self, state: AgentState) -> None:
        """A deregistered agent has no session, lease or credential here any more."""
        state.token_hash = ""
        self._leases.cancel(state)
        state.lease_until = 0.0
        if state.session is not None:
            session, state.session = state.session, None
            session.close(CloseReason.DEREGISTERED, "agent deregistered")

    # -- queries -------------------------------------------------------------------------------

    def get(self, agent_id: str) -> agent_pb2.Agent:
        return self._state(agent_id).agent

    def find(self, agent_id: str) -> agent_pb2.Agent | None:
        state = self._index.get(agent_id)
        return state.agent if state else None

    def agents(self) -> Iterable[agent_pb2.Agent]:
        return self._index.agents()

    def agents_after(self, after: str = "") -> Iterator[agent_pb2.Agent]:
        """Agents in registration (id) order, starting after the id `after`."""
        return self._index.agents_after(after)

    def matching(self, query: AgentFilter, after: str = "") -> Iterator[agent_pb2.Agent]:
        """The agents `query` matches, in registration (id) order, after the id `after` (indexed)."""
        return self._index.matching(query, after)

    def encoded(self, agent: agent_pb2.Agent) -> bytes:
        """`agent`'s wire bytes: an indexed agent's are kept until it changes (`AgentState.wire`)."""
        state = self._index.get(agent.agent_id)
        if state is not None and state.agent is agent:
            return state.encoded()
        return agent.SerializeToString()

    def session_of(self, agent_id: str) -> Session | None:
        state = self._index.get(agent_id)
        return state.session if state else None

    def list_agents(self, request: registry_pb2.ListAgentsRequest) -> tuple[list[agent_pb2.Agent], str]:
        violations = Violations()
        violations.name("type", request.type, required=False)
        violations.name("capability", request.capability, required=False)
        agent_filter = build_filter(
            violations,
            type=request.type,
            status=request.status,
            capabilities=[request.capability] if request.capability else (),
            label_selector=request.label_selector,
        )
        size = violations.page_size("page_size", request.page_size)
        violations.raise_if_any()
        return self.page(agent_filter, size, request.page_token)

    def page(self, query: AgentFilter, page_size: int, page_token: str) -> tuple[list[agent_pb2.Agent], str]:
        return self._index.page(query, page_size, page_token)

    def verify_token(self, agent_id: str, token: str, *, authenticated_only: bool = False) -> agent_pb2.Agent:
        """The agent whose credential `token` is; Unauthenticated otherwise (OpenCredential for one
        issued without authentication when `authenticated_only`). A credential this replica does
        not know yet (issued by another) is read from the store in the background, once per
        revision of the agent, for the next call; `verify_token_fresh` waits for it."""
        state = self._index.get(agent_id)
        if state is None or state.agent.status == DEREGISTERED:
            raise NotFound(f"agent {agent_id} is not registered")
        try:
            credentials.verify(agent_id, state.token_hash, token, authenticated_only=authenticated_only)
        except credentials.OpenCredential:
            raise
        except Unauthenticated:
            self._want_hash(state)
            raise
        return state.agent

    async def verify_token_fresh(
        self, agent_id: str, token: str, *, authenticated_only: bool = False
    ) -> agent_pb2.Agent:
        """As `verify_token`, reading the agent's credential from the store first when this
        replica's copy does not match (the agent registered, or registered again, on another
        replica). The check is made again whatever the read changed here: a background read may
        have brought the credential meanwhile. A read dropped because the agent changed while it
        ran is made again (a few times), so a hello is never refused for a commit it raced."""
        try:
            return self.verify_token(agent_id, token, authenticated_only=authenticated_only)
        except credentials.OpenCredential:
            raise
        except Unauthenticated:
            state = self._index.get(agent_id)
            if state is None:
                raise
        state.hash_revision = -1  # read now, whatever a background read found (a caller waits)
        for _ in range(FRESH_CREDENTIAL_READS):
            await self._read_hashes([state])
            if state.hash_revision == state.agent.revision:
                break
        return self.verify_token(agent_id, token, authenticated_only=authenticated_only)

    def _want_hash(self, state: AgentState) -> None:
        """Reads the agent's credential hash from the store soon (batched), unless it was read at
        the agent's current revision already: a credential changes only with a commit of its agent."""
        if state.hash_revision == state.agent.revision or self._closing:
            return
        if not self._hashes_wanted:
            asyncio.get_running_loop().call_soon(self._read_wanted_hashes)
        self._hashes_wanted.add(state.agent.agent_id)

    def _read_wanted_hashes(self) -> None:
        states = [state for agent_id in self._hashes_wanted if (state := self._index.get(agent_id))]
        self._hashes_wanted.clear()
        task = asyncio.get_running_loop().create_task(self._read_hashes(states))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _read_hashes(self, states: Sequence[AgentState]) -> None:
        """Reads these agents' stored credential hashes. A hash read while a commit of its agent
        was projected is dropped (it may predate that commit); `hash_revision` tells what was kept."""
        revisions = [
            (state, state.agent.revision) for state in states if state.hash_revision != state.agent.revision
        ]
        if not revisions:
            return
        try:
            hashes = await self._store.agent_token_hashes([state.agent.agent_id for state, _ in revisions])
        except Exception as error:  # the next failed check asks again
            log.warning("could not read agent credentials from the store: %s", error)
            return
        for state, revision in revisions:
            stored = hashes.get(state.agent.agent_id)
            if stored is None or state.agent.revision != revision:
                continue
            state.hash_revision = revision
            state.token_hash = stored

    def set_assigned_tasks(self, agent_id: str, count: int) -> None:
        """The scheduler's count of tasks placed on the agent (soft state, never committed alone)."""
        state = self._index.get(agent_id)
        if state is not None:
            state.agent.assigned_tasks = count
            state.changed()

    # -- helpers -------------------------------------------------------------------------------

    def _live_window(self) -> float:
        """How recently a session must have been heard from to keep its identity against a newcomer
        of another process: two beat intervals plus a second of slack."""
        return min(self._config.heartbeat_timeout, 2 * self._config.heartbeat_interval + 1.0)

    def _state(self, agent_id: str) -> AgentState:
        state = self._index.get(agent_id)
        if state is None:
            if not agent_id:
                raise InvalidArgument.field("agent_id", "is required")
            raise NotFound(f"agent {agent_id} not found")
        return state

    @staticmethod
    def _refuse_deregistered(state: AgentState) -> None:
        if state.agent.status == DEREGISTERED:
            raise FailedPrecondition(f"agent {state.agent.agent_id} is deregistered")

    def _live_record(self, agent_id: str) -> AgentState:
        state = self._state(agent_id)
        self._refuse_deregistered(state)
        return state

    def _lease_expired(self, state: AgentState) -> None:
        """The agent's lease ran out (see `Liveness`)."""
        raise NotImplementedError
