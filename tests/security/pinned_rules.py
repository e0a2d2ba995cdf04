"""Who may call each RPC, written out by hand.

The access tests take their expectations from here, never from `auth.RULES`: a rule loosened by
mistake in the server (CancelTask made READ) then disagrees with this table and with the calls the
tests make. A new RPC needs a row here before its tests pass."""

from __future__ import annotations

from typing import NamedTuple

from orchestrator_server.auth import Access


class Pinned(NamedTuple):
    access: Access
    #: For Access.AGENT: the request field that must name the calling agent ("" if none).
    agent_field: str = ""


_REGISTRY = "/orchestrator.v1.RegistryService/"
_HEALTH = "/orchestrator.v1.HealthService/"
_DISCOVERY = "/orchestrator.v1.DiscoveryService/"
_TASKS = "/orchestrator.v1.TasksService/"
PUBLIC = Pinned(Access.PUBLIC)
READ = Pinned(Access.READ)
ADMIN = Pinned(Access.ADMIN)
AGENT_SELF = Pinned(Access.AGENT, "agent_id")
#: The agent holding the attempt (the servicer checks the attempt's owner), or an admin.
ATTEMPT_OWNER = Pinned(Access.AGENT)

PINNED: dict[str, Pinned] = {
    _REGISTRY + "RegisterAgent": Pinned(Access.REGISTER),
    _REGISTRY + "DeregisterAgent": AGENT_SELF,
    _REGISTRY + "GetAgent": READ,
    _REGISTRY + "ListAgents": READ,
    _REGISTRY + "UpdateAgent": AGENT_SELF,
    _REGISTRY + "DrainAgent": ADMIN,
    _REGISTRY + "UndrainAgent": ADMIN,
    _REGISTRY + "SendHeartbeat": AGENT_SELF,
    _REGISTRY + "Heartbeat": Pinned(Access.SESSION),
    _HEALTH + "GetAgentHealth": READ,
    _HEALTH + "ListAgentHealth": READ,
    _HEALTH + "GetSystemHealth": READ,
    _HEALTH + "WatchAgentHealth": READ,
    _DISCOVERY + "DiscoverAgents": READ,
    _DISCOVERY + "ListEndpoints": READ,
    _DISCOVERY + "ResolveAgent": READ,
    _DISCOVERY + "WatchAgents": READ,
    _TASKS + "CreateTask": ADMIN,
    _TASKS + "GetTask": READ,
    _TASKS + "ListTasks": READ,
    _TASKS + "AssignTask": ADMIN,
    _TASKS + "CancelTask": ADMIN,
    _TASKS + "CompleteTask": ATTEMPT_OWNER,
    _TASKS + "FailTask": ATTEMPT_OWNER,
    _TASKS + "ReportTaskProgress": ATTEMPT_OWNER,
    _TASKS + "WatchTask": READ,
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.health.v1.Health/List": PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": READ,
    # Pinned ahead of being served (issue 10, item 6): same access as v1alpha.
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": READ,
}
