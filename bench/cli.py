"""``python -m bench``: run the baselines and the eight figures, print the table, write the report."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench import proc, report, workers
from bench.client import message_sizes
from bench.figures import (
    f1_detection,
    f2_failover,
    f3_capacity,
    f4_unary,
    f5_tasks,
    f6_rest,
    f7_restart,
    f8_replicas,
)
from bench.figures.common import FULL, QUICK, Context, Sizes, unimplemented
from bench.report import ERROR, FIGURES, NOT_MEASURED, Figure, Report

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_INTERRUPTED = threading.Event()  # set by SIGINT/SIGTERM: no further figure starts

RUNNERS: dict[str, Callable[[Context], Awaitable[Figure]]] = {
    f1_detection.KEY: f1_detection.run,
    f2_failover.KEY: f2_failover.run,
    f3_capacity.KEY: f3_capacity.run,
    f4_unary.KEY: f4_unary.run,
    f5_tasks.KEY: f5_tasks.run,
    f6_rest.KEY: f6_rest.run,
    f7_restart.KEY: f7_restart.run,
    f8_replicas.KEY: f8_replicas.run,
}


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="every figure at small sizes (< 2 min)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any figure was not produced")
    parser.add_argument(
        "--only", default="", help="comma-separated figure numbers to run, e.g. 1,3 (default: all eight)"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the server during each measured load")
    parser.add_argument(
        "--out", default="", help="report file stem in bench/results (default latest / quick)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SIZE=VALUE",
        help="override one size, e.g. --set capacity_levels=1000,2000 --set restart_tasks=20000",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    return parser.parse_args(argv)


def override(sizes: Sizes, assignments: list[str]) -> Sizes:
    """Apply ``name=value`` overrides to the sizes (tuples as comma-separated lists)."""
    changes: dict[str, object] = {}
    for item in assignments:
        name, sep, raw = item.partition("=")
        current = getattr(sizes, name, None)
        if not sep or current is None:
            raise SystemExit(f"--set {item}: expected NAME=VALUE with NAME one of {list(vars(sizes))}")
        if isinstance(current, tuple):
            changes[name] = tuple(int(x) for x in raw.split(",") if x.strip())
        else:
            changes[name] = type(current)(raw)
    return dataclasses.replace(sizes, **changes)  # type: ignore[arg-type]


async def run_figure(key: str, ctx: Context) -> Figure:
    _log(f"figure {key} ...")
    started = time.perf_counter()
    try:
        fig = await RUNNERS[key](ctx)
    except asyncio.CancelledError:
        # Interrupted (SIGINT/SIGTERM): record it, and let the run write what it has.
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        ctx.interrupted = True
        fig = Figure(key, "", ERROR, "interrupted")
    except Exception as exc:
        if unimplemented(exc):
            fig = Figure(key, "", NOT_MEASURED, f"server does not implement it yet ({exc.details()})")  # type: ignore[attr-defined]
        else:
            fig = Figure(key, "", ERROR, f"{type(exc).__name__}: {str(exc)[:500]}")
            traceback.print_exc(file=sys.stderr)
    finally:
        await ctx.stop_servers()
    fig.title = FIGURES[key]
    fig.seconds = time.perf_counter() - started
    _log(f"figure {key}: {fig.status} {fig.reason} ({fig.seconds:.1f} s)")
    return fig


async def run(args: argparse.Namespace) -> Report:
    sizes = QUICK if args.quick else FULL
    sizes = override(sizes, args.set)
    keys = list(FIGURES)
    if args.only:
        wanted = {s.strip() for s in args.only.split(",") if s.strip()}
        keys = [k for k in keys if k.split("_", 1)[0] in wanted]
    rep = Report(mode="quick" if args.quick else "full", machine=report.machine_info())
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    profile_dir = RESULTS_DIR / "profiles" if args.profile else None
    ctx = Context(sizes=sizes, workdir=workdir, profile_dir=profile_dir)
    msg_sizes = message_sizes()
    rep.baselines["message sizes (bytes)"] = msg_sizes
    echo = proc.echo_server(workdir, msg_sizes["unary_response"])
    try:
        await echo.start()
        ctx.echo = echo
        for key in keys:
            if ctx.interrupted or _INTERRUPTED.is_set():
                break
            rep.figures.append(await run_figure(key, ctx))
    finally:
        await echo.stop()
        await ctx.stop_servers()
        if args.keep:
            _log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    rep.baselines.update(ctx.baselines)
    rep.seconds = time.perf_counter() - started
    return rep


async def run_interruptible(args: argparse.Namespace) -> Report:
    """The run, cancelled on SIGINT/SIGTERM; whatever happens, no child process outlives it."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None

    def interrupt() -> None:
        _log("interrupted: killing load generators and servers; the report keeps what was measured")
        _INTERRUPTED.set()
        workers.kill_all()
        proc.kill_all()
        main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupt)
    try:
        return await run(args)
    finally:
        workers.kill_all()
        proc.kill_all()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.util import run as run_loop

    rep = run_loop(run_interruptible(args))
    print(report.render_text(rep))
    stem = args.out or ("quick" if args.quick else "latest")
    json_path, md_path = report.write(rep, RESULTS_DIR, stem)
    _log(f"wrote {json_path} and {md_path} ({rep.seconds:.0f} s)")
    if _INTERRUPTED.is_set():
        return 130
    missing = rep.missing()
    if missing:
        _log(f"figures not produced: {', '.join(missing)}")
        if args.check:
            return 1
    return 0
