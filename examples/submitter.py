"""Submit tasks to the orchestrator and wait for their results.

    python examples/submitter.py                   # against localhost:50051, for examples/agent.py
    python examples/submitter.py --target host:port --count 5 --timeout 60

Each task carries an idempotency key, so running this again after a lost answer never creates a
second task; that is also what lets the client retry CreateTask on UNAVAILABLE. Exits non-zero
when a task does not succeed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from typing import Any

from google.protobuf import json_format

from orchestrator_client import AdminClient, OrchestratorError, v1


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default=os.environ.get("ORCHESTRATOR_TARGET", "localhost:50051"))
    parser.add_argument("--count", type=int, default=3, help="tasks of each type")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for all results")
    parser.add_argument("--batch", default=uuid.uuid4().hex[:8], help="idempotency key prefix")
    return parser.parse_args()


def work(count: int) -> list[tuple[str, dict[str, Any]]]:
    sizes = ["small", "medium", "large"]
    return [
        *[("estimate", {"hours": 10 * (n + 1), "size": sizes[n % 3]}) for n in range(count)],
        *[("checksum", {"text": f"document {n} " * 1000}) for n in range(count)],
        ("wait", {"seconds": 1.0}),
    ]


async def submit_and_wait(
    admin: AdminClient, key: str, task_type: str, payload: dict[str, Any], wait_seconds: float
) -> bool:
    task = await admin.create_task(task_type, payload, idempotency_key=key, max_attempts=3)
    done = await admin.wait_for_result(task.task_id, timeout=wait_seconds)
    status = v1.TaskStatus.Name(done.status).removeprefix("TASK_STATUS_")
    if done.status == v1.TaskStatus.TASK_STATUS_SUCCEEDED:
        print(f"{task.task_id} {task_type:<9} {status:<9} {json_format.MessageToDict(done.result)}")
        return True
    print(f"{task.task_id} {task_type:<9} {status:<9} {done.error.reason}: {done.error.message}")
    return False


async def main() -> int:
    args = parse()
    try:
        return await submit_all(args)
    except OrchestratorError as error:
        # One line, not a traceback: the usual causes are a missing key or an unreachable server.
        hint = " (set ORCHESTRATOR_API_KEY)" if error.http_status in (401, 403) else ""
        print(f"orchestrator refused: {error}{hint}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"not all tasks finished within {args.timeout}s", file=sys.stderr)
        return 3


async def submit_all(args: argparse.Namespace) -> int:
    async with AdminClient(args.target, api_key=os.environ.get("ORCHESTRATOR_API_KEY") or None) as admin:
        ready = [agent.name async for agent in admin.discover_agents(type="example")]
        print(
            f"{len(ready)} ready agent(s) of type 'example': {', '.join(ready) or 'none yet, tasks will wait'}"
        )
        jobs = [
            submit_and_wait(admin, f"{args.batch}-{n}", task_type, payload, args.timeout)
            for n, (task_type, payload) in enumerate(work(args.count))
        ]
        outcomes = await asyncio.gather(*jobs)
    return 0 if all(outcomes) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
