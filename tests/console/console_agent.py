"""An SDK agent run as its own OS process by the console's browser tests.

It registers with the agent key in ORCHESTRATOR_API_KEY (the server under test has keys on).
Handlers: `echo` returns its payload; `fail` fails the attempt with reason "CONSOLE_TEST" (retryable,
so a task with max_attempts > 1 shows several attempts); `hold` runs until cancelled (an agent killed
while it holds a task is an unplanned drop that counts towards pausing failover).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from orchestrator_client import Agent, TaskContext, TaskFailure


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--type", default="worker")
    parser.add_argument("--label", action="append", default=[])
    args = parser.parse_args()
    agent = Agent(
        args.target,
        name=args.name,
        instance_id="1",
        type=args.type,
        labels=dict(item.split("=", 1) for item in args.label),
        max_concurrent_tasks=2,
        api_key=os.environ["ORCHESTRATOR_API_KEY"],
    )

    @agent.task("echo")
    async def echo(ctx: TaskContext) -> dict[str, Any]:
        return ctx.payload

    @agent.task("fail")
    async def fail(ctx: TaskContext) -> dict[str, Any]:
        raise TaskFailure("the console test asked for a failure", reason="CONSOLE_TEST")

    @agent.task("hold")
    async def hold(ctx: TaskContext) -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    async def run() -> None:
        async with agent:
            await agent.run_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
