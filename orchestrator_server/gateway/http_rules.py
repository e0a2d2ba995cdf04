"""HTTP routes derived from the `google.api.http` annotations of gRPC service descriptors.

Path templates follow google/api/http.proto:

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    Verb     = ":" LITERAL ;

Routes are matched segment by segment, so a literal segment always wins over a variable at the same
position (`/agents/list` before `/agents/{agent_id}`) whatever the order of the RPCs in the proto.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from orchestrator_server.gateway.descriptors import is_message, is_repeated, message_type_of

_FIELD_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_HTTP_METHODS = ("get", "put", "post", "delete", "patch")

# Ranks used to order routes: lower is more specific and is tried first.
_RANK_LITERAL = 0
_RANK_SINGLE = 1
_RANK_MULTI = 2


class HttpRuleError(ValueError):
    """An annotation cannot be turned into a route (bad template, unknown field, conflict)."""


@dataclass(frozen=True)
class _Segment:
    """One path segment of a template: a literal, `*` (one segment) or `**` (the rest)."""

    literal: str | None  # None for a wildcard
    multi: bool = False  # True for `**`

    @property
    def rank(self) -> int:
        if self.literal is not None:
            return _RANK_LITERAL
        return _RANK_MULTI if self.multi else _RANK_SINGLE


@dataclass(frozen=True)
class _Variable:
    """A variable binding segments [start, end) of the path to a request field."""

    field_path: str
    start: int
    end: int | None  # None: up to the end of the path (the variable ends with `**`)


@dataclass(frozen=True)
class PathTemplate:
    """A parsed path template that matches raw (percent-encoded) request paths."""

    text: str
    segments: tuple[_Segment, ...]
    variables: tuple[_Variable, ...]
    verb: str | None

    @classmethod
    def parse(cls, text: str) -> PathTemplate:
        if not text.startswith("/"):
            raise HttpRuleError(f"path template {text!r} must start with '/'")
        body = text[1:]
        verb: str | None = None
        # A verb follows the last ':' that is outside any variable braces.
        depth = 0
        for index, char in enumerate(body):
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
            elif char == ":" and depth == 0:
                body, verb = body[:index], body[index + 1 :]
                if not verb or "/" in verb:
                    raise HttpRuleError(f"path template {text!r} has an invalid verb")
                break
        segments: list[_Segment] = []
        variables: list[_Variable] = []
        for token in _split_top_level(body, text):
            if token.startswith("{"):
                if not token.endswith("}"):
                    raise HttpRuleError(f"path template {text!r} has an unterminated variable")
                inner = token[1:-1]
                field_path, _, sub_template = inner.partition("=")
                if not _FIELD_PATH.match(field_path):
                    raise HttpRuleError(f"path template {text!r} has an invalid field path {field_path!r}")
                start = len(segments)
                sub_segments = [_parse_segment(part, text) for part in (sub_template or "*").split("/")]
                segments.extend(sub_segments)
                multi = any(segment.rank == _RANK_MULTI for segment in sub_segments)
                variables.append(_Variable(field_path, start, None if multi else len(segments)))
            else:
                segments.append(_parse_segment(token, text))
        for position, segment in enumerate(segments):
            if segment.rank == _RANK_MULTI and position != len(segments) - 1:
                raise HttpRuleError(f"path template {text!r}: '**' may only be the last segment")
        return cls(text, tuple(segments), tuple(variables), verb)

    @property
    def specificity(self) -> tuple[int, ...]:
        """Sort key: templates with literals earlier in the path sort first."""
        return tuple(segment.rank for segment in self.segments)

    @property
    def openapi_path(self) -> str:
        """The template with each variable written as `{field.path}` (OpenAPI path syntax)."""
        parts: list[str] = []
        index = 0
        for variable in self.variables:
            parts.extend(self._literal_or_star(segment) for segment in self.segments[index : variable.start])
            parts.append("{" + variable.field_path + "}")
            index = len(self.segments) if variable.end is None else variable.end
        parts.extend(self._literal_or_star(segment) for segment in self.segments[index:])
        return "/" + "/".join(parts) + (f":{self.verb}" if self.verb else "")

    @staticmethod
    def _literal_or_star(segment: _Segment) -> str:
        if segment.literal is not None:
            return segment.literal
        return "**" if segment.multi else "*"

    def match(self, raw_path: str) -> dict[str, str] | None:
        """Returns the decoded variable values if `raw_path` (still percent-encoded) matches."""
        if not raw_path.startswith("/"):
            return None
        body = raw_path[1:]
        if self.verb is not None:
            suffix = ":" + self.verb
            if not body.endswith(suffix):
                return None
            body = body[: -len(suffix)]
        parts = body.split("/")
        last = self.segments[-1] if self.segments else None
        if last is not None and last.rank == _RANK_MULTI:
            if len(parts) < len(self.segments):
                return None
        elif len(parts) != len(self.segments):
            return None
        for position, segment in enumerate(self.segments):
            part = parts[position]
            if segment.literal is not None:
                if urllib.parse.unquote(part) != segment.literal:
                    return None
            elif not segment.multi and not part:
                return None
        if last is not None and last.rank == _RANK_MULTI and not any(parts[len(self.segments) - 1 :]):
            return None
        values: dict[str, str] = {}
        for variable in self.variables:
            captured = (
                parts[variable.start :] if variable.end is None else parts[variable.start : variable.end]
            )
            values[variable.field_path] = "/".join(urllib.parse.unquote(part) for part in captured)
        return values


def _split_top_level(body: str, text: str) -> list[str]:
    """Splits on '/' outside braces, so `{name=a/*}` stays one token."""
    tokens: list[str] = []
    depth = 0
    current = ""
    for char in body:
        if char == "{":
            if depth:
                raise HttpRuleError(f"path template {text!r} nests variables")
            depth += 1
        elif char == "}":
            if not depth:
                raise HttpRuleError(f"path template {text!r} has an unbalanced '}}'")
            depth -= 1
        if char == "/" and depth == 0:
            tokens.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise HttpRuleError(f"path template {text!r} has an unterminated variable")
    tokens.append(current)
    return tokens


def _parse_segment(token: str, text: str) -> _Segment:
    if token == "*":
        return _Segment(None)
    if token == "**":
        return _Segment(None, multi=True)
    if not token or any(char in token for char in "{}*=:"):
        raise HttpRuleError(f"path template {text!r} has an invalid segment {token!r}")
    return _Segment(token)


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one RPC."""

    http_method: str  # upper case, e.g. "GET"
    template: PathTemplate
    rpc: MethodDescriptor
    body: str  # "" (no body), "*" (the whole request) or a top-level field name
    response_body: str  # "" (the whole response) or a top-level field name
    binding_index: int  # 0 for the main binding, 1.. for additional_bindings

    @property
    def grpc_path(self) -> str:
        return f"/{self.rpc.containing_service.full_name}/{self.rpc.name}"

    @property
    def server_streaming(self) -> bool:
        return bool(self.rpc.server_streaming)

    @property
    def operation_id(self) -> str:
        suffix = f"_{self.binding_index}" if self.binding_index else ""
        return f"{self.rpc.containing_service.name}_{self.rpc.name}{suffix}"

    @property
    def path_fields(self) -> frozenset[str]:
        return frozenset(variable.field_path for variable in self.template.variables)


@dataclass(frozen=True)
class Resolution:
    """What a path resolves to: the route for the request's method (if any) and the methods allowed."""

    route: Route | None
    values: dict[str, str]
    allowed_methods: list[str]


@dataclass
class RouteTable:
    """Every route, ordered most specific first.

    A path belongs to its most specific matching template(s), whatever the method: `/agents/heartbeat`
    is the heartbeat resource, so `GET /agents/heartbeat` is a 405, not GetAgent("heartbeat"). That
    keeps the routing equal to what the OpenAPI document shows.
    """

    routes: list[Route] = field(default_factory=list)
    #: Resolutions of paths without variables (`/agents/list`): the same few on every request.
    _literal: dict[tuple[str, str], Resolution] = field(default_factory=dict, repr=False)

    def add(self, route: Route) -> None:
        for existing in self.routes:
            if existing.http_method == route.http_method and existing.template.text == route.template.text:
                raise HttpRuleError(
                    f"{route.http_method} {route.template.text} is bound by both "
                    f"{existing.rpc.full_name} and {route.rpc.full_name}"
                )
        self.routes.append(route)
        self.routes.sort(key=lambda candidate: candidate.template.specificity)
        self._literal.clear()

    def resolve(self, http_method: str, raw_path: str) -> Resolution:
        key = (http_method, raw_path)
        known = self._literal.get(key)
        if known is not None:
            return known
        resolution = self._resolve(http_method, raw_path)
        # Only routed paths that bind nothing are kept: there are as many as literal templates.
        if resolution.route is not None and not resolution.values and not resolution.route.template.variables:
            self._literal[key] = resolution
        return resolution

    def _resolve(self, http_method: str, raw_path: str) -> Resolution:
        best: tuple[int, ...] | None = None
        allowed: list[str] = []
        chosen: Route | None = None
        chosen_values: dict[str, str] = {}
        for route in self.routes:
            if best is not None and route.template.specificity != best:
                break  # sorted: every later route is less specific than the match already found
            values = route.template.match(raw_path)
            if values is None:
                continue
            best = route.template.specificity
            allowed.append(route.http_method)
            if chosen is None and route.http_method == http_method:
                chosen, chosen_values = route, values
        return Resolution(chosen, chosen_values, sorted(set(allowed)))


def http_rule_of(method: MethodDescriptor) -> http_pb2.HttpRule | None:
    options = method.GetOptions()
    # The stubs type `annotations_pb2.http` as a plain FieldDescriptor, not an extension descriptor.
    if not options.HasExtension(annotations_pb2.http):  # type: ignore[arg-type]
        return None
    rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]  # type: ignore[index]
    return rule


def _verb_and_path(rule: http_pb2.HttpRule, rpc: MethodDescriptor) -> tuple[str, str]:
    pattern = rule.WhichOneof("pattern")
    if pattern in _HTTP_METHODS:
        return pattern.upper(), str(getattr(rule, pattern))
    if pattern == "custom":
        return rule.custom.kind.upper(), rule.custom.path
    raise HttpRuleError(f"{rpc.full_name}: google.api.http has no pattern")


def _check_field_path(rpc: MethodDescriptor, field_path: str, what: str) -> None:
    message = rpc.input_type
    parts = field_path.split(".")
    for position, name in enumerate(parts):
        field_descriptor = message.fields_by_name.get(name)
        if field_descriptor is None:
            raise HttpRuleError(f"{rpc.full_name}: {what} names unknown field {field_path!r}")
        is_last = position == len(parts) - 1
        if not is_last:
            if not is_message(field_descriptor) or is_repeated(field_descriptor):
                raise HttpRuleError(f"{rpc.full_name}: {what} {field_path!r} crosses a non-message field")
            message = message_type_of(field_descriptor)


def _route_from_rule(rpc: MethodDescriptor, rule: http_pb2.HttpRule, binding_index: int) -> Route:
    http_method, path = _verb_and_path(rule, rpc)
    template = PathTemplate.parse(path)
    for variable in template.variables:
        _check_field_path(rpc, variable.field_path, "path template")
    if rule.body not in ("", "*"):
        _check_field_path(rpc, rule.body, "body")
    if rule.response_body and rule.response_body not in rpc.output_type.fields_by_name:
        raise HttpRuleError(f"{rpc.full_name}: response_body names unknown field {rule.response_body!r}")
    if rpc.client_streaming:
        raise HttpRuleError(f"{rpc.full_name}: client-streaming RPCs cannot be bound to HTTP")
    return Route(http_method, template, rpc, rule.body, rule.response_body, binding_index)


def routes_of_method(rpc: MethodDescriptor) -> list[Route]:
    """The routes of one RPC: its main binding and every additional binding (none if unannotated)."""
    rule = http_rule_of(rpc)
    if rule is None:
        return []
    routes = [_route_from_rule(rpc, rule, 0)]
    for index, extra in enumerate(rule.additional_bindings, start=1):
        if extra.additional_bindings:
            raise HttpRuleError(f"{rpc.full_name}: additional bindings cannot nest")
        routes.append(_route_from_rule(rpc, extra, index))
    return routes


def build_route_table(services: Iterable[ServiceDescriptor]) -> RouteTable:
    table = RouteTable()
    for service in services:
        for rpc in service.methods:
            for route in routes_of_method(rpc):
                table.add(route)
    return table


def describe_routes(table: RouteTable) -> Sequence[Mapping[str, str]]:
    """A printable summary (method, path, RPC) used by the CLI and the docs."""
    return [
        {"method": route.http_method, "path": route.template.text, "rpc": route.rpc.full_name}
        for route in table.routes
    ]
