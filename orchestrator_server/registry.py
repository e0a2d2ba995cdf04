"""Agents: registration, sessions, liveness and lifecycle.

An agent is alive while its Heartbeat session is open, or (for callers without a stream) until its
lease from the last unary heartbeat runs out. The moment a session ends without a goodbye the agent
is DOWN: nothing waits for a timeout. A silent session is closed when its lease runs out. A newer
session fences the older one by epoch.

Durable state (registration, attributes, status, session epoch) is committed before any reply;
heartbeat timestamps and load are soft state kept in memory.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import hmac
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf import timestamp_pb2

from orchestrator.v1 import agent_pb2, event_pb2, registry_pb2
from orchestrator_server.config import Config
from orchestrator_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from orchestrator_server.selectors import Selector, parse_selector
from orchestrator_server.store import Change, Store
from orchestrator_server.validation import (
    MAX_ADDRESS_LENGTH,
    MAX_CAPABILITIES,
    MAX_ENDPOINTS,
    MAX_TASK_TYPES,
    Violations,
    decode_page_token,
    encode_page_token,
)

log = logging.getLogger(__name__)

Status = agent_pb2.AgentStatus
READY = agent_pb2.AGENT_STATUS_READY
DEGRADED = agent_pb2.AGENT_STATUS_DEGRADED
DRAINING = agent_pb2.AGENT_STATUS_DRAINING
DOWN = agent_pb2.AGENT_STATUS_DOWN
DEREGISTERED = agent_pb2.AGENT_STATUS_DEREGISTERED
ALIVE_STATUSES = frozenset({READY, DEGRADED, DRAINING})

UPDATABLE_FIELDS = ("version", "capabilities", "labels", "endpoints", "max_concurrent_tasks", "task_types")


def now_timestamp() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


#: Marks the stored hash of a credential issued to a caller without a credential (authentication
#: off), so that it stops working once keys are configured (`verify_token(authenticated_only=True)`).
OPEN_TOKEN_PREFIX = "open:"


class OpenCredential(Unauthenticated):
    """The credential is right, but was issued while authentication was off."""


def new_id(prefix: str) -> str:
    """Identifiers that sort by creation time: prefix, 12 hex digits of milliseconds, 8 random."""
    return f"{prefix}{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


def take_page(agents: Iterable[agent_pb2.Agent], page_size: int) -> tuple[list[agent_pb2.Agent], str]:
    """The first `page_size` agents and the token for the next page ("" when there is none)."""
    page = list(itertools.islice(agents, page_size + 1))
    if len(page) <= page_size:
        return page, ""
    return page[:page_size], encode_page_token(page[page_size - 1].agent_id)


class AgentObserver(Protocol):
    """What the task scheduler needs to hear from the registry."""

    def agent_available(self, agent_id: str) -> None:
        """The agent may take (more) work: it came up, left drain or its capacity changed."""

    def agent_lost(self, agent_id: str, *, graceful: bool) -> None:
        """The agent went DOWN (graceful: it said goodbye or was deregistered)."""

    def agent_reattached(self, agent_id: str, running_attempt_ids: Sequence[str]) -> list[str]:
        """A session opened; returns the attempts the agent still holds."""


class IdentityInUse(AlreadyExists):
    """A second process claims an agent identity (name + instance) another live process holds."""

    reason = "IDENTITY_IN_USE"


# How long a refused session is told to wait while the server drains (it restarts meanwhile).
DRAIN_RETRY_AFTER = 1.0


@dataclass(frozen=True)
class SessionEnd:
    """Why the server closed a session; `code` is the status code name to end the stream with."""

    code: str
    reason: str


@dataclass(eq=False)
class Session:
    """One open Heartbeat stream of one agent."""

    agent_id: str
    epoch: int
    peer: str
    # The agent process's random id from the hello ("" for clients that do not send one).
    incarnation: str = ""
    outbox: asyncio.Queue[registry_pb2.HeartbeatResponse] = field(default_factory=asyncio.Queue)
    ended: SessionEnd | None = None
    goodbye: bool = False
    # The task serving the stream; cancelled to end the stream from the server's side.
    handler: asyncio.Task[object] | None = None

    def push(self, message: registry_pb2.HeartbeatResponse) -> None:
        self.outbox.put_nowait(message)

    def end(self, code: str, reason: str) -> None:
        """Ends the stream from the server's side (fencing, timeout, shutdown)."""
        if self.ended is None:
            self.ended = SessionEnd(code, reason)
            if self.handler is not None and not self.handler.done():
                self.handler.cancel()


@dataclass(eq=False)
class AgentState:
    agent: agent_pb2.Agent
    token_hash: str
    session: Session | None = None
    # Loop time of the last sign of life (any message on the session, or a unary heartbeat).
    last_seen: float = 0.0
    # Loop time until which the agent counts as alive without a session (unary TTL, restart grace).
    lease_until: float = 0.0
    lease_timer: asyncio.TimerHandle | None = None

    @property
    def alive(self) -> bool:
        return self.session is not None or self.lease_until > asyncio.get_running_loop().time()


@dataclass(frozen=True)
class AgentFilter:
    type: str = ""
    status: int = 0
    capabilities: tuple[str, ...] = ()
    selector: Selector = field(default_factory=Selector)
    include_deregistered: bool = False

    def matches(self, agent: agent_pb2.Agent) -> bool:
        if agent.status == DEREGISTERED and not (self.include_deregistered or self.status == DEREGISTERED):
            return False
        if self.type and agent.type != self.type:
            return False
        if self.status and agent.status != self.status:
            return False
        if self.capabilities and not set(self.capabilities).issubset(agent.capabilities):
            return False
        return self.selector.matches(agent.labels)


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


class Registry:
    """Every agent and its liveness. Knows nothing of gRPC."""

    def __init__(self, config: Config, store: Store) -> None:
        self._config = config
        self._store = store
        self._agents: dict[str, AgentState] = {}
        self._by_name: dict[tuple[str, str], str] = {}
        # Every agent id, sorted: ids sort by registration time, and pages start after an id.
        self._ordered_ids: list[str] = []
        self.observer: AgentObserver | None = None
        # Set while the process shuts down: sessions then end without taking their agents DOWN,
        # so after the restart they get a heartbeat timeout to come back and keep their work.
        self._closing = False
        # Called with every status transition, for metrics.
        self.on_transition: Callable[[agent_pb2.Agent, int], None] | None = None

    # -- startup -------------------------------------------------------------------------------

    def restore(self, agents: Sequence[agent_pb2.Agent], token_hashes: dict[str, str]) -> None:
        """Rebuilds the cache after a restart. Agents that were alive get a full heartbeat timeout
        to reconnect before they count as DOWN."""
        loop = asyncio.get_running_loop()
        grace_until = loop.time() + self._config.heartbeat_timeout
        for stored in agents:
            agent = agent_pb2.Agent()
            agent.CopyFrom(stored)
            agent.session.streaming = False
            agent.assigned_tasks = 0
            state = AgentState(agent, token_hashes.get(agent.agent_id, ""))
            self._agents[agent.agent_id] = state
            self._by_name[(agent.name, agent.instance_id)] = agent.agent_id
            bisect.insort(self._ordered_ids, agent.agent_id)
            if agent.status in ALIVE_STATUSES:
                state.last_seen = loop.time()
                state.lease_until = grace_until
                self._arm_lease(state)

    # -- queries -------------------------------------------------------------------------------

    def get(self, agent_id: str) -> agent_pb2.Agent:
        return self._state(agent_id).agent

    def find(self, agent_id: str) -> agent_pb2.Agent | None:
        state = self._agents.get(agent_id)
        return state.agent if state else None

    def agents(self) -> Iterable[agent_pb2.Agent]:
        return (state.agent for state in self._agents.values())

    def agents_after(self, after: str = "") -> Iterator[agent_pb2.Agent]:
        """Agents in registration (id) order, starting after the id `after`."""
        ids = self._ordered_ids
        for index in range(bisect.bisect_right(ids, after), len(ids)):
            yield self._agents[ids[index]].agent

    def session_of(self, agent_id: str) -> Session | None:
        state = self._agents.get(agent_id)
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
        matching = (
            agent for agent in self.agents_after(decode_page_token(page_token)) if query.matches(agent)
        )
        return take_page(matching, page_size)

    def verify_token(self, agent_id: str, token: str, *, authenticated_only: bool = False) -> agent_pb2.Agent:
        """The agent whose credential `token` is; Unauthenticated otherwise (OpenCredential for one
        issued without authentication when `authenticated_only`)."""
        state = self._agents.get(agent_id)
        if state is None or state.agent.status == DEREGISTERED:
            raise NotFound(f"agent {agent_id} is not registered")
        stored = state.token_hash.removeprefix(OPEN_TOKEN_PREFIX)
        if not token or not hmac.compare_digest(stored, hash_token(token)):
            raise Unauthenticated(f"invalid credential for agent {agent_id}")
        if authenticated_only and stored != state.token_hash:
            raise OpenCredential(
                f"the credential of agent {agent_id} was issued while authentication was off; "
                "register again with an agent key"
            )
        return state.agent

    # -- registration --------------------------------------------------------------------------

    async def register(
        self, request: registry_pb2.RegisterAgentRequest, *, authenticated: bool = True
    ) -> tuple[agent_pb2.Agent, str, bool]:
        """Registers (or re-registers) an agent; returns it, a fresh credential and whether it is new.
        `authenticated`: whether the caller presented a credential (see OPEN_TOKEN_PREFIX)."""
        self._validate_registration(request)
        existing_id = self._by_name.get((request.name, request.instance_id))
        now = now_timestamp()
        created = existing_id is None
        if existing_id is None:
            agent = agent_pb2.Agent(
                agent_id=new_id("agt_"), name=request.name, instance_id=request.instance_id, status=DOWN
            )
            agent.registered_at.CopyFrom(now)
            agent.status_changed_at.CopyFrom(now)
            state = AgentState(agent, "")
            self._agents[agent.agent_id] = state
            self._by_name[(agent.name, agent.instance_id)] = agent.agent_id
            bisect.insort(self._ordered_ids, agent.agent_id)
        else:
            state = self._agents[existing_id]
            agent = state.agent
            self._refuse_second_holder(state, "")
            if agent.type != request.type and agent.status != DEREGISTERED:
                raise AlreadyExists(
                    f"agent {request.name}/{request.instance_id} is registered with type {agent.type!r}"
                )
        revived = agent.status == DEREGISTERED
        previous = agent.status
        if revived:
            agent.status = DOWN
        self._apply_attributes(agent, request)
        agent.type = request.type
        agent.updated_at.CopyFrom(now)
        # `<agent_id>.<secret>`: the interceptor finds the agent from the credential alone (auth.py).
        token = f"{agent.agent_id}.{secrets.token_urlsafe(32)}"
        state.token_hash = ("" if authenticated else OPEN_TOKEN_PREFIX) + hash_token(token)
        if state.session is None:
            # Registering is a sign of life: the agent counts as alive for one heartbeat timeout,
            # as after a unary heartbeat, so REST callers that only register are discoverable.
            self._extend_lease(state)
        self._refresh_status(state, "registered")
        if created or revived:
            await self._commit(
                state, event_pb2.EVENT_TYPE_AGENT_REGISTERED, previous=previous, token_changed=True
            )
        else:
            await self._commit_status(
                state, previous if agent.status != previous else None, token_changed=True
            )
        if self.observer is not None and state.alive:
            self.observer.agent_available(agent.agent_id)
        return agent, token, created

    def _validate_registration(self, request: registry_pb2.RegisterAgentRequest) -> None:
        violations = Violations()
        violations.name("name", request.name)
        violations.name("instance_id", request.instance_id)
        violations.name("type", request.type)
        violations.text("version", request.version, 128)
        self._validate_attributes(
            violations, request.capabilities, request.labels, request.endpoints, request.max_concurrent_tasks
        )
        violations.names("task_types", request.task_types, MAX_TASK_TYPES)
        violations.raise_if_any()

    @staticmethod
    def _validate_attributes(
        violations: Violations,
        capabilities: Iterable[str],
        labels: dict[str, str] | object,
        endpoints: Sequence[agent_pb2.Endpoint],
        max_concurrent_tasks: int,
        prefix: str = "",
    ) -> None:
        violations.names(f"{prefix}capabilities", capabilities, MAX_CAPABILITIES)
        violations.labels(f"{prefix}labels", labels)  # type: ignore[arg-type]
        if len(endpoints) > MAX_ENDPOINTS:
            violations.add(f"{prefix}endpoints", f"more than {MAX_ENDPOINTS} endpoints")
        else:
            for index, endpoint in enumerate(endpoints):
                violations.name(f"{prefix}endpoints[{index}].name", endpoint.name)
                if not endpoint.address:
                    violations.add(f"{prefix}endpoints[{index}].address", "is required")
                violations.text(f"{prefix}endpoints[{index}].address", endpoint.address, MAX_ADDRESS_LENGTH)
                if endpoint.protocol not in agent_pb2.EndpointProtocol.values():
                    violations.add(f"{prefix}endpoints[{index}].protocol", "unknown protocol")
        if max_concurrent_tasks < 0 or max_concurrent_tasks > 100_000:
            violations.add(f"{prefix}max_concurrent_tasks", "must be between 0 and 100000")

    @staticmethod
    def _apply_attributes(agent: agent_pb2.Agent, source: registry_pb2.RegisterAgentRequest) -> None:
        agent.version = source.version
        del agent.capabilities[:]
        agent.capabilities.extend(sorted(set(source.capabilities)))
        agent.labels.clear()
        agent.labels.update(source.labels)
        del agent.endpoints[:]
        agent.endpoints.extend(source.endpoints)
        agent.max_concurrent_tasks = source.max_concurrent_tasks
        del agent.task_types[:]
        agent.task_types.extend(sorted(set(source.task_types)))

    async def deregister(self, agent_id: str) -> agent_pb2.Agent:
        state = self._state(agent_id)
        if state.agent.status == DEREGISTERED:
            return state.agent  # already gone: no second event, transition or failover
        if state.session is not None:
            state.session.end("NOT_FOUND", "agent deregistered")
            state.session = None
        self._cancel_lease(state)
        state.lease_until = 0.0
        state.token_hash = ""
        agent = state.agent
        agent.draining = False
        previous = agent.status
        self._transition(state, DEREGISTERED, "deregistered", now_timestamp())
        await self._commit(
            state, event_pb2.EVENT_TYPE_AGENT_DEREGISTERED, previous=previous, token_changed=True
        )
        if self.observer is not None:
            self.observer.agent_lost(agent_id, graceful=True)
        return agent

    async def update(
        self, agent_id: str, update: registry_pb2.AgentUpdate, paths: Sequence[str]
    ) -> agent_pb2.Agent:
        violations = Violations()
        if not paths:
            violations.add("update_mask", "must name at least one field")
        for path in paths:
            if path not in UPDATABLE_FIELDS:
                violations.add(
                    "update_mask", f"field {path!r} cannot be updated; allowed: {', '.join(UPDATABLE_FIELDS)}"
                )
        violations.text("update.version", update.version, 128)
        self._validate_attributes(
            violations,
            update.capabilities,
            update.labels,
            update.endpoints,
            update.max_concurrent_tasks,
            "update.",
        )
        violations.names("update.task_types", update.task_types, MAX_TASK_TYPES)
        violations.raise_if_any()
        state = self._live_record(agent_id)
        agent = state.agent
        if "version" in paths:
            agent.version = update.version
        if "capabilities" in paths:
            del agent.capabilities[:]
            agent.capabilities.extend(sorted(set(update.capabilities)))
        if "labels" in paths:
            agent.labels.clear()
            agent.labels.update(update.labels)
        if "endpoints" in paths:
            del agent.endpoints[:]
            agent.endpoints.extend(update.endpoints)
        if "max_concurrent_tasks" in paths:
            agent.max_concurrent_tasks = update.max_concurrent_tasks
        if "task_types" in paths:
            del agent.task_types[:]
            agent.task_types.extend(sorted(set(update.task_types)))
        agent.updated_at.GetCurrentTime()
        await self._commit(state, event_pb2.EVENT_TYPE_AGENT_UPDATED)
        if self.observer is not None and state.alive:
            self.observer.agent_available(agent_id)
        return agent

    async def set_draining(self, agent_id: str, draining: bool, reason: str) -> agent_pb2.Agent:
        violations = Violations()
        violations.text("reason", reason, 256)
        violations.raise_if_any()
        state = self._live_record(agent_id)
        agent = state.agent
        if agent.draining == draining:
            return agent
        agent.draining = draining
        agent.updated_at.GetCurrentTime()
        note = reason or ("drain requested" if draining else "drain ended")
        await self._commit_status(state, self._refresh_status(state, note))
        if state.session is not None:
            state.session.push(
                registry_pb2.HeartbeatResponse(drain=registry_pb2.DrainNotice(draining=draining, reason=note))
            )
        if not draining and self.observer is not None and state.alive:
            self.observer.agent_available(agent_id)
        return agent

    # -- liveness ------------------------------------------------------------------------------

    async def unary_heartbeat(
        self, agent_id: str, load: agent_pb2.Load, checks: Sequence[agent_pb2.Check]
    ) -> tuple[agent_pb2.AgentStatus.ValueType, float]:
        """A heartbeat without a stream: the agent lives for one heartbeat timeout.
        Returns its status and the lease's wall-clock expiry."""
        self._validate_beat(load, checks)
        state = self._live_record(agent_id)
        was_alive = state.alive
        self._extend_lease(state)
        self._record_beat(state.agent, load, checks, replace_checks=True)
        previous = self._refresh_status(state, "heartbeat")
        if previous is not None:
            await self._commit(state, event_pb2.EVENT_TYPE_AGENT_STATUS_CHANGED, previous=previous)
            if not was_alive and self.observer is not None:
                self.observer.agent_available(agent_id)
        return state.agent.status, time.time() + self._config.heartbeat_timeout

    async def open_session(
        self,
        agent_id: str,
        token: str,
        peer: str,
        running_attempt_ids: Sequence[str],
        incarnation: str = "",
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
        state = self._agents[agent_id]
        agent = state.agent
        self._refuse_second_holder(state, incarnation)
        if state.session is not None:
            state.session.end("ABORTED", f"superseded by a newer session (epoch {agent.session.epoch + 1})")
        session = Session(agent_id, agent.session.epoch + 1, peer, incarnation)
        state.session = session
        state.last_seen = asyncio.get_running_loop().time()
        state.lease_until = 0.0
        self._arm_lease(state)
        now = now_timestamp()
        agent.session.CopyFrom(
            agent_pb2.Session(epoch=session.epoch, peer=peer, owner=self._config.process_id, streaming=True)
        )
        agent.session.connected_at.CopyFrom(now)
        agent.last_heartbeat_at.CopyFrom(now)
        await self._commit_status(state, self._refresh_status(state, "session opened"))
        kept: list[str] = []
        if self.observer is not None:
            kept = self.observer.agent_reattached(agent_id, running_attempt_ids)
            self.observer.agent_available(agent_id)
        return session, kept

    def _refuse_second_holder(self, state: AgentState, incarnation: str) -> None:
        """Raises IdentityInUse when a live session of another process holds the agent.

        Live means heard from within two beat intervals (plus a second of slack): a stream that
        has been silent longer is presumed half-open (its process gone with its host) and is
        fenced by the newcomer. Sessions that sent no incarnation (raw clients) are always fenced,
        as before incarnations existed."""
        session = state.session
        if session is None or session.ended is not None or not session.incarnation:
            return
        if incarnation == session.incarnation:
            return  # the same process, resuming
        live_window = min(self._config.heartbeat_timeout, 2 * self._config.heartbeat_interval + 1.0)
        if asyncio.get_running_loop().time() - state.last_seen > live_window:
            return
        agent = state.agent
        raise IdentityInUse(
            f"agent {agent.name}/{agent.instance_id} is already connected from {session.peer} by another "
            "process; two processes cannot share one identity: give each its own instance id "
            "(Agent(instance_id=...), or AGENT_INSTANCE in the examples)"
        )

    def session_beat(
        self, session: Session, beat: registry_pb2.SessionBeat
    ) -> agent_pb2.AgentStatus.ValueType:
        """Records a beat; returns the status to ack with. Status changes commit in the background.
        A beat on a fenced session changes nothing (its stream is being closed)."""
        self._validate_beat(beat.load, beat.checks)
        state = self._agents.get(session.agent_id)
        if state is None or state.session is not session:
            return DOWN
        state.last_seen = asyncio.get_running_loop().time()
        agent = state.agent
        self._record_beat(agent, beat.load, beat.checks, replace_checks=len(beat.checks) > 0)
        previous = self._refresh_status(state, "checks changed")
        if previous is not None:
            self._commit_soon(state, event_pb2.EVENT_TYPE_AGENT_STATUS_CHANGED, previous)
        return agent.status

    def touch(self, session: Session) -> bool:
        """Any message on the session proves the agent is alive; False if the session was fenced."""
        state = self._agents.get(session.agent_id)
        if state is None or state.session is not session:
            return False
        state.last_seen = asyncio.get_running_loop().time()
        return True

    async def close_session(self, session: Session, reason: str) -> None:
        """The stream ended. Unless a newer session took over, the agent is DOWN at once."""
        state = self._agents.get(session.agent_id)
        if state is None or state.session is not session:
            return  # fenced by a newer session, or deregistered: nothing changes
        state.session = None
        if self._closing:
            return
        self._cancel_lease(state)
        agent = state.agent
        agent.session.streaming = False
        previous = self._refresh_status(state, "goodbye" if session.goodbye else reason)
        if self.observer is not None:
            self.observer.agent_lost(session.agent_id, graceful=session.goodbye)
        await self._commit_status(state, previous)

    @staticmethod
    def _validate_beat(load: agent_pb2.Load, checks: Sequence[agent_pb2.Check]) -> None:
        violations = Violations()
        if load.active_tasks < 0:
            violations.add("load.active_tasks", "must not be negative")
        for name, value in (("load.cpu", load.cpu), ("load.memory", load.memory)):
            if not 0.0 <= value <= 1.0:
                violations.add(name, "must be between 0.0 and 1.0")
        if len(checks) > 64:
            violations.add("checks", "more than 64 checks")
        else:
            for index, check in enumerate(checks):
                violations.name(f"checks[{index}].name", check.name)
                violations.text(f"checks[{index}].message", check.message, 512)
                if check.status not in agent_pb2.CheckStatus.values():
                    violations.add(f"checks[{index}].status", "unknown check status")
        violations.raise_if_any()

    @staticmethod
    def _record_beat(
        agent: agent_pb2.Agent,
        load: agent_pb2.Load,
        checks: Sequence[agent_pb2.Check],
        *,
        replace_checks: bool,
    ) -> None:
        agent.load.CopyFrom(load)
        if replace_checks:
            del agent.checks[:]
            agent.checks.extend(checks)
        agent.last_heartbeat_at.GetCurrentTime()

    # -- leases --------------------------------------------------------------------------------

    def _arm_lease(self, state: AgentState) -> None:
        """One timer per agent, re-armed lazily: a beat only moves `last_seen`, never the timer."""
        if state.lease_timer is None:
            loop = asyncio.get_running_loop()
            state.lease_timer = loop.call_at(
                self._lease_deadline(state), self._check_lease, state.agent.agent_id
            )

    def _extend_lease(self, state: AgentState) -> None:
        state.last_seen = asyncio.get_running_loop().time()
        state.lease_until = state.last_seen + self._config.heartbeat_timeout
        self._arm_lease(state)

    def _lease_deadline(self, state: AgentState) -> float:
        return max(state.last_seen + self._config.heartbeat_timeout, state.lease_until)

    def _cancel_lease(self, state: AgentState) -> None:
        if state.lease_timer is not None:
            state.lease_timer.cancel()
            state.lease_timer = None

    def _check_lease(self, agent_id: str) -> None:
        state = self._agents.get(agent_id)
        if state is None:
            return
        state.lease_timer = None
        loop = asyncio.get_running_loop()
        deadline = self._lease_deadline(state)
        if deadline > loop.time():
            state.lease_timer = loop.call_at(deadline, self._check_lease, agent_id)
            return
        if state.session is not None:
            # Its handler marks the agent DOWN as the stream closes.
            state.session.end("DEADLINE_EXCEEDED", "heartbeat timeout")
            return
        state.lease_until = 0.0
        previous = self._refresh_status(state, "heartbeat timeout")
        if previous is not None:
            if self.observer is not None:
                self.observer.agent_lost(agent_id, graceful=False)
            self._commit_soon(state, event_pb2.EVENT_TYPE_AGENT_STATUS_CHANGED, previous)

    # -- status --------------------------------------------------------------------------------

    def _refresh_status(self, state: AgentState, reason: str) -> int | None:
        """Derives the status from liveness, drain and checks; returns the previous status if it changed."""
        agent = state.agent
        if agent.status == DEREGISTERED:
            return None
        if not state.alive:
            status = DOWN
        elif agent.draining:
            status = DRAINING
        elif any(check.status == agent_pb2.CHECK_STATUS_FAILING for check in agent.checks):
            status = DEGRADED
        else:
            status = READY
        if status == agent.status:
            return None
        previous = agent.status
        if status == DEGRADED:
            failing = [check.name for check in agent.checks if check.status == agent_pb2.CHECK_STATUS_FAILING]
            reason = f"failing checks: {', '.join(failing)}"
        self._transition(state, status, reason, now_timestamp())
        return previous

    def _transition(self, state: AgentState, status: int, reason: str, now: timestamp_pb2.Timestamp) -> None:
        agent = state.agent
        previous = agent.status
        agent.status = status  # type: ignore[assignment]
        agent.status_reason = reason
        agent.status_changed_at.CopyFrom(now)
        agent.updated_at.CopyFrom(now)
        agent.transitions += 1
        if self.on_transition is not None:
            self.on_transition(agent, previous)
        if previous in ALIVE_STATUSES and status == DOWN:
            log.info("agent %s (%s) is DOWN: %s", agent.agent_id, agent.name, reason)

    # -- persistence ---------------------------------------------------------------------------

    @staticmethod
    def _event(state: AgentState, event_type: int, previous: int | None) -> event_pb2.Event:
        event = event_pb2.Event(type=event_type)  # type: ignore[arg-type]
        event.agent.CopyFrom(state.agent)
        if previous is not None:
            event.previous_status = previous  # type: ignore[assignment]
        return event

    async def _commit_status(
        self, state: AgentState, previous: int | None, *, token_changed: bool = False
    ) -> None:
        """Commits a change that may or may not have moved the status (`previous` is None if not)."""
        if previous is None:
            await self._commit(state, event_pb2.EVENT_TYPE_AGENT_UPDATED, token_changed=token_changed)
        else:
            await self._commit(
                state,
                event_pb2.EVENT_TYPE_AGENT_STATUS_CHANGED,
                previous=previous,
                token_changed=token_changed,
            )

    async def _commit(
        self, state: AgentState, event_type: int, *, previous: int | None = None, token_changed: bool = False
    ) -> None:
        change = Change(events=[self._event(state, event_type, previous)])
        if token_changed:
            change.agent_token_hashes[state.agent.agent_id] = state.token_hash
        state.agent.revision = await self._store.commit(change)

    def _commit_soon(self, state: AgentState, event_type: int, previous: int | None) -> None:
        """Commits without making the caller wait (heartbeat hot path, timers)."""
        change = Change(events=[self._event(state, event_type, previous)])
        task = asyncio.get_running_loop().create_task(self._store.commit(change))
        _background.add(task)
        task.add_done_callback(_finish_background)

    # -- helpers -------------------------------------------------------------------------------

    def _state(self, agent_id: str) -> AgentState:
        state = self._agents.get(agent_id)
        if state is None:
            if not agent_id:
                raise InvalidArgument.field("agent_id", "is required")
            raise NotFound(f"agent {agent_id} not found")
        return state

    def _live_record(self, agent_id: str) -> AgentState:
        state = self._state(agent_id)
        if state.agent.status == DEREGISTERED:
            raise FailedPrecondition(f"agent {agent_id} is deregistered")
        return state

    def shutdown(self, reason: str) -> None:
        """Asks every session to reconnect (the server is going away) and stops the timers."""
        self._closing = True
        for state in self._agents.values():
            self._cancel_lease(state)
            if state.session is not None:
                state.session.push(
                    registry_pb2.HeartbeatResponse(reconnect=registry_pb2.ReconnectRequest(reason=reason))
                )


_background: set[asyncio.Task[int]] = set()


def _finish_background(task: asyncio.Task[int]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("background commit failed: %s", task.exception())
