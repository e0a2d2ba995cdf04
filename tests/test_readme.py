"""The README's shell blocks run as pasted (against a real server on ephemeral ports)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    """The first ```bash block after the README heading that starts with `heading`."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"## {heading}") :]
    found = re.search(r"```bash\n(.*?)```", section, re.S)
    assert found is not None, f"no bash block under {heading!r}"
    return found.group(1)


def run_block(script: str, workdir: Path, env: dict[str, str] | None = None) -> str:
    """Runs the block with bash -eu (an interactive shell has no pipefail: `curl | head` is fine)."""
    completed = subprocess.run(
        ["bash", "-eu", "-c", script],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, (
        f"{script}\n--- stdout\n{completed.stdout}\n--- stderr\n{completed.stderr}"
    )
    return completed.stdout


def json_documents(output: str) -> list[dict[str, Any]]:
    """The JSON objects in `output`, which curl prints back to back (bodies end without a newline)."""
    decoder = json.JSONDecoder()
    documents = []
    position = output.find("{")
    while position != -1:
        try:
            document, end = decoder.raw_decode(output, position)
        except json.JSONDecodeError:
            position = output.find("{", position + 1)
            continue
        documents.append(document)
        position = output.find("{", end)
    return documents


def test_the_rest_examples_run_as_pasted(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_process(GATEWAY_ENABLED="true").start()
    script = readme_block("REST").replace("localhost:8080", f"127.0.0.1:{server.http_port}")
    # Every curl must fail on an HTTP error, as a newcomer would notice one.
    script = script.replace("curl -s", "curl -sf")
    # The watch follows until --max-time ends it, which curl reports as exit code 28.
    script = re.sub(r"^(curl -sfN --max-time .*?)(\s+#.*)?$", r"\1 || [ $? = 28 ]", script, flags=re.M)
    output = run_block(script, tmp_path)
    answers = json_documents(output)
    assert not any("error" in answer for answer in answers), answers
    heartbeat = next(answer for answer in answers if "lease_expires_at" in answer)
    assert heartbeat["status"] == "AGENT_STATUS_READY"
    listed = next(answer for answer in answers if "agents" in answer and "next_page_token" in answer)
    assert [agent["name"] for agent in listed["agents"]] == ["cost-agent"]
    status = next(answer for answer in answers if "task" in answer)
    assert status["task"]["spec"]["type"] == "estimate"
    assert "# HELP" in output, "the metrics line printed nothing"
    # The watch prints its snapshot (the registered agent) before --max-time ends it.
    assert any("snapshot" in json.dumps(answer).lower() for answer in answers), output


def readme_python(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"## {heading}") :]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found is not None, f"no python block under {heading!r}"
    return found.group(1)


def test_the_cli_and_grpcurl_examples_run_as_pasted(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_process().start()
    env = {**os.environ, "ORCHESTRATOR_TARGET": server.target}
    agent_script = tmp_path / "agent.py"
    agent_script.write_text(readme_python("An agent in twenty lines"))
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen([sys.executable, str(agent_script)], env=env, stdout=log, stderr=log)
    try:
        cli = readme_block("The admin CLI")
        # The watch follows until interrupted: give it a few seconds (timeout's exit code is 124).
        cli = re.sub(
            r"^(orchestrator watch agents)(\s+#.*)?$", r"timeout 5 \1 || [ $? = 124 ]", cli, flags=re.M
        )
        output = run_block(cli, ROOT, env)
        finished = json_documents(output)[-1]
        assert finished["status"] == "TASK_STATUS_SUCCEEDED", output
        assert finished["result"] == {"usd": pytest.approx(0.36)}, output
        assert "AGENT" in output and "cost-agent" in output, output

        grpcurl = readme_block("Debugging with grpcurl").replace("localhost:50051", server.target)
        output = run_block(". .venv/bin/activate\n" + grpcurl, ROOT, env)
        assert "orchestrator.v1.RegistryService" in output and '"status": "SERVING"' in output, output
        assert '"agentToken"' in output or '"agent_token"' in output, output
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
