"""The server's access table agrees with the one written by hand in `pinned_rules.py`, row by row,
and a method the table does not know is refused to everyone, admin included."""

from __future__ import annotations

import grpc
import pytest

from orchestrator.v1 import tasks_pb2
from orchestrator_server import auth
from tests.conftest import Running
from tests.security.conftest import ADMIN_KEY, READER_KEY, bearer, orchestrator_methods, path, served_methods
from tests.security.pinned_rules import PINNED
from tests.support import rpc_error


def test_every_rpc_of_every_proto_service_has_a_pinned_row() -> None:
    unpinned = sorted(path(method) for method in served_methods() if path(method) not in PINNED)
    assert not unpinned, f"add these RPCs to tests/security/pinned_rules.py: {unpinned}"
    # The orchestrator's own protos are all there (served_methods adds the standard services).
    assert {path(method) for method in orchestrator_methods()} <= set(PINNED)


def test_every_server_rule_matches_its_pinned_row() -> None:
    unpinned = sorted(set(auth.RULES) - set(PINNED))
    assert not unpinned, f"rules without a pinned row: {unpinned}"
    differ = {
        name: (rule.access.value, rule.agent_field, "pinned:", *PINNED[name])
        for name, rule in auth.RULES.items()
        if (rule.access, rule.agent_field) != (PINNED[name].access, PINNED[name].agent_field)
    }
    assert not differ, f"auth.RULES disagrees with the pinned table: {differ}"


async def test_a_reader_cannot_cancel_a_task(secured: Running) -> None:
    created = await secured.stubs.tasks.CreateTask(
        tasks_pb2.CreateTaskRequest(spec={"type": "work"}), metadata=bearer(ADMIN_KEY)
    )
    await rpc_error(
        secured.stubs.tasks.CancelTask(
            tasks_pb2.CancelTaskRequest(task_id=created.task.task_id), metadata=bearer(READER_KEY)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    task = await secured.stubs.tasks.GetTask(
        tasks_pb2.GetTaskRequest(task_id=created.task.task_id), metadata=bearer(READER_KEY)
    )
    assert task.task.status == created.task.status


async def test_a_method_without_a_rule_is_denied_even_to_an_admin(
    secured: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "/orchestrator.v1.TasksService/ListTasks"
    # The served method stays; only its rule goes, as if a new RPC had been added without one.
    monkeypatch.delitem(auth.RULES, name)  # type: ignore[arg-type]
    error = await rpc_error(
        secured.stubs.tasks.ListTasks(tasks_pb2.ListTasksRequest(), metadata=bearer(ADMIN_KEY)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert "no access rule" in (error.details() or "")
