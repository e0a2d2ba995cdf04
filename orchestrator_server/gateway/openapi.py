"""OpenAPI 3.0 document of the gateway, derived from the same descriptors and routes it serves.

Schemas describe what the gateway writes: proto3 JSON with the proto field names (snake_case),
enums by name, 64-bit integers as strings, Timestamp/Duration as strings. The gateway also
accepts lowerCamelCase names and enum numbers on input (json_format does); the document shows the
one canonical form. Descriptions come from the .proto comments (see proto_comments.py).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor

from orchestrator_server.gateway._proto_comments import COMMENTS
from orchestrator_server.gateway.constraints import is_required, keywords_of
from orchestrator_server.gateway.descriptors import (
    enum_type_of,
    is_map,
    is_message,
    is_repeated,
    message_type_of,
)
from orchestrator_server.gateway.http_rules import Route, RouteTable

#: aiohttp's limit on the request line and each header, which the gateway keeps (app.GatewayOptions).
MAX_FIELD_SIZE = 8190

Schema = dict[str, Any]

_ERROR_SCHEMA_NAME = "Error"
# Query parameters are flattened through nested messages down to this depth (`query.type`).
_MAX_QUERY_DEPTH = 3

_INT64_PATTERN = "^-?[0-9]+$"
_UINT64_PATTERN = "^[0-9]+$"

_SCALAR_SCHEMAS: dict[int, Schema] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64", "pattern": _INT64_PATTERN},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64", "pattern": _INT64_PATTERN},
    FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64", "pattern": _INT64_PATTERN},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64", "pattern": _UINT64_PATTERN},
    FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "uint64", "pattern": _UINT64_PATTERN},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}

# Well-known types have their own JSON forms (google/protobuf/*.proto, "JSON Mapping").
_WELL_KNOWN_SCHEMAS: dict[str, Schema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$",
        "example": "1.5s",
    },
    "google.protobuf.FieldMask": {"type": "string", "description": "Comma-separated field paths."},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
}
_WRAPPERS = {
    "google.protobuf.DoubleValue",
    "google.protobuf.FloatValue",
    "google.protobuf.Int64Value",
    "google.protobuf.UInt64Value",
    "google.protobuf.Int32Value",
    "google.protobuf.UInt32Value",
    "google.protobuf.BoolValue",
    "google.protobuf.StringValue",
    "google.protobuf.BytesValue",
}
# Types a query parameter can carry: their JSON form is a single string or scalar.
_QUERY_MESSAGE_TYPES = {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"}

_ERROR_SCHEMA: Schema = {
    "type": "object",
    "description": "Every error answer: HTTP code, gRPC status name, message and google.rpc details.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "status", "message"],
            "properties": {
                "code": {"type": "integer", "description": "The HTTP status code."},
                "status": {
                    "type": "string",
                    "description": "The google.rpc.Code name, e.g. INVALID_ARGUMENT.",
                },
                "message": {"type": "string"},
                "details": {
                    "type": "array",
                    "description": "google.rpc error details (BadRequest, RetryInfo...) in proto3 JSON.",
                    "items": {"type": "object", "additionalProperties": True},
                },
            },
        }
    },
}

_DOCUMENT_DESCRIPTION = """\
JSON over HTTP for the Orchestrator's gRPC API; every route is read from the `google.api.http`
annotations of the protos. Bodies and answers are proto3 JSON. Streaming RPCs answer with
newline-delimited JSON (`application/x-ndjson`), one message per line; an error after the first
line arrives as a last line `{"error": {...}}`.

Headers: `authorization` (Bearer) and `x-api-key` pass through to gRPC; `x-request-id` is passed
through (generated when absent) and echoed; `grpc-timeout` (gRPC syntax, e.g. `500m`) or
`x-request-timeout` (seconds) set the call deadline."""


def _ref(message: Descriptor) -> Schema:
    return {"$ref": f"#/components/schemas/{message.full_name}"}


class _SchemaBuilder:
    """Builds component schemas on demand for every message reachable from the routes."""

    def __init__(self, comments: Mapping[str, str]) -> None:
        self.comments = comments
        self.components: dict[str, Schema] = {}

    def message_ref(self, message: Descriptor) -> Schema:
        known = _WELL_KNOWN_SCHEMAS.get(message.full_name)
        if known is not None:
            return dict(known)
        if message.full_name not in self.components:
            self.components[message.full_name] = {}  # placeholder, so recursive types terminate
            self.components[message.full_name] = self.message_schema(message)
        return _ref(message)

    def message_schema(self, message: Descriptor, omit: Iterable[str] = ()) -> Schema:
        omitted = set(omit)
        properties = {
            field.name: self.field_schema(field) for field in message.fields if field.name not in omitted
        }
        schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
        required = [name for name in properties if is_required(message.fields_by_name[name])]
        if required:
            schema["required"] = required
        description = self.comments.get(message.full_name)
        if description:
            schema["description"] = description
        return schema

    def value_schema(self, field: FieldDescriptor) -> Schema:
        """Schema of one value of the field (an element, for repeated fields)."""
        if field.type == FieldDescriptor.TYPE_ENUM:
            return {"type": "string", "enum": [value.name for value in enum_type_of(field).values]}
        if is_message(field):
            message_type = message_type_of(field)
            if message_type.full_name in _WRAPPERS:
                inner = dict(self.value_schema(message_type.fields_by_name["value"]))
                inner["nullable"] = True
                return inner
            return self.message_ref(message_type)
        return dict(_SCALAR_SCHEMAS[field.type])

    def field_schema(self, field: FieldDescriptor) -> Schema:
        if is_map(field):
            value_field = message_type_of(field).fields_by_name["value"]
            schema: Schema = {"type": "object", "additionalProperties": self.value_schema(value_field)}
        elif is_repeated(field):
            schema = {"type": "array", "items": self.value_schema(field)}
        else:
            schema = self.value_schema(field)
        keywords = keywords_of(field)
        if keywords and "$ref" not in schema:
            # What the server checks on each value (an element of a list, a value of a map).
            if is_map(field):
                schema["additionalProperties"].update(keywords)
            elif is_repeated(field):
                schema["items"].update(keywords)
            else:
                schema.update(keywords)
        return self._describe(schema, self._field_description(field))

    def _field_description(self, field: FieldDescriptor) -> str | None:
        description = self.comments.get(field.full_name)
        if field.type == FieldDescriptor.TYPE_ENUM:
            enum_type = enum_type_of(field)
            values = [
                f"{value.name}: {self.comments[f'{enum_type.full_name}.{value.name}']}"
                for value in enum_type.values
                if f"{enum_type.full_name}.{value.name}" in self.comments
            ]
            if values:
                description = " ".join(filter(None, [description, "Values: " + " ".join(values)]))
        return description

    @staticmethod
    def _describe(schema: Schema, description: str | None) -> Schema:
        if not description:
            return schema
        if "$ref" in schema:
            # OpenAPI 3.0 ignores siblings of $ref, so the description goes beside an allOf.
            return {"allOf": [schema], "description": description}
        return {**schema, "description": description}


def _query_parameters(
    builder: _SchemaBuilder, message: Descriptor, prefix: str, excluded: set[str], depth: int
) -> list[Schema]:
    parameters: list[Schema] = []
    for field in message.fields:
        name = prefix + field.name
        if name in excluded or is_map(field):
            continue
        if is_message(field):
            full_name = message_type_of(field).full_name
            simple = full_name in _QUERY_MESSAGE_TYPES or full_name in _WRAPPERS
            if not simple:
                if (
                    not is_repeated(field)
                    and depth < _MAX_QUERY_DEPTH
                    and full_name not in _WELL_KNOWN_SCHEMAS
                ):
                    parameters.extend(
                        _query_parameters(builder, message_type_of(field), name + ".", excluded, depth + 1)
                    )
                continue
        schema = builder.field_schema(field)
        description = schema.pop("description", None)
        parameter: Schema = {"name": name, "in": "query", "required": is_required(field), "schema": schema}
        if is_repeated(field):
            parameter.update({"style": "form", "explode": True})
        if description:
            parameter["description"] = description
        parameters.append(parameter)
    return parameters


def _leaf_field(message: Descriptor, dotted: str) -> FieldDescriptor:
    parts = dotted.split(".")
    for part in parts[:-1]:
        message = message_type_of(message.fields_by_name[part])
    field: FieldDescriptor = message.fields_by_name[parts[-1]]
    return field


def _operation(builder: _SchemaBuilder, route: Route) -> Schema:
    rpc = route.rpc
    input_type = rpc.input_type
    parameters: list[Schema] = []
    for variable in route.template.variables:
        leaf = _leaf_field(input_type, variable.field_path)
        schema = builder.field_schema(leaf)
        description = schema.pop("description", None)
        parameter: Schema = {"name": variable.field_path, "in": "path", "required": True, "schema": schema}
        if description:
            parameter["description"] = description
        parameters.append(parameter)

    operation: Schema = {
        "operationId": route.operation_id,
        "tags": [rpc.containing_service.name],
        "summary": f"{rpc.containing_service.name}.{rpc.name}",
    }
    description = builder.comments.get(rpc.full_name)
    if description:
        operation["description"] = description

    if route.body == "*":
        body_schema = builder.message_schema(input_type, omit=route.path_fields)
        operation["requestBody"] = {
            # A route whose path names the resource may be called without a body.
            "required": not route.path_fields,
            "content": {"application/json": {"schema": body_schema}},
        }
    else:
        excluded = set(route.path_fields)
        if route.body:
            body_field = input_type.fields_by_name[route.body]
            excluded.add(route.body)
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": builder.field_schema(body_field)}},
            }
        parameters.extend(_query_parameters(builder, input_type, "", excluded, 0))
    if parameters:
        operation["parameters"] = parameters

    output_schema = (
        builder.field_schema(rpc.output_type.fields_by_name[route.response_body])
        if route.response_body
        else builder.message_ref(rpc.output_type)
    )
    if route.server_streaming:
        success = {
            "description": "A stream of newline-delimited JSON messages, one per line.",
            "content": {"application/x-ndjson": {"schema": output_schema}},
        }
    else:
        success = {"description": "Success.", "content": {"application/json": {"schema": output_schema}}}
    operation["responses"] = {
        "200": success,
        "default": {
            "description": "An error (gRPC status mapped to HTTP). A request the HTTP layer cannot "
            f"parse (a request line or header over {MAX_FIELD_SIZE} bytes, broken framing) is "
            "answered 400 in plain text before it reaches the gateway.",
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{_ERROR_SCHEMA_NAME}"}},
                "text/plain": {"schema": {"type": "string"}},
            },
        },
    }
    return operation


def _operations_paths() -> dict[str, Schema]:
    def plain(
        operation_id: str, summary: str, content_type: str, schema: Schema, codes: Iterable[str]
    ) -> Schema:
        responses = {
            code: {"description": summary, "content": {content_type: {"schema": schema}}} for code in codes
        }
        return {
            "get": {
                "operationId": operation_id,
                "tags": ["Operations"],
                "summary": summary,
                "responses": responses,
            }
        }

    probe_schema: Schema = {
        "type": "object",
        "properties": {"status": {"type": "string"}, "reason": {"type": "string"}},
        "required": ["status"],
    }
    return {
        "/livez": plain("livez", "The gateway process is alive.", "application/json", probe_schema, ["200"]),
        "/readyz": plain(
            "readyz",
            "The gRPC server answers its grpc.health.v1 check with SERVING (503 otherwise).",
            "application/json",
            probe_schema,
            ["200", "503"],
        ),
        "/metrics": plain(
            "metrics", "Prometheus metrics of this process.", "text/plain", {"type": "string"}, ["200"]
        ),
        "/openapi.json": plain(
            "openapi",
            "This document.",
            "application/json",
            {"type": "object", "additionalProperties": True},
            ["200"],
        ),
    }


def _version() -> str:
    try:
        return importlib.metadata.version("optiinfra-orchestrator")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def build_openapi(
    routes: RouteTable, services: Iterable[ServiceDescriptor], comments: Mapping[str, str] = COMMENTS
) -> dict[str, Any]:
    builder = _SchemaBuilder(comments)
    paths: dict[str, Schema] = {}
    for route in routes.routes:
        path_item = paths.setdefault(route.template.openapi_path, {})
        path_item[route.http_method.lower()] = _operation(builder, route)
    paths.update(_operations_paths())
    tags = [
        {
            "name": service.name,
            **({"description": comments[service.full_name]} if service.full_name in comments else {}),
        }
        for service in services
    ]
    tags.append({"name": "Operations", "description": "Probes, metrics and this document."})
    components: dict[str, Any] = {
        "schemas": {**dict(sorted(builder.components.items())), _ERROR_SCHEMA_NAME: _ERROR_SCHEMA},
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "An API key or an agent credential.",
            },
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Orchestrator REST gateway",
            "version": _version(),
            "description": _DOCUMENT_DESCRIPTION,
        },
        "tags": tags,
        "security": [{}, {"bearer": []}, {"apiKey": []}],
        "paths": paths,
        "components": components,
    }
