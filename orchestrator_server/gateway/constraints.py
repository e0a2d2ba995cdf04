"""What the server enforces on request fields, for the OpenAPI document to say it.

One table, built from `orchestrator_server.validation`'s own patterns and limits (the values the
domain checks), so the document and the checks cannot drift apart: `required` fields, and the
bounds, lengths and patterns of values. schemathesis generates requests from the document; before
this table it found 18 requests the document allowed and the server refused (`page_size=-2147483648`,
empty required names, ...).
"""

from __future__ import annotations

from typing import Any

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


class Rule:
    """The keywords of one field's values, and whether a request must set it."""

    def __init__(self, keywords: Schema, *, required: bool = False) -> None:
        self.keywords = keywords
        self.required = required


_REQUIRED_NAME = Rule(_NAME, required=True)
_OPTIONAL_NAME = Rule(_NAME)
_REQUIRED = Rule({}, required=True)

#: By full field name. Response messages that share a component (Task.spec) are always valid by
#: these rules: the server stored them after the same checks.
FIELD_RULES: dict[str, Rule] = {
    _P + "RegisterAgentRequest.name": _REQUIRED_NAME,
    _P + "RegisterAgentRequest.instance_id": _REQUIRED_NAME,
    _P + "RegisterAgentRequest.type": _REQUIRED_NAME,
    _P + "RegisterAgentRequest.capabilities": _OPTIONAL_NAME,
    _P + "SendHeartbeatRequest.agent_id": _REQUIRED_NAME,
    _P + "UpdateAgentRequest.agent_id": _REQUIRED_NAME,
    _P + "UpdateAgentRequest.update_mask": Rule({"minLength": 1}, required=True),
    _P + "ListAgentsRequest.type": _OPTIONAL_NAME,
    _P + "ListAgentsRequest.capability": _OPTIONAL_NAME,
    _P + "ListAgentsRequest.page_size": Rule(_PAGE_SIZE),
    _P + "ListAgentHealthRequest.page_size": Rule(_PAGE_SIZE),
    _P + "DiscoverAgentsRequest.page_size": Rule(_PAGE_SIZE),
    _P + "ListEndpointsRequest.page_size": Rule(_PAGE_SIZE),
    _P + "AgentQuery.type": _OPTIONAL_NAME,
    _P + "AgentQuery.capabilities": _OPTIONAL_NAME,
    _P + "CreateTaskRequest.spec": _REQUIRED,
    _P + "TaskSpec.type": _REQUIRED_NAME,
    _P + "TaskSpec.required_capabilities": _OPTIONAL_NAME,
    _P + "GetTaskRequest.task_id": _REQUIRED_NAME,
    _P + "ListTasksRequest.type": _OPTIONAL_NAME,
    _P + "ListTasksRequest.agent_id": _OPTIONAL_NAME,
    _P + "ListTasksRequest.page_size": Rule(_PAGE_SIZE),
    _P + "AssignTaskRequest.task_id": _REQUIRED_NAME,
    _P + "AssignTaskRequest.agent_id": _REQUIRED_NAME,
    _P + "CancelTaskRequest.task_id": _REQUIRED_NAME,
    _P + "CompleteTaskRequest.task_id": _REQUIRED_NAME,
    _P + "CompleteTaskRequest.attempt_id": _REQUIRED_NAME,
    _P + "FailTaskRequest.task_id": _REQUIRED_NAME,
    _P + "FailTaskRequest.attempt_id": _REQUIRED_NAME,
    _P + "ReportTaskProgressRequest.task_id": _REQUIRED_NAME,
    _P + "ReportTaskProgressRequest.attempt_id": _REQUIRED_NAME,
}


def rule_of(full_name: str) -> Rule | None:
    return FIELD_RULES.get(full_name)
