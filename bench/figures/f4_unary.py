"""Figure 4: unary latency of RegisterAgent, GetAgent, DiscoverAgents against echo unary.

One load-generator process makes sequential calls (one in flight): the echo call with a request and
response of the same sizes as GetAgent's, then each product method. Discovery runs over 10 READY
agents of one type (sessions held by a second process).
"""

from __future__ import annotations

from bench.figures.common import Context, target_of
from bench.report import Figure, Metric
from bench.stats import summarize
from bench.workers import Worker

KEY = "4_unary_latency"
DISCOVER_TYPE = "bench-disc"
READY_AGENTS = 10


async def run(ctx: Context) -> Figure:
    fig = Figure(KEY, "")
    sizes = ctx.sizes
    server = await ctx.start_server("f4")
    target = target_of(server)
    spec = {"target": target, "echo_target": ctx.echo_target}
    holder = Worker("f4-holder", spec).start()
    caller = Worker("f4-caller", spec).start()
    try:
        reg = await holder.call(
            "register", count=READY_AGENTS, prefix="disc", agent_type=DISCOVER_TYPE, return_creds=True
        )
        await holder.call("open_sessions", interval=1.0)
        agent_id = reg["creds"][0][0]
        n = sizes.unary_seq
        results: dict[str, list[float]] = {}
        echo = await caller.call("unary_seq", method="echo", count=n, request_bytes=48)
        results["echo"] = echo["latencies_ms"]
        async with ctx.profiled(fig, server, "unary"):
            for method, args in (
                ("register", {"prefix": "u"}),
                ("get", {"agent_id": agent_id}),
                ("discover", {"agent_type": DISCOVER_TYPE}),
            ):
                results[method] = (await caller.call("unary_seq", method=method, count=n, **args))[
                    "latencies_ms"
                ]
        echo_again = await caller.call("unary_seq", method="echo", count=n, request_bytes=48)
        results["echo"] += echo_again["latencies_ms"]
    finally:
        await holder.close()
        await caller.close()
    summaries = {k: summarize(v) for k, v in results.items()}
    fig.details |= {k: s.as_dict() for k, s in summaries.items() if s}
    echo_s = summaries["echo"]
    assert echo_s is not None
    ctx.baselines["echo unary (sequential)"] = echo_s.as_dict()
    targets = {"register": 3.0, "get": 1.5, "discover": 1.5}
    names = {"register": "RegisterAgent", "get": "GetAgent", "discover": "DiscoverAgents"}
    for method, limit in targets.items():
        s = summaries[method]
        fig.metrics.append(
            Metric.compare(
                f"{names[method]} p50", s.p50 if s else None, "ms", echo_s.p50, "echo p50", max_ratio=limit
            )
        )
        fig.metrics.append(
            Metric.compare(f"{names[method]} p99", s.p99 if s else None, "ms", echo_s.p99, "echo p99")
        )
    fig.notes.append(
        f"{sizes.unary_seq} sequential calls per method after 20 warm-up calls; echo measured before "
        f"and after the product calls (pooled); DiscoverAgents returns {READY_AGENTS} READY agents; "
        "RegisterAgent creates a new agent each call (durable commit)."
    )
    return fig
