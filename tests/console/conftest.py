"""The console's browser tests: a real server with keys, real SDK agents, real headless Chromium.

One server, one browser and one set of agents per test module (starting Chromium costs a second or
two on a busy machine). Without chromium + chromedriver the tests skip, except where
CONSOLE_BROWSER_REQUIRED=1 (CI sets it) makes a missing browser a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator.v1 import agent_pb2, registry_pb2, registry_pb2_grpc, tasks_pb2_grpc
from tests.conftest import ROOT, ServerProcess

CHROMIUM = os.environ.get("CONSOLE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CONSOLE_CHROMEDRIVER", "/usr/bin/chromedriver")
AGENT_SCRIPT = Path(__file__).resolve().parent / "console_agent.py"
# `make screenshots` refreshes the committed ones in docs/console (the README shows them); a plain
# test run writes them aside, so it never leaves the working tree modified.
SCREENSHOTS = Path(
    os.environ.get("CONSOLE_SCREENSHOTS") or Path(tempfile.gettempdir()) / "orchestrator-console"
)

ADMIN_KEY = "console-admin-key-0123456789"
AGENT_KEY = "console-agent-key-0123456789"
READER_KEY = "console-reader-key-0123456789"
BEARER_ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)


def _browser_missing() -> str:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    return ", ".join(missing)


@pytest.fixture(scope="module")
def browser_available() -> None:
    missing = _browser_missing()
    if not missing:
        return
    message = f"browser tests need {missing} (apt-get install -y chromium chromium-driver)"
    if os.environ.get("CONSOLE_BROWSER_REQUIRED") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def console_server(
    browser_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """`orchestrator serve` with the gateway and admin/agent/reader keys.

    One unplanned drop among the few agents pauses failover (MASS_FAILURE_*), so the kill test
    also shows the failover banner; the pause lasts a minute, long enough for the health view.
    """
    server = ServerProcess(
        tmp_path_factory.mktemp("console"),
        GATEWAY_ENABLED="true",
        API_KEYS=f"admin:{ADMIN_KEY},agent:{AGENT_KEY},reader:{READER_KEY}",
        MASS_FAILURE_MIN_AGENTS="1",
        MASS_FAILURE_THRESHOLD="0.2",
        MASS_FAILURE_WINDOW="60",
        TASK_RETRY_BACKOFF="0.05",
        TASK_RETRY_BACKOFF_MAX="0.2",
        SHUTDOWN_GRACE="0.5",
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def grpc_channel(console_server: ServerProcess) -> Iterator[grpc.Channel]:
    channel = grpc.insecure_channel(console_server.target)
    yield channel
    channel.close()


class Stubs:
    def __init__(self, channel: grpc.Channel) -> None:
        self.registry = registry_pb2_grpc.RegistryServiceStub(channel)
        self.tasks = tasks_pb2_grpc.TasksServiceStub(channel)

    def agent_by_name(self, name: str) -> agent_pb2.Agent | None:
        listed = self.registry.ListAgents(
            registry_pb2.ListAgentsRequest(page_size=1000), metadata=BEARER_ADMIN
        )
        return next((agent for agent in listed.agents if agent.name == name), None)


@pytest.fixture(scope="module")
def stubs(grpc_channel: grpc.Channel) -> Stubs:
    return Stubs(grpc_channel)


class AgentProcesses:
    """tests/console/console_agent.py processes; every one is SIGKILLed at the end of the module."""

    def __init__(self, server: ServerProcess, stubs: Stubs, workdir: Path) -> None:
        self.server = server
        self.stubs = stubs
        self.workdir = workdir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, timeout: float = 30.0) -> str:
        """Starts an agent and returns its id once the server lists it READY."""
        self.processes[name] = subprocess.Popen(
            [sys.executable, str(AGENT_SCRIPT), "--target", self.server.target, "--name", name, *args],
            cwd=ROOT,
            env={**os.environ, "ORCHESTRATOR_API_KEY": AGENT_KEY},
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / f"agent-{name}.log", "wb"),  # noqa: SIM115 (kept open for the child)
        )
        deadline = time.monotonic() + timeout
        while True:
            agent = self.stubs.agent_by_name(name)
            if agent is not None and agent.status == agent_pb2.AGENT_STATUS_READY:
                return str(agent.agent_id)
            if self.processes[name].poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / f"agent-{name}.log").read_text(errors="replace")
                pytest.fail(f"agent {name} did not become READY: {log[-2000:]}")
            time.sleep(0.05)

    def kill(self, name: str) -> None:
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(10)


@pytest.fixture(scope="module")
def agents(
    console_server: ServerProcess, stubs: Stubs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcesses]:
    processes = AgentProcesses(console_server, stubs, tmp_path_factory.mktemp("agents"))
    yield processes
    processes.stop_all()


@pytest.fixture(scope="module")
def browser(browser_available: None) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    # The page's console messages (a CSP violation, an uncaught error) are read back by the tests.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def screenshot(driver: Any, name: str) -> Path:
    """Saves the whole page as <name>.png in SCREENSHOTS."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    size = driver.get_window_size()
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size["width"], min(2400, max(size["height"], height + 140)))
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(size["width"], size["height"])
    return path


def until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Polls `predicate` (a gRPC or browser query) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
