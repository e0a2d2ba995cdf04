"""Authentication edges (issue 10): credential floods are limited per peer and their log sampled;
agent tokens minted while authentication was off die once keys exist; a hello tells no agent id
apart without a key; audit records name what was created and the real address of REST callers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2

from orchestrator.v1 import registry_pb2, task_pb2, tasks_pb2
from tests.conftest import Running, ServerProcess, Stubs
from tests.security.conftest import ADMIN_KEY, AGENT_KEY, API_KEYS, bearer, open_stream, register
from tests.support import SessionClient, error_detail, rpc_error

BAD_KEY = bearer("not-a-key-0123456789abcdef")


def _retry_delay(error: grpc.aio.AioRpcError) -> float:
    info = error_detail(error, error_details_pb2.RetryInfo)
    assert info is not None, "no RetryInfo detail"
    return info.retry_delay.ToTimedelta().total_seconds()


# -- item 11: bad-credential floods ---------------------------------------------------------------


async def test_a_bad_credential_flood_is_limited_per_peer_and_its_log_sampled(
    servers: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    running: Running = await servers(api_keys=API_KEYS, auth_failure_rate=0.5, auth_failure_burst=5)
    agents = running.stubs.registry
    request = registry_pb2.ListAgentsRequest()
    codes: list[grpc.StatusCode] = []
    exhausted: grpc.aio.AioRpcError | None = None
    with caplog.at_level(logging.INFO, logger="orchestrator.access"):
        for _ in range(200):
            try:
                await agents.ListAgents(request, metadata=BAD_KEY)
            except grpc.aio.AioRpcError as error:
                codes.append(error.code())
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    exhausted = error
        # A caller with a valid key on the same host is not held back by the flood.
        await agents.ListAgents(request, metadata=bearer(ADMIN_KEY))
    assert codes.count(grpc.StatusCode.UNAUTHENTICATED) <= 7, codes[:10]
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 190
    assert exhausted is not None and 0 < _retry_delay(exhausted) <= 2.0
    assert "failed authentications" in (exhausted.details() or "")
    refusals = [
        record
        for record in caplog.records
        if record.name == "orchestrator.access"
        and getattr(record, "code", "") in ("UNAUTHENTICATED", "RESOURCE_EXHAUSTED")
    ]
    # One line per peer and code per interval, not one per call (200 calls).
    assert len(refusals) <= 4, [record.getMessage() for record in refusals]


async def test_missing_credentials_and_bad_hellos_count_as_failures_too(servers: Callable[..., Any]) -> None:
    running: Running = await servers(api_keys=API_KEYS, auth_failure_rate=0.5, auth_failure_burst=3)
    for _ in range(3):
        await rpc_error(
            running.stubs.registry.ListAgents(registry_pb2.ListAgentsRequest()),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    await rpc_error(
        running.stubs.registry.ListAgents(registry_pb2.ListAgentsRequest()),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    session = open_stream(running, "agt_unknown", "agt_unknown.secret")
    await rpc_error(session.receive(), grpc.StatusCode.RESOURCE_EXHAUSTED)


async def test_rest_floods_are_limited_by_the_http_clients_address(servers: Callable[..., Any]) -> None:
    running: Running = await servers(
        api_keys=API_KEYS, gateway_enabled=True, auth_failure_rate=0.5, auth_failure_burst=3
    )
    url = f"http://127.0.0.1:{running.server.http_port}/agents/list"
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(10):
            async with session.get(url, headers={"x-api-key": "not-a-key-0123456789"}) as response:
                statuses.append(response.status)
                if response.status == 429:
                    assert int(response.headers["Retry-After"]) >= 1
        async with session.get(url, headers={"x-api-key": ADMIN_KEY}) as response:
            assert response.status == 200
    assert statuses[:3] == [401, 401, 401] and set(statuses[3:]) == {429}, statuses


# -- item 13: credentials minted without authentication -------------------------------------------


async def test_tokens_issued_while_auth_was_off_are_refused_once_keys_exist(
    server_process: Callable[..., ServerProcess],
) -> None:
    process = server_process(ENVIRONMENT="development").start()
    async with grpc.aio.insecure_channel(process.target) as channel:
        stubs = Stubs(channel)
        old = await stubs.register("legacy", "1")
        created = await stubs.tasks.CreateTask(
            tasks_pb2.CreateTaskRequest(
                spec=task_pb2.TaskSpec(type="work", target_agent_id=old.agent.agent_id)
            )
        )
    process.stop()
    process.env.update(ENVIRONMENT="production", API_KEYS=API_KEYS)
    process.start()
    async with grpc.aio.insecure_channel(process.target) as channel:
        stubs = Stubs(channel)
        refused = await rpc_error(
            stubs.registry.SendHeartbeat(
                registry_pb2.SendHeartbeatRequest(agent_id=old.agent.agent_id),
                metadata=bearer(old.agent_token),
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        assert "register again" in (refused.details() or "")
        await rpc_error(
            stubs.tasks.CompleteTask(
                tasks_pb2.CompleteTaskRequest(task_id=created.task.task_id, attempt_id="att_x"),
                metadata=bearer(old.agent_token),
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        for metadata in ((), bearer(AGENT_KEY)):
            session = SessionClient(stubs.registry, old.agent.agent_id, old.agent_token, metadata=metadata)
            error = await rpc_error(session.receive(), grpc.StatusCode.UNAUTHENTICATED)
            assert "register again" in (error.details() or "")
        # Registering again with the agent key gives a credential that works.
        again = await stubs.registry.RegisterAgent(
            registry_pb2.RegisterAgentRequest(
                name="legacy", instance_id="1", type="worker", max_concurrent_tasks=4
            ),
            metadata=bearer(AGENT_KEY),
        )
        assert again.agent.agent_id == old.agent.agent_id
        session = SessionClient(stubs.registry, again.agent.agent_id, again.agent_token)
        assert (await session.receive()).WhichOneof("message") == "welcome"
        session.close()


# -- item 15: no agent-id oracle ------------------------------------------------------------------


async def test_a_hello_without_a_key_cannot_tell_unknown_agents_from_wrong_tokens(secured: Running) -> None:
    known = await register(secured, "known")
    answers = []
    for agent_id, token in (
        ("agt_000000000000_unknown0", "agt_000000000000_unknown0.secret"),
        (known.agent.agent_id, f"{known.agent.agent_id}.wrong-secret"),
    ):
        error = await rpc_error(
            open_stream(secured, agent_id, token).receive(), grpc.StatusCode.UNAUTHENTICATED
        )
        answers.append(error.details())
    assert answers[0] == answers[1]
    # With an agent key the SDK's protocol holds: an unknown agent is NOT_FOUND, so it registers again.
    keyed = open_stream(
        secured, "agt_000000000000_unknown0", "agt_000000000000_unknown0.s", bearer(AGENT_KEY)
    )
    await rpc_error(keyed.receive(), grpc.StatusCode.NOT_FOUND)
    # An agent credential of an unknown agent on a unary call: UNAUTHENTICATED, like any bad key.
    await rpc_error(
        secured.stubs.registry.GetAgent(
            registry_pb2.GetAgentRequest(agent_id=known.agent.agent_id), metadata=bearer("agt_nobody.secret")
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )


# -- item 17: audit targets and the real client address ------------------------------------------

#: Headers a client may send to pose as another address; nothing reads them (a gateway once signed
#: the HTTP client's address in them for the gRPC server it called).
CLIENT_ADDRESS_HEADER = "x-orchestrator-client-address"
CLIENT_SIGNATURE_HEADER = "x-orchestrator-client-signature"


async def test_audit_names_created_targets_and_the_rest_clients_address(
    servers: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    running: Running = await servers(api_keys=API_KEYS, gateway_enabled=True)
    port = running.server.http_port
    with caplog.at_level(logging.INFO, logger="orchestrator.audit"):
        registered = await register(running, "audited")
        # REST over a connection whose local port we know: the audit must name it.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client_port = writer.get_extra_info("sockname")[1]
        body = b'{"spec":{"type":"estimate"}}'
        writer.write(
            b"POST /tasks/create HTTP/1.1\r\nHost: o\r\nContent-Type: application/json\r\n"
            + f"x-api-key: {ADMIN_KEY}\r\n{CLIENT_ADDRESS_HEADER}: ipv4:6.6.6.6:1\r\n".encode()
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        # A direct gRPC caller cannot pose as another address, with or without a signature.
        await running.stubs.tasks.CreateTask(
            tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="spoofed")),
            metadata=(
                *bearer(ADMIN_KEY),
                (CLIENT_ADDRESS_HEADER, "ipv4:6.6.6.6:1"),
                (CLIENT_SIGNATURE_HEADER, "0" * 64),
            ),
        )
    records = [record for record in caplog.records if record.name == "orchestrator.audit"]
    register_record, rest_record, grpc_record = records
    assert f"agent_id={registered.agent.agent_id}" in register_record.getMessage()
    assert "name=audited" in register_record.getMessage() and "instance=1" in register_record.getMessage()
    rest_message = rest_record.getMessage()
    assert (
        "what=CreateTask" in rest_message
        and "task_id=tsk_" in rest_message
        and "type=estimate" in rest_message
    )
    assert rest_record.peer == f"ipv4:127.0.0.1:{client_port}"  # type: ignore[attr-defined]
    assert "type=spoofed" in grpc_record.getMessage()
    assert "6.6.6.6" not in grpc_record.peer and "6.6.6.6" not in rest_record.peer  # type: ignore[attr-defined]
