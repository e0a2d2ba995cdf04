"""The published contract tells the truth (issue 10, item 19): /openapi.json marks the fields the
server requires and the bounds and patterns it enforces, from one table built on the domain's own
validation constants, so requests the document allows are not refused with 400."""

from __future__ import annotations

import re
from typing import Any

import pytest
from google.protobuf import descriptor_pool, message_factory

from orchestrator.v1 import registry_pb2, task_pb2, tasks_pb2
from orchestrator_server import validation
from orchestrator_server.gateway import DEFAULT_SERVICES
from orchestrator_server.gateway.constraints import FIELD_KEYWORDS, is_required
from orchestrator_server.gateway.http_rules import build_route_table
from orchestrator_server.gateway.openapi import build_openapi
from tests.conftest import Running
from tests.support import invalid_fields

DOCUMENT = build_openapi(build_route_table(DEFAULT_SERVICES), list(DEFAULT_SERVICES))


def _parameters(path: str, method: str) -> dict[str, Any]:
    return {parameter["name"]: parameter for parameter in DOCUMENT["paths"][path][method]["parameters"]}


def test_every_rule_names_a_field_of_the_protos() -> None:
    pool = descriptor_pool.Default()
    for full_name in FIELD_KEYWORDS:
        message_name, _, field_name = full_name.rpartition(".")
        assert field_name in pool.FindMessageTypeByName(message_name).fields_by_name, full_name


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/agents/list", "get"),
        ("/tasks/list", "get"),
        ("/health/agents", "get"),
        ("/discovery/endpoints", "get"),
    ],
)
def test_page_sizes_are_bounded_as_the_server_bounds_them(path: str, method: str) -> None:
    schema = _parameters(path, method)["page_size"]["schema"]
    assert schema["minimum"] == 0 and schema["maximum"] == validation.MAX_PAGE_SIZE
    assert not schema["minimum"] <= -2147483648  # the value schemathesis sent


def test_required_fields_are_marked_in_bodies_and_queries() -> None:
    register = DOCUMENT["paths"]["/agents/register"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert set(register["required"]) == {"name", "instance_id", "type"}
    name = register["properties"]["name"]
    assert name["minLength"] == 1 and name["pattern"] == validation.NAME_PATTERN.pattern
    assert _parameters("/tasks/status", "get")["task_id"]["required"] is True
    create = DOCUMENT["paths"]["/tasks/create"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert create["required"] == ["spec"]
    assert DOCUMENT["components"]["schemas"]["orchestrator.v1.TaskSpec"]["required"] == ["type"]
    complete = DOCUMENT["paths"]["/tasks/{task_id}/complete"]["post"]["requestBody"]["content"][
        "application/json"
    ]
    assert complete["schema"]["required"] == ["attempt_id"]
    heartbeat = DOCUMENT["paths"]["/agents/heartbeat"]["post"]["requestBody"]["content"]["application/json"]
    assert heartbeat["schema"]["required"] == ["agent_id"]


def test_documented_patterns_are_the_servers_and_valid_ecmascript() -> None:
    pattern = DOCUMENT["components"]["schemas"]["orchestrator.v1.TaskSpec"]["properties"]["type"]["pattern"]
    compiled = re.compile(pattern)
    for value in ("estimate", "a.b-c_d", "x" * 128):
        assert compiled.match(value) and validation.NAME_PATTERN.match(value)
    for value in ("", "-x", "x" * 129, "a b"):
        assert not compiled.match(value) and not validation.NAME_PATTERN.match(value)


def _required_fields(method: Any) -> list[str]:
    return [field.name for field in method.input_type.fields if is_required(field)]


async def test_every_required_field_is_refused_when_missing(running: Running) -> None:
    """The annotations tell the truth: leaving out a REQUIRED field is INVALID_ARGUMENT naming it."""
    checked = []
    for service in DEFAULT_SERVICES:
        for method in service.methods:
            required = _required_fields(method)
            if not required or method.client_streaming:
                continue
            violations = await invalid_fields(_call(running, method))
            # A check may stop at the first missing field (UpdateAgent looks at its mask first).
            assert set(required) & {name.split(".")[0] for name in violations}, (
                method.full_name,
                violations,
            )
            checked.append(method.name)
    assert len(checked) >= 15, checked


def _call(running: Running, method: Any) -> Any:
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    name = f"/{method.containing_service.full_name}/{method.name}"
    channel = running.stubs.channel
    if method.server_streaming:
        stream = channel.unary_stream(
            name,
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )(request_class(), timeout=10)
        return stream.read()
    return channel.unary_unary(
        name,
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )(request_class(), timeout=10)


@pytest.mark.parametrize(
    ("field", "make"),
    [
        (
            "RegisterAgentRequest.max_concurrent_tasks",
            lambda value: registry_pb2.RegisterAgentRequest(
                name="bounds", instance_id="1", type="worker", max_concurrent_tasks=value
            ),
        ),
        (
            "TaskSpec.priority",
            lambda value: tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="t", priority=value)),
        ),
        (
            "TaskSpec.max_attempts",
            lambda value: tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="t", max_attempts=value)),
        ),
    ],
)
async def test_documented_bounds_are_the_servers(running: Running, field: str, make: Any) -> None:
    """The bounds the document gives are exactly where the server starts refusing."""
    keywords = FIELD_KEYWORDS["orchestrator.v1." + field]
    call = running.stubs.registry.RegisterAgent if "Register" in field else running.stubs.tasks.CreateTask
    for value in (keywords["minimum"], keywords["maximum"]):
        await call(make(value))
    for value in (keywords["minimum"] - 1, keywords["maximum"] + 1):
        violations = await invalid_fields(call(make(value)))
        assert any(name.endswith(field.rsplit(".", 1)[1]) for name in violations), violations
