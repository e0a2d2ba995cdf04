"""py-spy on the server process: record while a load runs, then name the hot functions.

Used with ``python -m bench --profile``: py-spy samples out of process (``--nonblocking``), so the
numbers move a little; profiled runs are for finding hot spots, not for the published table.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ProfileResult:
    headline: str = "not profiled"
    summary: dict[str, Any] = field(default_factory=dict)


def py_spy() -> str | None:
    """py-spy of this virtualenv (its bin/ need not be on PATH), else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.asynccontextmanager
async def record(pid: int, out: Path, rate: int = 200) -> AsyncIterator[ProfileResult]:
    result = ProfileResult()
    exe = py_spy()
    if exe is None:
        result.headline = "py-spy missing (pip install py-spy)"
        yield result
        return
    raw = out.with_suffix(".txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--nonblocking"]
    argv += ["--output", str(raw), "--duration", "600"]
    log = out.with_suffix(".log").open("wb")
    spy = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log)
    try:
        yield result
    finally:
        if spy.returncode is None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(spy.wait(), 30)
        if spy.returncode is None:
            spy.kill()
        log.close()
        result.summary = summarize_collapsed(raw)
        top = result.summary.get("self", [])[:5]
        result.headline = "; ".join(f"{name} {pct:.0f}%" for name, pct in top) or "no samples"
        result.summary["file"] = str(raw)


def summarize_collapsed(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive time per function from py-spy's collapsed ("raw") output, in percent."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"samples": 0}
    for line in lines:
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        self_time[_short(frames[-1])] += count
        for name in {_short(f) for f in frames}:
            inclusive[name] += count
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "self": [(k, 100.0 * v / total) for k, v in self_time.most_common(top)],
        "inclusive": [(k, 100.0 * v / total) for k, v in inclusive.most_common(top)],
    }


def _short(frame: str) -> str:
    # py-spy frames look like "function (path/to/file.py:123)"; keep "function (file.py:123)".
    name, _, where = frame.partition(" (")
    if not where:
        return name
    file_line = where.rstrip(")")
    return f"{name} ({file_line.rsplit('/', 1)[-1]})"
