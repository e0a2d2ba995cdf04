"""Turns domain errors into gRPC statuses with google.rpc details, for every RPC in one place."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_interceptor.server import AsyncServerInterceptor
from grpc_status import rpc_status

from orchestrator_server.errors import InvalidArgument, OrchestratorError

log = logging.getLogger(__name__)


def to_status(error: OrchestratorError) -> grpc.Status:
    """The gRPC status for a domain error, with BadRequest or RetryInfo details where they apply."""
    details: list[any_pb2.Any] = []
    if isinstance(error, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        details.append(packed)
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after * 1e9))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(packed)
    if error.reason:
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain="orchestrator.optiinfra"))
        details.append(packed)
    status = status_pb2.Status(
        code=grpc.StatusCode[error.code].value[0], message=error.message, details=details
    )
    return rpc_status.to_status(status)


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: OrchestratorError) -> None:
    # abort_with_status exists on grpc.aio contexts but is missing from the type stubs.
    aio_context: Any = context
    await aio_context.abort_with_status(to_status(error))


async def answer(error: Exception, context: grpc.aio.ServicerContext[Any, Any], method_name: str) -> None:
    """Ends the call with the status `error` deserves: its own for domain errors, UNIMPLEMENTED for
    what is not implemented, a bare INTERNAL (and a logged traceback) for anything else."""
    if isinstance(error, grpc.aio.AbortError):
        raise error  # the call was already ended with a status
    if isinstance(error, OrchestratorError):
        await abort_with(context, error)
    if isinstance(error, NotImplementedError):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method_name} is not implemented")
    log.error("unexpected error in %s", method_name, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


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
