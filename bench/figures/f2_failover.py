"""Figure 2: SIGKILL an agent holding N running tasks -> all N placed on another agent.

Per round: a victim process (one agent, capacity N) takes N tasks and reports them STARTED; only then
does a survivor process register (so nothing is placed on it before). The victim is SIGKILLed; the
survivor stamps each assignment it receives and completes it. FAILOVER_GRACE=0, so "after the grace"
is "after the kill". Afterwards every task is read back: lost = not SUCCEEDED, double-completed =
more than one successful attempt or more than one accepted CompleteTask.
"""

from __future__ import annotations

import asyncio
import time

from bench.client import Stubs, channel
from bench.figures.common import Context, target_of
from bench.report import Figure, Metric
from bench.stats import summarize
from bench.workers import Worker
from orchestrator.v1 import task_pb2, tasks_pb2

KEY = "2_failover"
CAPABILITY = "bench-failover"


async def _wait_running(stubs: Stubs, agent_id: str, count: int, within: float) -> int:
    """Poll ListTasks until ``count`` tasks run on the agent (bounded)."""
    deadline = time.perf_counter() + within
    running = 0
    while time.perf_counter() < deadline:
        req = tasks_pb2.ListTasksRequest(
            status=task_pb2.TASK_STATUS_RUNNING, agent_id=agent_id, page_size=1000
        )
        running = len((await stubs.tasks.ListTasks(req, timeout=10)).tasks)
        if running >= count:
            break
        await asyncio.sleep(0.05)
    return running


async def run(ctx: Context) -> Figure:
    fig = Figure(KEY, "")
    sizes = ctx.sizes
    n = sizes.failover_tasks
    server = await ctx.start_server("f2", {"FAILOVER_GRACE": "0"})
    target = target_of(server)
    ch = channel(target)
    stubs = Stubs.of(ch)
    latencies: list[float] = []
    all_placed: list[float] = []
    lost = double = 0
    try:
        for rnd in range(sizes.failover_rounds):
            spec = {"target": target, "max_lifetime": 300}
            victim = Worker(f"fo-victim{rnd}", spec).start()
            survivor = Worker(f"fo-survivor{rnd}", spec).start()
            try:
                reg = await victim.call(
                    "register",
                    count=1,
                    prefix=f"fo-victim{rnd}",
                    capabilities=[CAPABILITY],
                    max_tasks=n,
                    return_creds=True,
                )
                victim_id = reg["creds"][0][0]
                await victim.call("open_sessions", interval=1.0, task_mode="hold")
                created = await survivor.call(
                    "unary_closed",
                    method="create_task",
                    concurrency=20,
                    seconds=60,
                    count=n,
                    capabilities=[CAPABILITY],
                    prefix=f"fo{rnd}",
                    max_attempts=5,
                )
                if created["calls"] != n:
                    raise RuntimeError(f"CreateTask: {created['errors']}")
                held = await victim.call("wait_assignments", count=n, within=30)
                if len(held["pushed"]) != n:
                    raise RuntimeError(f"victim got {len(held['pushed'])}/{n} tasks")
                running = await _wait_running(stubs, victim_id, n, 30)
                if running != n:
                    raise RuntimeError(f"{running}/{n} tasks RUNNING on the victim")
                await survivor.call(
                    "register", count=1, prefix=f"fo-survivor{rnd}", capabilities=[CAPABILITY], max_tasks=n
                )
                await survivor.call("open_sessions", interval=1.0, task_mode="complete")
                async with ctx.profiled(fig, server, f"round{rnd}"):
                    t_kill = time.perf_counter()
                    victim.kill()
                    report = await survivor.call("wait_assignments", count=n, within=30)
                pushed = [(t - t_kill) * 1000 for t in report["pushed"].values()]
                latencies.extend(pushed)
                if pushed:
                    all_placed.append(max(pushed))
                task_ids = list(held["task_keys"])
                for task_id in task_ids:
                    task = (
                        await stubs.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id), timeout=10)
                    ).task
                    succeeded = sum(1 for a in task.attempts if a.status == task_pb2.ATTEMPT_STATUS_SUCCEEDED)
                    if task.status != task_pb2.TASK_STATUS_SUCCEEDED:
                        lost += 1
                    if succeeded > 1 or report["completed"].get(task_id, 0) > 1:
                        double += 1
            finally:
                await asyncio.gather(victim.close(), survivor.close())
    finally:
        await ch.close(None)
    s = summarize(latencies)
    fig.details["per_task_ms"] = s.as_dict() if s else None
    fig.details["all_placed_ms"] = all_placed
    fig.metrics += [
        Metric.absolute("re-placed p50", s.p50 if s else None, "ms"),
        Metric.absolute("re-placed p99", s.p99 if s else None, "ms", at_most=100),
        Metric.absolute("all N re-placed (worst round)", max(all_placed) if all_placed else None, "ms"),
        Metric.absolute("lost", lost, "tasks", equals=0),
        Metric.absolute("double-completed", double, "tasks", equals=0),
    ]
    fig.notes.append(
        f"{sizes.failover_rounds} round(s) of N={n} RUNNING tasks on a SIGKILLed agent, FAILOVER_GRACE=0; "
        "latency = kill -> assignment received by the surviving agent (another process)."
    )
    return fig
