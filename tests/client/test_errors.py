"""Every status code the server uses maps to its SDK exception, details unpacked, cause chained.

The statuses are real: a grpc.aio server on 127.0.0.1:0 aborts GetTask with a google.rpc.Status
built by grpcio-status, and the AdminClient's call surfaces it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from scripted_orchestrator import abort, rich_status

from orchestrator_client import (
    Aborted,
    AdminClient,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OrchestratorError,
    PermissionDenied,
    ResourceExhausted,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    from_grpc_error,
    v1,
)
from orchestrator_client.backoff import NO_RETRY

BAD_REQUEST = error_details_pb2.BadRequest(
    field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="spec.type", description="required"),
        error_details_pb2.BadRequest.FieldViolation(field="spec.priority", description="must be >= 0"),
    ]
)
RETRY_INFO = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000))
ERROR_INFO = error_details_pb2.ErrorInfo(reason="AGENT_DRAINING", domain="orchestrator")

CASES: list[tuple[grpc.StatusCode, type[OrchestratorError], int, tuple[Any, ...]]] = [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument, 400, (BAD_REQUEST,)),
    (grpc.StatusCode.NOT_FOUND, NotFound, 404, ()),
    (grpc.StatusCode.ALREADY_EXISTS, AlreadyExists, 409, ()),
    (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition, 400, (ERROR_INFO,)),
    (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied, 403, ()),
    (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated, 401, ()),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted, 429, (RETRY_INFO,)),
    (grpc.StatusCode.UNAVAILABLE, Unavailable, 503, ()),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded, 504, ()),
    (grpc.StatusCode.ABORTED, Aborted, 409, ()),
]


class FailingTasks(v1.TasksServiceServicer):
    """GetTask fails with the status named by the task id."""

    async def GetTask(self, request: Any, context: Any) -> v1.GetTaskResponse:
        code = grpc.StatusCode[request.task_id]
        details = next(case[3] for case in CASES if case[0] == code)
        await abort(context, rich_status(code, f"{code.name.lower()} happened", *details))
        raise AssertionError("abort returns only by raising")

    async def CancelTask(self, request: Any, context: Any) -> v1.CancelTaskResponse:
        # A plain abort: no google.rpc.Status in the trailers.
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such task")
        raise AssertionError("abort returns only by raising")


@pytest.fixture
async def admin() -> AsyncIterator[AdminClient]:
    server = grpc.aio.server()
    v1.add_TasksServiceServicer_to_server(FailingTasks(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # No retries here: each call must show the server's status as it came.
    async with AdminClient(f"127.0.0.1:{port}", retry=NO_RETRY, timeout=5.0) as client:
        yield client
    await server.stop(None)


@pytest.mark.parametrize(
    ("code", "exception", "http_status", "details"), CASES, ids=[c[0].name for c in CASES]
)
async def test_each_status_code_maps_to_its_exception(
    admin: AdminClient,
    code: grpc.StatusCode,
    exception: type[OrchestratorError],
    http_status: int,
    details: tuple[Any, ...],
) -> None:
    with pytest.raises(exception) as caught:
        await admin.get_task(code.name)
    error = caught.value
    assert isinstance(error, OrchestratorError)
    assert error.grpc_code == code
    assert error.http_status == http_status
    assert error.message == f"{code.name.lower()} happened"
    assert error.details == list(details)
    assert str(error) == f"{code.name}: {code.name.lower()} happened"
    assert isinstance(error.__cause__, grpc.aio.AioRpcError)
    assert error.__cause__.code() == code


async def test_field_violations_retry_after_and_error_info_are_read_from_details(admin: AdminClient) -> None:
    with pytest.raises(InvalidArgument) as invalid:
        await admin.get_task("INVALID_ARGUMENT")
    assert [(v.field, v.description) for v in invalid.value.field_violations] == [
        ("spec.type", "required"),
        ("spec.priority", "must be >= 0"),
    ]
    with pytest.raises(ResourceExhausted) as exhausted:
        await admin.get_task("RESOURCE_EXHAUSTED")
    assert exhausted.value.retry_after == 2.5
    with pytest.raises(FailedPrecondition) as precondition:
        await admin.get_task("FAILED_PRECONDITION")
    assert precondition.value.error_info is not None
    assert precondition.value.error_info.reason == "AGENT_DRAINING"
    assert precondition.value.retry_after is None


async def test_a_status_without_rich_details_still_maps(admin: AdminClient) -> None:
    with pytest.raises(NotFound) as caught:
        await admin.cancel_task("task-1")
    assert caught.value.message == "no such task" and caught.value.details == []


def test_errors_that_are_not_calls_map_to_unknown() -> None:
    error = from_grpc_error(grpc.RpcError("something odd"))
    assert error.grpc_code == grpc.StatusCode.UNKNOWN and error.http_status == 500


def test_retry_policy_defaults_retry_only_unavailable() -> None:
    assert set(RetryPolicy().retryable_codes) == {grpc.StatusCode.UNAVAILABLE}
