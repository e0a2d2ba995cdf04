"""Path templates and the route table built from the protos' google.api.http annotations."""

from __future__ import annotations

import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool

from orchestrator_server.gateway import DEFAULT_SERVICES
from orchestrator_server.gateway.http_rules import HttpRuleError, PathTemplate, build_route_table


def test_simple_variable_matches_one_segment_and_decodes_it() -> None:
    template = PathTemplate.parse("/agents/{agent_id}")
    assert template.match("/agents/a%2Fb%20c") == {"agent_id": "a/b c"}
    assert template.match("/agents/") is None
    assert template.match("/agents/x/y") is None
    assert template.match("/agent/x") is None


def test_variable_with_sub_template_multi_segment_and_verb() -> None:
    nested = PathTemplate.parse("/v1/{name=projects/*/agents/*}")
    assert nested.match("/v1/projects/p1/agents/a1") == {"name": "projects/p1/agents/a1"}
    assert nested.match("/v1/projects/p1/tasks/a1") is None
    assert nested.openapi_path == "/v1/{name}"

    rest = PathTemplate.parse("/files/{path=**}")
    assert rest.match("/files/a/b/c") == {"path": "a/b/c"}
    assert rest.match("/files/") is None

    verb = PathTemplate.parse("/tasks/{task_id}:cancel")
    assert verb.match("/tasks/t1:cancel") == {"task_id": "t1"}
    assert verb.match("/tasks/t1") is None


@pytest.mark.parametrize(
    "bad",
    ["agents", "/agents/{id", "/agents/{id}}", "/a/**/b", "/a/{x={y}}", "/a/{1x}", "/a//b", "/a:"],
)
def test_invalid_templates_are_refused_at_startup(bad: str) -> None:
    with pytest.raises(HttpRuleError):
        PathTemplate.parse(bad)


@pytest.fixture(scope="module")
def table():  # type: ignore[no-untyped-def]
    return build_route_table(DEFAULT_SERVICES)


@pytest.mark.parametrize(
    ("method", "path", "rpc", "values"),
    [
        ("GET", "/agents/list", "ListAgents", {}),
        ("GET", "/agents/a1", "GetAgent", {"agent_id": "a1"}),
        ("DELETE", "/agents/a1", "DeregisterAgent", {"agent_id": "a1"}),
        ("PATCH", "/agents/a1", "UpdateAgent", {"agent_id": "a1"}),
        ("POST", "/agents/a1/drain", "DrainAgent", {"agent_id": "a1"}),
        ("POST", "/agents/heartbeat", "SendHeartbeat", {}),
        ("GET", "/health/system", "GetSystemHealth", {}),
        ("GET", "/health/agents", "ListAgentHealth", {}),
        ("GET", "/health/watch", "WatchAgentHealth", {}),
        ("GET", "/health/a1", "GetAgentHealth", {"agent_id": "a1"}),
        ("GET", "/tasks/status", "GetTask", {}),
        ("GET", "/tasks/list", "ListTasks", {}),
        ("GET", "/tasks/t1", "GetTask", {"task_id": "t1"}),
        ("GET", "/tasks/t1/watch", "WatchTask", {"task_id": "t1"}),
    ],
)
def test_literal_segments_win_over_variables(table, method, path, rpc, values) -> None:  # type: ignore[no-untyped-def]
    resolution = table.resolve(method, path)
    assert resolution.route is not None
    assert resolution.route.rpc.name == rpc
    assert resolution.values == values


def test_every_annotated_rpc_has_a_route_and_additional_bindings_are_included(table) -> None:  # type: ignore[no-untyped-def]
    annotated = {
        rpc.full_name
        for service in DEFAULT_SERVICES
        for rpc in service.methods
        if rpc.GetOptions().HasExtension(annotations_pb2.http)
    }
    assert {route.rpc.full_name for route in table.routes} == annotated
    get_task_paths = sorted(route.template.text for route in table.routes if route.rpc.name == "GetTask")
    assert get_task_paths == ["/tasks/status", "/tasks/{task_id}"]
    assert len(table.routes) >= 25


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/agents/a1", ["DELETE", "GET", "PATCH"]),
        # A literal path is its own resource: other methods do not fall through to `/agents/{agent_id}`.
        ("/agents/heartbeat", ["POST"]),
        ("/agents/list", ["GET"]),
        ("/tasks/create", ["POST"]),
        ("/tasks/status", ["GET"]),
        ("/nowhere", []),
    ],
)
def test_a_path_belongs_to_its_most_specific_templates(table, path, allowed) -> None:  # type: ignore[no-untyped-def]
    resolution = table.resolve("OPTIONS", path)
    assert resolution.route is None
    assert resolution.allowed_methods == allowed


def _service_with_rules(*rules: http_pb2.HttpRule):  # type: ignore[no-untyped-def]
    """A throwaway service whose methods carry the given rules, to test rule validation."""
    pool = descriptor_pool.DescriptorPool()
    for dependency in (descriptor_pb2, http_pb2, annotations_pb2):
        file_proto = descriptor_pb2.FileDescriptorProto()
        dependency.DESCRIPTOR.CopyToProto(file_proto)
        pool.Add(file_proto)
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="test/rules.proto", package="test", syntax="proto3", dependency=["google/api/annotations.proto"]
    )
    request = file_proto.message_type.add(name="Req")
    request.field.add(name="id", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    file_proto.message_type.add(name="Resp")
    service = file_proto.service.add(name="TestService")
    for index, rule in enumerate(rules):
        method = service.method.add(name=f"M{index}", input_type=".test.Req", output_type=".test.Resp")
        method.options.Extensions[annotations_pb2.http].CopyFrom(rule)
    return pool.Add(file_proto).services_by_name["TestService"]


@pytest.mark.parametrize(
    ("rules", "problem"),
    [
        ([http_pb2.HttpRule(get="/x/{missing}")], "unknown field"),
        ([http_pb2.HttpRule(post="/x", body="missing")], "unknown field"),
        ([http_pb2.HttpRule(get="/x/{id}"), http_pb2.HttpRule(get="/x/{id}")], "bound by both"),
        ([http_pb2.HttpRule()], "no pattern"),
    ],
)
def test_bad_annotations_fail_startup_with_a_clear_message(rules, problem) -> None:  # type: ignore[no-untyped-def]
    service = _service_with_rules(*rules)
    with pytest.raises(HttpRuleError, match=problem):
        build_route_table([service])


def test_custom_verbs_become_routes() -> None:
    rule = http_pb2.HttpRule(custom=http_pb2.CustomHttpPattern(kind="HEAD", path="/x/{id}"))
    table = build_route_table([_service_with_rules(rule)])
    resolution = table.resolve("HEAD", "/x/7")
    assert resolution.route is not None
    assert resolution.values == {"id": "7"}
