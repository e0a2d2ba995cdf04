"""Hostile and odd task inputs (issue 10, items 7, 8, 14 and 16), over gRPC and REST.

Values nobody can read back are refused before they are stored; tampered page tokens and absurd
timeouts are the caller's mistake (400), never a 500; an agent cannot report on another agent's
task, finished or not, and the attempt is audited; idempotency keys belong to their caller and
refuse a different spec.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2

from orchestrator.v1 import registry_pb2, task_pb2, tasks_pb2
from orchestrator_server.validation import MAX_VALUE_DEPTH
from tests.conftest import Running, Stubs
from tests.security.conftest import ADMIN_KEY, AGENT_KEY, API_KEYS, READER_KEY, bearer
from tests.support import SessionClient, invalid_fields, rpc_error
from tests.test_tasks import create, get, next_assignment, spec, wait_status

SECOND_ADMIN_KEY = "admin-key-second-0123456789"


def nested(depth: int) -> dict[str, Any]:
    """A JSON object `depth` objects deep: {"a": {"a": ... {"leaf": 1}}}."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(value)
    return result


def position_token(position: str) -> str:
    return base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


@pytest.fixture
async def rest(servers: Callable[..., Any]) -> AsyncIterator[tuple[Running, aiohttp.ClientSession]]:
    running: Running = await servers(api_keys=API_KEYS, gateway_enabled=True)
    async with aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{running.server.http_port}", headers={"x-api-key": ADMIN_KEY}
    ) as session:
        yield running, session


async def task_count(stubs: Stubs) -> int:
    listed = await stubs.tasks.ListTasks(tasks_pb2.ListTasksRequest(), metadata=bearer(READER_KEY))
    return len(listed.tasks)


async def agent_with_task(running: Running, name: str) -> tuple[str, str, SessionClient]:
    """Registers an agent with the agent key, opens its session; returns id, token, session."""
    registered = await running.stubs.registry.RegisterAgent(
        registry_pb2.RegisterAgentRequest(name=name, instance_id="1", type="worker", max_concurrent_tasks=1),
        metadata=bearer(AGENT_KEY),
    )
    session = SessionClient(
        running.stubs.registry,
        registered.agent.agent_id,
        registered.agent_token,
        metadata=bearer(registered.agent_token),
    )
    assert (await session.receive()).WhichOneof("message") == "welcome"
    return registered.agent.agent_id, registered.agent_token, session


# -- item 7: values that cannot be read back ----------------------------------------------------


async def test_rest_create_with_a_deep_or_odd_payload_is_refused_and_creates_nothing(
    rest: tuple[Running, aiohttp.ClientSession],
) -> None:
    running, http = rest
    for payload in (nested(32), nested(MAX_VALUE_DEPTH + 1)):
        async with http.post("/tasks/create", json={"spec": {"type": "job", "payload": payload}}) as response:
            body = await response.json()
            assert response.status == 400, body
            assert "spec.payload" in str(body), body
    # Python's JSON reader takes NaN and Infinity literals, which JSON itself does not have.
    for literal in ("NaN", "Infinity", "-Infinity"):
        raw = '{"spec": {"type": "job", "payload": {"x": LITERAL}}}'.replace("LITERAL", literal)
        headers = {"content-type": "application/json"}
        async with http.post("/tasks/create", data=raw, headers=headers) as response:
            body = await response.json()
            assert response.status == 400 and "spec.payload" in str(body), (literal, body)
    nan = spec(payload={"x": 1.0})
    nan.payload["x"] = float("nan")
    fields = await invalid_fields(
        running.stubs.tasks.CreateTask(tasks_pb2.CreateTaskRequest(spec=nan), metadata=bearer(ADMIN_KEY))
    )
    assert "NaN" in fields["spec.payload"]
    assert await task_count(running.stubs) == 0
    # The deepest accepted payload is stored and read back by every Python reader.
    async with http.post(
        "/tasks/create", json={"spec": {"type": "job", "payload": nested(MAX_VALUE_DEPTH)}}
    ) as response:
        assert response.status == 200, await response.text()
    async with http.get("/tasks/list") as response:
        assert response.status == 200 and len((await response.json())["tasks"]) == 1


async def test_an_agent_cannot_complete_with_a_deep_or_nan_result(
    rest: tuple[Running, aiohttp.ClientSession],
) -> None:
    running, http = rest
    stubs = running.stubs
    _, token, session = await agent_with_task(running, "worker")
    task = await create_as(stubs, ADMIN_KEY)
    assignment = await next_assignment(session)
    deep = struct(nested(33))
    nan = struct({"usd": 1.0})
    nan["usd"] = float("inf")
    for result, problem in ((deep, "deeper"), (nan, "NaN or infinite")):
        request = tasks_pb2.CompleteTaskRequest(
            task_id=task.task_id, attempt_id=assignment.attempt_id, result=result
        )
        fields = await invalid_fields(stubs.tasks.CompleteTask(request, metadata=bearer(token)))
        assert problem in fields["result"], fields
    # Nothing was stored: everyone can still list, and the agent can still complete properly.
    for key in (READER_KEY, ADMIN_KEY):
        listed = await stubs.tasks.ListTasks(tasks_pb2.ListTasksRequest(), metadata=bearer(key))
        assert [t.status for t in listed.tasks] == [task_pb2.TASK_STATUS_ASSIGNED]
    async with http.get("/tasks/list") as response:
        assert response.status == 200
    done = await stubs.tasks.CompleteTask(
        tasks_pb2.CompleteTaskRequest(
            task_id=task.task_id, attempt_id=assignment.attempt_id, result=struct({"usd": 1.5})
        ),
        metadata=bearer(token),
    )
    assert done.task.status == task_pb2.TASK_STATUS_SUCCEEDED


async def create_as(stubs: Stubs, key: str, **fields: Any) -> task_pb2.Task:
    response = await stubs.tasks.CreateTask(
        tasks_pb2.CreateTaskRequest(spec=spec(**fields)), metadata=bearer(key)
    )
    return response.task


# -- item 8: a caller's mistakes are 400s ---------------------------------------------------------


async def test_tampered_page_tokens_are_invalid_arguments(
    rest: tuple[Running, aiohttp.ClientSession],
) -> None:
    running, http = rest
    await create_as(running.stubs, ADMIN_KEY)
    for token in ("wrI", position_token("9" * 200), position_token("-1"), position_token("12a")):
        fields = await invalid_fields(
            running.stubs.tasks.ListTasks(
                tasks_pb2.ListTasksRequest(page_token=token), metadata=bearer(READER_KEY)
            )
        )
        assert "page_token" in fields
        async with http.get("/tasks/list", params={"page_token": token}) as response:
            assert response.status == 400, (token, await response.text())
    # Agent lists take agent-id positions: a made-up one is a page (maybe empty), never a 500.
    for token in ("wrI", position_token("9" * 200)):
        async with http.get("/agents/list", params={"page_token": token}) as response:
            assert response.status in (200, 400), (token, await response.text())


async def test_absurd_timeouts_are_refused_and_listing_keeps_working(
    rest: tuple[Running, aiohttp.ClientSession],
) -> None:
    running, http = rest
    for name in ("queue_timeout", "run_timeout"):
        async with http.post(
            "/tasks/create", json={"spec": {"type": "job", name: "1000000000000000000s"}}
        ) as response:
            body = await response.json()
            assert response.status == 400 and f"spec.{name}" in str(body), body
        huge = spec(**{name: duration_pb2.Duration(seconds=30 * 24 * 3600 + 1)})
        fields = await invalid_fields(
            running.stubs.tasks.CreateTask(tasks_pb2.CreateTaskRequest(spec=huge), metadata=bearer(ADMIN_KEY))
        )
        assert "30 days" in fields[f"spec.{name}"]
    # Thirty days exactly is fine, and the list that used to answer 500 answers.
    await create_as(running.stubs, ADMIN_KEY, queue_timeout=duration_pb2.Duration(seconds=30 * 24 * 3600))
    async with http.get("/tasks/list") as response:
        assert response.status == 200 and len((await response.json())["tasks"]) == 1


# -- item 14: another agent's finished task ------------------------------------------------------


async def test_an_agent_cannot_report_on_another_agents_finished_task(
    rest: tuple[Running, aiohttp.ClientSession], caplog: pytest.LogCaptureFixture
) -> None:
    running, http = rest
    stubs = running.stubs
    _, token_b, session_b = await agent_with_task(running, "agent-b")
    task = await create_as(stubs, ADMIN_KEY)
    assignment = await next_assignment(session_b)
    complete = tasks_pb2.CompleteTaskRequest(task_id=task.task_id, attempt_id=assignment.attempt_id)
    await stubs.tasks.CompleteTask(complete, metadata=bearer(token_b))
    _, token_a, _ = await agent_with_task(running, "agent-a")

    caplog.set_level(logging.INFO, logger="orchestrator.audit")
    await rpc_error(
        stubs.tasks.CompleteTask(complete, metadata=bearer(token_a)), grpc.StatusCode.PERMISSION_DENIED
    )
    fail = tasks_pb2.FailTaskRequest(task_id=task.task_id, attempt_id=assignment.attempt_id)
    await rpc_error(stubs.tasks.FailTask(fail, metadata=bearer(token_a)), grpc.StatusCode.PERMISSION_DENIED)
    async with http.post(
        f"/tasks/{task.task_id}/complete",
        json={"attempt_id": assignment.attempt_id},
        headers={"x-api-key": "", "authorization": f"Bearer {token_a}"},
    ) as response:
        assert response.status == 403, await response.text()
    denials = [
        record.getMessage()
        for record in caplog.records
        if record.name == "orchestrator.audit" and "result=PERMISSION_DENIED" in record.getMessage()
    ]
    assert len(denials) == 3 and all(f"task_id={task.task_id}" in line for line in denials), denials
    # The holder's own retried completion is still answered with the task.
    again = await stubs.tasks.CompleteTask(complete, metadata=bearer(token_b))
    assert again.task.status == task_pb2.TASK_STATUS_SUCCEEDED


# -- item 16: idempotency keys -------------------------------------------------------------------


async def test_idempotency_keys_are_per_caller_refuse_another_spec_and_survive_a_restart(
    servers: Callable[..., Any],
) -> None:
    keys = f"{API_KEYS},admin:{SECOND_ADMIN_KEY}"
    running: Running = await servers(api_keys=keys)
    stubs = running.stubs
    first = await create_as(stubs, ADMIN_KEY, payload={"n": 1}, idempotency_key="job-42")
    again = await create_as(stubs, ADMIN_KEY, payload={"n": 1}, idempotency_key="job-42")
    assert again.task_id == first.task_id
    other = await create_as(stubs, SECOND_ADMIN_KEY, payload={"n": 1}, idempotency_key="job-42")
    assert other.task_id != first.task_id
    error = await rpc_error(
        create_as(stubs, ADMIN_KEY, payload={"n": 2}, idempotency_key="job-42"),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert "different spec" in (error.details() or "")
    # max_attempts 0 means "the server default", which the stored spec spelled out: the same spec.
    assert (
        await create_as(stubs, ADMIN_KEY, payload={"n": 1}, idempotency_key="job-42")
    ).task_id == first.task_id

    await running.stubs.channel.close()
    await running.server.stop(0.1)
    restarted: Running = await servers(api_keys=keys)
    stubs = restarted.stubs
    assert (
        await create_as(stubs, ADMIN_KEY, payload={"n": 1}, idempotency_key="job-42")
    ).task_id == first.task_id
    assert (
        await create_as(stubs, SECOND_ADMIN_KEY, payload={"n": 1}, idempotency_key="job-42")
    ).task_id == other.task_id
    await rpc_error(
        create_as(stubs, SECOND_ADMIN_KEY, payload={"n": 3}, idempotency_key="job-42"),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert (await get_as(stubs, first.task_id)).spec.payload["n"] == 1


async def get_as(stubs: Stubs, task_id: str) -> task_pb2.Task:
    response = await stubs.tasks.GetTask(
        tasks_pb2.GetTaskRequest(task_id=task_id), metadata=bearer(READER_KEY)
    )
    return response.task


async def test_a_finished_task_keeps_its_key_and_its_spec_check(stubs: Stubs) -> None:
    """Without keys every caller shares one scope, as before; the check holds after the task ends."""
    session_stubs = stubs
    task = await create(session_stubs, idempotency_key="done-1", payload={"n": 1})
    await session_stubs.tasks.CancelTask(tasks_pb2.CancelTaskRequest(task_id=task.task_id))
    await wait_status(session_stubs, task.task_id, {task_pb2.TASK_STATUS_CANCELLED})
    assert (await create(session_stubs, idempotency_key="done-1", payload={"n": 1})).task_id == task.task_id
    await rpc_error(
        create(session_stubs, idempotency_key="done-1", payload={"n": 2}), grpc.StatusCode.ALREADY_EXISTS
    )
    assert (await get(session_stubs, task.task_id)).status == task_pb2.TASK_STATUS_CANCELLED


async def test_rest_answers_409_for_a_key_reused_with_another_spec(
    rest: tuple[Running, aiohttp.ClientSession],
) -> None:
    _, http = rest
    body = {"spec": {"type": "job", "payload": {"n": 1}, "idempotency_key": "rest-1"}}
    async with http.post("/tasks/create", json=body) as response:
        first = await response.json()
        assert response.status == 200 and first["created"] is True, first
    async with http.post("/tasks/create", json=body) as response:
        again = await response.json()
        assert again["task"]["task_id"] == first["task"]["task_id"] and not again.get("created"), again
    body["spec"]["payload"] = {"n": 2}
    async with http.post("/tasks/create", json=body) as response:
        error = await response.json()
        assert response.status == 409 and error["error"]["status"] == "ALREADY_EXISTS", error
        assert first["task"]["task_id"] in error["error"]["message"]
