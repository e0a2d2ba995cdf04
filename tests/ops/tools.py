"""External tools the ops tests run, found where `make setup` and `.ci/run` install them.

promtool: `make setup` unpacks it into .venv/tools (Debian's prometheus package, no daemon);
systemd-analyze and sqlite3: Debian packages `.ci/run` installs. In CI (CI=true) a missing tool
fails the test; elsewhere the test skips and says how to get the tool.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

HOW = {
    "promtool": "run `make setup` (it unpacks Debian's prometheus package into .venv/tools)",
    "systemd-analyze": "apt-get install systemd",
    "sqlite3": "apt-get install sqlite3",
}


def tool(name: str) -> str:
    """The tool's path; fails in CI, skips elsewhere, when it is not installed."""
    bundled = Path(sys.prefix) / "tools" / name
    found = str(bundled) if bundled.exists() else shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed: {HOW[name]}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
