"""gRPC status → HTTP status and the JSON error body shared by every gateway error.

The HTTP status of a gRPC code comes from `orchestrator_client.codes`, the one table the SDK's
exceptions read too (google/rpc/code.proto's mapping), so REST and gRPC callers see the same status.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Sequence
from typing import Any, cast

import grpc
from google.protobuf import any_pb2, json_format
from google.rpc import error_details_pb2, status_pb2

# Re-exported: the gateway's tests and callers read the table from here as well.
from orchestrator_client.codes import HTTP_STATUS_BY_GRPC_CODE, http_status_for

GRPC_DETAILS_METADATA_KEY = "grpc-status-details-bin"

__all__ = ["HTTP_STATUS_BY_GRPC_CODE", "GatewayError", "from_rpc_error", "invalid_argument"]


# Retry-After is sent on 429 even without a RetryInfo detail, so clients always get a hint.
DEFAULT_RETRY_AFTER_SECONDS = 1


class GatewayError(Exception):
    """An error answered as JSON: raised by the gateway itself or built from a failed gRPC call."""

    def __init__(
        self,
        http_status: int,
        status: str,
        message: str,
        details: Sequence[dict[str, Any]] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.status = status
        self.message = message
        self.details = list(details)
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.http_status,
                "status": self.status,
                "message": self.message,
                "details": self.details,
            }
        }


def invalid_argument(message: str, field: str | None = None) -> GatewayError:
    """A 400 for bad input; names the offending field in a google.rpc.BadRequest detail when known."""
    details: list[dict[str, Any]] = []
    if field is not None:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]
        )
        details.append(_render_detail(_pack(bad_request)))
    code = grpc.StatusCode.INVALID_ARGUMENT
    return GatewayError(http_status_for(code), code.name, message, details)


def _pack(message: error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _render_detail(detail: any_pb2.Any) -> dict[str, Any]:
    """Proto3 JSON of one detail; an unknown type is kept as base64 instead of failing the response."""
    try:
        rendered: dict[str, Any] = json_format.MessageToDict(detail, preserving_proto_field_name=True)
    except (TypeError, json_format.Error):
        return {"@type": detail.type_url, "value": base64.b64encode(detail.value).decode("ascii")}
    return rendered


def _rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """The google.rpc.Status of the `grpc-status-details-bin` trailer, if there is a valid one."""
    trailing = error.trailing_metadata()
    if trailing is None:
        return None
    # grpc.aio.Metadata iterates as (key, value) pairs; the stubs describe the sync API's tuple.
    for key, value in cast(Iterable[tuple[str, str | bytes]], trailing):
        if key == GRPC_DETAILS_METADATA_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # a corrupt trailer must not turn a clean error into a 500
                return None
    return None


def _retry_after_seconds(details: Sequence[any_pb2.Any]) -> int:
    for detail in details:
        if detail.TypeName() == error_details_pb2.RetryInfo.DESCRIPTOR.full_name:
            retry_info = error_details_pb2.RetryInfo()
            detail.Unpack(retry_info)
            delay = retry_info.retry_delay.ToTimedelta().total_seconds()
            # Retry-After takes whole seconds; round up so a client never retries too early.
            return max(1, math.ceil(delay))
    return DEFAULT_RETRY_AFTER_SECONDS


def from_rpc_error(error: grpc.aio.AioRpcError) -> GatewayError:
    code = error.code()
    rich = _rich_status(error)
    return from_status(code, error.details() or code.name, list(rich.details) if rich is not None else [])


def from_status(code: grpc.StatusCode, message: str, details: Sequence[any_pb2.Any]) -> GatewayError:
    """The HTTP error of a gRPC status: from a failed call, or from the policy layer directly
    (the in-process gateway)."""
    headers: dict[str, str] = {}
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        headers["Retry-After"] = str(_retry_after_seconds(details))
    return GatewayError(
        http_status_for(code),
        code.name,
        message,
        [_render_detail(detail) for detail in details],
        headers,
    )
