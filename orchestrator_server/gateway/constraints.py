"""What the server enforces on request fields, for the OpenAPI document to say it.

Two sources, each the one place for what it says: whether a field is required comes from its
`google.api.field_behavior = REQUIRED` annotation in the protos; the bounds, lengths and patterns of
values come from the table below, built on `orchestrator_server.validation`'s own patterns and
limits (the values the domain checks), so document and checks cannot drift apart. schemathesis
generates requests from the document; before this it found 18 requests the document allowed and
the server refused (`page_size=-2147483648`, empty required names, ...).
"""

from __future__ import annotations

from typing import Any

from google.api import field_behavior_pb2
from google.protobuf.descriptor import FieldDescriptor

from orchestrator_server import validation

Schema = dict[str, Any]

_P = "orchestrator.v1."
#: A name or identifier: what `Violations.name` / `Violations.identifier` accept.
_NAME: Schema = {
    "minLength": 1,
    "maxLength": validation.MAX_ID_LENGTH,
    "pattern": validation.NAME_PATTERN.pattern,
}
_PAGE_SIZE: Schema = {"minimum": 0, "maximum": validation.MAX_PAGE_SIZE}
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
)
_PAGED = (
    "ListAgentsRequest",
    "ListAgentHealthRequest",
    "DiscoverAgentsRequest",
    "ListEndpointsRequest",
    "ListTasksRequest",
)

#: Schema keywords of each value of a field (an element, for repeated fields), by full field name.
#: Response messages that share a component (Task.spec) satisfy them: the server stored them after
#: the same checks.
FIELD_KEYWORDS: dict[str, Schema] = {
    **{_P + name: _NAME for name in _NAMED},
    **{f"{_P}{message}.page_size": _PAGE_SIZE for message in _PAGED},
    _P + "UpdateAgentRequest.update_mask": {"minLength": 1},
}


def keywords_of(field: FieldDescriptor) -> Schema:
    return dict(FIELD_KEYWORDS.get(field.full_name, {}))


def is_required(field: FieldDescriptor) -> bool:
    """Whether the protos mark the field `(google.api.field_behavior) = REQUIRED`."""
    # The stubs of googleapis-common-protos type the extension as a plain FieldDescriptor.
    extension: Any = field_behavior_pb2.field_behavior
    behaviors: list[int] = list(field.GetOptions().Extensions[extension])
    return field_behavior_pb2.REQUIRED in behaviors
