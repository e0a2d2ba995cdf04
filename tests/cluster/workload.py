"""What the multi-replica tests put on the replicas of tests/cluster/replicas.py (the harness that
starts them): raw agents attached through a list of replicas, a stream of task creates that survives
a replica's death, and readers of the database's event log (the cluster's truth).

Agents reach "any replica" the way a client behind a DNS name with several A records does: a gRPC
target listing several addresses (`ipv4:a,b,c`, pick_first), so they attach to the first one that
answers and move on when it dies.
"""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from orchestrator.v1 import event_pb2, task_pb2, tasks_pb2
from tests.conftest import ROOT, ServerProcess, Stubs

# Short liveness settings so a dead replica's agents are noticed in seconds; a failover grace long
# enough that agents re-attaching elsewhere keep their running attempts (nothing is re-placed twice).
# REPLICA_TTL at its default (5 s): at 2 s a replica on this busy 2-core machine misses a renewal
# now and then and rightly stops serving sessions, which is not what these tests are about.
REPLICA_ENV = {
    "REPLICA_TTL": "5",
    "HEARTBEAT_TIMEOUT": "3",
    "HEARTBEAT_INTERVAL": "0.5",
    "FAILOVER_GRACE": "10",
}
SUCCEEDED = task_pb2.TASK_STATUS_SUCCEEDED


def target(*servers: ServerProcess) -> str:
    """One gRPC target over the replicas, first choice first."""
    return "ipv4:" + ",".join(f"127.0.0.1:{server.grpc_port}" for server in servers)


def alive(server: ServerProcess) -> bool:
    return server.process is not None and server.process.poll() is None


class Clients:
    """One channel per replica, opened on first use and closed by `close` (a killed replica's
    channel stays open until then: closing it would cancel the calls in flight, which must instead
    fail as a client of a dead replica sees them fail)."""

    def __init__(self) -> None:
        self._channels: dict[int, grpc.aio.Channel] = {}

    def __call__(self, server: ServerProcess) -> Stubs:
        key = id(server)
        if key not in self._channels:
            self._channels[key] = grpc.aio.insecure_channel(server.target)
        return Stubs(self._channels[key])

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


class AgentGroup:
    """`count` raw agents (tests/agent_process.py's Agent) in one OS process, events per agent."""

    def __init__(self, workdir: Path, target: str, prefix: str, count: int, *args: str) -> None:
        self.directory = workdir / f"agents-{prefix}"
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "tests.cluster.agents", "--target", target, "--prefix", prefix,
            "--count", str(count), "--events-dir", str(self.directory), *args,
        ]  # fmt: skip
        self.count = count
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(self.directory / "stderr.log", "wb"),  # noqa: SIM115 (kept open for the child)
        )

    def records(self) -> dict[str, list[dict[str, Any]]]:
        """Every agent's JSON-lines records, by agent name."""
        out: dict[str, list[dict[str, Any]]] = {}
        for path in sorted(self.directory.glob("*.jsonl")):
            lines = path.read_text().splitlines()
            out[path.stem] = [json.loads(line) for line in lines if line.endswith("}")]
        return out

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for records in self.records().values() for r in records if r["event"] == kind]

    def welcomed_since(self, since: float) -> dict[str, float]:
        """Each agent's first welcome at or after `since` (wall clock), by agent name."""
        out: dict[str, float] = {}
        for name, records in self.records().items():
            times = [r["time"] for r in records if r["event"] == "welcome" and r["time"] >= since]
            if times:
                out[name] = min(times)
        return out

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


async def event_log(database_url: str, after: int = 0) -> list[event_pb2.Event]:
    """The cluster's event log as committed, in revision order."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT data FROM events WHERE revision > $1 ORDER BY revision", after)
    finally:
        await conn.close()
    return [event_pb2.Event.FromString(row["data"]) for row in rows]


def completions(events: Iterable[event_pb2.Event]) -> collections.Counter[str]:
    """How many times each task entered SUCCEEDED in the log (2 would be a double completion)."""
    counts: collections.Counter[str] = collections.Counter()
    last: dict[str, int] = {}
    for event in events:
        if event.HasField("task"):
            task = event.task
            if task.status == SUCCEEDED and last.get(task.task_id) != SUCCEEDED:
                counts[task.task_id] += 1
            last[task.task_id] = task.status
    return counts


async def lease_holders(database_url: str) -> dict[str, str]:
    """The leases table (name -> holder) as it is now; empty before the cluster work creates any."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT name, holder FROM leases WHERE expires_at > extract(epoch FROM now())"
        )
    finally:
        await conn.close()
    return {row["name"]: row["holder"] for row in rows}


class CreateStream:
    """Creates `count` tasks at `rate`/s, each under its own idempotency key, sending them to the
    live replicas in turn. A create that fails (its replica died, or the database is away) is
    retried on the next live replica with the same key until it is acknowledged, so an answer lost
    with a replica can never make a second task, and every acknowledged key must complete once."""

    def __init__(
        self, servers: list[ServerProcess], clients: Clients, count: int, rate: float, prefix: str = "k"
    ) -> None:
        self.servers = servers
        self.clients = clients
        self.count = count
        self.rate = rate
        self.prefix = prefix
        self.acknowledged: dict[str, str] = {}  # idempotency key -> task id
        self.retries: collections.Counter[str] = collections.Counter()  # by status code
        self.sent = 0

    def live(self) -> list[ServerProcess]:
        return [server for server in self.servers if alive(server)]

    async def _create(self, index: int, within: float) -> None:
        key = f"{self.prefix}-{index}"
        request = tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="job", idempotency_key=key))
        deadline = time.monotonic() + within
        turn = index
        while time.monotonic() < deadline:
            live = self.live()
            replica = live[turn % len(live)]
            turn += 1
            try:
                created = await self.clients(replica).tasks.CreateTask(request, timeout=5)
            except grpc.aio.AioRpcError as error:
                self.retries[error.code().name] += 1
                await asyncio.sleep(0.1)
                continue
            self.acknowledged[key] = created.task.task_id
            return

    async def run(self, within: float = 60.0) -> None:
        started = time.monotonic()
        creates = []
        for index in range(self.count):
            await asyncio.sleep(max(0.0, started + index / self.rate - time.monotonic()))
            self.sent += 1
            creates.append(asyncio.create_task(self._create(index, within)))
        await asyncio.gather(*creates)
