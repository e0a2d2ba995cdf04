"""One exception hierarchy for every failed call, modelled on google-api-core's `GoogleAPICallError`.

Each gRPC status code has its own subclass of `OrchestratorError`, carrying the gRPC code, the HTTP
status the REST gateway answers with (read from the one table in `orchestrator_client.codes`, which
the gateway uses too), the message, and the
`google.rpc` detail messages the server attached (`BadRequest`, `RetryInfo`, `ErrorInfo`, ...),
already unpacked. `from_grpc_error` builds the right subclass; callers `raise ... from err` so the
original `grpc.aio.AioRpcError` stays reachable as `__cause__`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, cast

import google.rpc.error_details_pb2 as error_details_pb2
import google.rpc.status_pb2 as status_pb2
import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message as ProtoMessage
from grpc_status import rpc_status

from orchestrator_client.codes import http_status_for

# The detail types of google/rpc/error_details.proto, unpacked from `google.protobuf.Any`.
_DETAIL_TYPES: dict[str, type[ProtoMessage]] = {
    detail_type.DESCRIPTOR.full_name: detail_type
    for detail_type in (
        error_details_pb2.BadRequest,
        error_details_pb2.RetryInfo,
        error_details_pb2.ErrorInfo,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.QuotaFailure,
        error_details_pb2.ResourceInfo,
        error_details_pb2.RequestInfo,
        error_details_pb2.DebugInfo,
        error_details_pb2.Help,
        error_details_pb2.LocalizedMessage,
    )
}


class OrchestratorError(Exception):
    """A call to the orchestrator failed. Subclasses name the gRPC status code."""

    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    http_status: ClassVar[int] = http_status_for(grpc.StatusCode.UNKNOWN)
    """What the REST gateway answers for this code; never set by hand, see `__init_subclass__`."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # One table for both transports: a subclass names its gRPC code, the table gives the rest.
        cls.http_status = http_status_for(cls.grpc_code)

    def __init__(self, message: str, *, details: Sequence[ProtoMessage] = ()) -> None:
        super().__init__(message)
        self.message = message
        # Unpacked google.rpc detail messages; unknown types stay as `google.protobuf.Any`.
        self.details: list[ProtoMessage] = list(details)

    def __str__(self) -> str:
        return f"{self.grpc_code.name}: {self.message}"

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked the caller to wait (google.rpc.RetryInfo), if it said."""
        for detail in self.details:
            if isinstance(detail, error_details_pb2.RetryInfo) and detail.HasField("retry_delay"):
                return float(detail.retry_delay.ToTimedelta().total_seconds())
        return None

    @property
    def error_info(self) -> error_details_pb2.ErrorInfo | None:
        """The machine-readable reason (google.rpc.ErrorInfo), if the server attached one."""
        for detail in self.details:
            if isinstance(detail, error_details_pb2.ErrorInfo):
                return detail
        return None


class Cancelled(OrchestratorError):
    grpc_code = grpc.StatusCode.CANCELLED


class Unknown(OrchestratorError):
    grpc_code = grpc.StatusCode.UNKNOWN


class InvalidArgument(OrchestratorError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT

    @property
    def field_violations(self) -> list[error_details_pb2.BadRequest.FieldViolation]:
        """Every field the server rejected, with why (google.rpc.BadRequest)."""
        return [
            violation
            for detail in self.details
            if isinstance(detail, error_details_pb2.BadRequest)
            for violation in detail.field_violations
        ]


class DeadlineExceeded(OrchestratorError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(OrchestratorError):
    grpc_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(OrchestratorError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(OrchestratorError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(OrchestratorError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(OrchestratorError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(OrchestratorError):
    grpc_code = grpc.StatusCode.ABORTED


class OutOfRange(OrchestratorError):
    grpc_code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(OrchestratorError):
    grpc_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(OrchestratorError):
    grpc_code = grpc.StatusCode.INTERNAL


class Unavailable(OrchestratorError):
    grpc_code = grpc.StatusCode.UNAVAILABLE


class DataLoss(OrchestratorError):
    grpc_code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(OrchestratorError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[OrchestratorError]] = {
    cls.grpc_code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def exception_class_for(code: grpc.StatusCode) -> type[OrchestratorError]:
    """The subclass of `OrchestratorError` that stands for a gRPC status code."""
    return _BY_CODE.get(code, Unknown)


def _unpack(detail: any_pb2.Any) -> ProtoMessage:
    detail_type = _DETAIL_TYPES.get(detail.TypeName())
    if detail_type is None:
        return detail
    unpacked = detail_type()
    detail.Unpack(unpacked)
    return unpacked


def _rich_status(error: grpc.aio.AioRpcError | grpc.Call) -> status_pb2.Status | None:
    try:
        # from_call only reads code(), details() and trailing_metadata(), which AioRpcError has too.
        status: status_pb2.Status | None = rpc_status.from_call(cast(grpc.Call, error))
    except ValueError:
        # The rich status disagrees with the call's own code or message: trust the call.
        return None
    return status


def from_grpc_error(error: grpc.RpcError) -> OrchestratorError:
    """Map a failed call (`grpc.aio.AioRpcError` or a sync `grpc.RpcError`) to an `OrchestratorError`.

    The message and the detail messages come from the `google.rpc.Status` in the trailing metadata
    when the server sent one (grpcio-status), otherwise from the call's own code and details.
    """
    # grpc.aio.AioRpcError is not a grpc.Call, but has the same accessors.
    if not isinstance(error, grpc.aio.AioRpcError | grpc.Call):
        return Unknown(str(error) or type(error).__name__)
    code = error.code()
    message_text = error.details() or ""
    details: list[ProtoMessage] = []
    status = _rich_status(error)
    if status is not None:
        message_text = status.message
        details = [_unpack(detail) for detail in status.details]
    return exception_class_for(code)(message_text, details=details)
