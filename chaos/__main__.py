"""`python -m chaos`: SIGKILL the orchestrator at random moments under SDK agents and a steady task
submitter, restart it on the same database each time, let everything settle, then count.

Exit status 1 when a task was lost, left unfinished, created twice for one idempotency key or
completed twice; re-runs (at-least-once delivery) are counted but allowed. docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from chaos.agent import TASK_TYPE
from chaos.processes import Server, start_agent, stop_process
from orchestrator_client import TERMINAL_TASK_STATUSES, AdminClient, ConnectionOptions, OrchestratorError, v1

TERMINAL = TERMINAL_TASK_STATUSES


@dataclass
class Submitted:
    """Every idempotency key sent, and the task ids the server acknowledged for it."""

    keys: list[str] = field(default_factory=list)
    acknowledged: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    @property
    def task_ids(self) -> set[str]:
        return {task_id for ids in self.acknowledged.values() for task_id in ids}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument("--kills", type=int, default=int(os.environ.get("CHAOS_KILLS", "20")))
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--rate", type=float, default=10.0, help="tasks submitted per second")
    parser.add_argument("--up", type=float, nargs=2, default=(1.0, 4.0), help="seconds between kills")
    parser.add_argument("--settle", type=float, default=60.0, help="seconds allowed to settle after")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given")
    return parser.parse_args()


async def submit(target: str, submitted: Submitted, rate: float, stop: asyncio.Event) -> None:
    """Creates `chaos` tasks at `rate` per second, each with its own idempotency key, retrying a key
    until the server acknowledges it: a create the server committed is never sent under a new key."""
    run = f"{int(time.time())}-{os.getpid()}"
    # A short core reconnect backoff: the submitter stays steady across restarts one to four
    # seconds apart instead of idling in the default 5 s backoff.
    connection = ConnectionOptions(max_reconnect_backoff=0.5)
    async with AdminClient(target, timeout=15.0, connection=connection) as admin:
        number = 0
        while not stop.is_set():
            key = f"chaos-{run}-{number}"
            submitted.keys.append(key)
            while True:
                try:
                    task = await admin.create_task(
                        TASK_TYPE,
                        {"n": number, "sleep": random.uniform(0.0, 0.5)},
                        idempotency_key=key,
                        max_attempts=10,
                    )
                except (OrchestratorError, grpc.RpcError):
                    await asyncio.sleep(0.2)  # the server is down longer than the client's retries
                    continue
                submitted.acknowledged[key].add(task.task_id)
                break
            number += 1
            await asyncio.sleep(1.0 / rate)


async def statuses(target: str, task_ids: set[str]) -> dict[str, v1.Task]:
    """The server's view of every task of the run (absent: the server does not know it)."""
    found: dict[str, v1.Task] = {}
    async with AdminClient(target, timeout=30.0) as admin:
        async for task in admin.list_tasks(type=TASK_TYPE, page_size=500):
            if task.task_id in task_ids:
                found[task.task_id] = task
    return found


async def settle(target: str, task_ids: set[str], within: float) -> dict[str, v1.Task]:
    deadline = time.monotonic() + within
    while True:
        found = await statuses(target, task_ids)
        done = all(task_id in found and found[task_id].status in TERMINAL for task_id in task_ids)
        if done or time.monotonic() > deadline:
            return found
        await asyncio.sleep(1.0)


def agent_records(workdir: Path) -> tuple[dict[str, set[str]], dict[str, int], dict[str, set[str]]]:
    """Per task id, from every agent's log: attempts run, handler runs, attempts accepted."""
    runs: dict[str, set[str]] = defaultdict(set)
    run_count: dict[str, int] = defaultdict(int)
    accepted: dict[str, set[str]] = defaultdict(set)
    for path in workdir.glob("agent-*.jsonl"):
        for line in path.read_text().splitlines():
            if not line.endswith("}"):
                continue  # a line cut short by the agent's own exit
            record = json.loads(line)
            if record["event"] == "run":
                runs[record["task_id"]].add(record["attempt_id"])
                run_count[record["task_id"]] += 1
            elif record["event"] == "accepted":
                accepted[record["task_id"]].add(record["attempt_id"])
    return runs, run_count, accepted


def errors_logged(paths: Iterable[Path]) -> int:
    return sum(path.read_text(errors="replace").count(" ERROR ") for path in paths if path.exists())


def report(submitted: Submitted, found: dict[str, v1.Task], workdir: Path, kills: int) -> dict[str, int]:
    task_ids = submitted.task_ids
    _, run_count, accepted = agent_records(workdir)
    succeeded_attempts = {
        task_id: sum(
            1 for attempt in task.attempts if attempt.status == v1.AttemptStatus.ATTEMPT_STATUS_SUCCEEDED
        )
        for task_id, task in found.items()
    }
    return {
        "kills": kills,
        "created": len(task_ids),
        "unacknowledged": sum(1 for key in submitted.keys if not submitted.acknowledged.get(key)),
        "duplicate_creates": sum(1 for ids in submitted.acknowledged.values() if len(ids) > 1),
        "lost": sum(1 for task_id in task_ids if task_id not in found),
        "not_terminal": sum(1 for task in found.values() if task.status not in TERMINAL),
        "succeeded": sum(1 for task in found.values() if task.status == v1.TaskStatus.TASK_STATUS_SUCCEEDED),
        "failed": sum(1 for task in found.values() if task.status == v1.TaskStatus.TASK_STATUS_FAILED),
        "double_completed": sum(
            1
            for task_id in task_ids
            if len(accepted.get(task_id, ())) > 1 or succeeded_attempts.get(task_id, 0) > 1
        ),
        "re_run": sum(1 for task_id in task_ids if run_count.get(task_id, 0) > 1),
        "handler_runs": sum(run_count[task_id] for task_id in task_ids if task_id in run_count),
        # Informational: what the processes logged at ERROR while this happened to them.
        "errors_logged_agents": errors_logged(workdir.glob("agent-*.log")),
        "errors_logged_server": errors_logged([workdir / "server.log"]),
    }


FAILING = ("lost", "not_terminal", "double_completed", "duplicate_creates", "unacknowledged")


async def chaos(args: argparse.Namespace, workdir: Path) -> dict[str, int]:
    rng = random.Random(args.seed)
    server = Server(workdir, {"FAILOVER_GRACE": "5", "HEARTBEAT_INTERVAL": "1", "HEARTBEAT_TIMEOUT": "10"})
    await server.start()
    agents = [start_agent(server.target, f"agent-{index}", workdir) for index in range(args.agents)]
    submitted = Submitted()
    stop = asyncio.Event()
    submitter = asyncio.create_task(submit(server.target, submitted, args.rate, stop))
    try:
        for kill in range(1, args.kills + 1):
            await asyncio.sleep(rng.uniform(*args.up))
            if submitter.done():
                submitter.result()  # the submitter failed: say why
            server.kill()
            print(
                f"kill {kill}/{args.kills}: {len(submitted.task_ids)} tasks acknowledged so far", flush=True
            )
            await server.start()
        await asyncio.sleep(rng.uniform(*args.up))
        stop.set()
        await asyncio.wait_for(submitter, 120)
        found = await settle(server.target, submitted.task_ids, args.settle)
        return report(submitted, found, workdir, args.kills)
    finally:
        submitter.cancel()
        for agent in agents:
            stop_process(agent)
        server.stop()


def main() -> int:
    args = parse()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        counts = asyncio.run(chaos(args, args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="chaos-") as directory:
            counts = asyncio.run(chaos(args, Path(directory)))
    width = max(len(name) for name in counts)
    for name, value in counts.items():
        print(f"{name:<{width}}  {value}")
    bad = [name for name in FAILING if counts[name]]
    print("chaos: FAILED (" + ", ".join(bad) + ")" if bad else "chaos: OK", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
