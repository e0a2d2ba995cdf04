"""Sessions and leases: how the domain sees an agent's open stream, and when silence ends it.

The domain talks to a session only through `SessionPort` (implemented by the gRPC servicer, which
owns the stream, its outbox and writer, and maps a `CloseReason` to a status code). Everything here
is soft state of this process: which session is current, when the agent was last heard from, and
the lease timers; the agent's committed record (epoch, status) changes only through commits.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from orchestrator.v1 import task_pb2
from orchestrator_server.errors import AlreadyExists

if TYPE_CHECKING:
    from orchestrator_server.agents.index import AgentState

# How long a refused session is told to wait while the server drains (it restarts meanwhile).
DRAIN_RETRY_AFTER = 1.0


class CloseReason(enum.Enum):
    """Why the server ends a session."""

    #: A newer session of the same agent took over.
    FENCED = "fenced"
    #: Nothing was heard within the heartbeat timeout.
    TIMED_OUT = "timed out"
    #: The agent was deregistered.
    DEREGISTERED = "deregistered"
    #: A message could not be delivered down the stream.
    UNDELIVERABLE = "undeliverable"
    #: The server is going away; the agent should reconnect.
    SHUTDOWN = "shutdown"


class SessionPort(Protocol):
    """What the domain may do with an open session stream. Every call returns at once."""

    def assign(self, task: task_pb2.Task, attempt_id: str) -> None:
        """Pushes an assignment of `task` (attempt `attempt_id`)."""

    def cancel(self, task_id: str, attempt_id: str, reason: str) -> None:
        """Tells the agent to stop an attempt."""

    def drain(self, draining: bool, reason: str) -> None:
        """Tells the agent it entered (or left) drain."""

    def reconnect(self, reason: str) -> None:
        """Asks the agent to reconnect (the server is going away)."""

    def close(self, reason: CloseReason, message: str) -> None:
        """Ends the stream from the server's side."""


class IdentityInUse(AlreadyExists):
    """A second process claims an agent identity (name + instance) another live process holds."""

    reason = "IDENTITY_IN_USE"


@dataclass(eq=False)
class Session:
    """One open Heartbeat session of one agent, as the domain sees it."""

    agent_id: str
    epoch: int
    peer: str
    port: SessionPort
    # The agent process's random id from the hello ("" for clients that do not send one).
    incarnation: str = ""
    goodbye: bool = False
    # Why the server ended it (None while open, or when the agent ended it).
    ended: CloseReason | None = None

    def assign(self, task: task_pb2.Task, attempt_id: str) -> None:
        self.port.assign(task, attempt_id)

    def cancel(self, task_id: str, attempt_id: str, reason: str) -> None:
        self.port.cancel(task_id, attempt_id, reason)

    def drain(self, draining: bool, reason: str) -> None:
        self.port.drain(draining, reason)

    def reconnect(self, reason: str) -> None:
        self.port.reconnect(reason)

    def close(self, reason: CloseReason, message: str) -> None:
        """Ends the stream from the server's side (fencing, timeout, deregistration, shutdown)."""
        if self.ended is None:
            self.ended = reason
            self.port.close(reason, message)


def refuse_second_holder(state: AgentState, incarnation: str, live_window: float) -> None:
    """Raises IdentityInUse when a live session of another process holds the agent.

    Live means heard from within `live_window`: a stream that has been silent longer is presumed
    half-open (its process gone with its host) and is fenced by the newcomer. Sessions that sent
    no incarnation (raw clients) are always fenced, as before incarnations existed."""
    session = state.session
    if session is None or session.ended is not None or not session.incarnation:
        return
    if incarnation == session.incarnation:
        return  # the same process, resuming
    if asyncio.get_running_loop().time() - state.last_seen > live_window:
        return
    agent = state.agent
    raise IdentityInUse(
        f"agent {agent.name}/{agent.instance_id} is already connected from {session.peer} by another "
        "process; two processes cannot share one identity: give each its own instance id "
        "(Agent(instance_id=...), or AGENT_INSTANCE in the examples)"
    )


class Leases:
    """One timer per agent, re-armed lazily: a beat only moves `last_seen`, never the timer; when
    the timer fires it re-arms at `last_seen + timeout` if needed, else calls `on_expired`."""

    def __init__(self, timeout: float, on_expired: Callable[[AgentState], None]) -> None:
        self._timeout = timeout
        self._on_expired = on_expired

    def arm(self, state: AgentState) -> None:
        if state.lease_timer is None:
            loop = asyncio.get_running_loop()
            state.lease_timer = loop.call_at(self._deadline(state), self._fire, state)

    def extend(self, state: AgentState) -> None:
        """The agent counts as alive without a session for one timeout from now."""
        state.last_seen = asyncio.get_running_loop().time()
        state.lease_until = state.last_seen + self._timeout
        self.arm(state)

    def grant_until(self, state: AgentState, until: float) -> None:
        """Alive without a session until the loop time `until` (the restart grace)."""
        state.last_seen = asyncio.get_running_loop().time()
        state.lease_until = until
        self.arm(state)

    def cancel(self, state: AgentState) -> None:
        if state.lease_timer is not None:
            state.lease_timer.cancel()
            state.lease_timer = None

    def _deadline(self, state: AgentState) -> float:
        return max(state.last_seen + self._timeout, state.lease_until)

    def _fire(self, state: AgentState) -> None:
        state.lease_timer = None
        loop = asyncio.get_running_loop()
        deadline = self._deadline(state)
        if deadline > loop.time():
            state.lease_timer = loop.call_at(deadline, self._fire, state)
            return
        self._on_expired(state)
