"""The quick chaos run (`make chaos-quick`): three SIGKILLs of a real orchestrator under three SDK
agent processes and a steady submitter lose nothing, leave nothing unfinished and complete nothing
twice. `make chaos` does the same with twenty kills."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.replicas
@pytest.mark.timeout(150)
def test_three_kills_lose_nothing_and_complete_nothing_twice() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "chaos", "--kills", "3", "--settle", "45"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr[-4000:]
    counts = dict(
        line.split(maxsplit=1)
        for line in finished.stdout.splitlines()
        if line and not line.startswith(("kill", "chaos"))
    )
    assert int(counts["created"]) > 0
    for name in ("lost", "not_terminal", "double_completed", "duplicate_creates", "unacknowledged"):
        assert counts[name].strip() == "0", finished.stdout
