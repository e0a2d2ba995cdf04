"""What callers may set on an agent: checked (INVALID_ARGUMENT naming the field) and copied onto a
draft. No state here."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from orchestrator.v1 import agent_pb2, registry_pb2
from orchestrator_server.agents.status import stamp_now
from orchestrator_server.validation import (
    MAX_ADDRESS_LENGTH,
    MAX_CAPABILITIES,
    MAX_ENDPOINTS,
    MAX_TASK_TYPES,
    Violations,
)

UPDATABLE_FIELDS = ("version", "capabilities", "labels", "endpoints", "max_concurrent_tasks", "task_types")


def validate_registration(request: registry_pb2.RegisterAgentRequest) -> None:
    violations = Violations()
    violations.name("name", request.name)
    violations.name("instance_id", request.instance_id)
    violations.name("type", request.type)
    violations.text("version", request.version, 128)
    _validate_attributes(
        violations, request.capabilities, request.labels, request.endpoints, request.max_concurrent_tasks
    )
    violations.names("task_types", request.task_types, MAX_TASK_TYPES)
    violations.raise_if_any()


def validate_update(update: registry_pb2.AgentUpdate, paths: Sequence[str]) -> None:
    violations = Violations()
    if not paths:
        violations.add("update_mask", "must name at least one field")
    for path in paths:
        if path not in UPDATABLE_FIELDS:
            violations.add(
                "update_mask", f"field {path!r} cannot be updated; allowed: {', '.join(UPDATABLE_FIELDS)}"
            )
    violations.text("update.version", update.version, 128)
    _validate_attributes(
        violations,
        update.capabilities,
        update.labels,
        update.endpoints,
        update.max_concurrent_tasks,
        "update.",
    )
    violations.names("update.task_types", update.task_types, MAX_TASK_TYPES)
    violations.raise_if_any()


def validate_beat(load: agent_pb2.Load, checks: Sequence[agent_pb2.Check]) -> None:
    if not checks and load.active_tasks >= 0 and 0.0 <= load.cpu <= 1.0 and 0.0 <= load.memory <= 1.0:
        return  # the common beat (every second from every agent): valid, no report built
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


def apply_registration(draft: agent_pb2.Agent, request: registry_pb2.RegisterAgentRequest) -> None:
    apply_update(draft, request, UPDATABLE_FIELDS)
    draft.type = request.type


def apply_update(
    draft: agent_pb2.Agent,
    source: registry_pb2.AgentUpdate | registry_pb2.RegisterAgentRequest,
    paths: Iterable[str],
) -> None:
    """Copies the fields named in `paths` from `source` (an update, or a registration: all of them)."""
    for path in paths:
        if path == "version":
            draft.version = source.version
        elif path == "capabilities":
            del draft.capabilities[:]
            draft.capabilities.extend(sorted(set(source.capabilities)))
        elif path == "labels":
            draft.labels.clear()
            draft.labels.update(source.labels)
        elif path == "endpoints":
            del draft.endpoints[:]
            draft.endpoints.extend(source.endpoints)
        elif path == "max_concurrent_tasks":
            draft.max_concurrent_tasks = source.max_concurrent_tasks
        elif path == "task_types":
            del draft.task_types[:]
            draft.task_types.extend(sorted(set(source.task_types)))


def record_beat(
    agent: agent_pb2.Agent, load: agent_pb2.Load, checks: Sequence[agent_pb2.Check], *, replace_checks: bool
) -> None:
    """Soft state: the latest load, checks and heartbeat time, kept in memory between commits."""
    agent.load.CopyFrom(load)
    if replace_checks:
        del agent.checks[:]
        agent.checks.extend(checks)
    stamp_now(agent.last_heartbeat_at)
