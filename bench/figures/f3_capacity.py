"""Figure 3: heartbeat capacity. K concurrent sessions at 1 beat/s, then saturation ping-pong.

Sessions are held by several worker processes (a few hundred streams per channel). K grows in steps
on one server (1k, 5k, 10k): after each step one interval of warm-up, then a window in which every
ack latency is recorded and the server's CPU seconds and RSS are read from /proc. RSS per agent is
(RSS now - RSS before the first agent registered) / K. Saturation: the sessions are closed, then S
streams do beat -> ack as fast as they can; the echo service's bidi ping-pong with the same streams
and processes is the baseline.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench import proc
from bench.figures.common import Context, merged, target_of
from bench.figures.f1_detection import kill_victims
from bench.report import Figure, Metric
from bench.stats import summarize
from bench.workers import Pool, split

KEY = "3_heartbeat_capacity"
SATURATION_WORKERS = 2
SATURATED_ACK_P99_MS = 1000.0  # acks this late mean the server no longer keeps up with the beats


def _ms(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


async def saturation(ctx: Context, target: str) -> dict[str, dict[str, float | None]]:
    """Product and echo ping-pong, alternated (echo, product, echo, ...) so drift hits both alike."""
    sizes = ctx.sizes
    spec = {"target": target, "echo_target": ctx.echo_target, "streams_per_channel": 16}
    pool = Pool.start("pp", SATURATION_WORKERS, spec)
    runs: dict[str, list[dict[str, float | None]]] = {"echo": [], "product": []}
    try:
        streams = split(sizes.saturation_streams, SATURATION_WORKERS)
        order = ["echo"] + ["product", "echo"] * sizes.saturation_rounds
        for kind in order:
            args = [
                {"kind": kind, "streams": s, "seconds": sizes.saturation_s, "prefix": "sat"} for s in streams
            ]
            results = await pool.call_each("pingpong", args)
            total = sum(r["round_trips"] for r in results)
            lat = summarize(merged(results, "latencies_ms"))
            runs[kind].append(
                {
                    "per_s": total / max(r["seconds"] for r in results),
                    "p50": lat.p50 if lat else None,
                    "p99": lat.p99 if lat else None,
                }
            )
    finally:
        await pool.close()
    out: dict[str, dict[str, float | None]] = {}
    for kind, values in runs.items():
        rates = sorted(float(v["per_s"] or 0) for v in values)
        best = max(values, key=lambda v: float(v["per_s"] or 0))
        out[kind] = {
            "per_s": statistics.median(rates),
            "best_per_s": rates[-1],
            "p50": best["p50"],
            "p99": best["p99"],
        }
        out[kind]["runs"] = len(values)
    return out


async def _levels(
    ctx: Context, pool: Pool, server: proc.ManagedProcess, fig: Figure, echo: bool
) -> list[dict[str, Any]]:
    """Grow to each K, warm up one interval, then measure a window; stop growing once saturated."""
    sizes = ctx.sizes
    base = server.usage()
    levels: list[dict[str, Any]] = []
    current = saturated_at = 0
    for k in sizes.capacity_levels:
        if saturated_at:
            levels.append({"sessions": k, "not_reached": f"saturated at {saturated_at} sessions"})
            continue
        adds = split(k - current, sizes.capacity_workers)
        register_s = 0.0
        if echo:
            opened = await pool.call_each("open_echo_sessions", [{"count": a, "within": 300} for a in adds])
        else:
            regs = await pool.call_each(
                "register", [{"count": a, "prefix": f"cap{k}", "concurrency": 32} for a in adds], wait=600
            )
            register_s = max(r["seconds"] for r in regs)
            opened = await pool.call("open_sessions", interval=1.0, open_concurrency=100, within=300)
        current = k
        await pool.call("measure", seconds=1.0)  # warm-up interval: every session beats once
        before = server.usage()
        label = f"{'echo-' if echo else ''}k{k}"
        async with ctx.profiled(fig, server, label):
            results = await pool.call("measure", seconds=sizes.capacity_window_s)
        after = server.usage()
        lat = summarize(merged(results, "latencies_ms"))
        levels.append(
            {
                "sessions": k,
                "alive": sum(r["alive"] for r in results),
                "register_s": register_s,
                "open_s": max(o["seconds"] for o in opened),
                "acks": lat.count if lat else 0,
                "beats_per_s": sum(r["beats"] for r in results) / sizes.capacity_window_s,
                "ack_p50_ms": lat.p50 if lat else None,
                "ack_p99_ms": lat.p99 if lat else None,
                "ack_max_ms": lat.max if lat else None,
                "server_cpu_cores": proc.cpu_share(before, after),
                "server_rss_mb": after.rss / 2**20,
                "rss_per_agent_kb": (after.rss - base.rss) / k / 1024,
                "errors": sum(r["errors"] for r in results),
            }
        )
        if lat is None or lat.p99 > SATURATED_ACK_P99_MS or levels[-1]["alive"] < k:
            saturated_at = k  # more sessions would only pile up a backlog: stop growing
    if not echo and levels:
        await _detection_under_load(ctx, server, fig, _last_measured(levels))
    await pool.call("close_sessions", goodbye=False, wait=120)
    return levels


def _last_measured(levels: list[dict[str, Any]]) -> dict[str, Any]:
    return next(level for level in reversed(levels) if "not_reached" not in level)


async def _detection_under_load(
    ctx: Context, server: proc.ManagedProcess, fig: Figure, level: dict[str, Any]
) -> None:
    """Figure 1's SIGKILL -> DOWN at a watcher, while the level's sessions keep beating: whether
    one busy event loop still notices a dead stream at once."""
    kills = ctx.sizes.loaded_kills
    try:
        latencies, missed = await kill_victims(
            ctx, server, fig, kills, min(kills, ctx.sizes.kill_batch), "loaded"
        )
    except Exception as error:  # a saturated server may not even open the victims' sessions
        level["detection"] = {"kills": kills, "error": f"{type(error).__name__}: {str(error)[:200]}"}
        return
    summary = summarize(latencies["WatchAgents"])
    health = summarize(latencies["WatchAgentHealth"])
    level["detection"] = {
        "kills": kills,
        "missed": missed,
        "WatchAgents": summary.as_dict() if summary else None,
        "WatchAgentHealth": health.as_dict() if health else None,
    }


async def run(ctx: Context) -> Figure:
    fig = Figure(KEY, "")
    sizes = ctx.sizes
    assert ctx.echo is not None
    server = await ctx.start_server("f3", {"HEARTBEAT_TIMEOUT": "30"})
    target = target_of(server)
    spec = {"target": target, "echo_target": ctx.echo_target, "streams_per_channel": 250}
    pool = Pool.start("hb", sizes.capacity_workers, spec)
    try:
        levels = await _levels(ctx, pool, server, fig, echo=False)
        echo_levels = await _levels(ctx, pool, ctx.echo, fig, echo=True)
    finally:
        await pool.close()
    sat = await saturation(ctx, target)
    product, echo = sat["product"], sat["echo"]
    ctx.baselines["echo bidi ping-pong"] = {"streams": sizes.saturation_streams, **echo}
    ctx.baselines["echo sessions at 1 Hz"] = echo_levels
    fig.details["levels"] = levels
    fig.details["echo_levels"] = echo_levels
    fig.details["saturation"] = {"product": product, "echo": echo}
    for level, base in zip(levels, echo_levels, strict=True):
        k = int(level["sessions"])
        last = k == sizes.capacity_levels[-1]
        for key, name, unit, limit in (
            ("ack_p99_ms", "ack p99", "ms", 20.0),
            ("server_cpu_cores", "server CPU", "cores", 1.0),
            ("rss_per_agent_kb", "RSS per agent", "KB", 40.0),
        ):
            fig.metrics.append(
                Metric.absolute(
                    f"{k} sessions: {name}",
                    level.get(key),
                    unit,
                    at_most=limit if last else None,
                    baseline=base.get(key),
                    baseline_name=f"echo, {k} streams",
                )
            )
    for level in levels:
        if "detection" in level:
            detection = level["detection"]
            k = level["sessions"]
            if "error" in detection:
                fig.notes.append(f"detection while {k} sessions beat: not measured, {detection['error']}")
            for stream in ("WatchAgents", "WatchAgentHealth"):
                p99 = detection[stream]["p99"] if detection.get(stream) else None
                fig.metrics.append(
                    Metric.absolute(
                        f"SIGKILL -> DOWN at a {stream} watcher while {k} sessions beat: p99",
                        p99,
                        "ms",
                        at_most=25,
                    )
                )
            fig.metrics.append(
                Metric.absolute(
                    f"DOWN not seen within 5 s while {k} sessions beat",
                    detection.get("missed"),
                    "events",
                    equals=0,
                )
            )
            if detection.get("WatchAgents"):
                fig.notes.append(
                    f"detection while {k} sessions beat: {detection['kills']} SIGKILLs of one-agent processes "
                    f"(as figure 1), WatchAgents p50 {_ms(detection['WatchAgents']['p50'])}"
                )
    fig.metrics.append(
        Metric.compare(
            "saturation beats/s", product["per_s"], "/s", echo["per_s"], "echo round trips/s", min_ratio=0.7
        )
    )
    for name, rows in (("product", levels), ("echo", echo_levels)):
        for level in rows:
            if "not_reached" in level:
                fig.notes.append(f"{name} K={level['sessions']}: not measured, {level['not_reached']}")
                continue
            fig.notes.append(
                f"{name} K={level['sessions']}: {level['alive']} alive, {level['beats_per_s']:.0f} beats/s, "
                f"ack p50 {_ms(level['ack_p50_ms'])}, max {_ms(level['ack_max_ms'])}, errors {level['errors']}, "
                f"registered in {level['register_s']:.1f} s, streams opened in {level['open_s']:.1f} s, "
                f"server RSS {level['server_rss_mb']:.0f} MB"
            )
    fig.notes.append(
        f"saturation: {sizes.saturation_streams} streams in {SATURATION_WORKERS} processes, "
        f"{sizes.saturation_s} s per run, echo and product alternated, median of the runs; "
        f"ack p99 product {_ms(product['p99'])} vs echo {_ms(echo['p99'])}"
    )
    return fig
