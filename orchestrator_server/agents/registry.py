"""Agents: the commands (register, update, drain, deregister, sessions, heartbeats) and the
projection of committed agent events.

Writes go one way: command → conditional commit → event → projection. A command reads the
committed record, builds the changed agent on a copy and commits it on the condition that the
record still has the revision it read (`Expect`; 0 for a new agent). Only the committed event
changes the cache, through `apply`, whichever process committed it; status transitions notify the
metrics hook and the scheduler from there too. A command that loses a race re-reads (the store
delivers the conflicting event before it answers) and decides again, a bounded number of times.

Between commits only soft state changes in memory: heartbeat time, load and checks (they ride
along in the next commit) and this process's liveness bookkeeping (the current session, last_seen,
lease timers). An agent is alive while its session is open, or until its lease from the last
unary heartbeat (or registration, or the restart grace) runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from orchestrator.v1 import agent_pb2, event_pb2, registry_pb2
from orchestrator_server.agents import credentials
from orchestrator_server.agents.attributes import (
    apply_registration,
    apply_update,
    record_beat,
    validate_beat,
    validate_registration,
    validate_update,
)
from orchestrator_server.agents.index import AgentFilter, AgentIndex, AgentState, build_filter
from orchestrator_server.agents.sessions import (
    DRAIN_RETRY_AFTER,
    CloseReason,
    Leases,
    Session,
    SessionPort,
    refuse_second_holder,
)
from orchestrator_server.agents.status import (
    ALIVE_STATUSES,
    DEREGISTERED,
    DOWN,
    GOODBYE,
    derive_status,
    now_timestamp,
    refresh_status,
    set_status,
)
from orchestrator_server.config import Config
from orchestrator_server.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from orchestrator_server.store import Change, ConditionFailed, Expect, Store
from orchestrator_server.validation import Violations

log = logging.getLogger(__name__)

#: How often a command decides again after losing a race to another writer before giving up.
COMMAND_ATTEMPTS = 5


def new_id(prefix: str) -> str:
    """Identifiers that sort by creation time: prefix, 12 hex digits of milliseconds, 8 random."""
    return f"{prefix}{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


class AgentObserver(Protocol):
    """What the task scheduler needs to hear from the registry."""

    def agent_available(self, agent_id: str) -> None:
        """The agent may take (more) work: it came up, left drain or its capacity changed."""

    def agent_lost(self, agent_id: str, *, graceful: bool) -> None:
        """The agent went DOWN (graceful: it said goodbye or was deregistered)."""

    def agent_reattached(self, agent_id: str, running_attempt_ids: Sequence[str]) -> list[str]:
        """A session opened; returns the attempts the agent still holds."""


@dataclass
class _Plan:
    """What a command decided: the event carrying the new agent, and the revision it read."""

    event: event_pb2.Event
    expected_revision: int
    token_hash: str | None = None


@dataclass
class _KeyLock:
    lock: asyncio.Lock
    users: int = 0


class Registry:
    """Every agent and its liveness. Knows nothing of gRPC."""

    def __init__(self, config: Config, store: Store) -> None:
        self._config = config
        self._store = store
        self._index = AgentIndex()
        self._leases = Leases(config.heartbeat_timeout, self._lease_expired)
        # Registrations of one name + instance in this process, one at a time (they would only
        # lose to each other); other processes' collide on the store's uniqueness constraint.
        self._registering: dict[tuple[str, str], _KeyLock] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.observer: AgentObserver | None = None
        # Set while the process shuts down: sessions then end without taking their agents DOWN,
        # so after the restart they get a heartbeat timeout to come back and keep their work.
        self._closing = False
        # Called with every committed status transition, for metrics.
        self.on_transition: Callable[[agent_pb2.Agent, int], None] | None = None

    # -- startup -------------------------------------------------------------------------------

    def restore(self, agents: Sequence[agent_pb2.Agent], token_hashes: dict[str, str]) -> None:
        """Rebuilds the cache after a restart. Agents that were alive get a full heartbeat timeout
        to reconnect before they count as DOWN."""
        grace_until = asyncio.get_running_loop().time() + self._config.heartbeat_timeout
        for stored in agents:
            state = self._index.add(stored, token_hashes.get(stored.agent_id, ""))
            state.agent.session.streaming = False
            state.agent.assigned_tasks = 0
            if state.agent.status in ALIVE_STATUSES:
                self._leases.grant_until(state, grace_until)

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
        elif committed.revision and committed.revision <= state.agent.revision:
            return  # already applied
        else:
            previous = state.agent.status
            self._index.project(state, committed)
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
        issued without authentication when `authenticated_only`)."""
        state = self._index.get(agent_id)
        if state is None or state.agent.status == DEREGISTERED:
            raise NotFound(f"agent {agent_id} is not registered")
        credentials.verify(agent_id, state.token_hash, token, authenticated_only=authenticated_only)
        return state.agent

    def set_assigned_tasks(self, agent_id: str, count: int) -> None:
        """The scheduler's count of tasks placed on the agent (soft state, never committed alone)."""
        state = self._index.get(agent_id)
        if state is not None:
            state.agent.assigned_tasks = count

    # -- the write path ------------------------------------------------------------------------

    @staticmethod
    def _draft(state: AgentState, event_type: int) -> event_pb2.Event:
        """An event carrying a copy of the agent, for a command to change and commit."""
        event = event_pb2.Event(type=event_type)  # type: ignore[arg-type]
        event.agent.CopyFrom(state.agent)
        return event

    async def _commit(self, plan: _Plan) -> None:
        """Commits the plan if the agent still has the revision it was decided on; raises
        ConditionFailed (the projection is then as new as the conflicting commit) otherwise."""
        agent_id = plan.event.agent.agent_id
        change = Change(events=[plan.event], expect=[Expect(agent_id, plan.expected_revision)])
        if plan.token_hash is not None:
            change.agent_token_hashes[agent_id] = plan.token_hash
        await self._store.commit(change)

    async def _decide_and_commit(
        self, state: AgentState, decide: Callable[[AgentState], _Plan | None]
    ) -> bool:
        """Runs `decide` on the committed record and commits its plan, deciding again after a lost
        race; returns whether anything was committed (`decide` returned a plan)."""
        async with state.lock:
            for _ in range(COMMAND_ATTEMPTS):
                plan = decide(state)
                if plan is None:
                    return False
                try:
                    await self._commit(plan)
                except ConditionFailed as conflict:
                    log.debug(
                        "agent %s changed meanwhile, deciding again: %s", state.agent.agent_id, conflict
                    )
                    continue
                return True
        raise Aborted(f"agent {state.agent.agent_id} keeps changing; try again")

    # -- registration --------------------------------------------------------------------------

    async def register(
        self, request: registry_pb2.RegisterAgentRequest, *, authenticated: bool = True
    ) -> tuple[agent_pb2.Agent, str, bool]:
        """Registers (or re-registers) an agent; returns it, a fresh credential and whether it is new.
        `authenticated`: whether the caller presented a credential (see OPEN_TOKEN_PREFIX)."""
        validate_registration(request)
        key = (request.name, request.instance_id)
        async with self._one_registration(key):
            for _ in range(COMMAND_ATTEMPTS):
                state = self._index.by_name(*key)
                try:
                    if state is None:
                        return await self._register_new(request, authenticated)
                    async with state.lock:
                        return await self._register_again(state, request, authenticated)
                except ConditionFailed:
                    continue  # changed by another process meanwhile: decide again
                except _NameTaken:
                    continue  # registered by another process meanwhile: register again
        raise Aborted(f"agent {request.name}/{request.instance_id} keeps changing; try again")

    @contextlib.asynccontextmanager
    async def _one_registration(self, key: tuple[str, str]) -> AsyncIterator[None]:
        entry = self._registering.get(key)
        if entry is None:
            entry = self._registering[key] = _KeyLock(asyncio.Lock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._registering[key]

    async def _register_new(
        self, request: registry_pb2.RegisterAgentRequest, authenticated: bool
    ) -> tuple[agent_pb2.Agent, str, bool]:
        now = now_timestamp()
        event = event_pb2.Event(type=event_pb2.EVENT_TYPE_AGENT_REGISTERED, previous_status=DOWN)
        draft = event.agent
        draft.agent_id = new_id("agt_")
        draft.name, draft.instance_id, draft.status = request.name, request.instance_id, DOWN
        draft.registered_at.CopyFrom(now)
        draft.status_changed_at.CopyFrom(now)
        draft.updated_at.CopyFrom(now)
        apply_registration(draft, request)
        token, token_hash = credentials.issue(draft.agent_id, authenticated=authenticated)
        # Registering is a sign of life: the agent counts as alive for one heartbeat timeout,
        # as after a unary heartbeat, so REST callers that only register are discoverable.
        refresh_status(draft, True, "registered")
        try:
            await self._commit(_Plan(event, 0, token_hash))
        except AlreadyExists as error:
            raise _NameTaken from error
        state = self._index.get(draft.agent_id)
        assert state is not None, "a committed agent is projected before its commit returns"
        state.token_hash = token_hash
        if state.session is None:
            self._leases.extend(state)
        return state.agent, token, True

    async def _register_again(
        self, state: AgentState, request: registry_pb2.RegisterAgentRequest, authenticated: bool
    ) -> tuple[agent_pb2.Agent, str, bool]:
        agent = state.agent
        refuse_second_holder(state, "", self._live_window())
        if agent.type != request.type and agent.status != DEREGISTERED:
            raise AlreadyExists(
                f"agent {request.name}/{request.instance_id} is registered with type {agent.type!r}"
            )
        event = self._draft(state, event_pb2.EVENT_TYPE_AGENT_UPDATED)
        draft = event.agent
        previous = draft.status
        revived = previous == DEREGISTERED
        if revived:
            draft.status = DOWN
        apply_registration(draft, request)
        draft.updated_at.GetCurrentTime()
        token, token_hash = credentials.issue(draft.agent_id, authenticated=authenticated)
        if state.session is None:
            self._leases.extend(state)  # a sign of life (soft state), see _register_new
        changed = refresh_status(draft, state.alive, "registered")
        if revived:
            event.type = event_pb2.EVENT_TYPE_AGENT_REGISTERED
            event.previous_status = previous
        elif changed is not None:
            event.type = event_pb2.EVENT_TYPE_AGENT_STATUS_CHANGED
            event.previous_status = changed
        await self._commit(_Plan(event, agent.revision, token_hash))
        state.token_hash = token_hash
        return state.agent, token, False

    async def deregister(self, agent_id: str) -> agent_pb2.Agent:
        def decide(state: AgentState) -> _Plan | None:
            if state.agent.status == DEREGISTERED:
                return None  # already gone: no second event, transition or failover
            event = self._draft(state, event_pb2.EVENT_TYPE_AGENT_DEREGISTERED)
            event.previous_status = state.agent.status
            event.agent.draining = False
            set_status(event.agent, DEREGISTERED, "deregistered")
            return _Plan(event, state.agent.revision, token_hash="")

        state = self._state(agent_id)
        await self._decide_and_commit(state, decide)
        return state.agent

    async def update(
        self, agent_id: str, update: registry_pb2.AgentUpdate, paths: Sequence[str]
    ) -> agent_pb2.Agent:
        validate_update(update, paths)

        def decide(state: AgentState) -> _Plan:
            self._refuse_deregistered(state)
            event = self._draft(state, event_pb2.EVENT_TYPE_AGENT_UPDATED)
            apply_update(event.agent, update, paths)
            event.agent.updated_at.GetCurrentTime()
            return _Plan(event, state.agent.revision)

        state = self._live_record(agent_id)
        await self._decide_and_commit(state, decide)
        return state.agent

    async def set_draining(self, agent_id: str, draining: bool, reason: str) -> agent_pb2.Agent:
        violations = Violations()
        violations.text("reason", reason, 256)
        violations.raise_if_any()
        note = reason or ("drain requested" if draining else "drain ended")

        def decide(state: AgentState) -> _Plan | None:
            self._refuse_deregistered(state)
            if state.agent.draining == draining:
                return None
            event = self._draft(state, event_pb2.EVENT_TYPE_AGENT_UPDATED)
            event.agent.draining = draining
            event.agent.updated_at.GetCurrentTime()
            self._note_status(event, refresh_status(event.agent, state.alive, note))
            return _Plan(event, state.agent.revision)

        state = self._live_record(agent_id)
        if await self._decide_and_commit(state, decide) and state.session is not None:
            state.session.drain(draining, note)
        return state.agent

    # -- liveness ------------------------------------------------------------------------------

    async def unary_heartbeat(
        self, agent_id: str, load: agent_pb2.Load, checks: Sequence[agent_pb2.Check]
    ) -> tuple[agent_pb2.AgentStatus.ValueType, float]:
        """A heartbeat without a stream: the agent lives for one heartbeat timeout.
        Returns its status and the lease's wall-clock expiry."""
        validate_beat(load, checks)
        state = self._live_record(agent_id)
        self._leases.extend(state)
        record_beat(state.agent, load, checks, replace_checks=True)
        await self._refresh(state, "heartbeat")
        return state.agent.status, time.time() + self._config.heartbeat_timeout

    async def open_session(
        self,
        agent_id: str,
        token: str,
        peer: str,
        running_attempt_ids: Sequence[str],
        incarnation: str = "",
        *,
        port: SessionPort,
    ) -> tuple[Session, list[str]]:
        """Authenticates the hello, fences any older session and marks the agent alive.

        The older session is fenced only when it belongs to the same process (same incarnation:
        a reconnect that overtook the end of its broken stream) or has gone silent; a live session
        of another process keeps the identity and the newcomer is refused (IdentityInUse)."""
        violations = Violations()
        violations.identifier("hello.agent_id", agent_id)
        violations.text("hello.incarnation", incarnation, 64)
        if len(running_attempt_ids) > 100_000:
            violations.add("hello.running_attempt_ids", "too many attempts")
        violations.raise_if_any()
        if self._closing:
            raise Unavailable("the orchestrator is shutting down; reconnect shortly", DRAIN_RETRY_AFTER)
        self.verify_token(agent_id, token)
        state = self._state(agent_id)
        opened: list[Session] = []

        def decide(state: AgentState) -> _Plan:
            self.verify_token(agent_id, token)  # registered again or deregistered meanwhile
            epoch = state.agent.session.epoch + 1
            if not opened:
                refuse_second_holder(state, incarnation, self._live_window())
                if state.session is not None:
                    state.session.close(CloseReason.FENCED, f"superseded by a newer session (epoch {epoch})")
                # The session is this process's soft state: current from now, so the fenced
                # stream's end no longer takes the agent DOWN; its epoch is committed below.
                opened.append(Session(agent_id, epoch, peer, port, incarnation))
                state.session = opened[0]
                state.last_seen = asyncio.get_running_loop().time()
                state.lease_until = 0.0
                self._leases.arm(state)
            elif state.session is not opened[0]:
                raise Aborted(f"agent {agent_id}: superseded by a newer session while opening")
            opened[0].epoch = epoch
            now = now_timestamp()
            event = self._draft(state, event_pb2.EVENT_TYPE_AGENT_UPDATED)
            draft = event.agent
            draft.session.CopyFrom(
                agent_pb2.Session(epoch=epoch, peer=peer, owner=self._config.process_id, streaming=True)
            )
            draft.session.connected_at.CopyFrom(now)
            draft.last_heartbeat_at.CopyFrom(now)
            self._note_status(event, refresh_status(draft, True, "session opened"))
            return _Plan(event, state.agent.revision)

        try:
            await self._decide_and_commit(state, decide)
        except BaseException:
            if opened and state.session is opened[0]:
                state.session = None  # never confirmed: the agent's status follows its liveness again
                self._refresh_soon(state, "session failed to open")
            raise
        kept: list[str] = []
        if self.observer is not None:
            kept = self.observer.agent_reattached(agent_id, running_attempt_ids)
        return opened[0], kept

    def session_beat(
        self, session: Session, beat: registry_pb2.SessionBeat
    ) -> agent_pb2.AgentStatus.ValueType:
        """Records a beat; returns the status to ack with. Status changes commit in the background.
        A beat on a fenced session changes nothing (its stream is being closed)."""
        validate_beat(beat.load, beat.checks)
        state = self._index.get(session.agent_id)
        if state is None or state.session is not session:
            return DOWN
        state.last_seen = asyncio.get_running_loop().time()
        agent = state.agent
        record_beat(agent, beat.load, beat.checks, replace_checks=len(beat.checks) > 0)
        derived = derive_status(agent, True, "checks changed")
        if derived is None:
            return agent.status
        self._refresh_soon(state, "checks changed")
        return derived[0]

    def touch(self, session: Session) -> bool:
        """Any message on the session proves the agent is alive; False if the session was fenced."""
        state = self._index.get(session.agent_id)
        if state is None or state.session is not session:
            return False
        state.last_seen = asyncio.get_running_loop().time()
        return True

    async def close_session(self, session: Session, reason: str) -> None:
        """The stream ended. Unless a newer session took over, the agent is DOWN at once."""
        state = self._index.get(session.agent_id)
        if state is None or state.session is not session:
            return  # fenced by a newer session, or deregistered: nothing changes
        state.session = None
        if self._closing:
            return
        self._leases.cancel(state)
        why = GOODBYE if session.goodbye else reason

        def decide(state: AgentState) -> _Plan | None:
            if state.session is not None or state.agent.status == DEREGISTERED:
                return None  # a newer session took over meanwhile; it committed its own state
            event = self._draft(state, event_pb2.EVENT_TYPE_AGENT_UPDATED)
            event.agent.session.streaming = False
            self._note_status(event, refresh_status(event.agent, state.alive, why))
            return _Plan(event, state.agent.revision)

        await self._decide_and_commit(state, decide)

    def _lease_expired(self, state: AgentState) -> None:
        if state.session is not None:
            # Its handler marks the agent DOWN as the stream closes.
            state.session.close(CloseReason.TIMED_OUT, "heartbeat timeout")
            return
        state.lease_until = 0.0
        if derive_status(state.agent, False, "") is not None:
            self._refresh_soon(state, "heartbeat timeout")

    # -- status --------------------------------------------------------------------------------

    @staticmethod
    def _note_status(event: event_pb2.Event, previous: int | None) -> None:
        if previous is not None:
            event.type = event_pb2.EVENT_TYPE_AGENT_STATUS_CHANGED
            event.previous_status = previous  # type: ignore[assignment]

    def _refresh_decision(self, reason: str) -> Callable[[AgentState], _Plan | None]:
        def decide(state: AgentState) -> _Plan | None:
            state.refresh_pending = False  # a change from here on asks for another refresh
            event = self._draft(state, event_pb2.EVENT_TYPE_AGENT_STATUS_CHANGED)
            previous = refresh_status(event.agent, state.alive, reason)
            if previous is None:
                return None
            event.previous_status = previous
            return _Plan(event, state.agent.revision)

        return decide

    async def _refresh(self, state: AgentState, reason: str) -> None:
        """Commits the status the agent's liveness, drain and checks call for, if it changed."""
        await self._decide_and_commit(state, self._refresh_decision(reason))

    def _refresh_soon(self, state: AgentState, reason: str) -> None:
        """As `_refresh`, without making the caller wait (beats, timers); one at a time per agent."""
        if state.refresh_pending:
            return
        state.refresh_pending = True
        task = asyncio.get_running_loop().create_task(self._refresh(state, reason))
        self._background.add(task)
        task.add_done_callback(self._finish_background)

    def _finish_background(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background status commit failed: %s", task.exception())

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

    def shutdown(self, reason: str) -> None:
        """Asks every session to reconnect (the server is going away) and stops the timers."""
        self._closing = True
        for state in self._index.records():
            self._leases.cancel(state)
            if state.session is not None:
                state.session.reconnect(reason)


class _NameTaken(Exception):
    """Another process registered the same name + instance first."""
