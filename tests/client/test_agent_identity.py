"""One identity, one live process: a second holder is refused and stops; restarts resume; the SDK
says where it is (issue 10, items 2, 5 and 18)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import SleepRecorder

from orchestrator_client import AdminClient, Agent, AgentStopped, Backoff, TaskContext, v1
from orchestrator_client.agent import IDENTITY_IN_USE, default_instance_id
from tests.client.test_sdk_restart import ready_agent, sdk_agents  # noqa: F401 (fixture)
from tests.conftest import ROOT, Running, ServerProcess, async_wait_for

READY = v1.AgentStatus.AGENT_STATUS_READY


async def test_a_second_process_with_the_same_identity_is_refused_and_stops(
    server_process: Callable[..., ServerProcess],
    sdk_agents: Callable[..., subprocess.Popen[bytes]],  # noqa: F811
    tmp_path: Path,
) -> None:
    server = await asyncio.to_thread(server_process().start)
    first = sdk_agents(server.target, "twin")
    async with AdminClient(server.target, timeout=5.0) as admin:
        registered = await ready_agent(admin, "twin")

        async def streaming() -> v1.Agent | None:
            agent = await admin.get_agent(registered.agent_id)
            return agent if agent.session.streaming else None

        holder = await async_wait_for(streaming, 20, "the first process's session")
        second = sdk_agents(server.target, "twin")  # same name, same instance id
        code = await asyncio.to_thread(second.wait, 60)
        assert code != 0
        log = (tmp_path / "agent-twin.log").read_text(errors="replace")
        assert IDENTITY_IN_USE in log or "already connected" in log, log
        assert "give each its own instance id" in log
        # The first process kept its session all along: no fencing, no re-registration.
        current = await admin.get_agent(holder.agent_id)
        assert current.status == READY
        assert current.session.epoch == holder.session.epoch
        assert current.transitions == holder.transitions
        assert first.poll() is None
        # A handful of log lines, not a fight: the refusal is final.
        assert log.count("superseded") == 0
        assert log.count("registered twin/") <= 2


async def test_the_refusal_is_final_for_an_in_process_agent(running: Running) -> None:
    holder = Agent(running.target, name="solo", type="t", instance_id="i-1", handle_signals=False)
    await holder.start(connect_timeout=20)
    intruder = Agent(
        running.target,
        name="solo",
        type="t",
        instance_id="i-1",
        handle_signals=False,
        reconnect_backoff=Backoff(initial=0.01, maximum=0.05),
    )
    try:
        with pytest.raises(AgentStopped) as stopped:
            await intruder.start(connect_timeout=20)
        assert "instance id" in str(stopped.value)
        assert holder.connected and holder.sessions_opened == 1
    finally:
        await intruder.stop(grace=0)
        await holder.stop(grace=0)


async def test_a_restarted_process_resumes_its_identity(running: Running) -> None:
    """Same identity, new incarnation, old session gone: the restart is welcomed, not refused."""
    first = Agent(running.target, name="phoenix", type="t", handle_signals=False)
    await first.start(connect_timeout=20)
    agent_id = first.agent_id
    await first.stop(grace=0)
    second = Agent(running.target, name="phoenix", type="t", handle_signals=False)
    try:
        await second.start(connect_timeout=20)
        assert second.instance_id == first.instance_id
        assert second.agent_id == agent_id
    finally:
        await second.stop(grace=0)


def test_default_instance_id_is_stable_across_restarts() -> None:
    def run() -> str:
        return subprocess.run(
            [
                sys.executable,
                "-c",
                "from orchestrator_client.agent import default_instance_id as d; print(d())",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()

    first, second = run(), run()
    assert first == second
    assert str(os.getpid()) not in default_instance_id()


async def test_connected_line_at_info(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    agent = Agent(running.target, name="chatty", type="t", instance_id="c-1", handle_signals=False)

    @agent.task("estimate")
    async def estimate(ctx: TaskContext) -> dict[str, Any]:
        return {}

    @agent.task("audit")
    async def audit(ctx: TaskContext) -> dict[str, Any]:
        return {}

    with caplog.at_level(logging.INFO, logger="orchestrator_client.agent"):
        await agent.start(connect_timeout=20)
        await agent.stop(grace=0)
    lines = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    assert f"connected as {agent.agent_id} (chatty/c-1), handling audit, estimate" in lines


async def test_backoff_stays_short_through_a_planned_restart(
    servers: Callable[..., Any], tmp_path: Path
) -> None:
    running: Running = await servers()
    port = running.server.grpc_port
    sleeps = SleepRecorder(real=True)
    # random() pinned near 1: every pause is its ceiling, so growth would show at once.
    backoff = Backoff(initial=0.2, maximum=30.0, random=lambda: 0.99)
    agent = Agent(
        running.target,
        name="patient",
        type="t",
        instance_id="p-1",
        handle_signals=False,
        reconnect_backoff=backoff,
        sleep=sleeps,
    )
    await agent.start(connect_timeout=20)
    try:
        await running.server.stop(0.5)  # a planned restart: reconnect requests, then the port closes

        def waited(seconds: float) -> bool:
            return sum(sleeps.delays) >= seconds

        # Down for a while: today's backoff would have grown to 0.2 * 2**4 = 3.2 s by now.
        await async_wait_for(lambda: waited(5.0), 30, "five seconds of reconnect pauses")
        await servers(grpc_port=port)
        await async_wait_for(lambda: agent.sessions_opened == 2, 30, "the agent back after the restart")
        assert max(sleeps.delays) <= 2.0, sleeps.delays
    finally:
        await agent.stop(grace=0)


async def test_a_result_the_server_accepted_is_not_called_moved(
    servers: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The report landed but its answer was lost in a restart; the next welcome no longer lists the
    attempt. That is not a move: the SDK must not say so, nor cancel the report's retry."""
    running: Running = await servers(failover_grace=60.0)
    port = running.server.grpc_port
    release = asyncio.Event()
    sleeps = SleepRecorder()
    agent = Agent(
        running.target,
        name="reporter",
        type="t",
        instance_id="r-1",
        handle_signals=False,
        sleep=sleeps,
        reconnect_backoff=Backoff(initial=0.05, maximum=0.2),
    )

    @agent.task("slow")
    async def slow(ctx: TaskContext) -> dict[str, Any]:
        await release.wait()
        return {"done": True}

    await agent.start(connect_timeout=20)
    created = await running.stubs.tasks.CreateTask(v1.CreateTaskRequest(spec=v1.TaskSpec(type="slow")))
    await async_wait_for(lambda: len(agent.running_attempt_ids) == 1, 20, "the attempt on the agent")
    attempt_id = agent.running_attempt_ids[0]
    await running.server.stop(0.2)
    accepted = asyncio.Event()

    async def during_report_retry(_count: int) -> None:
        task = asyncio.current_task()
        if accepted.is_set() or task is None or not task.get_name().startswith("attempt-"):
            return
        # The report failed (server away). Meanwhile the server comes back and the earlier report
        # "lands": accepted, its answer lost. Then the agent reconnects before retrying.
        back: Running = await servers(grpc_port=port, failover_grace=60.0)
        complete = v1.CompleteTaskRequest(task_id=created.task.task_id, attempt_id=attempt_id)
        complete.result.update({"done": True})
        await back.stubs.tasks.CompleteTask(complete, metadata=(("authorization", f"Bearer {agent._token}"),))
        accepted.set()
        await async_wait_for(lambda: agent.sessions_opened == 2, 30, "the reconnect")

    sleeps.on_sleep = during_report_retry
    try:
        with caplog.at_level(logging.INFO, logger="orchestrator_client.agent"):
            release.set()
            await async_wait_for(lambda: not agent.running_attempt_ids, 60, "the report to finish")
        assert accepted.is_set()
        messages = [record.getMessage() for record in caplog.records]
        assert not any("was moved" in message for message in messages), messages
        assert not any(f"attempt {attempt_id} stopped" in message for message in messages), messages
    finally:
        await agent.stop(grace=0)
