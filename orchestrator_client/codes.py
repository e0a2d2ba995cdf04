"""The one table from gRPC status code to HTTP status, shared by the SDK and the REST gateway.

`OrchestratorError.http_status` (the SDK) and the status line of a gateway error (the server) are
both read from `HTTP_STATUS_BY_GRPC_CODE`, so a caller sees the same HTTP status for a failure
whichever transport it used. The values are the "HTTP Mapping" that `google/rpc/code.proto`
documents for each code (AIP-193), which is also what google-api-core's exception classes carry:
in particular FAILED_PRECONDITION is 400 Bad Request, not 412. HTTP's 412 Precondition Failed is
about the request's own conditional headers (If-Match, RFC 9110 §15.5.13), which the gateway does
not take; a resource in the wrong state is a 400 whose body says FAILED_PRECONDITION.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import grpc

HTTP_STATUS_BY_GRPC_CODE: Mapping[grpc.StatusCode, int] = MappingProxyType(
    {
        grpc.StatusCode.OK: 200,
        grpc.StatusCode.CANCELLED: 499,  # "Client Closed Request" (nginx); no standard status says it
        grpc.StatusCode.UNKNOWN: 500,
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.ALREADY_EXISTS: 409,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.FAILED_PRECONDITION: 400,
        grpc.StatusCode.ABORTED: 409,
        grpc.StatusCode.OUT_OF_RANGE: 400,
        grpc.StatusCode.UNIMPLEMENTED: 501,
        grpc.StatusCode.INTERNAL: 500,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DATA_LOSS: 500,
    }
)


def http_status_for(code: grpc.StatusCode) -> int:
    """The HTTP status that stands for a gRPC status code (500 for one this table does not know)."""
    return HTTP_STATUS_BY_GRPC_CODE.get(code, 500)
