"""Figure 5: task throughput and dispatch latency (create -> pushed to an agent -> completed).

Agents: 2 processes x 4 agents with sessions; on an assignment each sends STARTED over its session
and calls CompleteTask. Phase A (latency): one process creates tasks open-loop at a fixed rate;
dispatch = assignment received - CreateTask sent, end-to-end = CompleteTask answered - sent.
Phase B (throughput): 2 processes create closed-loop (C in flight in all) for a while; tasks/s =
tasks completed / (last completion - first create). Baseline: echo unary calls/s, same callers.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from bench.figures.common import Context, merged, merged_dicts, target_of
from bench.report import Figure, Metric
from bench.stats import summarize
from bench.workers import Pool, split

KEY = "5_task_throughput"
CAPABILITY = "bench-task"
AGENT_WORKERS = 2
AGENTS_PER_WORKER = 4
CREATORS = 2


async def wait_done(agents: Pool, keys: set[str], within: float) -> dict[str, dict[str, Any]]:
    """Poll the agents' reports until every key completed (bounded). Also returns how many times
    CompleteTask was accepted per task id and the agents' errors, summed over the workers."""
    deadline = time.perf_counter() + within
    while True:
        reports = await agents.call("task_report", clear=False)
        pushed, done = merged_dicts(reports, "pushed"), merged_dicts(reports, "done")
        if keys <= done.keys() or time.perf_counter() > deadline:
            break
        await asyncio.sleep(0.05)
    await agents.call("task_report", clear=True)
    completed: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for report in reports:
        completed.update(report["completed"])
        errors.update(report["errors"])
    return {"pushed": pushed, "done": done, "completed": dict(completed), "errors": dict(errors)}


async def run(ctx: Context) -> Figure:
    fig = Figure(KEY, "")
    sizes = ctx.sizes
    server = await ctx.start_server("f5")
    target = target_of(server)
    spec = {"target": target, "echo_target": ctx.echo_target}
    agents = Pool.start("f5-agent", AGENT_WORKERS, spec)
    creators = Pool.start("f5-creator", CREATORS, spec)
    try:
        await agents.call(
            "register", count=AGENTS_PER_WORKER, prefix="tasker", capabilities=[CAPABILITY], max_tasks=256
        )
        await agents.call("open_sessions", interval=1.0, task_mode="complete")
        task_args: dict[str, Any] = {"capabilities": [CAPABILITY]}

        # Phase A: dispatch latency at a fixed rate.
        rate = await creators.workers[0].call(
            "create_at_rate", rate=sizes.task_rate, count=sizes.task_rate_count, prefix="rate", **task_args
        )
        sent_a: dict[str, float] = rate["sent"]
        times_a = await wait_done(agents, set(sent_a), 60)
        dispatch = [(times_a["pushed"][k] - t) * 1000 for k, t in sent_a.items() if k in times_a["pushed"]]
        e2e = [(times_a["done"][k] - t) * 1000 for k, t in sent_a.items() if k in times_a["done"]]
        lost_a = len(sent_a) - len(times_a["done"])

        # Phase B: throughput, closed loop.
        per = split(sizes.closed_concurrency, CREATORS)
        assert ctx.echo is not None
        echo_before = ctx.echo.usage()
        echo = await creators.call_each(
            "unary_closed", [{"method": "echo", "concurrency": c, "seconds": sizes.closed_s} for c in per]
        )
        echo_calls = sum(r["calls"] for r in echo)
        echo_rate = echo_calls / max(r["seconds"] for r in echo)
        # CPU per unit of work holds still on a busy machine better than rates do.
        echo_cpu_ms = (ctx.echo.usage().cpu - echo_before.cpu) * 1000 / max(echo_calls, 1)
        server_before = server.usage()
        async with ctx.profiled(fig, server, "throughput"):
            made = await creators.call_each(
                "unary_closed",
                [
                    {
                        "method": "create_task",
                        "concurrency": c,
                        "seconds": sizes.closed_s,
                        "prefix": "tp",
                        **task_args,
                    }
                    for c in per
                ],
            )
            sent_b = merged_dicts(made, "sent")
            created_ok = sum(r["calls"] for r in made)
            times_b = await wait_done(agents, set(sent_b), 120)
        server_cpu_s = server.usage().cpu - server_before.cpu
        done_b = times_b["done"]
        completed = len(done_b)
        span = (max(done_b.values()) - min(sent_b.values())) if done_b else 0.0
        throughput = completed / span if span > 0 else None
        create_errors = {k: v for r in made for k, v in r["errors"].items()}
    finally:
        await agents.close()
        await creators.close()
    ctx.baselines["echo unary closed loop"] = {
        "concurrency": sizes.closed_concurrency,
        "calls_per_s": echo_rate,
    }
    d, e = summarize(dispatch), summarize(e2e)
    create_lat = summarize(merged(made, "latencies_ms"))
    fig.details |= {
        "rate_per_s": sizes.task_rate,
        "dispatch_ms": d.as_dict() if d else None,
        "create_to_complete_ms": e.as_dict() if e else None,
        "not_completed_phase_a": lost_a,
        "throughput": {
            "created": created_ok,
            "completed": completed,
            "seconds": span,
            "tasks_per_s": throughput,
            "create_latency_ms": create_lat.as_dict() if create_lat else None,
            "create_errors": create_errors,
        },
        "echo_calls_per_s": echo_rate,
        "echo_cpu_ms_per_call": echo_cpu_ms,
        "server_cpu_ms_per_task": server_cpu_s * 1000 / completed if completed else None,
    }
    fig.metrics += [
        Metric.compare(
            "tasks/s (create -> complete)", throughput, "/s", echo_rate, "echo unary calls/s", min_ratio=0.4
        ),
        Metric.compare(
            "server CPU per task",
            server_cpu_s * 1000 / completed if completed else None,
            "ms",
            echo_cpu_ms,
            "echo server CPU ms per call",
        ),
        Metric.absolute(f"dispatch p50 at {sizes.task_rate:g}/s", d.p50 if d else None, "ms"),
        Metric.absolute(f"dispatch p99 at {sizes.task_rate:g}/s", d.p99 if d else None, "ms", at_most=10),
        Metric.absolute(f"create -> complete p99 at {sizes.task_rate:g}/s", e.p99 if e else None, "ms"),
        Metric.absolute("not completed", lost_a + (len(sent_b) - completed), "tasks", equals=0),
    ]
    fig.notes.append(
        f"{AGENT_WORKERS * AGENTS_PER_WORKER} agents (capacity 256) in {AGENT_WORKERS} processes; phase A: "
        f"{sizes.task_rate_count} tasks open-loop at {sizes.task_rate:g}/s; phase B: "
        f"{sizes.closed_concurrency} CreateTask callers in {CREATORS} processes for {sizes.closed_s} s, "
        f"created {created_ok}, completed "
        f"{completed}; create errors {create_errors or 'none'}."
    )
    return fig
