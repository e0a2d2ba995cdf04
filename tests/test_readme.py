"""The README's shell blocks run as pasted (against a real server on ephemeral ports)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    """The first ```bash block after the README heading that starts with `heading`."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"## {heading}") :]
    found = re.search(r"```bash\n(.*?)```", section, re.S)
    assert found is not None, f"no bash block under {heading!r}"
    return found.group(1)


def run_block(script: str, workdir: Path) -> str:
    """Runs the block with bash -eu (an interactive shell has no pipefail: `curl | head` is fine)."""
    completed = subprocess.run(
        ["bash", "-eu", "-c", script],
        cwd=workdir,
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
