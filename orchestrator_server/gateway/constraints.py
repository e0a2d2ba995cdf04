"""What the server enforces on request fields, for the OpenAPI document to say it.

Two sources, each the one place for what it says: whether a field is required comes from its
`google.api.field_behavior = REQUIRED` annotation in the protos; the bounds, lengths and patterns of
values come from the table below, built on `orchestrator_server.validation`'s own patterns and
limits (the values the domain checks), so document and checks cannot drift apart. schemathesis
generates requests from the document; before this it found 18 requests the document allowed and
the server refused (`page_size=-2147483648`, empty required names, ...).
"""

from __future__ import annotations

import re
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf.descriptor import FieldDescriptor

from orchestrator_server import validation
from orchestrator_server.agents import UPDATABLE_FIELDS
from orchestrator_server.tasks import MAX_ATTEMPTS_LIMIT

Schema = dict[str, Any]

_P = "orchestrator.v1."
#: A name or identifier: what `Violations.name` / `Violations.identifier` accept.
_NAME: Schema = {
    "minLength": 1,
    "maxLength": validation.MAX_ID_LENGTH,
    "pattern": validation.NAME_PATTERN.pattern,
}
_PAGE_SIZE: Schema = {"minimum": 0, "maximum": validation.MAX_PAGE_SIZE}
# A FieldMask is written in proto3 JSON as lowerCamelCase paths joined by commas.
_UPDATABLE = "|".join(
    re.sub(r"_([a-z])", lambda match: match.group(1).upper(), name) for name in UPDATABLE_FIELDS
)
_CAPACITY: Schema = {"minimum": 0, "maximum": 100_000}
_SHARE: Schema = {"minimum": 0.0, "maximum": 1.0}
#: A label value (of a map: keys cannot be described in OpenAPI 3.0, their pattern is in the text).
_LABEL_VALUE: Schema = {"pattern": validation.LABEL_VALUE_PATTERN.pattern}
_NAMED = (
    "RegisterAgentRequest.name",
    "RegisterAgentRequest.instance_id",
    "RegisterAgentRequest.type",
    "RegisterAgentRequest.capabilities",
    "SendHeartbeatRequest.agent_id",
    "UpdateAgentRequest.agent_id",
    "ListAgentsRequest.type",
    "ListAgentsRequest.capability",
    "AgentQuery.type",
    "AgentQuery.capabilities",
    "TaskSpec.type",
    "TaskSpec.required_capabilities",
    "GetTaskRequest.task_id",
    "ListTasksRequest.type",
    "ListTasksRequest.agent_id",
    "AssignTaskRequest.task_id",
    "AssignTaskRequest.agent_id",
    "CancelTaskRequest.task_id",
    "CompleteTaskRequest.task_id",
    "CompleteTaskRequest.attempt_id",
    "FailTaskRequest.task_id",
    "FailTaskRequest.attempt_id",
    "ReportTaskProgressRequest.task_id",
    "ReportTaskProgressRequest.attempt_id",
    "Endpoint.name",
    "Check.name",
)
_PAGED = (
    "ListAgentsRequest",
    "ListAgentHealthRequest",
    "DiscoverAgentsRequest",
    "ListEndpointsRequest",
    "ListTasksRequest",
)

#: Schema keywords of each value of a field (an element of a list, a value of a map), by full name.
#: Response messages that share a component (Task.spec) satisfy them: the server stored them after
#: the same checks.
FIELD_KEYWORDS: dict[str, Schema] = {
    **{_P + name: _NAME for name in _NAMED},
    **{f"{_P}{message}.page_size": _PAGE_SIZE for message in _PAGED},
    _P + "UpdateAgentRequest.update_mask": {"pattern": f"^({_UPDATABLE})(,({_UPDATABLE}))*$"},
    _P + "RegisterAgentRequest.labels": _LABEL_VALUE,
    _P + "AgentUpdate.labels": _LABEL_VALUE,
    _P + "TaskSpec.labels": _LABEL_VALUE,
    _P + "Endpoint.address": {"minLength": 1, "maxLength": validation.MAX_ADDRESS_LENGTH},
    _P + "Check.message": {"maxLength": 512},
    _P + "RegisterAgentRequest.version": {"maxLength": 128},
    _P + "AgentUpdate.version": {"maxLength": 128},
    _P + "TaskSpec.max_attempts": {"minimum": 0, "maximum": MAX_ATTEMPTS_LIMIT},
    _P + "TaskSpec.idempotency_key": {"maxLength": 256},
    _P + "TaskSpec.routing_key": {"maxLength": 256},
    # Literal in the domain's checks (registry.py, tasks.py); test_gateway_contract.py probes them.
    _P + "RegisterAgentRequest.max_concurrent_tasks": _CAPACITY,
    _P + "AgentUpdate.max_concurrent_tasks": _CAPACITY,
    _P + "TaskSpec.priority": {"minimum": -1000, "maximum": 1000},
    _P + "Load.active_tasks": {"minimum": 0},
    _P + "Load.cpu": _SHARE,
    _P + "Load.memory": _SHARE,
}


def keywords_of(field: FieldDescriptor) -> Schema:
    return dict(FIELD_KEYWORDS.get(field.full_name, {}))


def is_required(field: FieldDescriptor) -> bool:
    """Whether the protos mark the field `(google.api.field_behavior) = REQUIRED`."""
    # The stubs of googleapis-common-protos type the extension as a plain FieldDescriptor.
    extension: Any = field_behavior_pb2.field_behavior
    behaviors: list[int] = list(field.GetOptions().Extensions[extension])
    return field_behavior_pb2.REQUIRED in behaviors
