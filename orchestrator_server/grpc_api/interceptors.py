"""The gRPC adapter of the policy layer (`orchestrator_server.policy`): one interceptor that opens
the call's record, audits it, authenticates and authorizes the caller and meters it, inside
`ErrorInterceptor`, which turns the domain errors it raises into statuses.

What is gRPC's own lives here: bytes that do not decode (grpc would answer UNKNOWN and log a
traceback), and the messages of a client stream. The Heartbeat servicer reads its stream with
`context.read()`, so checks on the messages of a stream (the hello, the session budget) wrap the
context: `read()` passes every message through the hooks registered here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_interceptor.server import AsyncServerInterceptor

from orchestrator_server.auth import Access
from orchestrator_server.policy import (
    Call,
    Malformed,
    Policy,
    StreamSlot,
    acting_agent_id,
    authenticated_caller,
    caller_scope,
)

__all__ = [
    "PolicyInterceptor",
    "acting_agent_id",
    "authenticated_caller",
    "caller_scope",
]

Context = grpc.aio.ServicerContext[Any, Any]
# A check on one message of a client stream: raises to refuse it, returns the seconds to wait
# before it is handled (pacing; 0.0 nearly always, so the beat path awaits nothing extra).
Hook = Callable[[Any], float]
# End-of-stream marker of context.read(); missing from the type stubs.
EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            # grpc would answer UNKNOWN "Unexpected DecodeError" and log a traceback per request.
            return Malformed(error)

    return deserialize


class _HookedContext:
    """A servicer context whose `read()` passes each message through the registered hooks."""

    def __init__(self, context: Context) -> None:
        self._context = context
        self.hooks: list[Hook] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not EOF:
            for hook in self.hooks:
                delay = hook(message)
                if delay > 0:
                    await asyncio.sleep(delay)
        return message


def _reject_malformed(message: Any) -> float:
    if isinstance(message, Malformed):
        raise message.error()
    return 0.0


async def _parsed(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for message in requests:
        _reject_malformed(message)
        yield message


def _request_id_of(context: Context) -> Callable[[], str]:
    return lambda: next(
        (
            value
            for key, value in context.invocation_metadata() or ()
            if key == "x-request-id" and isinstance(value, str)
        ),
        "",
    )


class PolicyInterceptor(AsyncServerInterceptor):
    """Applies the policy to every gRPC call; see `orchestrator_server.policy` for the order."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await super().intercept_service(continuation, handler_call_details)  # type: ignore[no-untyped-call]
        if handler is None or handler.request_deserializer is None:
            return handler
        return handler._replace(request_deserializer=_tolerant(handler.request_deserializer))

    async def intercept(
        self, method: Callable[..., Any], request: Any, context: Context, method_name: str
    ) -> Any:
        metadata = context.invocation_metadata() or ()
        call, _ = self._policy.begin(method_name, context.peer())
        scope = self._policy.audited(call, request, _request_id_of(context))
        if scope is None:
            return await self._checked(call, metadata, method, request, context)
        with scope:
            try:
                scope.response = await self._checked(call, metadata, method, request, context)
            except grpc.aio.AbortError:
                aborted = context.code()
                scope.code = aborted.name if isinstance(aborted, grpc.StatusCode) else "ABORTED_BY_HANDLER"
                raise
            return scope.response

    async def _checked(
        self, call: Call, metadata: Any, method: Callable[..., Any], request: Any, context: Context
    ) -> Any:
        policy = self._policy
        policy.admit(call, metadata, request)
        slot = policy.meter(call, request)
        hooks: list[Hook] = []
        if hasattr(request, "__aiter__"):
            # A client stream: servicers read it either by iterating or with context.read().
            request = _parsed(request)
            hooks.append(_reject_malformed)
        if call.rule is not None and call.rule.access is Access.SESSION:
            hooks.append(self._session_hook(call, slot))
        if hooks:
            hooked = _HookedContext(context)
            hooked.hooks.extend(hooks)
            context = hooked  # type: ignore[assignment]
        response = method(request, context)
        if not hasattr(response, "__aiter__"):
            try:
                return await response
            finally:
                # A session (it writes with context.write, so it ends here) holds its slot since
                # its hello; it used to keep it for good, and an agent's 1001st reconnect was refused.
                self._policy.close_stream(slot)
        return self._stream(response, slot)

    def _session_hook(self, call: Call, slot: StreamSlot) -> Hook:
        first = True

        def check(message: Any) -> float:
            nonlocal first
            if first:
                first = False
                self._policy.check_hello(call, message)
            return self._policy.pace(call, slot)

        return check

    async def _stream(self, responses: AsyncIterator[Any], slot: StreamSlot) -> AsyncIterator[Any]:
        try:
            self._policy.open_stream(slot)
            async for response in responses:
                yield response
        finally:
            self._policy.close_stream(slot)
