"""The REST gateway: `Gateway.handle` answers every HTTP request (`serve.py` runs it on a socket).

Every HTTP request is transcoded into the request message of its RPC and handed to a backend
(`backends.py`): inside the server, the servicers themselves under the policy layer the gRPC
interceptors apply too (`inprocess.py`); as a process of its own, a remote gRPC server through a
grpc.aio channel, whose interceptors apply. Either way a REST caller meets the same checks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import prometheus_client
from aiohttp import web
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from multidict import CIMultiDict

from orchestrator.v1 import discovery_pb2, registry_pb2, tasks_pb2
from orchestrator.v1 import health_pb2 as orchestrator_health_pb2
from orchestrator_client.codes import http_status_for
from orchestrator_server.auth import grpc_peer
from orchestrator_server.console import Console
from orchestrator_server.gateway import metrics
from orchestrator_server.gateway.backends import Backend, ChannelBackend, Invocation
from orchestrator_server.gateway.errors import GatewayError, invalid_argument
from orchestrator_server.gateway.http_rules import Route, RouteTable, build_route_table
from orchestrator_server.gateway.openapi import MAX_FIELD_SIZE, build_openapi
from orchestrator_server.gateway.proto_json import ProtoJsonWriter
from orchestrator_server.gateway.transcode import build_request

logger = logging.getLogger(__name__)

DEFAULT_SERVICES: tuple[ServiceDescriptor, ...] = (
    registry_pb2.DESCRIPTOR.services_by_name["RegistryService"],
    orchestrator_health_pb2.DESCRIPTOR.services_by_name["HealthService"],
    discovery_pb2.DESCRIPTOR.services_by_name["DiscoveryService"],
    tasks_pb2.DESCRIPTOR.services_by_name["TasksService"],
)

# Headers forwarded to the gRPC server as metadata (HTTP header names are case-insensitive; gRPC
# metadata keys are lower case).
FORWARDED_HEADERS = ("authorization", "x-api-key", "x-request-id")
REQUEST_ID_HEADER = "x-request-id"
NDJSON = "application/x-ndjson"

_GRPC_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_GRPC_TIMEOUT_UNIT_SECONDS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
#: The longest deadline a REST client may ask for; a longer one is clamped to it. Far larger values
#: (`x-request-timeout: 1e308`, `grpc-timeout: 99999999H`) overflow grpc's deadline arithmetic and
#: used to end the call at once with 504.
MAX_DEADLINE_SECONDS = 86_400.0
_PRINTABLE_ASCII = re.compile(r"^[\x20-\x7e]*$")
_MAX_REQUEST_ID_LENGTH = 128

ReadinessCheck = Callable[[], Awaitable[bool]]

# Copied into each answer: cheaper than aiohttp's handling of `content_type=`.
_JSON = CIMultiDict({"Content-Type": "application/json"})

_ROUTE_KEY = web.RequestKey("gateway_route", str)
_REQUEST_ID_KEY = web.RequestKey("gateway_request_id", str)
_STREAMING_KEY = web.RequestKey("gateway_streaming", bool)
_UNMATCHED_ROUTE = "unmatched"
_CONSOLE_ROUTE = "/ui"


@dataclass(frozen=True)
class GatewayOptions:
    """Knobs of the gateway; the defaults suit `orchestrator serve`."""

    #: Largest accepted request body; the gRPC server's default receive limit is 4 MiB too.
    max_body_bytes: int = 4 * 1024 * 1024
    #: Deadline of unary calls when the client sends none; None waits as long as the server takes.
    default_timeout: float | None = 30.0
    #: Write fields that hold their default value (0, "", false, []), as legacy callers expect.
    emit_defaults: bool = True
    #: Deadline of the grpc.health.v1 Check behind /readyz.
    readiness_timeout: float = 2.0
    #: Service name asked in that Check ("" is the server as a whole).
    readiness_service: str = ""
    #: Seconds a connection may go without a complete request head (new, or idle between
    #: requests) before it is closed: what ends slowloris connections.
    header_timeout: float = 10.0
    #: Seconds allowed for reading a request body once its head has arrived.
    body_timeout: float = 30.0
    #: Open connections at most; each one over is answered 503 and closed at once.
    max_connections: int = 4096
    #: Longest request line and header (bytes); longer ones answer 400 (never logged).
    max_field_size: int = MAX_FIELD_SIZE


def _json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(error: GatewayError) -> web.Response:
    return _json_response(error.body(), error.http_status, error.headers)


def _parse_timeout(request: web.BaseRequest) -> float | None:
    """The client's deadline: `grpc-timeout` (gRPC syntax) or `x-request-timeout` (seconds)."""
    grpc_timeout = request.headers.get("grpc-timeout")
    if grpc_timeout is not None:
        match = _GRPC_TIMEOUT.match(grpc_timeout)
        if match is None or int(match.group(1)) == 0:
            raise invalid_argument(
                f"invalid grpc-timeout header {grpc_timeout!r}: expected 1 to 8 digits and a unit "
                "(H, M, S, m, u, n), e.g. 500m",
                "grpc-timeout",
            )
        return min(MAX_DEADLINE_SECONDS, int(match.group(1)) * _GRPC_TIMEOUT_UNIT_SECONDS[match.group(2)])
    seconds_text = request.headers.get("x-request-timeout")
    if seconds_text is not None:
        try:
            seconds = float(seconds_text)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds <= 0:
            raise invalid_argument(
                f"invalid x-request-timeout header {seconds_text!r}: expected a positive number of seconds",
                "x-request-timeout",
            )
        return min(MAX_DEADLINE_SECONDS, seconds)
    return None


def _new_request_id() -> str:
    # The form of uuid4().hex (32 hex digits), at a fraction of its cost: an id need not be secret,
    # and os.urandom is a system call per request.
    return f"{random.getrandbits(128):032x}"


def _request_id(request: web.BaseRequest) -> str:
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is None or not given.strip():
        return _new_request_id()
    return given


class Gateway:
    """Routes, the backend and the handlers of one gateway application."""

    def __init__(
        self,
        backend: Backend,
        routes: RouteTable,
        options: GatewayOptions,
        readiness_check: ReadinessCheck | None,
        openapi_document: dict[str, Any],
    ) -> None:
        self.routes = routes
        self.options = options
        self.backend = backend
        self._readiness_check = readiness_check
        self._openapi_body = json.dumps(openapi_document, indent=1).encode()
        self._json_writer = ProtoJsonWriter(options.emit_defaults)
        self._open_stream_handlers: set[asyncio.Task[Any]] = set()
        self._console = Console()
        self._operations: dict[str, Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]] = {
            "/livez": self._livez,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
            "/openapi.json": self._openapi,
        }

    # -- dispatch ---------------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answers one HTTP request: aiohttp's low-level request handler (`web.Server`). Sets the
        request id, turns every error into the JSON shape (never an HTML page), counts the request."""
        started = time.perf_counter()
        request_id = _request_id(request)
        request[_REQUEST_ID_KEY] = request_id
        try:
            if len(request_id) > _MAX_REQUEST_ID_LENGTH or not _PRINTABLE_ASCII.match(request_id):
                request[_REQUEST_ID_KEY] = _new_request_id()
                raise invalid_argument(
                    f"header x-request-id must be at most {_MAX_REQUEST_ID_LENGTH} printable ASCII characters",
                    REQUEST_ID_HEADER,
                )
            response = await self.dispatch(request)
        except GatewayError as error:
            response = error_response(error)
        except web.HTTPException as error:
            # aiohttp's own errors (e.g. a body it cannot decode) get the same JSON shape as ours.
            response = error_response(
                GatewayError(error.status, "INVALID_ARGUMENT", error.reason, headers={})
            )
        except Exception:
            logger.exception("gateway request failed", extra={"request_id": request[_REQUEST_ID_KEY]})
            response = error_response(
                GatewayError(http_status_for(grpc.StatusCode.INTERNAL), "INTERNAL", "internal gateway error")
            )
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request[_REQUEST_ID_KEY]
        route = request.get(_ROUTE_KEY, _UNMATCHED_ROUTE)
        metrics.count_request(request.method, route, response.status)
        if not request.get(_STREAMING_KEY, False):
            metrics.observe_latency(request.method, route, time.perf_counter() - started)
        return response

    async def dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        raw_path = request.rel_url.raw_path
        operation = self._operations.get(raw_path)
        if operation is not None:
            request[_ROUTE_KEY] = raw_path
            if request.method != "GET":
                raise GatewayError(
                    405, "METHOD_NOT_ALLOWED", f"{raw_path} only answers GET", headers={"Allow": "GET"}
                )
            return await operation(request)
        resolution = self.routes.resolve(request.method, raw_path)
        route, path_values = resolution.route, resolution.values
        if route is None:
            if self._console.owns(raw_path):
                return self._answer_console(request)
            allowed = resolution.allowed_methods
            if allowed:
                raise GatewayError(
                    405,
                    "METHOD_NOT_ALLOWED",
                    f"{request.method} is not allowed on {request.rel_url.path}; use {', '.join(allowed)}",
                    headers={"Allow": ", ".join(allowed)},
                )
            raise GatewayError(
                http_status_for(grpc.StatusCode.NOT_FOUND),
                "NOT_FOUND",
                f"no endpoint at {request.rel_url.path}",
            )
        request[_ROUTE_KEY] = route.template.text
        raw_body = await self._read_body(request) if route.body else b""
        query = {name: request.rel_url.query.getall(name) for name in request.rel_url.query}
        message = build_request(route, path_values, query, raw_body)
        metadata = self._metadata(request)
        deadline_seconds = _parse_timeout(request)
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        if route.server_streaming:
            invocation = Invocation(metadata, grpc_peer(peer), request[_REQUEST_ID_KEY], deadline_seconds)
            return await self._call_streaming(request, route, message, invocation)
        timeout = deadline_seconds if deadline_seconds is not None else self.options.default_timeout
        invocation = Invocation(metadata, grpc_peer(peer), request[_REQUEST_ID_KEY], timeout)
        reply = await self.backend.unary(route, message, invocation)
        return web.Response(body=self._json_writer.to_json(reply, route.response_body), headers=_JSON)

    def _answer_console(self, request: web.BaseRequest) -> web.Response:
        # The operator console at /ui (docs/CONSOLE.md): the paths no API route takes.
        request[_ROUTE_KEY] = _CONSOLE_ROUTE
        if request.method not in ("GET", "HEAD"):
            raise GatewayError(
                405,
                "METHOD_NOT_ALLOWED",
                f"{request.rel_url.path} only answers GET",
                headers={"Allow": "GET, HEAD"},
            )
        return self._console.answer(request.rel_url.path)

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        limit = self.options.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise self._too_large()
        content = request.content
        if content.is_eof():
            # The whole body came with the head (the usual small request): taken as it is, without
            # `read()`'s loop of awaits and copies (~5 us of a REST heartbeat).
            body = content.read_nowait()
            if len(body) > limit:
                raise self._too_large()
            return body
        try:
            async with asyncio.timeout(self.options.body_timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large() from None
        except TimeoutError:
            raise GatewayError(
                408,
                "DEADLINE_EXCEEDED",
                f"the request body did not arrive within {self.options.body_timeout:g} s",
                headers={"Connection": "close"},
            ) from None

    def _too_large(self) -> GatewayError:
        return invalid_argument(f"the request body exceeds the limit of {self.options.max_body_bytes} bytes")

    def _metadata(self, request: web.BaseRequest) -> list[tuple[str, str]]:
        metadata: list[tuple[str, str]] = []
        for name in FORWARDED_HEADERS:
            value = request[_REQUEST_ID_KEY] if name == REQUEST_ID_HEADER else request.headers.get(name)
            if value is None:
                continue
            if not _PRINTABLE_ASCII.match(value):
                raise invalid_argument(f"header {name!r} must be printable ASCII", name)
            metadata.append((name, value))
        return metadata

    async def _call_streaming(
        self, request: web.BaseRequest, route: Route, message: Message, invocation: Invocation
    ) -> web.StreamResponse:
        """Streams the RPC's messages as newline-delimited JSON until the RPC ends or the client leaves.

        The HTTP status is decided by the first message: an RPC that fails before sending anything
        (unknown task, bad argument, no credentials) answers with the mapped status and an error body.
        A failure after that is written as a last line `{"error": {...}}`, since the status is sent.
        """
        request[_STREAMING_KEY] = True
        started = time.perf_counter()
        handler_task = asyncio.current_task()
        if handler_task is not None:
            self._open_stream_handlers.add(handler_task)
        messages = self.backend.stream(route, message, invocation)
        metrics.OPEN_STREAMS.inc()
        try:
            try:
                first: Message | None = await anext(messages)
            except StopAsyncIteration:
                first = None
            response = web.StreamResponse(
                status=200,
                headers={
                    "Content-Type": NDJSON,
                    "Cache-Control": "no-cache",
                    REQUEST_ID_HEADER: request[_REQUEST_ID_KEY],
                },
            )
            await response.prepare(request)
            metrics.observe_latency(request.method, route.template.text, time.perf_counter() - started)
            try:
                if first is not None:
                    await self._write_line(response, route, first)
                    async for reply in messages:
                        await self._write_line(response, route, reply)
            except GatewayError as error:
                await response.write(json.dumps(error.body(), separators=(",", ":")).encode() + b"\n")
            await response.write_eof()
            return response
        finally:
            # Whatever ended the stream (the RPC, the client leaving, gateway shutdown), the call
            # ends with it, so the server frees the watcher at once.
            await _close(messages)
            metrics.OPEN_STREAMS.dec()
            if handler_task is not None:
                self._open_stream_handlers.discard(handler_task)

    async def _write_line(self, response: web.StreamResponse, route: Route, reply: Message) -> None:
        await response.write(self._json_writer.to_json(reply, route.response_body) + b"\n")

    async def cancel_streams(self) -> None:
        """Ends every open streamed response (used at shutdown: a watch never ends by itself)."""
        tasks = list(self._open_stream_handlers)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- operations -------------------------------------------------------------------------------

    async def _livez(self, request: web.BaseRequest) -> web.Response:
        return _json_response({"status": "ok"})

    async def _readyz(self, request: web.BaseRequest) -> web.Response:
        reason = await self._not_ready_reason()
        if reason is not None:
            return _json_response({"status": "NOT_SERVING", "reason": reason}, status=503)
        return _json_response({"status": "SERVING"})

    async def _not_ready_reason(self) -> str | None:
        reason = await self.backend.health(self.options.readiness_service, self.options.readiness_timeout)
        if reason is not None:
            return reason
        if self._readiness_check is not None:
            try:
                ready = await self._readiness_check()
            except Exception as error:
                logger.warning("readiness check raised", exc_info=True)
                return f"readiness check failed: {error}"
            if not ready:
                return "readiness check failed"
        return None

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        return web.Response(
            body=prometheus_client.generate_latest(prometheus_client.REGISTRY),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    async def _openapi(self, request: web.BaseRequest) -> web.Response:
        return web.Response(body=self._openapi_body, content_type="application/json")


async def _close(messages: AsyncIterator[Message]) -> None:
    aclose = getattr(messages, "aclose", None)
    if aclose is not None:
        await aclose()


def create_gateway(
    backend: Backend | grpc.aio.Channel,
    *,
    services: Iterable[ServiceDescriptor] = DEFAULT_SERVICES,
    options: GatewayOptions | None = None,
    readiness_check: ReadinessCheck | None = None,
) -> Gateway:
    """The gateway calling `backend`: the servicers of this process (`inprocess.InProcessBackend`),
    or a gRPC server through a channel.

    Serve `Gateway.handle` with aiohttp's low-level server, `web.Server(gateway.handle,
    handler_cancellation=True)`: that cancellation is what ends a watch's call when its HTTP client
    goes away; call `cancel_streams()` at shutdown. `start_gateway` does both for you.
    """
    chosen = options or GatewayOptions()
    service_list = list(services)
    routes = build_route_table(service_list)
    if isinstance(backend, grpc.aio.Channel):
        backend = ChannelBackend(backend, routes.routes)
    return Gateway(backend, routes, chosen, readiness_check, build_openapi(routes, service_list))
