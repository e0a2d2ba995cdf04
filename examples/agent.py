"""A complete orchestrator agent: three handlers, a health check, graceful shutdown.

    python examples/agent.py                       # against localhost:50051 (make run)
    ORCHESTRATOR_TARGET=host:port AGENT_INSTANCE=pod-0 python examples/agent.py

Handlers:
  estimate  async; prices `hours` of compute, reports progress, refuses bad input for good
  wait      async; sleeps `seconds` in steps with progress, cleans up when cancelled
  checksum  plain function (runs on a worker thread); SHA-256 of `text`, CPU-bound work
Try it with examples/submitter.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
from typing import Any

from orchestrator_client import Agent, NonRetryableError, SyncTaskContext, TaskContext

log = logging.getLogger("example-agent")

agent = Agent(
    os.environ.get("ORCHESTRATOR_TARGET", "localhost:50051"),
    name="example-agent",
    type="example",
    # A stable instance id keeps one registration across restarts of this process.
    instance_id=os.environ.get("AGENT_INSTANCE") or None,
    version="1.0.0",
    capabilities=["pricing", "hashing"],
    labels={"region": os.environ.get("AGENT_REGION", "local")},
    max_concurrent_tasks=4,
    api_key=os.environ.get("ORCHESTRATOR_API_KEY") or None,
    shutdown_grace=20.0,
)

HOURLY_RATE_USD = {"small": 0.02, "medium": 0.12, "large": 0.48}


@agent.task("estimate")
async def estimate(ctx: TaskContext) -> dict[str, Any]:
    hours = ctx.payload.get("hours")
    size = ctx.payload.get("size", "medium")
    if not isinstance(hours, int | float) or hours < 0:
        raise NonRetryableError("payload.hours must be a non-negative number", reason="BAD_INPUT")
    if size not in HOURLY_RATE_USD:
        raise NonRetryableError(f"payload.size must be one of {sorted(HOURLY_RATE_USD)}", reason="BAD_INPUT")
    await ctx.report_progress(0.5, f"pricing {size}")
    return {"usd": round(hours * HOURLY_RATE_USD[size], 4), "size": size}


@agent.task("wait")
async def wait(ctx: TaskContext) -> dict[str, Any]:
    seconds = float(ctx.payload.get("seconds", 1.0))
    steps = 10
    try:
        for step in range(steps):
            await asyncio.sleep(seconds / steps)
            await ctx.report_progress((step + 1) / steps)
    except asyncio.CancelledError:
        # The task was cancelled (or handed back on shutdown): clean up, then let it propagate.
        log.info("wait %s cancelled at attempt %s", ctx.task_id, ctx.attempt_id)
        raise
    return {"waited": seconds, "attempt": ctx.attempt_number}


@agent.task("checksum")
def checksum(ctx: SyncTaskContext) -> dict[str, Any] | None:
    text = ctx.payload.get("text")
    if not isinstance(text, str):
        raise NonRetryableError("payload.text must be a string", reason="BAD_INPUT")
    digest = hashlib.sha256()
    for start in range(0, len(text), 1 << 20):
        if ctx.cancelled.is_set():  # threads cannot be interrupted: look now and then
            return None
        digest.update(text[start : start + (1 << 20)].encode())
    return {"sha256": digest.hexdigest(), "length": len(text)}


@agent.check("disk")
def disk_has_room() -> bool:
    usage = shutil.disk_usage("/")
    return usage.free / usage.total > 0.05


async def main() -> None:
    async with agent:
        log.info("agent %s connected to %s", agent.agent_id, agent.target)
        await agent.run_forever()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main())
