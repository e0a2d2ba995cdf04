"""Who may call what: the access table covers every RPC, and every RPC refuses a missing, wrong or
too weak credential; an agent's credential acts only as that agent."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.descriptor import MethodDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from orchestrator.v1 import registry_pb2, task_pb2, tasks_pb2
from orchestrator_server.auth import RULES, Access, Audit
from tests.conftest import Running
from tests.security.conftest import (
    ADMIN_KEY,
    AGENT_KEY,
    READER_KEY,
    Metadata,
    bearer,
    call_code,
    message_class,
    open_stream,
    orchestrator_methods,
    path,
    register,
    served_methods,
)
from tests.security.pinned_rules import PINNED
from tests.support import SessionClient

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


def test_every_rpc_of_the_protos_has_a_rule() -> None:
    missing = sorted(path(method) for method in orchestrator_methods() if path(method) not in RULES)
    assert not missing, f"RPCs without an access rule in orchestrator_server/auth.py RULES: {missing}"


def test_every_rule_names_a_served_rpc() -> None:
    served = {path(method) for method in served_methods()}
    stale = sorted(set(RULES) - served)
    assert not stale, f"rules for RPCs that do not exist: {stale}"


def test_audited_rpcs_are_unary() -> None:
    # The audit record is written when the call returns; a stream would be recorded at its end.
    by_path = {path(method): method for method in served_methods()}
    for name, rule in RULES.items():
        if rule.audit is not Audit.NEVER:
            assert not by_path[name].server_streaming and not by_path[name].client_streaming, name


async def test_every_service_the_server_exposes_is_covered(secured: Running) -> None:
    """Via reflection, as grpcurl sees it: a service added to the server without rules fails here."""
    stub = reflection_pb2_grpc.ServerReflectionStub(secured.stubs.channel)

    async def ask(**request: Any) -> reflection_pb2.ServerReflectionResponse:
        call = stub.ServerReflectionInfo(metadata=bearer(READER_KEY))
        await call.write(reflection_pb2.ServerReflectionRequest(**request))
        await call.done_writing()
        response: reflection_pb2.ServerReflectionResponse = await call.read()
        return response

    services = [service.name for service in (await ask(list_services="")).list_services_response.service]
    assert "orchestrator.v1.RegistryService" in services
    served = {path(method) for method in served_methods()}
    for service in services:
        names = {name for name in served if name.startswith(f"/{service}/")}
        assert names, f"{service} is served but its methods are unknown to the test"
        assert names <= set(RULES), f"{service}: {sorted(names - set(RULES))} have no rule"


async def _agent(secured: Running, name: str = "agent-a") -> tuple[str, str]:
    registered = await register(secured, name)
    return registered.agent.agent_id, registered.agent_token


def _request(method: MethodDescriptor, agent_id: str, token: str) -> tuple[Any, list[Any]]:
    """A request naming `agent_id` wherever a request names an agent; a Heartbeat's hello."""
    request_class = message_class(method)
    if method.name == "Heartbeat":
        hello = registry_pb2.SessionHello(agent_id=agent_id, agent_token=token)
        return registry_pb2.HeartbeatRequest(hello=hello), []
    if method.name == "ServerReflectionInfo":
        return request_class(list_services=""), []
    fields = request_class.DESCRIPTOR.fields_by_name
    return request_class(**({"agent_id": agent_id} if "agent_id" in fields else {})), []


async def _codes(
    running: Running, metadata: Metadata, agent_id: str, token: str, methods: list[MethodDescriptor]
) -> dict[str, grpc.StatusCode]:
    codes = {}
    for method in methods:
        request, more = _request(method, agent_id, token)
        codes[method.name] = await call_code(running.stubs.channel, method, request, metadata, more=more)
    return codes


def _methods(*accesses: Access) -> list[MethodDescriptor]:
    # Deregistration revokes the agent's credential, so it goes last.
    methods = [method for method in served_methods() if PINNED[path(method)].access in accesses]
    return sorted(methods, key=lambda method: method.name == "DeregisterAgent")


async def test_without_a_credential_every_rpc_is_unauthenticated(secured: Running) -> None:
    agent_id, _ = await _agent(secured)
    # A session without metadata is authenticated by its hello; a wrong token in it is refused too.
    codes = await _codes(secured, (), agent_id, f"{agent_id}.wrong", _methods(*set(Access) - {Access.PUBLIC}))
    assert codes and all(code == UNAUTHENTICATED for code in codes.values()), codes
    public = await _codes(secured, (), agent_id, "", _methods(Access.PUBLIC))
    assert not {code for code in public.values()} & {UNAUTHENTICATED, PERMISSION_DENIED}, public


@pytest.mark.parametrize(
    "metadata",
    [
        bearer("not-a-key-0123456789abcdef"),
        (("x-api-key", "not-a-key-0123456789abcdef"),),
        (("authorization", f"Basic {ADMIN_KEY}"),),
        bearer("agt_0123.forged-secret"),
    ],
    ids=["bearer", "x-api-key", "not-bearer", "forged-agent-token"],
)
async def test_with_a_wrong_credential_every_rpc_is_unauthenticated(
    secured: Running, metadata: Metadata
) -> None:
    agent_id, token = await _agent(secured)
    codes = await _codes(secured, metadata, agent_id, token, _methods(*set(Access) - {Access.PUBLIC}))
    assert codes and all(code == UNAUTHENTICATED for code in codes.values()), codes


async def test_a_role_too_weak_is_permission_denied(secured: Running) -> None:
    agent_id, token = await _agent(secured)
    weaker = {
        "reader key": (bearer(READER_KEY), (Access.REGISTER, Access.AGENT, Access.SESSION, Access.ADMIN)),
        "agent key": ((("x-api-key", AGENT_KEY),), (Access.AGENT, Access.ADMIN)),
        "agent credential": (bearer(token), (Access.REGISTER, Access.ADMIN)),
    }
    checked = set()
    for who, (metadata, accesses) in weaker.items():
        methods = _methods(*accesses)
        codes = await _codes(secured, metadata, agent_id, token, methods)
        wrong = {name: code for name, code in codes.items() if code != PERMISSION_DENIED}
        assert not wrong, f"{who}: {wrong}"
        checked.update(path(method) for method in methods)
    needs_more_than_read = {
        path(method)
        for method in served_methods()
        if PINNED[path(method)].access not in (Access.PUBLIC, Access.READ)
    }
    assert needs_more_than_read <= checked


async def test_a_strong_enough_role_gets_through(secured: Running) -> None:
    agent_id, token = await _agent(secured)
    enough = {
        "reader key": (bearer(READER_KEY), (Access.READ,)),
        "agent key": (bearer(AGENT_KEY), (Access.REGISTER,)),
        "agent credential": (bearer(token), (Access.AGENT, Access.SESSION, Access.READ)),
        "admin key": ((("x-api-key", ADMIN_KEY),), tuple(Access)),
    }
    for who, (metadata, accesses) in enough.items():
        codes = await _codes(secured, metadata, agent_id, token, _methods(*accesses))
        refused = {name: code for name, code in codes.items() if code in (UNAUTHENTICATED, PERMISSION_DENIED)}
        assert not refused, f"{who}: {refused}"


async def test_open_in_development_without_keys(running: Running) -> None:
    response = await running.stubs.registry.ListAgents(registry_pb2.ListAgentsRequest())
    assert not response.agents


async def test_open_mode_warns_at_startup(servers: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="orchestrator_server.grpc_api.interceptors"):
        await servers()
    assert any("authentication is OFF" in record.getMessage() for record in caplog.records)


# -- agent credentials -------------------------------------------------------------------------


async def _assigned(secured: Running, session: SessionClient, agent_id: str) -> tuple[str, str]:
    """Creates a task for `agent_id` and returns (task_id, attempt_id) once its session has it."""
    created = await secured.stubs.tasks.CreateTask(
        tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="work", target_agent_id=agent_id)),
        metadata=bearer(ADMIN_KEY),
    )
    while True:
        message = await session.receive()
        if message.WhichOneof("message") == "assignment":
            assert message.assignment.task.task_id == created.task.task_id
            return created.task.task_id, message.assignment.attempt_id


async def test_agent_a_cannot_act_for_agent_b(secured: Running) -> None:
    _, a_token = await _agent(secured, "agent-a")
    b_id, b_token = await _agent(secured, "agent-b")
    b_session = open_stream(secured, b_id, b_token, bearer(b_token))
    assert (await b_session.receive()).WhichOneof("message") == "welcome"
    task_id, attempt_id = await _assigned(secured, b_session, b_id)
    as_a = bearer(a_token)
    tasks = secured.stubs.tasks
    registry = secured.stubs.registry

    async def code(call: Any) -> grpc.StatusCode:
        try:
            await call
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    refused = {
        "CompleteTask": await code(
            tasks.CompleteTask(
                tasks_pb2.CompleteTaskRequest(
                    task_id=task_id, attempt_id=attempt_id, result=struct_pb2.Struct()
                ),
                metadata=as_a,
            )
        ),
        "FailTask": await code(
            tasks.FailTask(
                tasks_pb2.FailTaskRequest(task_id=task_id, attempt_id=attempt_id, error=task_pb2.TaskError()),
                metadata=as_a,
            )
        ),
        "ReportTaskProgress": await code(
            tasks.ReportTaskProgress(
                tasks_pb2.ReportTaskProgressRequest(
                    task_id=task_id, attempt_id=attempt_id, progress=task_pb2.TaskProgress(fraction=0.5)
                ),
                metadata=as_a,
            )
        ),
        "SendHeartbeat": await code(
            registry.SendHeartbeat(registry_pb2.SendHeartbeatRequest(agent_id=b_id), metadata=as_a)
        ),
        "UpdateAgent": await code(
            registry.UpdateAgent(registry_pb2.UpdateAgentRequest(agent_id=b_id), metadata=as_a)
        ),
        "DeregisterAgent": await code(
            registry.DeregisterAgent(registry_pb2.DeregisterAgentRequest(agent_id=b_id), metadata=as_a)
        ),
    }
    assert refused == dict.fromkeys(refused, PERMISSION_DENIED)

    # A's credential in the metadata, B in the hello (even with B's own token): refused.
    hijack = open_stream(secured, b_id, b_token, as_a)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await hijack.receive()
    assert raised.value.code() == PERMISSION_DENIED
    # A's token presented as B's in the hello: not B's credential.
    forged = open_stream(secured, b_id, a_token)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await forged.receive()
    assert raised.value.code() == UNAUTHENTICATED

    # B's session was not disturbed, and B itself may report on its attempt.
    b_session.send(beat=registry_pb2.SessionBeat(sequence=1))
    assert (await b_session.receive()).ack.sequence == 1
    done = await tasks.CompleteTask(
        tasks_pb2.CompleteTaskRequest(task_id=task_id, attempt_id=attempt_id), metadata=bearer(b_token)
    )
    assert done.task.status == task_pb2.TASK_STATUS_SUCCEEDED
    b_session.close()


async def test_deregistration_revokes_the_credential(secured: Running) -> None:
    agent_id, token = await _agent(secured)
    await secured.stubs.registry.SendHeartbeat(
        registry_pb2.SendHeartbeatRequest(agent_id=agent_id), metadata=bearer(token)
    )
    await secured.stubs.registry.DeregisterAgent(
        registry_pb2.DeregisterAgentRequest(agent_id=agent_id), metadata=bearer(token)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await secured.stubs.registry.SendHeartbeat(
            registry_pb2.SendHeartbeatRequest(agent_id=agent_id), metadata=bearer(token)
        )
    assert raised.value.code() == UNAUTHENTICATED


async def test_reregistration_replaces_the_credential(secured: Running) -> None:
    agent_id, old = await _agent(secured)
    again = await register(secured, "agent-a")
    assert again.agent.agent_id == agent_id and again.agent_token != old
    assert again.agent_token.startswith(f"{agent_id}.")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await secured.stubs.registry.GetAgent(
            registry_pb2.GetAgentRequest(agent_id=agent_id), metadata=bearer(old)
        )
    assert raised.value.code() == UNAUTHENTICATED


async def test_a_session_is_authenticated_by_its_hello_and_may_carry_a_key(secured: Running) -> None:
    agent_id, token = await _agent(secured)
    for metadata in ((), bearer(AGENT_KEY), bearer(ADMIN_KEY), bearer(token)):
        session = open_stream(secured, agent_id, token, metadata)
        assert (await session.receive()).WhichOneof("message") == "welcome"
        session.send(beat=registry_pb2.SessionBeat(sequence=3))
        assert (await session.receive()).ack.sequence == 3
        session.close()


async def test_an_unknown_agent_in_the_hello_is_not_found(secured: Running) -> None:
    # The SDK re-registers on NOT_FOUND (session protocol), so that code survives authentication.
    session = open_stream(secured, "agt_unknown", "agt_unknown.secret", bearer(AGENT_KEY))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await session.receive()
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


# -- audit -------------------------------------------------------------------------------------


async def test_mutating_calls_are_audited(secured: Running, caplog: pytest.LogCaptureFixture) -> None:
    agent_id, token = await _agent(secured)
    registry = secured.stubs.registry
    with caplog.at_level(logging.INFO, logger="orchestrator.audit"):
        await registry.DrainAgent(
            registry_pb2.DrainAgentRequest(agent_id=agent_id),
            metadata=(*bearer(ADMIN_KEY), ("x-request-id", "req-42")),
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await registry.UndrainAgent(
                registry_pb2.UndrainAgentRequest(agent_id=agent_id), metadata=bearer(READER_KEY)
            )
        await registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id), metadata=bearer(ADMIN_KEY))
        await registry.SendHeartbeat(
            registry_pb2.SendHeartbeatRequest(agent_id=agent_id), metadata=bearer(token)
        )
    records = [record for record in caplog.records if record.name == "orchestrator.audit"]
    assert [(record.method.rsplit("/", 1)[-1], record.code) for record in records] == [  # type: ignore[attr-defined]
        ("DrainAgent", "OK"),
        ("UndrainAgent", "PERMISSION_DENIED"),
    ]
    drain, undrain = records
    assert drain.principal.startswith("admin-key:")  # type: ignore[attr-defined]
    assert drain.request_id == "req-42"  # type: ignore[attr-defined]
    assert f"agent_id={agent_id}" in drain.getMessage()
    assert undrain.principal.startswith("reader-key:")  # type: ignore[attr-defined]
    assert ADMIN_KEY not in drain.getMessage() and READER_KEY not in undrain.getMessage()


async def test_an_agent_completing_its_own_task_is_not_audited_an_admin_override_is(
    secured: Running, caplog: pytest.LogCaptureFixture
) -> None:
    agent_id, token = await _agent(secured)
    session = open_stream(secured, agent_id, token, bearer(token))
    await session.receive()
    first = await _assigned(secured, session, agent_id)
    second = await _assigned(secured, session, agent_id)
    with caplog.at_level(logging.INFO, logger="orchestrator.audit"):
        await secured.stubs.tasks.CompleteTask(
            tasks_pb2.CompleteTaskRequest(task_id=first[0], attempt_id=first[1]), metadata=bearer(token)
        )
        await secured.stubs.tasks.FailTask(
            tasks_pb2.FailTaskRequest(task_id=second[0], attempt_id=second[1]), metadata=bearer(ADMIN_KEY)
        )
    records = [record for record in caplog.records if record.name == "orchestrator.audit"]
    assert [record.method.rsplit("/", 1)[-1] for record in records] == ["FailTask"]  # type: ignore[attr-defined]
    session.close()
