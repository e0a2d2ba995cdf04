"""Gateway overhead per request: REST `GET /agents/list` and `POST /agents/heartbeat` against gRPC.

    .venv/bin/python -m tests.gateway.measure_overhead [--requests 2000] [--agents 10]

Starts `python -m orchestrator_server serve` (gRPC and the in-process gateway, one event loop) on
loopback with ephemeral ports, and, for comparison, the gateway as its own process in front of that
server. The client runs in this process: sequential calls (latency) and 32 in flight (throughput).
Numbers from these shared machines are noisy: compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc

from orchestrator.v1 import registry_pb2, registry_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
CONCURRENCY = 32


def _wait_ready(path: Path, process: subprocess.Popen[bytes]) -> dict[str, int]:
    deadline = time.monotonic() + 30
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"process did not become ready (exit code {process.poll()})")
        time.sleep(0.02)
    ready: dict[str, int] = json.loads(path.read_text())
    return ready


async def _sequential(call: Callable[[], Awaitable[None]], count: int) -> list[float]:
    for _ in range(min(200, count)):  # warm-up: connections, caches
        await call()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


async def _throughput(call: Callable[[], Awaitable[None]], count: int) -> float:
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return count / (time.perf_counter() - started)


def _row(name: str, samples: list[float], rate: float) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[int(len(ordered) * 0.99) - 1] * 1000
    return f"| {name} | {p50:.2f} | {p99:.2f} | {rate:,.0f} |"


async def _measure(grpc_target: str, http_ports: dict[str, int], requests: int, agents: int) -> list[str]:
    channel = grpc.aio.insecure_channel(grpc_target)
    registry = registry_pb2_grpc.RegistryServiceStub(channel)
    for index in range(agents):
        registered = await registry.RegisterAgent(
            registry_pb2.RegisterAgentRequest(name=f"bench-{index}", instance_id="1", type="bench")
        )
    agent_id, token = registered.agent.agent_id, registered.agent_token
    credential = [("authorization", f"Bearer {token}")]

    async def grpc_list() -> None:
        await registry.ListAgents(registry_pb2.ListAgentsRequest())

    async def grpc_beat() -> None:
        await registry.SendHeartbeat(
            registry_pb2.SendHeartbeatRequest(agent_id=agent_id), metadata=credential
        )

    rows = []
    for name, call in (("gRPC ListAgents (direct)", grpc_list), ("gRPC SendHeartbeat (direct)", grpc_beat)):
        rows.append(_row(name, await _sequential(call, requests), await _throughput(call, requests)))
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        for where, port in http_ports.items():
            base = f"http://127.0.0.1:{port}"

            async def rest_list(base: str = base) -> None:
                async with session.get(f"{base}/agents/list") as response:
                    await response.read()
                    assert response.status == 200

            async def rest_beat(base: str = base) -> None:
                headers = {"authorization": f"Bearer {token}"}
                async with session.post(
                    f"{base}/agents/heartbeat", json={"agent_id": agent_id}, headers=headers
                ) as r:
                    await r.read()
                    assert r.status == 200

            for name, call in ((f"REST GET /agents/list ({where})", rest_list),
                               (f"REST POST /agents/heartbeat ({where})", rest_beat)):  # fmt: skip
                rows.append(_row(name, await _sequential(call, requests), await _throughput(call, requests)))
    await channel.close(grace=None)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--agents", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        env = {
            **os.environ,
            "GRPC_PORT": "0",
            "PORT": "0",
            "BIND_HOST": "127.0.0.1",
            "DATABASE_PATH": str(workdir / "bench.db"),
            "LOG_LEVEL": "WARNING",
            "ORCHESTRATOR_READY_FILE": str(workdir / "server.json"),
        }
        server = subprocess.Popen([sys.executable, "-m", "orchestrator_server", "serve"], env=env, cwd=ROOT)
        gateway: subprocess.Popen[bytes] | None = None
        try:
            ready = _wait_ready(workdir / "server.json", server)
            target = f"127.0.0.1:{ready['grpc_port']}"
            gateway = subprocess.Popen(
                [sys.executable, "-m", "orchestrator_server.gateway", "--grpc-target", target, "--host", "127.0.0.1",
                 "--port", "0", "--ready-file", str(workdir / "gateway.json")],
                env={**os.environ, "LOG_LEVEL": "WARNING"},
                cwd=ROOT,
            )  # fmt: skip
            separate = _wait_ready(workdir / "gateway.json", gateway)
            ports = {
                "gateway in the server process": ready["http_port"],
                "gateway as its own process": separate["http_port"],
            }
            rows = asyncio.run(_measure(target, ports, args.requests, args.agents))
        finally:
            for process in (gateway, server):
                if process is not None:
                    process.terminate()
                    process.wait(15)
    print(
        f"{args.requests} sequential calls, then {args.requests} with {CONCURRENCY} in flight; {args.agents} agents"
    )
    print("| path | p50 ms | p99 ms | calls/s (32 in flight) |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
