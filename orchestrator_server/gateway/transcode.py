"""HTTP request → protobuf request message, and protobuf response → JSON, for one route.

Inputs are proto3 JSON (`json_format`): field names in snake_case or lowerCamelCase, enums by name
or number, 64-bit integers as numbers or strings. Unknown fields are rejected with a 400 that names
them, because a silently ignored typo (`"max_concurent_tasks"`) is worse than an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import orjson
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from orchestrator_server.gateway.descriptors import (
    enum_type_of,
    is_map,
    is_message,
    is_repeated,
    message_type_of,
)
from orchestrator_server.gateway.errors import invalid_argument
from orchestrator_server.gateway.http_rules import Route
from orchestrator_server.gateway.proto_json import ProtoJsonWriter

# Well-known message types that have a string form in proto3 JSON, so they can come from a query
# parameter or a path segment (e.g. `?not_before=2024-01-01T00:00:00Z`).
_STRING_FORM_TYPES = frozenset(
    {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"}
)
_WRAPPER_TYPES = frozenset(
    {
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
)
_TRUE_WORDS = frozenset({"true", "1"})
_FALSE_WORDS = frozenset({"false", "0"})
_PARSE_FAILURES = (json_format.Error, TypeError, ValueError, RecursionError)


def _descriptor_of(message: Message) -> Descriptor:
    # The stubs allow the upb (C) descriptor class too; both expose the same interface.
    return cast(Descriptor, message.DESCRIPTOR)


def _find_field(message: Descriptor, name: str) -> FieldDescriptor | None:
    """A field by its proto name or its JSON (lowerCamelCase) name."""
    found = message.fields_by_name.get(name)
    if found is not None:
        return found
    for candidate in message.fields:
        if candidate.json_name == name:
            return candidate
    return None


def _resolve_path(root: Descriptor, dotted: str, source: str) -> list[FieldDescriptor]:
    """The chain of fields a dotted parameter name walks through; a clear 400 if it cannot."""
    chain: list[FieldDescriptor] = []
    message: Descriptor | None = root
    parts = dotted.split(".")
    for position, part in enumerate(parts):
        if message is None:
            raise invalid_argument(f"{source} {dotted!r} does not name a field of {root.full_name}", dotted)
        found = _find_field(message, part)
        if found is None:
            raise invalid_argument(f"unknown {source} {dotted!r}: {root.full_name} has no such field", dotted)
        chain.append(found)
        is_last = position == len(parts) - 1
        if not is_last:
            if not is_message(found) or is_repeated(found):
                raise invalid_argument(
                    f"{source} {dotted!r}: {found.name!r} is not a message field that can be nested into",
                    dotted,
                )
            message = message_type_of(found)
    return chain


def _scalar_from_text(field: FieldDescriptor, text: str, name: str, source: str) -> Any:
    """Converts the text of a query parameter or path segment to the JSON value json_format expects."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        lowered = text.lower()
        if lowered in _TRUE_WORDS:
            return True
        if lowered in _FALSE_WORDS:
            return False
        raise invalid_argument(f"{source} {name!r}: expected true or false, got {text!r}", name)
    if field.type == FieldDescriptor.TYPE_ENUM:
        stripped = text.lstrip("-")
        return int(text) if stripped.isdigit() else text
    if is_message(field):
        message_type = message_type_of(field)
        full_name = message_type.full_name
        if full_name in _STRING_FORM_TYPES:
            return text
        if full_name in _WRAPPER_TYPES:
            return _scalar_from_text(message_type.fields_by_name["value"], text, name, source)
        raise invalid_argument(f"{source} {name!r}: field of type {full_name} cannot be set from text", name)
    # Numbers, strings and bytes: proto3 JSON accepts the text form of each as a JSON string.
    return text


def _apply_text_values(
    request: Message, dotted: str, values: Sequence[str], source: str, replace: bool = False
) -> None:
    """Sets the field named by `dotted` from one or more text values (a query parameter or path variable)."""
    chain = _resolve_path(_descriptor_of(request), dotted, source)
    leaf = chain[-1]
    if is_map(leaf):
        raise invalid_argument(f"{source} {dotted!r}: map fields cannot be set from the URL", dotted)
    if is_repeated(leaf):
        if is_message(leaf) and message_type_of(leaf).full_name not in _WRAPPER_TYPES:
            raise invalid_argument(
                f"{source} {dotted!r}: repeated messages cannot be set from the URL", dotted
            )
        value: Any = [_scalar_from_text(leaf, text, dotted, source) for text in values]
    else:
        if len(values) > 1:
            raise invalid_argument(
                f"{source} {dotted!r} is given {len(values)} times but is not repeated", dotted
            )
        value = _scalar_from_text(leaf, values[0], dotted, source)
    # Build {"a": {"b": value}} and merge it, so json_format does every type check and conversion.
    nested: dict[str, Any] = {leaf.name: value}
    for field in reversed(chain[:-1]):
        nested = {field.name: nested}
    parsed = type(request)()
    try:
        json_format.ParseDict(nested, parsed)
    except _PARSE_FAILURES as error:
        raise invalid_argument(f"{source} {dotted!r}: {_describe_parse_error(error)}", dotted) from None
    if replace:
        _clear_path(request, chain)
    request.MergeFrom(parsed)


def _clear_path(request: Message, chain: Sequence[FieldDescriptor]) -> None:
    target = request
    for field in chain[:-1]:
        target = getattr(target, field.name)
    target.ClearField(chain[-1].name)


def _current_text(request: Message, chain: Sequence[FieldDescriptor]) -> str | None:
    """The current value of a singular string-like field along `chain`, or None if unset/default."""
    target: Any = request
    for field in chain:
        if isinstance(target, Message) and is_message(field) and not target.HasField(field.name):
            return None
        target = getattr(target, field.name)
    if isinstance(target, Message) or target in ("", 0, False):
        return None
    return str(target)


def _describe_parse_error(error: BaseException) -> str:
    if isinstance(error, RecursionError):
        return "nested too deeply"
    # json_format appends a list of every available field on a second line; the first says it all.
    return str(error).split("\n", 1)[0].strip()


def parse_json_body(raw: bytes) -> Any:
    if not raw.strip():
        raise invalid_argument("the request body is required: send a JSON object")
    try:
        # JSON on the wire is UTF-8 (RFC 8259); json.loads would otherwise guess UTF-16/32 from bytes.
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_argument("the request body is not UTF-8 text") from None
    try:
        # orjson parses the common body several times faster; what it refuses (NaN, integers past
        # 64 bits, lone surrogates, deep nesting) or cannot parse, json parses or words the error of,
        # so answers and refusals stay json's.
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text)
    except RecursionError:
        raise invalid_argument("malformed JSON in the request body: nested too deeply") from None
    except ValueError as error:
        raise invalid_argument(f"malformed JSON in the request body: {error}") from None


def build_request(
    route: Route,
    path_values: Mapping[str, str],
    query: Mapping[str, Sequence[str]],
    raw_body: bytes,
) -> Message:
    """The gRPC request for one HTTP request, or a GatewayError (400) saying what is wrong with it."""
    request_class = message_factory.GetMessageClass(route.rpc.input_type)
    request: Message = request_class()

    if route.body:
        _apply_body(route, request, raw_body)
        # With `body: "*"` every field not in the path comes from the body, so a query parameter is
        # a mistake; with `body: "field"` the other fields may still come from the query.
        if route.body == "*" and query:
            name = next(iter(query))
            raise invalid_argument(
                f"unexpected query parameter {name!r}: this endpoint takes its fields from the JSON body",
                name,
            )

    for dotted, values in query.items():
        if dotted in route.path_fields:
            raise invalid_argument(f"query parameter {dotted!r} is already given by the path", dotted)
        if route.body and route.body != "*" and dotted.split(".")[0] == route.body:
            raise invalid_argument(f"query parameter {dotted!r} is given by the request body", dotted)
        _apply_text_values(request, dotted, values, "query parameter")

    for dotted, text in path_values.items():
        chain = _resolve_path(_descriptor_of(request), dotted, "path variable")
        existing = _current_text(request, chain)
        if existing is not None and existing != text:
            raise invalid_argument(
                f"{dotted!r} is {existing!r} in the body but {text!r} in the path; leave it out of the body",
                dotted,
            )
        _apply_text_values(request, dotted, [text], "path variable", replace=True)
    return request


def _apply_body(route: Route, request: Message, raw_body: bytes) -> None:
    if not raw_body.strip() and route.path_fields:
        # An action on a resource named by the path (POST /agents/{id}/drain) may omit its body.
        return
    document = parse_json_body(raw_body)
    if route.body == "*":
        if not isinstance(document, dict):
            raise invalid_argument(f"the request body must be a JSON object, not {type(document).__name__}")
        target: Any = document
    else:
        target = {route.body: document}
    if _fast_parse(target, request):
        return
    request.Clear()
    try:
        json_format.ParseDict(target, request)
    except _PARSE_FAILURES as error:
        raise invalid_argument(f"invalid request body: {_describe_parse_error(error)}") from None


# -- the common body, without json_format --------------------------------------------------------
#
# json_format.ParseDict walks every value in pure Python with many checks; it cost a heartbeat more
# than the heartbeat itself. `_fast_parse` sets the plain shapes (strings, booleans, integers,
# finite numbers, enums by name, nested messages and lists of them) directly and answers False at
# the first value it is not sure of: the caller then clears the message and lets json_format parse
# the whole document, so every other input (and every error message) is json_format's own.

_INTEGER_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_FLOAT_MAX = 3.4028234663852886e38
_NOT_PLAIN = object()

# How a field is set from a plain JSON value: its own kind, or "message" / "messages" (nested
# objects) / "scalars" (a list of plain values); None: json_format must judge it (maps, well-known
# types).
_MESSAGE, _MESSAGES, _SCALAR, _SCALARS = "message", "messages", "scalar", "scalars"


class _Plan:
    """What `_fast_parse` needs of one field, worked out once per field rather than per value."""

    __slots__ = ("field", "how", "name", "oneof")

    def __init__(self, field: FieldDescriptor) -> None:
        self.field = field
        self.name = field.name
        oneof = field.containing_oneof
        self.oneof = oneof.name if oneof is not None else None
        self.how: str | None
        if is_map(field):
            self.how = None
        elif is_message(field):
            if message_type_of(field).full_name.startswith("google.protobuf."):
                self.how = None
            else:
                self.how = _MESSAGES if is_repeated(field) else _MESSAGE
        else:
            self.how = _SCALARS if is_repeated(field) else _SCALAR


_PLANS: dict[Descriptor, dict[str, _Plan]] = {}


def _plans(descriptor: Descriptor) -> dict[str, _Plan]:
    """The fields of a message by JSON name and by proto name."""
    plans = _PLANS.get(descriptor)
    if plans is None:
        plans = {}
        for candidate in descriptor.fields:
            plan = _Plan(candidate)
            plans[candidate.json_name] = plan
            plans[candidate.name] = plan
        _PLANS[descriptor] = plans
    return plans


def _plain_scalar(field: FieldDescriptor, value: Any) -> Any:
    """`value` as the field takes it, or _NOT_PLAIN when json_format must judge it."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return value if type(value) is str else _NOT_PLAIN
    if kind == FieldDescriptor.TYPE_BOOL:
        return value if type(value) is bool else _NOT_PLAIN
    if kind in _INTEGER_TYPES:
        return value if type(value) is int else _NOT_PLAIN
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        if type(value) is int:
            value = float(value)
        if type(value) is not float or not math.isfinite(value):
            return _NOT_PLAIN
        if kind == FieldDescriptor.TYPE_FLOAT and abs(value) > _FLOAT_MAX:
            return _NOT_PLAIN
        return value
    if kind == FieldDescriptor.TYPE_ENUM and type(value) is str:
        number = enum_type_of(field).values_by_name.get(value)
        return number.number if number is not None else _NOT_PLAIN
    return _NOT_PLAIN


def _fast_parse(document: dict[str, Any], message: Message) -> bool:
    """Sets `document` into `message` if every value has a plain shape; False otherwise (the message
    is then partly set)."""
    plans = _plans(_descriptor_of(message))
    seen: set[str] = set()
    oneofs: set[str] = set()
    for key, value in document.items():
        plan = plans.get(key)
        if plan is None or value is None or plan.how is None or plan.name in seen:
            return False
        seen.add(plan.name)
        if plan.oneof is not None:
            if plan.oneof in oneofs:
                return False
            oneofs.add(plan.oneof)
        how = plan.how
        if how is _MESSAGE:
            if type(value) is not dict:
                return False
            child = getattr(message, plan.name)
            child.SetInParent()
            if not _fast_parse(value, child):
                return False
        elif how is _MESSAGES:
            if type(value) is not list:
                return False
            items = getattr(message, plan.name)
            for item in value:
                if type(item) is not dict or not _fast_parse(item, items.add()):
                    return False
        else:
            try:
                if how is _SCALARS:
                    if type(value) is not list:
                        return False
                    converted = [_plain_scalar(plan.field, item) for item in value]
                    if any(item is _NOT_PLAIN for item in converted):
                        return False
                    getattr(message, plan.name).extend(converted)
                else:
                    plain = _plain_scalar(plan.field, value)
                    if plain is _NOT_PLAIN:
                        return False
                    setattr(message, plan.name, plain)
            except (TypeError, ValueError):  # out of the field's range
                return False
    return True


def render_message(message: Message, response_body: str, writer: ProtoJsonWriter) -> Any:
    """Proto3 JSON (snake_case names) of a response, or of one of its fields if the rule says so."""
    rendered = writer.to_dict(message)
    return rendered.get(response_body) if response_body else rendered
