"""The orchestrator and the agents of a chaos run, as OS processes on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Server:
    """`python -m orchestrator_server serve` on a fixed database, restarted on the same port."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = {
            **os.environ,
            "GRPC_PORT": "0",
            "BIND_HOST": "127.0.0.1",
            "GATEWAY_ENABLED": "false",
            "DATABASE_PATH": str(workdir / "orchestrator.db"),
            "LOG_LEVEL": "WARNING",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, within: float = 60.0) -> None:
        """Starts the server and returns once it serves (its ready file is written)."""
        ready = self._launch()
        deadline = time.monotonic() + within
        while not ready.exists():
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.process.returncode}; see {self.workdir}/server.log"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready within {within:g} s")
            await asyncio.sleep(0.02)
        self.port = int(json.loads(ready.read_text())["grpc_port"])

    def _launch(self) -> Path:
        self.starts += 1
        ready = self.workdir / f"ready-{self.starts}.json"
        env = {**self.env, "ORCHESTRATOR_READY_FILE": str(ready)}
        if self.port:
            env["GRPC_PORT"] = str(self.port)  # agents and the submitter reconnect to the same address
        with open(self.workdir / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "orchestrator_server", "serve"],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=log,
            )
        return ready

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        stop_process(self.process)


def start_agent(target: str, name: str, workdir: Path) -> subprocess.Popen[bytes]:
    with open(workdir / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chaos.agent",
                "--target",
                target,
                "--name",
                name,
                "--log",
                str(workdir / f"{name}.jsonl"),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL if it does not exit within 15 s."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(15)
