"""Agents: registration, sessions, liveness and lifecycle.

- `index`: the committed agents in memory (by id, by name + instance, in order) and their queries;
- `credentials`: agent tokens, stored as hashes;
- `sessions`: the session port the domain talks to a stream through, and lease timers;
- `status`: an agent's status as a function of its record and liveness;
- `attributes`: what callers may set, checked and copied;
- `commit`: the write path (decide on a copy, commit on a condition, decide again);
- `projection`: committed events → the cache, observers and metrics; the queries;
- `liveness`: sessions, heartbeats, leases;
- `registry`: registration, updates, drain, deregistration.
"""

from orchestrator_server.agents.attributes import UPDATABLE_FIELDS
from orchestrator_server.agents.credentials import OPEN_TOKEN_PREFIX, OpenCredential, hash_token
from orchestrator_server.agents.index import AgentFilter, AgentState, build_filter, take_page
from orchestrator_server.agents.projection import AgentObserver
from orchestrator_server.agents.registry import Registry, new_id
from orchestrator_server.agents.sessions import (
    DRAIN_RETRY_AFTER,
    CloseReason,
    IdentityInUse,
    Session,
    SessionPort,
)
from orchestrator_server.agents.status import (
    ALIVE_STATUSES,
    DEGRADED,
    DEREGISTERED,
    DOWN,
    DRAINING,
    READY,
    now_timestamp,
)

__all__ = [
    "ALIVE_STATUSES",
    "DEGRADED",
    "DEREGISTERED",
    "DOWN",
    "DRAINING",
    "DRAIN_RETRY_AFTER",
    "OPEN_TOKEN_PREFIX",
    "READY",
    "UPDATABLE_FIELDS",
    "AgentFilter",
    "AgentObserver",
    "AgentState",
    "CloseReason",
    "IdentityInUse",
    "OpenCredential",
    "Registry",
    "Session",
    "SessionPort",
    "build_filter",
    "hash_token",
    "new_id",
    "now_timestamp",
    "take_page",
]
