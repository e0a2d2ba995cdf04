"""Helpers shared by the harness's child processes."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def write_ready_file(info: dict[str, Any]) -> None:
    """Write the readiness JSON atomically (temp file + rename) where ORCHESTRATOR_READY_FILE says."""
    target = os.environ.get("ORCHESTRATOR_READY_FILE")
    if not target:
        return
    path = Path(target)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run with uvloop when installed (the product installs it too)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a server dependency
        return asyncio.run(main)
    return uvloop.run(main)
