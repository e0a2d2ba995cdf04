"""`orchestrator tasks create` takes the placement constraints, and `tasks get` says why a task waits
(issue 10, item 1), run as real processes against a real server process."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from tests.client.test_cli import cli
from tests.conftest import AgentProcess, ServerProcess


def test_create_with_constraints_and_see_why_it_waits(
    server_process: Callable[..., ServerProcess], agent_processes: Callable[..., AgentProcess]
) -> None:
    server = server_process().start()
    agent_id = agent_processes(server.target, "cli-agent", "--label", "zone=a").wait_welcome()
    created = cli(
        server,
        "tasks",
        "create",
        "estimate",
        "--capability",
        "gpu",
        "--capability",
        "aws",
        "--selector",
        "zone=a",
        "--target-agent",
        agent_id,
        "--max-attempts",
        "2",
    )
    assert created.returncode == 0, created.stderr
    spec = json.loads(created.stdout)["spec"]
    assert spec["required_capabilities"] == ["gpu", "aws"]
    assert (spec["label_selector"], spec["target_agent_id"], spec["max_attempts"]) == ("zone=a", agent_id, 2)
    task_id = json.loads(created.stdout)["task_id"]

    deadline = time.monotonic() + 30
    while True:
        shown = cli(server, "tasks", "get", task_id)
        assert shown.returncode == 0, shown.stderr
        task = json.loads(shown.stdout)
        assert task["status"] == "TASK_STATUS_PENDING"
        if "pending_reason" in task or time.monotonic() > deadline:
            break
    assert task["pending_reason"]["filtered_by_capability"] == 1, task
    assert shown.stderr.strip() == f"pending: {task['pending_reason']['message']}"
    assert "1 lack a capability" in shown.stderr
