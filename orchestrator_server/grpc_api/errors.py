"""Turns domain errors into gRPC statuses with google.rpc details, for every RPC in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_interceptor.server import AsyncServerInterceptor
from grpc_status import rpc_status

from orchestrator_server.errors import OrchestratorError
from orchestrator_server.policy import error_status, failure_status


def to_status(error: OrchestratorError) -> grpc.Status:
    """The gRPC status for a domain error, with the details `policy.error_status` gives it."""
    return rpc_status.to_status(error_status(error))


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: OrchestratorError) -> None:
    # abort_with_status exists on grpc.aio contexts but is missing from the type stubs.
    aio_context: Any = context
    await aio_context.abort_with_status(to_status(error))


async def answer(error: Exception, context: grpc.aio.ServicerContext[Any, Any], method_name: str) -> None:
    """Ends the call with the status `error` deserves (`policy.failure_status`)."""
    if isinstance(error, grpc.aio.AbortError):
        raise error  # the call was already ended with a status
    aio_context: Any = context
    await aio_context.abort_with_status(rpc_status.to_status(failure_status(error, method_name)))


class ErrorInterceptor(AsyncServerInterceptor):
    """Domain errors become their status; anything else is logged and becomes a bare INTERNAL."""

    async def intercept(
        self,
        method: Callable[..., Any],
        request_or_iterator: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        method_name: str,
    ) -> Any:
        try:
            response = method(request_or_iterator, context)
            if hasattr(response, "__aiter__"):
                return self._stream(response, context, method_name)
            return await response
        except Exception as error:
            await answer(error, context, method_name)

    async def _stream(
        self, responses: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any], method_name: str
    ) -> AsyncIterator[Any]:
        try:
            async for response in responses:
                yield response
        except Exception as error:
            await answer(error, context, method_name)
