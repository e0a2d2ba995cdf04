"""Liveness: sessions, heartbeats and leases, as commands on the agents' projection.

An agent is alive while its Heartbeat session is open, or (for callers without a stream) until its
lease from the last unary heartbeat runs out. The moment a session ends without a goodbye the agent
is DOWN: nothing waits for a timeout. A silent session is closed when its lease runs out. A newer
session fences the older one by epoch, committed with the agent.

What changes here before a commit is soft state only: the current session, last_seen, lease
timers, and the latest beat (load, checks, heartbeat time). A status change they cause is decided
and committed like any command; on the beat path, in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from orchestrator.v1 import agent_pb2, event_pb2, registry_pb2
from orchestrator_server.agents.attributes import record_beat, validate_beat
from orchestrator_server.agents.commit import (
    COMMAND_ATTEMPTS,
    Plan,
    decide_and_commit,
    draft_event,
    note_status,
)
from orchestrator_server.agents.index import AgentState
from orchestrator_server.agents.projection import AgentProjection
from orchestrator_server.agents.sessions import (
    DRAIN_RETRY_AFTER,
    CloseReason,
    Session,
    SessionPort,
    refuse_second_holder,
)
from orchestrator_server.agents.status import (
    DEREGISTERED,
    DOWN,
    GOODBYE,
    derive_status,
    now_timestamp,
    refresh_status,
    set_status,
)
from orchestrator_server.errors import Aborted, Unavailable
from orchestrator_server.store import Change
from orchestrator_server.validation import Violations

log = logging.getLogger(__name__)


class Liveness(AgentProjection):
    """Sessions, heartbeats and leases of the agents."""

    async def unary_heartbeat(
        self, agent_id: str, load: agent_pb2.Load, checks: Sequence[agent_pb2.Check]
    ) -> tuple[agent_pb2.AgentStatus.ValueType, float]:
        """A heartbeat without a stream: the agent lives for one heartbeat timeout.
        Returns its status and the lease's wall-clock expiry.

        The replica that got the latest beat times the lease: when that is a change, the new owner
        is committed (the agent's session owner), so the previous one stops timing it."""
        validate_beat(load, checks)
        self._refuse_unless_serving()
        state = self._live_record(agent_id)
        committed = state.agent.session
        if state.session is None and committed.streaming and self.cluster.alive(committed.owner):
            # Its stream lives on another replica, which times it: the beat is only soft state.
            _record_beat(state, load, checks, replace_checks=True)
            return state.agent.status, time.time() + self._config.heartbeat_timeout
        self._leases.extend(state)
        state.timed_elsewhere, state.orphan_of = False, None
        _record_beat(state, load, checks, replace_checks=True)
        if state.session is None and committed.owner != self._me:
            await self._refresh(state, "heartbeat", claim=True)
        elif state.lock.locked() or derive_status(state.agent, True, "") is not None:
            await self._refresh(state, "heartbeat")
        return state.agent.status, time.time() + self._config.heartbeat_timeout

    def _refuse_unless_serving(self) -> None:
        """A replica that lost its membership (the database) takes no sign of life: the agent is
        told to go to another replica."""
        if not self.cluster.serving:
            raise Unavailable(
                "this replica cannot reach the database; reconnect to another", DRAIN_RETRY_AFTER
            )

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
        self._refuse_unless_serving()
        if self._index.get(agent_id) is None:
            # Registered on another replica a moment ago? An empty commit delivers every event
            # committed before it (the store's promise), so the hello is answered from a view at
            # least as new as the registration.
            await self._store.commit(Change())
        await self.verify_token_fresh(agent_id, token)
        state = self._state(agent_id)
        opened: list[Session] = []

        def decide(state: AgentState) -> Plan:
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
            event = draft_event(state, event_pb2.EVENT_TYPE_AGENT_UPDATED)
            draft = event.agent
            draft.session.CopyFrom(
                agent_pb2.Session(epoch=epoch, peer=peer, owner=self._config.process_id, streaming=True)
            )
            draft.session.connected_at.CopyFrom(now)
            draft.last_heartbeat_at.CopyFrom(now)
            note_status(event, refresh_status(draft, True, "session opened"))
            return Plan(event, state.agent.revision)

        try:
            await decide_and_commit(self._store, state, decide)
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
        _record_beat(state, beat.load, beat.checks, replace_checks=len(beat.checks) > 0)
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
        if not self.cluster.serving:
            return  # it was asked to reconnect elsewhere; what this replica decides now is stale
        why = GOODBYE if session.goodbye else reason

        def decide(state: AgentState) -> Plan | None:
            if state.session is not None or state.agent.status == DEREGISTERED:
                return None  # a newer session took over meanwhile; it committed its own state
            event = draft_event(state, event_pb2.EVENT_TYPE_AGENT_UPDATED)
            event.agent.session.streaming = False
            note_status(event, refresh_status(event.agent, state.alive, why))
            return Plan(event, state.agent.revision)

        await decide_and_commit(self._store, state, decide)

    def _lease_expired(self, state: AgentState) -> None:
        if state.session is not None:
            # Its handler marks the agent DOWN as the stream closes.
            state.session.close(CloseReason.TIMED_OUT, "heartbeat timeout")
            return
        lost = state.orphan_of
        if not self.cluster.serving or (lost is not None and not self.cluster.leader):
            self._time_liveness(state)  # no longer this replica's to decide
            return
        state.lease_until = 0.0
        reason = "heartbeat timeout"
        if lost is not None:
            reason = f"heartbeat timeout: its replica {lost or '(unknown)'} was lost and it did not reconnect"
        if derive_status(state.agent, False, "") is not None:
            self._refresh_soon(state, reason)

    def _refresh_decision(self, reason: str, claim: bool) -> Callable[[AgentState], Plan | None]:
        def decide(state: AgentState) -> Plan | None:
            state.refresh_pending = False  # a change from here on asks for another refresh
            derived = derive_status(state.agent, state.alive, reason)
            claiming = claim and state.agent.session.owner != self._me
            if derived is None and not claiming:
                return None  # the common case (a unary beat): no copy made
            event = draft_event(state, event_pb2.EVENT_TYPE_AGENT_UPDATED)
            if claiming:
                event.agent.session.owner, event.agent.session.streaming = self._me, False
            if derived is not None:
                note_status(event, state.agent.status)
                set_status(event.agent, *derived)
            return Plan(event, state.agent.revision)

        return decide

    async def _refresh(self, state: AgentState, reason: str, *, claim: bool = False) -> None:
        """Commits the status the agent's liveness, drain and checks call for, if it changed, until
        it holds: a beat that arrives while a status commits changes only the soft checks, which
        may call for another status once that commit lands. `claim`: also records this replica as
        the one timing the agent's lease (a unary beat arrived here)."""
        for _ in range(COMMAND_ATTEMPTS):
            if not await decide_and_commit(self._store, state, self._refresh_decision(reason, claim)):
                return

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

    def shutdown(self, reason: str) -> None:
        """Asks every session to reconnect (the server is going away) and stops the timers."""
        self._closing = True
        for state in self._index.records():
            self._leases.cancel(state)
            if state.session is not None:
                state.session.reconnect(reason)


def _record_beat(
    state: AgentState, load: agent_pb2.Load, checks: Sequence[agent_pb2.Check], *, replace_checks: bool
) -> None:
    record_beat(state.agent, load, checks, replace_checks=replace_checks)
    state.changed()
