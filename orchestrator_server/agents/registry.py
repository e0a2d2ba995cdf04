"""Agents: the registry's commands.

Writes go one way: command → conditional commit → event → projection (see `commit` and
`projection`). Registration, attribute updates, drain and deregistration are here; sessions,
heartbeats and leases in `liveness`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from orchestrator.v1 import agent_pb2, event_pb2, registry_pb2
from orchestrator_server.agents import credentials
from orchestrator_server.agents.attributes import (
    apply_registration,
    apply_update,
    validate_registration,
    validate_update,
)
from orchestrator_server.agents.commit import (
    COMMAND_ATTEMPTS,
    Plan,
    commit_plan,
    decide_and_commit,
    draft_event,
    note_status,
)
from orchestrator_server.agents.index import AgentState
from orchestrator_server.agents.liveness import Liveness
from orchestrator_server.agents.sessions import refuse_second_holder
from orchestrator_server.agents.status import DEREGISTERED, DOWN, now_timestamp, refresh_status, set_status
from orchestrator_server.cluster import Cluster
from orchestrator_server.config import Config
from orchestrator_server.errors import Aborted, AlreadyExists
from orchestrator_server.store import ConditionFailed, Store
from orchestrator_server.validation import Violations


def new_id(prefix: str) -> str:
    """Identifiers that sort by creation time: prefix, 12 hex digits of milliseconds, 8 random."""
    return f"{prefix}{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


@dataclass
class _KeyLock:
    lock: asyncio.Lock
    users: int = 0


class Registry(Liveness):
    """Every agent and its liveness. Knows nothing of gRPC."""

    def __init__(self, config: Config, store: Store, cluster: Cluster) -> None:
        super().__init__(config, store, cluster)
        # Registrations of one name + instance in this process, one at a time (they would only
        # lose to each other); other processes' collide on the store's uniqueness constraint.
        self._registering: dict[tuple[str, str], _KeyLock] = {}

    async def register(
        self, request: registry_pb2.RegisterAgentRequest, *, authenticated: bool = True
    ) -> tuple[agent_pb2.Agent, str, bool]:
        """Registers (or re-registers) an agent; returns it, a fresh credential and whether it is new.
        `authenticated`: whether the caller presented a credential (see OPEN_TOKEN_PREFIX)."""
        validate_registration(request)
        self._refuse_unless_serving()
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
        draft.session.owner = self._me  # this replica times the lease registering grants
        draft.status_changed_at.CopyFrom(now)
        draft.updated_at.CopyFrom(now)
        apply_registration(draft, request)
        token, token_hash = credentials.issue(draft.agent_id, authenticated=authenticated)
        # Registering is a sign of life: the agent counts as alive for one heartbeat timeout,
        # as after a unary heartbeat, so REST callers that only register are discoverable.
        refresh_status(draft, True, "registered")
        try:
            await commit_plan(self._store, Plan(event, 0, token_hash))
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
        event = draft_event(state, event_pb2.EVENT_TYPE_AGENT_UPDATED)
        draft = event.agent
        previous = draft.status
        revived = previous == DEREGISTERED
        if revived:
            draft.status = DOWN
        apply_registration(draft, request)
        draft.updated_at.GetCurrentTime()
        token, token_hash = credentials.issue(draft.agent_id, authenticated=authenticated)
        committed = agent.session
        if state.session is None and not (committed.streaming and self.cluster.alive(committed.owner)):
            # A sign of life (soft state, see _register_new), timed here from now on.
            self._leases.extend(state)
            state.timed_elsewhere, state.orphan_of = False, None
            draft.session.owner, draft.session.streaming = self._me, False
        changed = refresh_status(draft, state.alive, "registered")
        if revived:
            event.type = event_pb2.EVENT_TYPE_AGENT_REGISTERED
            event.previous_status = previous
        elif changed is not None:
            event.type = event_pb2.EVENT_TYPE_AGENT_STATUS_CHANGED
            event.previous_status = changed
        await commit_plan(self._store, Plan(event, agent.revision, token_hash))
        state.token_hash = token_hash
        return state.agent, token, False

    async def deregister(self, agent_id: str) -> agent_pb2.Agent:
        def decide(state: AgentState) -> Plan | None:
            if state.agent.status == DEREGISTERED:
                return None  # already gone: no second event, transition or failover
            event = draft_event(state, event_pb2.EVENT_TYPE_AGENT_DEREGISTERED)
            event.previous_status = state.agent.status
            event.agent.draining = False
            set_status(event.agent, DEREGISTERED, "deregistered")
            return Plan(event, state.agent.revision, token_hash="")

        state = self._state(agent_id)
        await decide_and_commit(self._store, state, decide)
        return state.agent

    async def update(
        self, agent_id: str, update: registry_pb2.AgentUpdate, paths: Sequence[str]
    ) -> agent_pb2.Agent:
        validate_update(update, paths)

        def decide(state: AgentState) -> Plan:
            self._refuse_deregistered(state)
            event = draft_event(state, event_pb2.EVENT_TYPE_AGENT_UPDATED)
            apply_update(event.agent, update, paths)
            event.agent.updated_at.GetCurrentTime()
            return Plan(event, state.agent.revision)

        state = self._live_record(agent_id)
        await decide_and_commit(self._store, state, decide)
        return state.agent

    async def set_draining(self, agent_id: str, draining: bool, reason: str) -> agent_pb2.Agent:
        violations = Violations()
        violations.text("reason", reason, 256)
        violations.raise_if_any()
        note = reason or ("drain requested" if draining else "drain ended")

        def decide(state: AgentState) -> Plan | None:
            self._refuse_deregistered(state)
            if state.agent.draining == draining:
                return None
            event = draft_event(state, event_pb2.EVENT_TYPE_AGENT_UPDATED)
            event.agent.draining = draining
            event.agent.updated_at.GetCurrentTime()
            note_status(event, refresh_status(event.agent, state.alive, note))
            return Plan(event, state.agent.revision)

        state = self._live_record(agent_id)
        await decide_and_commit(self._store, state, decide)  # the projection tells the session
        return state.agent


class _NameTaken(Exception):
    """Another process registered the same name + instance first."""
