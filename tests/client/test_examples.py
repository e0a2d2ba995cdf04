"""The documented agent snippet and the examples run as written against a real server process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator_client import AdminClient, v1
from tests.conftest import ServerProcess, async_wait_for

ROOT = Path(__file__).resolve().parents[2]
SNIPPET = re.compile(r"<!-- agent-snippet:start.*?-->\s*```python\n(.*?)```", re.S)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def spawn(script: Path, *args: str, target: str, log_name: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / log_name, "wb")  # noqa: SIM115 (kept open for the child)
        env = {**os.environ, "ORCHESTRATOR_TARGET": target}
        process = subprocess.Popen(
            [sys.executable, str(script), *args], cwd=ROOT, env=env, stdout=log, stderr=log
        )
        started.append(process)
        return process

    yield spawn
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_the_docs_snippet_is_about_twenty_lines() -> None:
    snippet = SNIPPET.search((ROOT / "docs" / "SDK.md").read_text())
    assert snippet is not None
    lines = snippet.group(1).strip().splitlines()
    assert 18 <= len(lines) <= 24, len(lines)


async def test_the_docs_snippet_runs_as_written(
    server_process: Callable[..., ServerProcess],
    processes: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    snippet = SNIPPET.search((ROOT / "docs" / "SDK.md").read_text())
    assert snippet is not None
    script = tmp_path / "snippet_agent.py"
    script.write_text(snippet.group(1))
    server = server_process().start()
    agent = processes(script, target=server.target, log_name="snippet.log")

    async with AdminClient(server.target, timeout=5.0) as admin:

        async def cost_agent_ready() -> bool:
            return any([a async for a in admin.discover_agents(type="cost")])

        await async_wait_for(cost_agent_ready, within=20, what="the snippet agent to be ready")
        good = await admin.create_task("estimate", {"hours": 10})
        bad = await admin.create_task("estimate", {"hours": "ten"}, max_attempts=3)
        done = await admin.wait_for_result(good.task_id, timeout=20)
        assert done.status == v1.TaskStatus.TASK_STATUS_SUCCEEDED
        assert dict(done.result) == {"usd": pytest.approx(1.2)}
        refused = await admin.wait_for_result(bad.task_id, timeout=20)
        assert refused.status == v1.TaskStatus.TASK_STATUS_FAILED
        assert refused.error.non_retryable and len(refused.attempts) == 1

        agent.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(agent.wait, 20) == 0
        gone = [a async for a in admin.list_agents(type="cost")]
        assert [a.status for a in gone] == [v1.AgentStatus.AGENT_STATUS_DOWN]


async def test_example_agent_and_submitter(
    server_process: Callable[..., ServerProcess],
    processes: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    server = server_process().start()
    processes(ROOT / "examples" / "agent.py", target=server.target, log_name="agent.log")
    submitter = processes(
        ROOT / "examples" / "submitter.py",
        "--count",
        "2",
        "--timeout",
        "60",
        target=server.target,
        log_name="submitter.log",
    )
    code = await asyncio.to_thread(submitter.wait, 90)
    output = (tmp_path / "submitter.log").read_text()
    assert code == 0, output
    assert output.count("SUCCEEDED") == 5, output  # 2 estimates, 2 checksums, 1 wait


async def test_submitter_without_a_key_says_so_in_one_line(
    server_process: Callable[..., ServerProcess],
    processes: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    server = server_process(API_KEYS="admin:admin-key-for-the-example-0001").start()
    env_key = os.environ.pop("ORCHESTRATOR_API_KEY", None)
    try:
        submitter = processes(
            ROOT / "examples" / "submitter.py", target=server.target, log_name="refused.log"
        )
        code = await asyncio.to_thread(submitter.wait, 60)
    finally:
        if env_key is not None:
            os.environ["ORCHESTRATOR_API_KEY"] = env_key
    output = (tmp_path / "refused.log").read_text()
    assert code == 2, output
    assert "Traceback" not in output, output
    refusal = [line for line in output.splitlines() if line.startswith("orchestrator refused")]
    assert len(refusal) == 1 and "ORCHESTRATOR_API_KEY" in refusal[0], output
