"""An SDK agent process rides out an orchestrator SIGKILL (or SIGTERM) and restart without any help.

The server (`python -m orchestrator_server serve`) and the agent (tests/client/sdk_agent_process.py)
are separate OS processes. The server is killed while the agent runs two tasks; one of them
finishes during the outage. The server restarts on the same port and database; the agent must
reconnect, keep its attempts and get both results accepted. Nothing in the test talks to the agent.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator_client import AdminClient, v1
from tests.conftest import ServerProcess, async_wait_for

AGENT_SCRIPT = Path(__file__).resolve().parent / "sdk_agent_process.py"
ROOT = Path(__file__).resolve().parents[2]
RUNNING = v1.TaskStatus.TASK_STATUS_RUNNING
SUCCEEDED = v1.TaskStatus.TASK_STATUS_SUCCEEDED


@pytest.fixture
def sdk_agents(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def spawn(target: str, name: str, *flags: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"agent-{name}.log", "wb")  # noqa: SIM115 (kept open for the child)
        process = subprocess.Popen(
            [sys.executable, str(AGENT_SCRIPT), "--target", target, "--name", name, *flags],
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
        started.append(process)
        return process

    yield spawn
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


async def ready_agent(admin: AdminClient, name: str) -> v1.Agent:
    async def find() -> v1.Agent | None:
        async for agent in admin.list_agents(type="sdk-test"):
            if agent.name == name and agent.status == v1.AgentStatus.AGENT_STATUS_READY:
                return agent
        return None

    found: v1.Agent = await async_wait_for(find, within=20, what=f"agent {name} READY")
    return found


@pytest.mark.parametrize(
    ("flavour", "stop"),
    [("async", "SIGKILL"), ("sync", "SIGKILL"), ("async", "SIGTERM")],
    ids=["async-sigkill", "sync-sigkill", "async-sigterm"],
)
async def test_agent_process_survives_orchestrator_restart(
    server_process: Callable[..., ServerProcess],
    sdk_agents: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
    flavour: str,
    stop: str,
    record_property: Callable[[str, Any], None],
) -> None:
    server = server_process().start()
    flags = ["--sync"] if flavour == "sync" else []
    agent_process = sdk_agents(server.target, f"survivor-{flavour}", *flags)
    during_outage = tmp_path / "gate-during-outage"
    after_restart = tmp_path / "gate-after-restart"

    async with AdminClient(server.target, timeout=5.0) as admin:
        agent = await ready_agent(admin, f"survivor-{flavour}")
        echo = await admin.create_task("echo", {"hello": "world"})
        echoed = await admin.wait_for_result(echo.task_id, timeout=20)
        assert echoed.status == SUCCEEDED and dict(echoed.result) == {"hello": "world"}

        first = await admin.create_task("gate", {"gate": str(during_outage)})
        second = await admin.create_task("gate", {"gate": str(after_restart)})

        async def both_running() -> bool:
            tasks = [await admin.get_task(first.task_id), await admin.get_task(second.task_id)]
            return all(task.status == RUNNING for task in tasks)

        await async_wait_for(both_running, within=20, what="both gate tasks RUNNING")

        # SIGKILL: the streams just die. SIGTERM: a planned restart; the server drains and sends
        # every session a reconnect request before it goes.
        if stop == "SIGKILL":
            server.kill()
        else:
            assert server.terminate() == 0
        killed_at = time.time()
        during_outage.touch()  # this result is produced while nobody can take it
        server.start()
        serving_at = time.time()

        async def reattached() -> v1.Agent | None:
            current = await admin.get_agent(agent.agent_id)
            connected_at = current.session.connected_at.ToDatetime().timestamp()
            fresh = current.session.streaming and connected_at > killed_at
            return current if fresh else None

        back = await async_wait_for(reattached, within=60, what="agent re-attached after the restart")
        reconnect_seconds = back.session.connected_at.ToDatetime().timestamp() - serving_at
        record_property("reconnect_after_restart_seconds", round(reconnect_seconds, 3))
        print(
            f"\n[{flavour}, {stop}] server down {serving_at - killed_at:.2f}s; agent re-attached {reconnect_seconds:.2f}s after ready"
        )

        after_restart.touch()
        for task in (first, second):
            done = await admin.wait_for_result(task.task_id, timeout=30)
            assert done.status == SUCCEEDED, done
            # The result of the attempt that was in flight through the restart was accepted:
            # one attempt, on this agent, never moved.
            assert [(a.agent_id, a.status) for a in done.attempts] == [
                (agent.agent_id, v1.AttemptStatus.ATTEMPT_STATUS_SUCCEEDED)
            ]
        assert dict((await admin.get_task(first.task_id)).result)["gate"] == during_outage.name
        assert agent_process.poll() is None
