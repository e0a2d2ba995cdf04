"""Agent statuses, and how an agent's status follows from its record and its liveness.

`derive_status` is a pure function; commands apply its answer to the draft they commit.
"""

from __future__ import annotations

import time
from typing import TypeAlias

from google.protobuf import timestamp_pb2

from orchestrator.v1 import agent_pb2

StatusValue: TypeAlias = agent_pb2.AgentStatus.ValueType
READY = agent_pb2.AGENT_STATUS_READY
DEGRADED = agent_pb2.AGENT_STATUS_DEGRADED
DRAINING = agent_pb2.AGENT_STATUS_DRAINING
DOWN = agent_pb2.AGENT_STATUS_DOWN
DEREGISTERED = agent_pb2.AGENT_STATUS_DEREGISTERED
ALIVE_STATUSES = frozenset({READY, DEGRADED, DRAINING})
FAILING = agent_pb2.CHECK_STATUS_FAILING

#: The status reason of an agent whose session ended with a goodbye: its loss is graceful (its
#: work moves at once), for whichever process reads the committed event.
GOODBYE = "goodbye"


def stamp_now(stamp: timestamp_pb2.Timestamp) -> None:
    """Sets `stamp` to the current time. Timestamp.GetCurrentTime goes through a datetime and
    costs ~5 % of a session beat's CPU; the beat path stamps twice (the heartbeat, the ack)."""
    stamp.seconds, stamp.nanos = divmod(time.time_ns(), 1_000_000_000)


def now_timestamp() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp_now(stamp)
    return stamp


def derive_status(agent: agent_pb2.Agent, alive: bool, reason: str) -> tuple[StatusValue, str] | None:
    """The status `agent` should have and why (`reason` unless checks fail), or None when its
    status stays: from liveness, drain and checks; a deregistered agent stays deregistered."""
    if agent.status == DEREGISTERED:
        return None
    if not alive:
        status = DOWN
    elif agent.draining:
        status = DRAINING
    elif agent.checks and any(check.status == FAILING for check in agent.checks):
        status = DEGRADED
    else:
        status = READY
    if status == agent.status:
        return None
    if status == DEGRADED:
        failing = [check.name for check in agent.checks if check.status == FAILING]
        reason = f"failing checks: {', '.join(failing)}"
    return status, reason


def set_status(draft: agent_pb2.Agent, status: StatusValue, reason: str) -> None:
    """Records a transition on a draft (a copy about to be committed)."""
    now = now_timestamp()
    draft.status = status
    draft.status_reason = reason
    draft.status_changed_at.CopyFrom(now)
    draft.updated_at.CopyFrom(now)
    draft.transitions += 1


def refresh_status(draft: agent_pb2.Agent, alive: bool, reason: str) -> StatusValue | None:
    """Applies the derived status to `draft`; returns its previous status if it changed."""
    derived = derive_status(draft, alive, reason)
    if derived is None:
        return None
    previous = draft.status
    set_status(draft, *derived)
    return previous
