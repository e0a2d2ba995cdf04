"""An agent written with the SDK alone, run as its own OS process by the restart tests.

Nothing here knows about restarts: whatever resilience the agent shows comes from the SDK.

Handlers (async with `Agent`, plain functions with `--sync` and `SyncAgent`):
  gate  waits until the file named by payload["gate"] exists, then returns {"gate": ..., "pid": ...}
  echo  returns its payload
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from orchestrator_client import Agent, SyncAgent, SyncTaskContext, TaskContext


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--sync", action="store_true")
    return parser.parse_args()


def run_async(args: argparse.Namespace) -> None:
    agent = Agent(args.target, name=args.name, instance_id=args.name, type="sdk-test", max_concurrent_tasks=4)

    @agent.task("gate")
    async def gate(ctx: TaskContext) -> dict[str, Any]:
        gate_file = Path(ctx.payload["gate"])
        while True:
            if await asyncio.to_thread(gate_file.exists):
                return {"gate": gate_file.name, "pid": os.getpid()}
            await asyncio.sleep(0.02)

    @agent.task("echo")
    async def echo(ctx: TaskContext) -> dict[str, Any]:
        return ctx.payload

    async def main() -> None:
        async with agent:
            await agent.run_forever()

    asyncio.run(main())


def run_sync(args: argparse.Namespace) -> None:
    agent = SyncAgent(
        args.target, name=args.name, instance_id=args.name, type="sdk-test", max_concurrent_tasks=4
    )

    @agent.task("gate")
    def gate(ctx: SyncTaskContext) -> dict[str, Any]:
        gate_file = Path(ctx.payload["gate"])
        while not gate_file.exists() and not ctx.cancelled.is_set():
            time.sleep(0.02)
        return {"gate": gate_file.name, "pid": os.getpid()}

    @agent.task("echo")
    def echo(ctx: SyncTaskContext) -> dict[str, Any]:
        ctx.report_progress(1.0, "echoed")
        return ctx.payload

    with agent:
        agent.run_forever()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    arguments = parse()
    if arguments.sync:
        run_sync(arguments)
    else:
        run_async(arguments)
