"""The gateway inside the server: each HTTP request calls the servicer method of its RPC directly,
under the same policy (`orchestrator_server.policy`) and telemetry the gRPC interceptors apply.

A call over the loopback channel cost a second HTTP/2 request, two serializations and five
interceptors per REST request (issue 13: 0.17x FastAPI on heartbeats, 0.07x on lists). Here the
request message the gateway built is handed to the servicer as is. What grpc core did for the
channel is done here: the message size limit (MAX_MESSAGE_BYTES), the deadline, and the status of
an error, which comes from `policy.failure_status` like a gRPC caller's trailer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Mapping
from contextvars import Token
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from orchestrator_server.errors import OrchestratorError
from orchestrator_server.gateway.backends import Invocation, not_serving
from orchestrator_server.gateway.errors import GatewayError, from_status
from orchestrator_server.gateway.http_rules import Route
from orchestrator_server.gateway.proto_json import Encoded
from orchestrator_server.grpc_api import telemetry
from orchestrator_server.policy import Call, Policy, failure_status, outcome

#: The message grpc gives a call whose deadline passed.
_DEADLINE_MESSAGE = "Deadline Exceeded"


class _Aborted(Exception):
    """What `context.abort` raises in process (grpc raises its own AbortError)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class InProcessContext:
    """The servicer context of a call the gateway makes in process: the caller's metadata, address
    and deadline. Servicers behind REST routes read at most these."""

    def __init__(self, invocation: Invocation, deadline: float | None) -> None:
        self._invocation = invocation
        self._deadline = deadline

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(self._invocation.metadata)

    def peer(self) -> str:
        return self._invocation.peer

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def cancelled(self) -> bool:
        return False

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Aborted(code, details)


def _error(error: BaseException, method: str) -> GatewayError:
    if isinstance(error, _Aborted):
        return from_status(error.code, error.details or error.code.name, [])
    if isinstance(error, TimeoutError):
        return from_status(grpc.StatusCode.DEADLINE_EXCEEDED, _DEADLINE_MESSAGE, [])
    status = failure_status(error, method)
    code = _CODES.get(status.code, grpc.StatusCode.INTERNAL)
    return from_status(code, status.message, list(status.details))


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _code_of(error: BaseException | None) -> str:
    if isinstance(error, GeneratorExit):
        return "CANCELLED"  # the HTTP client left
    if isinstance(error, _Aborted):
        return error.code.name
    if isinstance(error, TimeoutError):
        return "DEADLINE_EXCEEDED"
    return outcome(error)


Servicer = Callable[[Any, Any], Any]
#: A unary call's answer: a message, or a list page as its bytes.
Reply = Message | Encoded


class InProcessBackend:
    """Dispatches to the servicers of this process. `servicers` maps a service's full name
    (`orchestrator.v1.RegistryService`) to its servicer object; `health` is the grpc.health.v1
    servicer behind /readyz."""

    def __init__(self, servicers: Mapping[str, object], policy: Policy, health: Any) -> None:
        self._servicers = servicers
        self._policy = policy
        self._health = health
        self._methods: dict[str, Servicer] = {}

    def _method(self, route: Route) -> Servicer:
        """The servicer's method of the route's RPC, or the one it offers answering bytes
        (`grpc_api.pages`: a list answer is then rendered without building its message)."""
        method = self._methods.get(route.grpc_path)
        if method is None:
            servicer = self._servicers.get(route.rpc.containing_service.full_name)
            encoded = getattr(servicer, "encoded_methods", None)
            if encoded is not None and not route.server_streaming:
                method = encoded().get(route.rpc.name)
            if method is None:
                method = getattr(servicer, route.rpc.name, None) if servicer is not None else None
            if method is None:
                raise from_status(grpc.StatusCode.UNIMPLEMENTED, "Method not found!", [])
            self._methods[route.grpc_path] = method
        return method

    def _begin(
        self, route: Route, message: Message, invocation: Invocation
    ) -> tuple[Call, Token[Call | None]]:
        # grpc core refuses a message over the limit before any interceptor sees it.
        try:
            self._policy.check_size(message, "Received")
        except OrchestratorError as error:
            raise _error(error, route.grpc_path) from None
        return self._policy.begin(route.grpc_path, invocation.peer)

    async def unary(self, route: Route, message: Message, invocation: Invocation) -> Message | Encoded:
        method = self._method(route)
        call, call_token = self._begin(route, message, invocation)
        rid_token = telemetry.request_id.set(invocation.request_id)
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            return await _within(self._unary(call, route, method, message, invocation), invocation.timeout)
        except BaseException as error:
            failure = error
            if not isinstance(error, Exception):
                raise
            raise _error(error, route.grpc_path) from None
        finally:
            telemetry.record(route.grpc_path, _code_of(failure), invocation.request_id, started)
            telemetry.request_id.reset(rid_token)
            self._policy.end(call_token)

    async def _unary(
        self, call: Call, route: Route, method: Servicer, message: Message, invocation: Invocation
    ) -> Message | Encoded:
        policy = self._policy
        context = InProcessContext(invocation, _deadline(invocation))
        scope = policy.audited(call, message, lambda: invocation.request_id)
        if scope is None:
            policy.admit(call, invocation.metadata, message)
            policy.meter(call, message)
            reply: Message | bytes = await method(message, context)
        else:
            with scope:
                policy.admit(call, invocation.metadata, message)
                policy.meter(call, message)
                reply = await method(message, context)
                scope.response = (
                    Encoded(route.rpc.output_type, reply).message() if isinstance(reply, bytes) else reply
                )
        if isinstance(reply, bytes):
            policy.check_length(len(reply), "Sent")
            return Encoded(route.rpc.output_type, reply)
        policy.check_size(reply, "Sent")
        return reply

    async def stream(self, route: Route, message: Message, invocation: Invocation) -> AsyncIterator[Message]:
        method = self._method(route)
        call, call_token = self._begin(route, message, invocation)
        rid_token = telemetry.request_id.set(invocation.request_id)
        started = time.perf_counter()
        deadline = _deadline(invocation)
        policy = self._policy
        slot = None
        failure: BaseException | None = None
        replies: AsyncIterator[Message] | None = None
        try:
            try:
                policy.admit(call, invocation.metadata, message)
                slot = policy.meter(call, message)
                policy.open_stream(slot)
                replies = method(message, InProcessContext(invocation, deadline))
                assert replies is not None
                while True:
                    # The deadline covers the servicer's steps only: a timeout around a `yield`
                    # would cancel whatever the consumer is doing when it fires.
                    async with asyncio.timeout_at(deadline):
                        try:
                            reply = await anext(replies)
                        except StopAsyncIteration:
                            break
                    policy.check_size(reply, "Sent")
                    yield reply
            except BaseException as error:
                failure = error
                if not isinstance(error, Exception):
                    raise  # cancelled, or closed because the HTTP client left
                raise _error(error, route.grpc_path) from None
        finally:
            if replies is not None and hasattr(replies, "aclose"):
                await replies.aclose()
            if slot is not None:
                policy.close_stream(slot)
            telemetry.record(route.grpc_path, _code_of(failure), invocation.request_id, started)
            telemetry.request_id.reset(rid_token)
            self._policy.end(call_token)

    async def health(self, service: str, within: float) -> str | None:
        check = health_pb2.HealthCheckRequest(service=service)
        context = InProcessContext(Invocation([], "", "", within), None)
        try:
            async with asyncio.timeout(within):
                reply: health_pb2.HealthCheckResponse = await self._health.Check(check, context)
        except _Aborted as error:
            return f"gRPC health check failed: {error.code.name}: {error.details or None}"
        except TimeoutError:
            return f"gRPC health check failed: DEADLINE_EXCEEDED: {_DEADLINE_MESSAGE}"
        return not_serving(reply)


async def _within(step: Coroutine[Any, Any, Reply], seconds: float | None) -> Reply:
    """`step` under a deadline `seconds` from now, armed only if it has to wait.

    Most calls (a heartbeat, a list) answer without ever suspending; arming a loop timer for them
    (`asyncio.timeout`) cost ~20 µs under uvloop, 6% of a heartbeat. So the first step runs at
    once, and only a call that then waits continues under the deadline, measured from its start."""
    started = asyncio.get_running_loop().time()
    try:
        waiting_on = step.send(None)
    except StopIteration as done:
        reply: Reply = done.value
        return reply
    when = None if seconds is None else started + seconds
    async with asyncio.timeout_at(when):
        return await _Resumed(step, waiting_on)


class _Resumed:
    """Awaits the rest of a coroutine already stepped once: hands what it waits on to the task, and
    the task's answers (results, cancellation) back to it, as `await` would have."""

    __slots__ = ("_step", "_waiting_on")

    def __init__(self, step: Coroutine[Any, Any, Reply], waiting_on: Any) -> None:
        self._step = step
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, Reply]:
        waiting_on = self._waiting_on
        while True:
            try:
                sent = yield waiting_on
            except BaseException as error:  # cancelled (by the deadline or the client leaving)
                try:
                    waiting_on = self._step.throw(error)
                except StopIteration as done:
                    reply: Reply = done.value
                    return reply
            else:
                try:
                    waiting_on = self._step.send(sent)
                except StopIteration as done:
                    reply = done.value
                    return reply


def _deadline(invocation: Invocation) -> float | None:
    if invocation.timeout is None:
        return None
    return asyncio.get_running_loop().time() + invocation.timeout
