"""Group-commit throughput: N concurrent single-task commits on a file database (synchronous=FULL).

    .venv/bin/python -m tests.store_contract.bench_commits [--commits N] [--rounds R] [--conditions]

Prints commits/s per round and the median, so the cost of conditions can be compared.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from orchestrator.v1 import event_pb2, task_pb2
from orchestrator_server.store import Change, Expect, open_store


def task_change(task_id: str, conditions: bool) -> Change:
    task = task_pb2.Task(
        task_id=task_id,
        status=task_pb2.TASK_STATUS_PENDING,
        spec=task_pb2.TaskSpec(type="job", idempotency_key=f"key-{task_id}"),
    )
    change = Change(events=[event_pb2.Event(type=event_pb2.EVENT_TYPE_TASK_CREATED, task=task)])
    if conditions:
        change.expect.append(Expect(task_id, 0))
    return change


async def one_round(path: str, commits: int, conditions: bool) -> float:
    store = open_store(path, synchronous="FULL")
    await store.open(lambda events: None)
    started = time.perf_counter()
    await asyncio.gather(*(store.commit(task_change(f"t{n}", conditions)) for n in range(commits)))
    elapsed = time.perf_counter() - started
    await store.close()
    return commits / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commits", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--conditions", action="store_true", help="each change expects its task not to exist")
    args = parser.parse_args()
    rates = []
    with tempfile.TemporaryDirectory() as directory:
        for round_number in range(args.rounds):
            rate = await one_round(
                str(Path(directory) / f"bench{round_number}.db"), args.commits, args.conditions
            )
            rates.append(rate)
            print(f"round {round_number}: {rate:,.0f} commits/s")
    print(
        f"median: {statistics.median(rates):,.0f} commits/s ({args.commits} concurrent, conditions={args.conditions})"
    )


if __name__ == "__main__":
    asyncio.run(main())
