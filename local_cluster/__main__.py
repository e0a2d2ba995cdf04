"""`python -m local_cluster` (`make cluster`): a throwaway PostgreSQL and N `orchestrator serve`
replicas sharing it on loopback, until Ctrl-C (or SIGTERM), which stops exactly what it started:
the replicas (SIGTERM, then SIGKILL after --stop-timeout), then PostgreSQL, and removes the data.

Ports: replica i serves gRPC on --grpc-port + i and REST on --http-port + i (0: ephemeral ports,
which the replicas report in their ready files). Every other setting comes from the environment,
as for `orchestrator serve` (e.g. REPLICA_TTL, FAILOVER_GRACE, LOG_LEVEL).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from local_cluster.postgres import ThrowawayPostgres

_PR_SET_PDEATHSIG = 1


@dataclass
class Replica:
    index: int
    process: subprocess.Popen[bytes]
    ready_file: Path
    log: Path
    grpc_port: int = 0
    http_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m local_cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--grpc-port", type=int, default=50051, help="of the first replica (0: ephemeral)")
    parser.add_argument("--http-port", type=int, default=8080, help="of the first replica (0: ephemeral)")
    parser.add_argument("--start-timeout", type=float, default=60.0, help="seconds for a replica to be ready")
    parser.add_argument("--stop-timeout", type=float, default=15.0, help="seconds before SIGKILL on stop")
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    return args


def port(base: int, index: int) -> int:
    return 0 if base == 0 else base + index


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux's PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start_replica(index: int, args: argparse.Namespace, database_url: str, workdir: Path) -> Replica:
    ready = workdir / f"replica-{index}.ready.json"
    log = workdir / f"replica-{index}.log"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "BIND_HOST": "127.0.0.1",
        "GRPC_PORT": str(port(args.grpc_port, index)),
        "PORT": str(port(args.http_port, index)),
        "ORCHESTRATOR_READY_FILE": str(ready),
    }
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator_server", "serve"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own process group: a Ctrl-C reaches only this script, which stops the replicas
            # in order (and PostgreSQL after them) instead of everything at once.
            start_new_session=True,
            # ...and should this script be killed outright, they go with it.
            preexec_fn=_die_with_parent,
        )
    return Replica(index, process, ready, log)


def wait_ready(replica: Replica, deadline: float, stopping: threading.Event) -> None:
    while not replica.ready_file.exists():
        if replica.process.poll() is not None:
            raise RuntimeError(
                f"replica {replica.index} exited with {replica.process.returncode}:\n"
                + replica.log.read_text(errors="replace")[-4000:]
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"replica {replica.index} not ready in time; its log: {replica.log}")
        if stopping.wait(0.05):
            raise KeyboardInterrupt
    info = json.loads(replica.ready_file.read_text())
    replica.grpc_port, replica.http_port = info["grpc_port"], info["http_port"]


def stop_replicas(replicas: list[Replica], timeout: float) -> None:
    for replica in replicas:
        if replica.process.poll() is None:
            replica.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for replica in replicas:
        try:
            replica.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait(10)


def banner(replicas: list[Replica], postgres: ThrowawayPostgres, workdir: Path) -> str:
    targets = ",".join(replica.target for replica in replicas)
    lines = [f"PostgreSQL (pid {postgres.pid}): {postgres.url()}"]
    for replica in replicas:
        lines.append(
            f"replica {replica.index} (pid {replica.process.pid}): gRPC {replica.target}  "
            f"REST http://127.0.0.1:{replica.http_port}  log {replica.log}"
        )
    lines += [
        "",
        "Point agents and the CLI at every replica (an agent moves on when its replica goes away):",
        f"  export ORCHESTRATOR_TARGET={targets}",
        "  orchestrator agents list",
        f"  DATABASE_URL='{postgres.url()}' orchestrator serve   # one more replica",
        f"Ctrl-C stops the {len(replicas)} replicas and PostgreSQL and removes {workdir}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stopping = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    workdir = Path(tempfile.mkdtemp(prefix="orchestrator-cluster-"))
    replicas: list[Replica] = []
    postgres: ThrowawayPostgres | None = None
    status = 0
    try:
        print("starting PostgreSQL ...", flush=True)
        postgres = ThrowawayPostgres()
        deadline = time.monotonic() + args.start_timeout
        for index in range(args.replicas):
            replicas.append(start_replica(index, args, postgres.url(), workdir))
        for replica in replicas:
            wait_ready(replica, deadline, stopping)
        print(banner(replicas, postgres, workdir), flush=True)
        while not stopping.wait(0.5):
            for replica in replicas:
                if replica.process.poll() is not None:
                    print(f"replica {replica.index} exited with {replica.process.returncode}", flush=True)
                    stopping.set()
                    status = 1
    except KeyboardInterrupt:
        pass
    except Exception as error:
        print(f"local cluster failed: {error}", file=sys.stderr, flush=True)
        status = 1
    finally:
        print("stopping ...", flush=True)
        stop_replicas(replicas, args.stop_timeout)
        if postgres is not None:
            postgres.destroy()
        with contextlib.suppress(OSError):
            for path in workdir.iterdir():
                path.unlink()
            workdir.rmdir()
        print("stopped", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
