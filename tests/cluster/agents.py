"""`python -m tests.cluster.agents`: many raw agents (tests/agent_process.py's Agent) in one OS
process, so a test can hold 20 sessions without starting 20 interpreters on a busy machine.

Agent i is named `<prefix>-<i>` and writes its records to `<events-dir>/<prefix>-<i>.jsonl`.
Every agent reconnects when its session ends (to the next address of --target that answers).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from tests.agent_process import Agent


def agent_args(args: argparse.Namespace, index: int) -> argparse.Namespace:
    name = f"{args.prefix}-{index}"
    return argparse.Namespace(
        target=args.target,
        name=name,
        events=str(Path(args.events_dir) / f"{name}.jsonl"),
        type=args.type,
        capability=args.capability,
        label=[],
        capacity=args.capacity,
        interval=args.interval,
        work=args.work,
        reconnect=True,
        reconnect_delay=0.1,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--events-dir", required=True)
    parser.add_argument("--type", default="worker")
    parser.add_argument("--capability", action="append", default=[])
    parser.add_argument("--capacity", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--work", type=float, default=0.0, help="seconds each task takes")
    args = parser.parse_args()

    async def run() -> None:
        # The channels must be created inside the running loop.
        agents = [Agent(agent_args(args, index)) for index in range(args.count)]
        await asyncio.gather(*(agent.run() for agent in agents))

    asyncio.run(run())


if __name__ == "__main__":
    main()
