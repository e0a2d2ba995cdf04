"""The `orchestrator` admin CLI, run as a real process against a real server process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import AgentProcess, ServerProcess

CLI = str(Path(sys.executable).parent / "orchestrator")


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "--target", server.target, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_everyday_questions(
    server_process: Callable[..., ServerProcess], agent_processes: Callable[..., AgentProcess]
) -> None:
    server = server_process().start()
    agent = agent_processes(server.target, "cli-agent", "--label", "zone=a")
    agent_id = agent.wait_welcome()

    listed = cli(server, "agents", "list", "--selector", "zone=a")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()[:2]
    assert header.split()[:5] == ["AGENT", "NAME", "INSTANCE", "TYPE", "STATUS"]
    assert row.split()[:5] == [agent_id, "cli-agent", "cli-agent", "worker", "READY"]

    created = cli(server, "tasks", "create", "job", "--payload", '{"n": 1}', "--key", "cli-1")
    assert created.returncode == 0, created.stderr
    task_id = json.loads(created.stdout)["task_id"]
    waited = cli(server, "tasks", "wait", task_id)
    assert waited.returncode == 0 and json.loads(waited.stdout)["status"] == "TASK_STATUS_SUCCEEDED"
    tasks = cli(server, "--json", "tasks", "list", "--status", "SUCCEEDED")
    assert [json.loads(line)["task_id"] for line in tasks.stdout.splitlines()] == [task_id]

    drained = cli(server, "agents", "drain", agent_id)
    assert json.loads(drained.stdout)["status"] == "AGENT_STATUS_DRAINING"
    system = json.loads(cli(server, "health").stdout)
    assert system["store_status"] == "ok" and system["total_agents"] == "1"

    # A watch prints one JSON line per change until it is stopped.
    watch = subprocess.Popen(
        [CLI, "--target", server.target, "watch", "agents"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert watch.stdout is not None
        assert "snapshot" in json.loads(watch.stdout.readline())
        agent.kill()
        delta = json.loads(watch.stdout.readline())
        assert delta["delta"]["agent"]["status"] == "AGENT_STATUS_DOWN"
    finally:
        watch.kill()
        watch.wait(10)


def test_errors_are_one_line_with_the_code(server_process: Callable[..., ServerProcess]) -> None:
    server = server_process().start()
    missing = cli(server, "agents", "get", "agt_missing")
    assert missing.returncode == 1
    assert missing.stderr.strip().startswith("orchestrator: NOT_FOUND:")
    no_id = cli(server, "tasks", "get")
    assert no_id.returncode == 2 and "id is required" in no_id.stderr


def test_options_work_before_and_after_the_command() -> None:
    from orchestrator_client.cli import parser

    after = parser().parse_args(["agents", "list", "--json", "--target", "h:1"])
    before = parser().parse_args(["--json", "--target", "h:2", "agents", "list"])
    neither = parser().parse_args(["tasks", "list"])
    assert (after.json, after.target) == (True, "h:1")
    assert (before.json, before.target) == (True, "h:2")
    assert neither.json is False and neither.timeout == 10.0
