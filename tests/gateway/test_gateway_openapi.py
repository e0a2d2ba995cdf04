"""/openapi.json: derived from the same routes and descriptors; descriptions from the proto comments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator_server.gateway import DEFAULT_SERVICES
from orchestrator_server.gateway._proto_comments import COMMENTS
from orchestrator_server.gateway.http_rules import build_route_table
from orchestrator_server.gateway.openapi import build_openapi
from orchestrator_server.gateway.proto_comments import generate_comments

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_openapi(build_route_table(DEFAULT_SERVICES), DEFAULT_SERVICES)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def test_every_route_is_documented_with_its_method_and_a_unique_operation_id(
    document: dict[str, Any],
) -> None:
    table = build_route_table(DEFAULT_SERVICES)
    for route in table.routes:
        operation = document["paths"][route.template.openapi_path][route.http_method.lower()]
        assert operation["operationId"] == route.operation_id
    operation_ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(operation_ids) == len(set(operation_ids))
    assert document["paths"]["/tasks/status"]["get"]["operationId"] == "TasksService_GetTask_1"
    assert {"/livez", "/readyz", "/metrics", "/openapi.json"} <= set(document["paths"])


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for ref in _refs(document):
        assert ref.startswith("#/components/schemas/")
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def test_parameters_and_bodies_follow_the_http_rules(document: dict[str, Any]) -> None:
    discover = document["paths"]["/discovery/agents"]["get"]
    parameters = {parameter["name"]: parameter for parameter in discover["parameters"]}
    assert set(parameters) == {
        "query.type",
        "query.capabilities",
        "query.label_selector",
        "query.include_degraded",
        "page_size",
        "page_token",
    }
    assert parameters["query.capabilities"]["schema"]["type"] == "array"
    assert parameters["query.capabilities"]["schema"]["items"]["type"] == "string"
    assert parameters["query.capabilities"]["explode"] is True
    assert parameters["query.include_degraded"]["schema"] == {"type": "boolean"}

    get_agent = document["paths"]["/agents/{agent_id}"]["get"]
    assert get_agent["parameters"] == [
        {
            "name": "agent_id",
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            "description": "Agent to return.",
        }
    ]
    register = document["paths"]["/agents/register"]["post"]["requestBody"]
    assert register["required"] is True
    drain = document["paths"]["/agents/{agent_id}/drain"]["post"]["requestBody"]
    assert drain["required"] is False
    assert set(drain["content"]["application/json"]["schema"]["properties"]) == {
        "reason"
    }  # agent_id is in the path

    status_filter = {p["name"]: p for p in document["paths"]["/agents/list"]["get"]["parameters"]}["status"]
    assert "AGENT_STATUS_DOWN" in status_filter["schema"]["enum"]


def test_schemas_describe_proto3_json(document: dict[str, Any]) -> None:
    agent = document["components"]["schemas"]["orchestrator.v1.Agent"]
    properties = agent["properties"]
    assert agent["additionalProperties"] is False
    assert properties["revision"]["type"] == "string"  # int64
    assert properties["registered_at"]["format"] == "date-time"
    assert properties["labels"]["additionalProperties"]["type"] == "string"
    assert properties["load"]["allOf"] == [{"$ref": "#/components/schemas/orchestrator.v1.Load"}]
    spec = document["components"]["schemas"]["orchestrator.v1.TaskSpec"]["properties"]
    assert spec["payload"]["type"] == "object"  # google.protobuf.Struct
    assert spec["run_timeout"]["pattern"].endswith("s$")  # google.protobuf.Duration
    watch = document["paths"]["/discovery/watch"]["get"]["responses"]["200"]
    assert set(watch["content"]) == {"application/x-ndjson"}


def test_descriptions_are_the_proto_comments(document: dict[str, Any]) -> None:
    assert (
        document["paths"]["/agents/{agent_id}"]["get"]["description"]
        == COMMENTS["orchestrator.v1.RegistryService.GetAgent"]
    )
    agent = document["components"]["schemas"]["orchestrator.v1.Agent"]
    assert agent["description"] == "Agent is one registered agent instance."
    assert agent["properties"]["agent_id"]["description"].startswith("Server-assigned identifier")
    status = agent["properties"]["status"]["description"]
    assert "AGENT_STATUS_DOWN: Not alive" in status


def test_committed_comments_match_the_protos() -> None:
    pytest.importorskip("grpc_tools")
    fresh = generate_comments(PROTO_ROOT, sorted((PROTO_ROOT / "orchestrator" / "v1").glob("*.proto")))
    assert fresh == COMMENTS, "stale: run `python -m orchestrator_server.gateway.proto_comments`"


async def test_served_document_is_the_built_one(
    http: aiohttp.ClientSession, document: dict[str, Any]
) -> None:
    async with http.get("/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.json() == document
