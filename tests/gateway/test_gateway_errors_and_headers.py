"""gRPC status → HTTP status and error body; headers passed through as metadata; deadlines."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from orchestrator_client import NO_RETRY, AdminClient, OrchestratorError
from orchestrator_client.errors import exception_class_for
from orchestrator_server.gateway.errors import HTTP_STATUS_BY_GRPC_CODE
from tests.conftest import Running
from tests.gateway.conftest import ScriptedBackend


def _aborting(code: grpc.StatusCode, message: str, *details: Any) -> Any:
    async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        packed = []
        for detail in details:
            wrapper = any_pb2.Any()
            wrapper.Pack(detail)
            packed.append(wrapper)
        status = status_pb2.Status(code=code.value[0], message=message, details=packed)
        await context.abort_with_status(rpc_status.to_status(status))

    return behaviour


@pytest.mark.parametrize(
    ("code", "http_status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.OUT_OF_RANGE, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.ALREADY_EXISTS, 409),
        (grpc.StatusCode.ABORTED, 409),
        (grpc.StatusCode.FAILED_PRECONDITION, 400),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.CANCELLED, 499),
        (grpc.StatusCode.UNKNOWN, 500),
        (grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.DATA_LOSS, 500),
        (grpc.StatusCode.UNIMPLEMENTED, 501),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    ],
)
async def test_grpc_codes_map_to_http_as_code_proto_says(
    backend: ScriptedBackend, http: aiohttp.ClientSession, code: grpc.StatusCode, http_status: int
) -> None:
    assert HTTP_STATUS_BY_GRPC_CODE[code] == http_status

    async def fail(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, f"it went {code.name}")

    backend.unary["RegistryService/GetAgent"] = fail
    async with http.get("/agents/a-1") as response:
        assert response.status == http_status
        body = await response.json()
    assert body == {
        "error": {"code": http_status, "status": code.name, "message": f"it went {code.name}", "details": []}
    }


def _documented_http_mappings() -> dict[str, int]:
    """Each code's "HTTP Mapping" as google/rpc/code.proto (shipped in googleapis-common-protos) says."""
    text = Path(code_pb2.__file__).with_name("code.proto").read_text()
    return {
        name: int(status) for status, name in re.findall(r"HTTP Mapping: (\d+)[^\n]*\n\s*(\w+) = \d+;", text)
    }


def test_the_one_table_maps_every_grpc_code_as_code_proto_documents() -> None:
    documented = _documented_http_mappings()
    assert len(documented) == len(grpc.StatusCode)
    assert set(HTTP_STATUS_BY_GRPC_CODE) == set(grpc.StatusCode)
    assert {code.name: status for code, status in HTTP_STATUS_BY_GRPC_CODE.items()} == documented
    for code in grpc.StatusCode:
        if code is not grpc.StatusCode.OK:
            exception = exception_class_for(code)
            assert (exception.grpc_code, exception.http_status) == (code, HTTP_STATUS_BY_GRPC_CODE[code])


@pytest.mark.parametrize(
    "code", [code for code in grpc.StatusCode if code is not grpc.StatusCode.OK], ids=lambda code: code.name
)
async def test_rest_status_and_sdk_exception_agree_for_every_code(
    backend: ScriptedBackend, http: aiohttp.ClientSession, code: grpc.StatusCode
) -> None:
    async def fail(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, f"it went {code.name}")

    backend.unary["RegistryService/GetAgent"] = fail
    async with http.get("/agents/a-1") as response:
        rest_status = response.status
        body = await response.json()
    async with AdminClient(f"127.0.0.1:{backend.port}", retry=NO_RETRY, timeout=10.0) as admin:
        with pytest.raises(OrchestratorError) as raised:
            await admin.get_agent("a-1")
    assert type(raised.value) is exception_class_for(code)
    assert raised.value.grpc_code == code and body["error"]["status"] == code.name
    assert raised.value.http_status == rest_status == body["error"]["code"] == HTTP_STATUS_BY_GRPC_CODE[code]


async def test_the_real_server_fails_alike_over_rest_and_through_the_sdk(servers: Callable[..., Any]) -> None:
    live: Running = await servers(gateway_enabled=True)
    async with (
        aiohttp.ClientSession(base_url=f"http://127.0.0.1:{live.server.http_port}") as rest,
        AdminClient(live.target, retry=NO_RETRY, timeout=10.0) as admin,
    ):
        await admin.create_task("analyze", idempotency_key="key-1")
        cases: list[tuple[grpc.StatusCode, Callable[[], Any], Callable[[], Awaitable[Any]]]] = [
            (grpc.StatusCode.NOT_FOUND, lambda: rest.get("/agents/agt_missing"),
             lambda: admin.get_agent("agt_missing")),
            (grpc.StatusCode.INVALID_ARGUMENT, lambda: rest.post("/agents/register", json={"type": "t"}),
             lambda: admin.register_agent("", "i-1", "t")),
            (grpc.StatusCode.FAILED_PRECONDITION, lambda: rest.get("/discovery/resolve", params={"query.type": "none"}),
             lambda: admin.resolve_agent(type="none")),
            (grpc.StatusCode.ALREADY_EXISTS,
             lambda: rest.post("/tasks/create", json={"spec": {"type": "other", "idempotency_key": "key-1"}}),
             lambda: admin.create_task("other", idempotency_key="key-1")),
        ]  # fmt: skip
        for code, rest_call, sdk_call in cases:
            async with rest_call() as response:
                rest_status = response.status
                body = await response.json()
            with pytest.raises(OrchestratorError) as raised:
                await sdk_call()
            assert body["error"]["status"] == raised.value.grpc_code.name == code.name
            assert type(raised.value) is exception_class_for(code)
            assert raised.value.http_status == rest_status == HTTP_STATUS_BY_GRPC_CODE[code], code.name


async def test_error_details_are_decoded_from_the_status_trailer(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    violation = error_details_pb2.BadRequest.FieldViolation(field="name", description="required")
    backend.unary["RegistryService/RegisterAgent"] = _aborting(
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid request: name: required",
        error_details_pb2.BadRequest(field_violations=[violation]),
    )
    async with http.post("/agents/register", json={"type": "cost"}) as response:
        assert response.status == 400
        body = await response.json()
    assert body["error"]["message"] == "invalid request: name: required"
    assert body["error"]["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "field_violations": [{"field": "name", "description": "required"}],
        }
    ]


async def test_an_undecodable_detail_is_passed_on_as_base64_not_a_500(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    async def fail(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        unknown = any_pb2.Any(type_url="type.googleapis.com/acme.Secret", value=b"\x01\x02")
        status = status_pb2.Status(code=code_pb2.NOT_FOUND, message="gone", details=[unknown])
        await context.abort_with_status(rpc_status.to_status(status))

    backend.unary["RegistryService/GetAgent"] = fail
    async with http.get("/agents/a-1") as response:
        assert response.status == 404
        body = await response.json()
    assert body["error"]["details"] == [{"@type": "type.googleapis.com/acme.Secret", "value": "AQI="}]


async def test_resource_exhausted_is_429_with_retry_after_from_retry_info(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000))
    backend.unary["RegistryService/SendHeartbeat"] = _aborting(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", retry
    )
    async with http.post("/agents/heartbeat", json={"agent_id": "a-1"}) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "3"  # rounded up: never earlier than asked
        body = await response.json()
    assert body["error"]["details"][0]["retry_delay"] == "2.500s"

    backend.unary["RegistryService/SendHeartbeat"] = _aborting(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down"
    )
    async with http.post("/agents/heartbeat", json={"agent_id": "a-1"}) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"


async def test_auth_and_request_id_headers_become_metadata(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    headers = {
        "Authorization": "Bearer key-1",
        "X-Api-Key": "k-2",
        "X-Request-Id": "req-123",
        "Cookie": "not=forwarded",
    }
    async with http.get("/agents/list", headers=headers) as response:
        assert response.status == 200
        assert response.headers["x-request-id"] == "req-123"
    metadata = backend.last("RegistryService/ListAgents").metadata
    assert metadata["authorization"] == "Bearer key-1"
    assert metadata["x-api-key"] == "k-2"
    assert metadata["x-request-id"] == "req-123"
    assert "cookie" not in metadata


async def test_a_request_id_is_generated_when_absent_and_sent_both_ways(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    async with http.get("/agents/list") as response:
        generated = response.headers["x-request-id"]
    assert len(generated) == 32
    assert backend.last("RegistryService/ListAgents").metadata["x-request-id"] == generated
    async with http.get("/nothing") as response:  # errors carry one too
        assert response.status == 404
        assert response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("header", "value", "expected"),
    [("grpc-timeout", "1500m", 1.5), ("x-request-timeout", "2.5", 2.5), (None, None, 30.0)],
)
async def test_deadline_comes_from_the_headers_or_the_default(
    backend: ScriptedBackend,
    http: aiohttp.ClientSession,
    header: str | None,
    value: str | None,
    expected: float,
) -> None:
    headers = {header: value} if header and value else {}
    async with http.get("/agents/list", headers=headers) as response:
        assert response.status == 200
    remaining = backend.last("RegistryService/ListAgents").time_remaining
    assert remaining is not None
    # Generous below (a loaded machine delays the call), a little slack above (clock granularity).
    assert expected - 5.0 < remaining <= expected + 0.1


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("grpc-timeout", "soon"),
        ("grpc-timeout", "0S"),
        ("grpc-timeout", "123456789S"),
        ("x-request-timeout", "-1"),
        ("x-request-timeout", "nan"),
        ("x-request-timeout", "inf"),
        ("x-request-id", "x" * 129),
        ("authorization", "Bearer \u00e9"),
    ],
)
async def test_bad_headers_are_400(
    backend: ScriptedBackend, http: aiohttp.ClientSession, header: str, value: str
) -> None:
    async with http.get("/agents/list", headers={header: value}) as response:
        assert response.status == 400
        body = await response.json()
    assert header in body["error"]["message"]
    assert backend.calls == []


async def test_an_expired_deadline_is_504_and_the_server_call_is_cancelled(
    backend: ScriptedBackend, http: aiohttp.ClientSession
) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def never_answers(request: Any, context: Any) -> Any:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    backend.unary["RegistryService/ListAgents"] = never_answers
    # Long enough for the call to reach the handler even on a loaded machine, short enough to expire.
    async with http.get("/agents/list", headers={"x-request-timeout": "0.5"}) as response:
        assert response.status == 504
        assert (await response.json())["error"]["status"] == "DEADLINE_EXCEEDED"
    assert started.is_set()
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_gateway_answers_503_when_the_grpc_server_is_unreachable(unused_tcp_port: int) -> None:
    from orchestrator_server.gateway import start_gateway

    gateway = await start_gateway("127.0.0.1", 0, f"127.0.0.1:{unused_tcp_port}")
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{gateway.port}"
            async with session.get(f"{url}/agents/list", headers={"x-request-timeout": "5"}) as response:
                assert response.status == 503
                assert (await response.json())["error"]["status"] == "UNAVAILABLE"
            async with session.get(f"{url}/readyz") as response:
                assert response.status == 503
                assert "UNAVAILABLE" in (await response.json())["reason"]
            async with session.get(f"{url}/livez") as response:
                assert response.status == 200
    finally:
        await gateway.stop()
