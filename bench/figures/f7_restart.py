"""Figure 7: restart with A agents and T tasks in the store; time to serving and to re-attached.

A agents register and hold sessions at the default 10 s interval (in several processes, reconnecting
like the SDK: the server's retry_after, then exponential backoff with full jitter); T tasks are
created that no agent can take (so they stay PENDING in the store); the tasks are created before the agents register. The server is stopped with SIGTERM (drain) and started again
on the same ports and database. Serving = ready file written - process spawned (also shown: when a
polling client first got an answer); re-attached = the last agent's new welcome - process spawned.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from bench.client import CHANNEL_OPTIONS, Stubs, channel
from bench.figures.common import Context, target_of
from bench.report import Figure, Metric
from bench.stats import summarize
from bench.workers import Pool, split
from orchestrator.v1 import health_pb2

KEY = "7_restart"
WORKERS = 4
REATTACH_TIMEOUT_S = 120.0
# The product's default beat interval (10 s): figure 3 measures 1 Hz; here the agents only need to be live.
BEAT_INTERVAL_S = 10.0
SERVER_ENV = {"HEARTBEAT_INTERVAL": "10", "HEARTBEAT_TIMEOUT": "30"}


async def _first_answer(target: str, within: float) -> float | None:
    """When the restarted server first answers an RPC (a client with 20 ms reconnect backoff polls)."""
    options = [
        *CHANNEL_OPTIONS,
        ("grpc.initial_reconnect_backoff_ms", 20),
        ("grpc.min_reconnect_backoff_ms", 20),
        ("grpc.max_reconnect_backoff_ms", 100),
    ]
    deadline = time.perf_counter() + within
    async with grpc.aio.insecure_channel(target, options=options) as ch:
        health = Stubs.of(ch).health
        while time.perf_counter() < deadline:
            try:
                await health.GetSystemHealth(
                    health_pb2.GetSystemHealthRequest(), timeout=2, wait_for_ready=True
                )
                return time.perf_counter()
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.01)  # refused before the port is bound: poll again, bounded
    return None


async def run(ctx: Context) -> Figure:
    fig = Figure(KEY, "")
    sizes = ctx.sizes
    a, t = sizes.restart_agents, sizes.restart_tasks
    first = await ctx.start_server("f7", SERVER_ENV)
    target = target_of(first)
    ports = {"GRPC_PORT": str(first.info["grpc_port"]), "PORT": str(first.info.get("http_port") or 0)}
    pool = Pool.start("f7-", WORKERS, {"target": target, "streams_per_channel": 250})
    try:
        # Tasks first: with no agent yet, each CreateTask's placement pass has nothing to scan.
        t0 = time.perf_counter()
        made = await pool.call_each(
            "unary_closed",
            [
                {
                    "method": "create_task",
                    "concurrency": 16,
                    "seconds": 1800,
                    "count": n,
                    "prefix": "pending",
                    "capabilities": ["bench-nobody"],
                }
                for n in split(t, WORKERS)
            ],
            wait=2000,
        )
        fill_tasks_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        await pool.call_each(
            "register",
            [{"count": n, "prefix": "restart", "concurrency": 32} for n in split(a, WORKERS)],
            wait=900,
        )
        opened = await pool.call("open_sessions", interval=BEAT_INTERVAL_S, reconnect=True, within=300)
        fill_agents_s = time.perf_counter() - t0
        created = sum(r["calls"] for r in made)
        t_stop = time.perf_counter()
        await first.stop(grace=60)
        stop_s = time.perf_counter() - t_stop
        launched = time.perf_counter()
        probe = asyncio.create_task(_first_answer(target, REATTACH_TIMEOUT_S))
        second = await ctx.start_server("f7", {**SERVER_ENV, **ports})
        serving_s = second.ready_at - second.started_at
        answered_at = await probe
        first_answer_s = answered_at - launched if answered_at is not None else None
        async with ctx.profiled(fig, second, "reattach"):
            seen = await pool.call("wait_welcomes", since=second.started_at, within=REATTACH_TIMEOUT_S)
        welcomes = [w for r in seen for w in r["welcomes"].values()]
        reattached = len(welcomes)
        ch = channel(target)
        try:
            health = await Stubs.of(ch).health.GetSystemHealth(
                health_pb2.GetSystemHealthRequest(), timeout=30
            )
        finally:
            await ch.close(None)
    finally:
        await pool.close()
    rel = [(w - second.started_at) for w in welcomes]
    s = summarize(rel)
    all_s = max(rel) if reattached == a and rel else None
    fig.details |= {
        "agents": a,
        "tasks_created": created,
        "sessions_opened_before": sum(o["opened"] for o in opened),
        "fill_agents_s": fill_agents_s,
        "fill_tasks_s": fill_tasks_s,
        "tasks_per_s_while_filling": created / fill_tasks_s if fill_tasks_s else None,
        "stop_s": stop_s,
        "serving_s": serving_s,
        "first_answer_s": first_answer_s,
        "reattached": reattached,
        "reattach_s": s.as_dict() if s else None,
        "after_restart": {
            "total_agents": health.total_agents,
            "pending_tasks": health.pending_tasks,
            "store_status": health.store_status,
        },
    }
    fig.metrics += [
        Metric.absolute(f"serving after start ({a} agents, {created} tasks)", serving_s, "s", at_most=2),
        Metric.absolute("first RPC answered after start", first_answer_s, "s"),
        Metric.absolute("all agents re-attached after start", all_s, "s", at_most=15),
        Metric.absolute("re-attach p50", s.p50 if s else None, "s"),
        Metric.absolute("agents not re-attached", a - reattached, "agents", equals=0),
        Metric.absolute(
            "tasks missing after restart", max(0, created - health.pending_tasks), "tasks", equals=0
        ),
    ]
    fig.notes.append(
        f"store filled in {fill_agents_s:.1f} s (agents + sessions) and {fill_tasks_s:.1f} s (tasks); "
        f"graceful stop took {stop_s:.1f} s; after restart GetSystemHealth says "
        f"{health.total_agents} agents, "
        f"{health.pending_tasks} pending tasks, store {health.store_status!r}."
    )
    return fig
