"""`make cluster` (`python -m local_cluster`): PostgreSQL and 3 replicas come up, an agent given the
printed targets attaches, and Ctrl-C stops everything it started and removes its files."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from orchestrator_client import AdminClient, Agent, TaskContext, v1
from tests.conftest import ROOT, async_wait_for

pytestmark = pytest.mark.replicas


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child that exited but was not yet reaped by its parent is gone for every purpose here.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


async def test_make_cluster_serves_three_replicas_an_agent_attaches_and_ctrl_c_cleans_up() -> None:
    script = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "local_cluster", "--grpc-port", "0", "--http-port", "0",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert script.stdout is not None
    output: list[str] = []
    try:
        async with asyncio.timeout(120):
            while not any(line.startswith("Ctrl-C stops") for line in output):
                line = (await script.stdout.readline()).decode()
                assert line, "the script ended before it was ready:\n" + "".join(output)
                output.append(line)
        text = "".join(output)
        targets = re.search(r"export ORCHESTRATOR_TARGET=(\S+)", text)
        assert targets is not None, text
        replica_pids = [int(pid) for pid in re.findall(r"replica \d \(pid (\d+)\)", text)]
        postgres_pid = int(re.search(r"PostgreSQL \(pid (\d+)\)", text).group(1))  # type: ignore[union-attr]
        directories = [
            Path(path)
            for path in re.findall(r"(?:^|[\s=])(/[^\s=]*orchestrator-(?:pg|cluster)-\w+)", text, re.M)
        ]
        assert len(replica_pids) == 3 and all(directory.exists() for directory in directories)

        for target in targets.group(1).split(","):
            async with AdminClient(target, timeout=20) as admin:
                await admin.get_system_health()  # each replica serves
                assert admin.target == target

        agent = Agent(
            targets.group(1), name="try-me", instance_id="try-me-1", type="demo", handle_signals=False
        )

        @agent.task("hello")
        async def hello(ctx: TaskContext) -> dict[str, str]:
            return {"hello": str(ctx.payload["name"])}

        await agent.start(connect_timeout=30)
        try:
            async with AdminClient(targets.group(1), timeout=20) as admin:
                task = await admin.create_task("hello", {"name": "cluster"})
                done = await admin.wait_for_result(task.task_id, timeout=30)
                assert done.status == v1.TaskStatus.TASK_STATUS_SUCCEEDED, done
                assert dict(done.result) == {"hello": "cluster"}
        finally:
            await agent.stop(grace=0)

        script.send_signal(signal.SIGINT)  # what Ctrl-C sends
        rest, _ = await asyncio.wait_for(script.communicate(), 60)
        assert script.returncode == 0, text + rest.decode()
        assert rest.decode().rstrip().endswith("stopped")
        await async_wait_for(
            lambda: not any(alive(pid) for pid in [*replica_pids, postgres_pid]),
            within=20,
            what="the replicas and PostgreSQL gone",
        )
        assert not any(directory.exists() for directory in directories)
    finally:
        if script.returncode is None:  # the test failed: still stop what the script started
            script.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(script.communicate(), 60)
            except TimeoutError:
                script.kill()
                await script.wait()


@pytest.fixture(autouse=True)
def _needs_postgres() -> None:
    from local_cluster.postgres import _bindir

    try:
        _bindir()
    except RuntimeError as missing:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(missing))
