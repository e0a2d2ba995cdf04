"""Baseline (b): what the original design gives. FastAPI + uvicorn (one worker, uvloop, httptools).

``POST /agents/heartbeat`` and ``GET /agents/list`` of the original document on an in-memory dict,
with the same bearer-token check the product applies to an agent's heartbeat.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel

from bench.util import run, write_ready_file

AGENTS: dict[str, dict[str, Any]] = {}
TOKENS: dict[str, str] = {}
HEARTBEAT_TIMEOUT_S = 60.0


class Load(BaseModel):
    active_tasks: int = 0
    cpu: float = 0.0
    memory: float = 0.0


class HeartbeatRequest(BaseModel):
    agent_id: str
    load: Load | None = None


app = FastAPI()


@app.post("/agents/heartbeat")
async def heartbeat(body: HeartbeatRequest, authorization: str = Header(default="")) -> dict[str, Any]:
    agent = AGENTS.get(body.agent_id)
    if agent is None:
        raise HTTPException(status_code=404, detail="agent not found")
    if authorization != f"Bearer {TOKENS[body.agent_id]}":
        raise HTTPException(status_code=401, detail="bad credential")
    now = time.time()
    agent["last_heartbeat"] = now
    agent["status"] = "READY"
    if body.load is not None:
        agent["load"] = body.load.model_dump()
    return {"status": "READY", "lease_expires_at": now + HEARTBEAT_TIMEOUT_S, "heartbeat_interval": 10}


@app.get("/agents/list")
async def list_agents() -> dict[str, Any]:
    return {"agents": list(AGENTS.values())[:100]}


def seed(count: int) -> None:
    now = time.time()
    for i in range(count):
        agent_id = f"agent-{i:05d}"
        TOKENS[agent_id] = f"token-{i:05d}"
        AGENTS[agent_id] = {
            "agent_id": agent_id,
            "name": "bench-rest",
            "instance_id": f"i-{i:05d}",
            "type": "bench-rest",
            "version": "1.0.0",
            "capabilities": ["cpu"],
            "labels": {"region": "eu"},
            "endpoints": [{"name": "api", "address": f"127.0.0.1:{9000 + i}", "protocol": "HTTP"}],
            "max_concurrent_tasks": 4,
            "status": "READY",
            "registered_at": now,
            "last_heartbeat": now,
            "load": {"active_tasks": 0, "cpu": 0.0, "memory": 0.0},
        }


async def _serve(agents: int) -> None:
    seed(agents)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", access_log=False, loop="none", http="httptools")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(2000):  # bounded: uvicorn sets `started` within milliseconds
        if server.started or serving.done():
            break
        await asyncio.sleep(0.005)
    if not server.started:
        raise SystemExit("uvicorn did not start")
    write_ready_file(
        {
            "http_port": sock.getsockname()[1],
            "pid": os.getpid(),
            "agent_id": "agent-00000",
            "token": TOKENS["agent-00000"],
        }
    )
    await serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=100)
    args = parser.parse_args()
    run(_serve(args.agents))


if __name__ == "__main__":
    main()
