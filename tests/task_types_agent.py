"""An SDK agent process with handlers for the task types named on its command line (none at all
with no --handles: then it declares no types, is offered every task and refuses each one, as an
older SDK or a misconfigured agent would). Every handler returns {"handled": TYPE}."""

from __future__ import annotations

import argparse
import asyncio

from orchestrator_client import Agent, TaskContext


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--handles", action="append", default=[])
    args = parser.parse_args()
    agent = Agent(args.target, name=args.name, instance_id=args.name, type="typed", max_concurrent_tasks=4)
    for task_type in args.handles:

        async def handle(ctx: TaskContext, task_type: str = task_type) -> dict[str, str]:
            return {"handled": task_type}

        agent.task(task_type)(handle)

    async def run() -> None:
        async with agent:
            await agent.run_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
