"""Figure 6: REST gateway against the FastAPI baseline, driven by wrk.

Both servers hold 100 agents. ``POST /agents/heartbeat`` carries an agent's bearer token (the
gateway's is issued by RegisterAgent); ``GET /agents/list`` returns one page of 100. The runs
alternate baseline / product so drift on a noisy machine hits both. Every endpoint is first checked
to answer 2xx, and wrk's non-2xx count is reported.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any

from bench import proc
from bench.figures.common import Context, target_of
from bench.report import NOT_MEASURED, Figure, Metric
from bench.workers import Worker

KEY = "6_rest_gateway"
AGENTS = 100
WRK_INSTALL = "apt-get install -y wrk"

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms) and non-2xx count from ``wrk --latency`` output."""
    out: dict[str, Any] = {"non_2xx": 0, "errors": ""}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else None
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        out[f"p{pct}_ms"] = float(value) * _UNITS[unit]
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        out["non_2xx"] = int(m.group(1))
    m = re.search(r"Socket errors:(.*)", text)
    if m:
        out["errors"] = m.group(1).strip()
    m = re.search(r"(\d+) requests in", text)
    out["requests"] = int(m.group(1)) if m else None
    return out


def _lua(path: Path, body: dict[str, Any], token: str) -> Path:
    script = (
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {token}"\n'
    )
    path.write_text(script)
    return path


def _check(url: str, body: dict[str, Any] | None, token: str) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(300).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(300).decode(errors="replace")


async def _wrk(ctx: Context, url: str, script: Path | None) -> dict[str, Any]:
    sizes = ctx.sizes
    argv = [
        "wrk",
        "-t1",
        f"-c{sizes.rest_connections}",
        f"-d{sizes.rest_duration_s}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    p = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(p.communicate(), sizes.rest_duration_s + 30)
    return parse_wrk(out.decode(errors="replace"))


async def run(ctx: Context) -> Figure:
    fig = Figure(KEY, "")
    if shutil.which("wrk") is None:
        fig.status, fig.reason = NOT_MEASURED, f"wrk missing (install it: {WRK_INSTALL})"
        return fig
    server = await ctx.start_server("f6")
    http_port = server.info.get("http_port")
    if not http_port:
        fig.status, fig.reason = NOT_MEASURED, "the server announced no http_port (gateway not serving)"
        return fig
    directory = ctx.workdir / "f6"
    fastapi = proc.fastapi_server(directory, AGENTS)
    holder = Worker("f6-holder", {"target": target_of(server)}).start()
    try:
        reg = await holder.call(
            "register", count=AGENTS, prefix="rest", agent_type="bench-rest", return_creds=True
        )
        agent_id, token = reg["creds"][0]
        info = await fastapi.start()
        product_base = f"http://127.0.0.1:{http_port}"
        fastapi_base = f"http://127.0.0.1:{info['http_port']}"
        beat_body = {"agent_id": agent_id, "load": {"active_tasks": 1, "cpu": 0.25, "memory": 0.5}}
        base_body = {**beat_body, "agent_id": info["agent_id"]}
        checks = {
            "gateway heartbeat": await asyncio.to_thread(
                _check, f"{product_base}/agents/heartbeat", beat_body, token
            ),
            "gateway list": await asyncio.to_thread(_check, f"{product_base}/agents/list", None, token),
            "fastapi heartbeat": await asyncio.to_thread(
                _check, f"{fastapi_base}/agents/heartbeat", base_body, info["token"]
            ),
            "fastapi list": await asyncio.to_thread(_check, f"{fastapi_base}/agents/list", None, ""),
        }
        fig.details["checks"] = {k: list(v) for k, v in checks.items()}
        bad = {k: v for k, v in checks.items() if not 200 <= v[0] < 300}
        if bad:
            fig.status, fig.reason = NOT_MEASURED, f"endpoint check failed: {bad}"
            return fig
        product_lua = _lua(directory / "product_beat.lua", beat_body, token)
        base_lua = _lua(directory / "fastapi_beat.lua", base_body, info["token"])
        runs: dict[str, dict[str, Any]] = {}
        runs["fastapi heartbeat"] = await _wrk(ctx, f"{fastapi_base}/agents/heartbeat", base_lua)
        async with ctx.profiled(fig, server, "heartbeat"):
            runs["gateway heartbeat"] = await _wrk(ctx, f"{product_base}/agents/heartbeat", product_lua)
        runs["fastapi list"] = await _wrk(ctx, f"{fastapi_base}/agents/list", None)
        async with ctx.profiled(fig, server, "list"):
            runs["gateway list"] = await _wrk(ctx, f"{product_base}/agents/list", None)
    finally:
        await holder.close()
        await fastapi.stop()
    fig.details["wrk"] = runs
    ctx.baselines["fastapi (wrk)"] = {k: v for k, v in runs.items() if k.startswith("fastapi")}
    for what, rps_target, p99_target in (("heartbeat", 1.0, 1.5), ("list", 1.0, None)):
        g, b = runs[f"gateway {what}"], runs[f"fastapi {what}"]
        fig.metrics.append(
            Metric.compare(f"{what} req/s", g["rps"], "/s", b["rps"], "FastAPI", min_ratio=rps_target)
        )
        fig.metrics.append(
            Metric.compare(
                f"{what} p99", g.get("p99_ms"), "ms", b.get("p99_ms"), "FastAPI", max_ratio=p99_target
            )
        )
    non_2xx = {k: v["non_2xx"] for k, v in runs.items() if v["non_2xx"]}
    fig.metrics.append(Metric.absolute("non-2xx answers", sum(non_2xx.values()), "", equals=0))
    fig.notes.append(
        f"wrk -t1 -c{ctx.sizes.rest_connections} -d{ctx.sizes.rest_duration_s}s --latency; "
        f"FastAPI 1 worker with uvloop + httptools on a dict; {AGENTS} agents in both; "
        f"non-2xx {non_2xx or 'none'}."
    )
    return fig
