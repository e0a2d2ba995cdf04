"""Request validation helpers and the mapping of domain errors to gRPC statuses."""

from __future__ import annotations

import base64

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from orchestrator_server.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from orchestrator_server.grpc_api.errors import to_status
from orchestrator_server.validation import (
    DEFAULT_PAGE_SIZE,
    Violations,
    decode_page_token,
    encode_page_token,
)


def test_violations_collect_every_problem() -> None:
    violations = Violations()
    violations.name("name", "")
    violations.name("optional", "", required=False)
    violations.name("good", "agent-1.a_b")
    violations.name("bad", "has space")
    violations.text("note", "x" * 11, limit=10)
    violations.identifier("id", "")
    violations.identifier("id2", "x" * 129)
    violations.labels("labels", {"ok": "v", "bad key": "v", "k": "bad value"})
    violations.names("caps", ["a", "b c"], limit=5)
    violations.names("many", ["a"] * 6, limit=5)
    assert violations.page_size("page_size", 0) == DEFAULT_PAGE_SIZE
    assert violations.page_size("page_size", 7) == 7
    assert [field for field, _ in violations.items] == [
        "name",
        "bad",
        "note",
        "id",
        "id2",
        "labels[bad key]",
        "labels[k]",
        "caps[1]",
        "many",
    ]
    with pytest.raises(InvalidArgument) as raised:
        violations.raise_if_any()
    assert raised.value.violations == violations.items
    assert "name: is required" in raised.value.message
    Violations().raise_if_any()  # nothing to report, nothing raised


def test_page_size_bounds() -> None:
    violations = Violations()
    assert violations.page_size("page_size", -1) == DEFAULT_PAGE_SIZE
    violations.page_size("page_size", 1001)
    assert violations.page_size("page_size", 1000) == 1000
    assert [problem for _, problem in violations.items] == ["must not be negative", "must be at most 1000"]


@pytest.mark.parametrize("position", ["agt_0001", "a/b", "12345", "ü-unicode", "x" * 256])
def test_page_tokens_round_trip(position: str) -> None:
    token = encode_page_token(position)
    assert "=" not in token
    assert decode_page_token(token) == position


@pytest.mark.parametrize(
    "token",
    [
        "!!!",
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),  # not UTF-8
        encode_page_token("x" * 257),
        "a",  # not a whole base64 quantum
    ],
)
def test_bad_page_tokens(token: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        decode_page_token(token, "next")
    assert [field for field, _ in raised.value.violations] == ["next"]


def test_empty_page_token_is_the_start() -> None:
    assert decode_page_token("") == ""


def _details(status: grpc.Status) -> status_pb2.Status:
    for key, value in status.trailing_metadata:
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no status details")


def test_invalid_argument_becomes_bad_request() -> None:
    status = to_status(InvalidArgument([("a", "is required"), ("b[0]", "too long")]))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    details = _details(status)
    assert details.code == code_pb2.INVALID_ARGUMENT
    bad_request = error_details_pb2.BadRequest()
    assert details.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("a", "is required"),
        ("b[0]", "too long"),
    ]


def test_resource_exhausted_carries_a_retry_delay() -> None:
    status = to_status(ResourceExhausted("slow down", retry_after=1.5))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED and status.details == "slow down"
    retry = error_details_pb2.RetryInfo()
    assert _details(status).details[0].Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 1500
    assert _details(to_status(ResourceExhausted("no hint"))).details == []


def test_other_errors_map_to_their_code() -> None:
    status = to_status(NotFound("agent x not found"))
    assert (status.code, status.details) == (grpc.StatusCode.NOT_FOUND, "agent x not found")
    assert _details(status).details == []
