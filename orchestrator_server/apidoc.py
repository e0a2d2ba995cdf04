"""Writes docs/API.md from the protos: every service, RPC, message, field and enum, with the proto
comments and the REST binding of each RPC.

    python -m orchestrator_server.apidoc            # run by `make proto`
    python -m orchestrator_server.apidoc --check    # run by `make lint`: fails when docs/API.md is stale

The descriptors are the generated modules' (what the server serves, and `make lint` checks those
against the protos); the REST bindings are read by the gateway's own `routes_of_method`, and the
comments are extracted fresh from the .proto files by `proto_comments.generate_comments`, so the
document has one source and no second parser.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from google.api import field_behavior_pb2
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    FileDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)

from orchestrator_server.gateway.descriptors import enum_type_of, is_map, is_message, message_type_of
from orchestrator_server.gateway.http_rules import routes_of_method
from orchestrator_server.gateway.proto_comments import generate_comments

__all__ = ["render"]

_REPO_ROOT = Path(__file__).resolve().parents[1]
_PROTO_ROOT = _REPO_ROOT / "proto"
_PROTO_DIR = _PROTO_ROOT / "orchestrator" / "v1"
_OUTPUT = _REPO_ROOT / "docs" / "API.md"
_PACKAGE = "orchestrator.v1"

_SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_FIXED64: "fixed64",
    FieldDescriptor.TYPE_FIXED32: "fixed32",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_SFIXED32: "sfixed32",
    FieldDescriptor.TYPE_SFIXED64: "sfixed64",
    FieldDescriptor.TYPE_SINT32: "sint32",
    FieldDescriptor.TYPE_SINT64: "sint64",
}

_HEADER = """# API reference

Generated from `proto/orchestrator/v1` by `make proto` (`orchestrator_server/apidoc.py`); do not
edit: `make lint` fails when this file differs from what the protos produce. Descriptions are the
proto comments; the REST binding of each RPC is its `google.api.http` annotation, served by the
gateway on `PORT` (JSON is proto3 JSON; `docs/GATEWAY.md`). Package `orchestrator.v1`.

Besides these services the gRPC port serves `grpc.health.v1.Health` (the process's own health,
NOT_SERVING while draining) and server reflection; the HTTP port also serves `/metrics`, `/livez`,
`/readyz` and `/openapi.json`.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _anchor(full_name: str) -> str:
    return full_name.lower().replace(".", "-")


def _heading(level: int, full_name: str, title: str) -> list[str]:
    return [f'<a id="{_anchor(full_name)}"></a>', "", f"{'#' * level} {title}", ""]


def _link(full_name: str) -> str:
    if full_name.startswith(_PACKAGE + "."):
        return f"[{full_name.removeprefix(_PACKAGE + '.')}](#{_anchor(full_name)})"
    return f"`{full_name}`"


def _type_of(field: FieldDescriptor) -> str:
    if is_map(field):
        entry = message_type_of(field)
        return f"map<{_type_of(entry.fields_by_name['key'])}, {_type_of(entry.fields_by_name['value'])}>"
    if is_message(field):
        return _link(message_type_of(field).full_name)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return _link(enum_type_of(field).full_name)
    return _SCALARS[field.type]


def _notes(field: FieldDescriptor) -> str:
    notes: list[str] = []
    if field.is_repeated and not is_map(field):
        notes.append("repeated")
    oneof = field.containing_oneof
    if oneof is not None:
        # proto3 `optional` is a one-field oneof the compiler adds ("_name"), not a real choice.
        synthetic = len(oneof.fields) == 1 and oneof.name == f"_{field.name}"
        notes.append("optional" if synthetic else f"one of `{oneof.name}`")
    behaviors: Sequence[int] = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]  # type: ignore[index]
    notes.extend(field_behavior_pb2.FieldBehavior.Name(behavior).lower() for behavior in behaviors)
    return ", ".join(notes)


def _kind(rpc: MethodDescriptor) -> str:
    if rpc.client_streaming and rpc.server_streaming:
        return "bidirectional stream"
    if rpc.server_streaming:
        return "server stream"
    if rpc.client_streaming:
        return "client stream"
    return "unary"


def _rest(rpc: MethodDescriptor) -> list[str]:
    routes = routes_of_method(rpc)
    if not routes:
        return ["- REST: none (gRPC only)"]
    lines = []
    for route in routes:
        extras = []
        if route.body:
            extras.append("body: the whole request" if route.body == "*" else f"body: `{route.body}`")
        if route.response_body:
            extras.append(f"response: `{route.response_body}`")
        if route.server_streaming:
            extras.append("streamed, one JSON object per line")
        suffix = f" ({'; '.join(extras)})" if extras else ""
        lines.append(f"- REST: `{route.http_method} {route.template.text}`{suffix}")
    return lines


def _service(service: ServiceDescriptor, comments: Mapping[str, str]) -> list[str]:
    lines = _heading(2, service.full_name, service.name)
    if service.full_name in comments:
        lines += [comments[service.full_name], ""]
    lines += ["| RPC | kind | REST |", "|---|---|---|"]
    for rpc in service.methods:
        rest = ", ".join(f"`{route.http_method} {route.template.text}`" for route in routes_of_method(rpc))
        lines.append(f"| {_link(rpc.full_name)} | {_kind(rpc)} | {rest or '—'} |")
    lines.append("")
    for rpc in service.methods:
        lines += _heading(3, rpc.full_name, f"{service.name}.{rpc.name}")
        if rpc.full_name in comments:
            lines += [comments[rpc.full_name], ""]
        lines += [
            f"- gRPC: `/{service.full_name}/{rpc.name}` ({_kind(rpc)})",
            *_rest(rpc),
            f"- request: {_link(rpc.input_type.full_name)}, response: {_link(rpc.output_type.full_name)}",
            "",
        ]
    return lines


def _message(message: Descriptor, comments: Mapping[str, str]) -> list[str]:
    lines = _heading(3, message.full_name, message.full_name.removeprefix(_PACKAGE + "."))
    if message.full_name in comments:
        lines += [comments[message.full_name], ""]
    if message.fields:
        lines += ["| field | number | type | notes | description |", "|---|---|---|---|---|"]
        for field in message.fields:
            description = _cell(comments.get(f"{message.full_name}.{field.name}", ""))
            lines.append(
                f"| `{field.name}` | {field.number} | {_type_of(field)} | {_notes(field)} | {description} |"
            )
    else:
        lines.append("No fields.")
    lines.append("")
    return lines


def _enum(enum: EnumDescriptor, comments: Mapping[str, str]) -> list[str]:
    lines = _heading(3, enum.full_name, enum.full_name.removeprefix(_PACKAGE + "."))
    if enum.full_name in comments:
        lines += [comments[enum.full_name], ""]
    lines += ["| value | number | description |", "|---|---|---|"]
    for value in enum.values:
        description = _cell(comments.get(f"{enum.full_name}.{value.name}", ""))
        lines.append(f"| `{value.name}` | {value.number} | {description} |")
    lines.append("")
    return lines


def _walk(message: Descriptor) -> Iterator[Descriptor | EnumDescriptor]:
    """The message, then its nested enums and messages (map entries are shown as map<K, V>)."""
    if message.GetOptions().map_entry:
        return
    yield message
    yield from message.enum_types
    for nested in message.nested_types:
        yield from _walk(nested)


def _files() -> list[FileDescriptor]:
    modules = [importlib.import_module(f"orchestrator.v1.{path.stem}_pb2") for path in _proto_files()]
    return [module.DESCRIPTOR for module in modules]


def _proto_files() -> list[Path]:
    return sorted(_PROTO_DIR.glob("*.proto"))


def render(comments: Mapping[str, str]) -> str:
    files = _files()
    services = [service for file in files for service in file.services_by_name.values()]
    types: list[Descriptor | EnumDescriptor] = []
    for file in files:
        types.extend(file.enum_types_by_name.values())
        for message in file.message_types_by_name.values():
            types.extend(_walk(message))
    lines = [_HEADER, "## Services", ""]
    lines += [f"- {_link(service.full_name)}: {comments.get(service.full_name, '')}" for service in services]
    lines.append("")
    for service in services:
        lines += _service(service, comments)
    lines += ["## Messages and enums", ""]
    for item in sorted(types, key=lambda item: item.full_name):
        lines += _enum(item, comments) if isinstance(item, EnumDescriptor) else _message(item, comments)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file differs instead of writing it")
    parser.add_argument("--output", type=Path, default=_OUTPUT)
    args = parser.parse_args(argv)
    text = render(generate_comments(_PROTO_ROOT, _proto_files()))
    if not args.check:
        args.output.write_text(text)
        print(f"wrote {args.output}")
        return 0
    current = args.output.read_text() if args.output.exists() else ""
    if current == text:
        return 0
    diff = difflib.unified_diff(
        current.splitlines(), text.splitlines(), str(args.output), "protos", lineterm=""
    )
    print("\n".join(list(diff)[:40]), file=sys.stderr)
    print(f"{args.output} is stale: run 'make proto'", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
