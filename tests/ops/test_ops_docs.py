"""The `bash` blocks of docs/DEPLOYMENT.md and docs/OPERATIONS.md run as written (issue 15, items 2
and 6), against a real server with keys, the gateway and JSON logs, as test_readme.py does for the
README. What differs from a production host, and only that, is moved: the ports (ephemeral), the
directories /var/lib/orchestrator, /var/backups/orchestrator and /etc/orchestrator (into a
temporary directory), and `journalctl` (a stand-in that prints this server's log). `sh` blocks need
systemd, a cluster or a container engine: where one stops or starts the server, the test does that
step itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, wait_for
from tests.ops.tools import tool

ROOT = Path(__file__).resolve().parents[2]
DOCS = {name: ROOT / "docs" / name for name in ("DEPLOYMENT.md", "OPERATIONS.md")}
ADMIN_KEY = "ops-admin-key-0123456789abcdef"
AGENT_KEY = "fleet-agent-key-0123456789abcdef"

# Every heading with a bash block, and the test that runs it (checked below).
RUN_BY: dict[tuple[str, str], str] = {
    ("DEPLOYMENT.md", "Upgrades and schema migrations"): "test_backups_as_written",
    ("DEPLOYMENT.md", "Backups of the SQLite file"): "test_backups_as_written",
    ("DEPLOYMENT.md", "Monitoring"): "test_monitoring_checks_as_written",
    ("DEPLOYMENT.md", "TLS, mutual TLS and keys"): "test_mutual_tls_as_written",
    ("OPERATIONS.md", "First look"): "test_first_look_and_alert_checks_as_written",
    ("OPERATIONS.md", "OrchestratorDown"): "test_first_look_and_alert_checks_as_written",
    ("OPERATIONS.md", "OrchestratorFailoverPaused"): "test_first_look_and_alert_checks_as_written",
    ("OPERATIONS.md", "OrchestratorAgentsDown"): "test_first_look_and_alert_checks_as_written",
    ("OPERATIONS.md", "OrchestratorTaskQueueGrowing"): "test_first_look_and_alert_checks_as_written",
    ("OPERATIONS.md", "OrchestratorDispatchLatencyHigh"): "test_first_look_and_alert_checks_as_written",
    ("OPERATIONS.md", "OrchestratorStoreCommitErrors"): "test_first_look_and_alert_checks_as_written",
    ("OPERATIONS.md", "OrchestratorHeartbeatsRateLimited"): "test_first_look_and_alert_checks_as_written",
    ("OPERATIONS.md", "Draining an agent"): "test_draining_and_the_audit_log_as_written",
    ("OPERATIONS.md", "Reading the audit log"): "test_draining_and_the_audit_log_as_written",
    ("OPERATIONS.md", "A planned restart"): "test_restart_and_restore_as_written",
    ("OPERATIONS.md", "Restoring from a backup"): "test_restart_and_restore_as_written",
    ("OPERATIONS.md", "Rotating keys"): "test_key_rotation_as_written",
}


@dataclass(frozen=True)
class Block:
    heading: str
    language: str
    code: str


def blocks(doc: str) -> list[Block]:
    found: list[Block] = []
    heading = ""
    lines = iter(DOCS[doc].read_text().splitlines())
    for line in lines:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("```") and len(line) > 3:
            code = []
            for inner in lines:
                if inner.startswith("```"):
                    break
                code.append(inner)
            found.append(Block(heading, line[3:].strip(), "\n".join(code) + "\n"))
    return found


def bash_blocks(doc: str, heading: str) -> list[str]:
    found = [block.code for block in blocks(doc) if block.heading == heading and block.language == "bash"]
    assert found, f"no bash block under {heading!r} in {doc}"
    return found


class Host:
    """A stand-in for the orchestrator's host: its directories, a server, a shell."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.state = tmp_path / "var-lib-orchestrator"
        self.backups = tmp_path / "var-backups-orchestrator"
        self.etc = tmp_path / "etc-orchestrator"
        self.bin = tmp_path / "bin"
        for directory in (self.state, self.backups, self.etc, self.bin):
            directory.mkdir()
        (self.etc / "keys").write_text(f"admin:{ADMIN_KEY}\nagent:{AGENT_KEY}\n")
        journalctl = self.bin / "journalctl"
        journalctl.write_text(
            "#!/bin/sh\n# the unit's journal: this server's log\ncat \"$ORCHESTRATOR_LOG\"\n"
        )
        journalctl.chmod(0o755)
        self.server = ServerProcess(
            tmp_path,
            GATEWAY_ENABLED="true",
            ENVIRONMENT="production",
            API_KEYS_FILE=self.etc / "keys",
            DATABASE_PATH=self.state / "orchestrator.db",
            LOG_FORMAT="json",
            SHUTDOWN_DELAY="0",  # the tests stop it often; the drain itself is tested elsewhere
            # The REST agent registers once and never beats: it must stay alive through the module
            # however slowly a busy machine runs it.
            HEARTBEAT_TIMEOUT="3600",
        )

    def start(self) -> Host:
        self.server.start()
        return self

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    def post(self, path: str, body: dict[str, object], key: str) -> dict[str, object]:
        request = urllib.request.Request(
            self.http + path, data=json.dumps(body).encode(), headers={"x-api-key": key}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.loads(response.read()))

    def run(self, doc: str, heading: str) -> str:
        """Every bash block under `heading`, each as pasted into its own terminal."""
        return "".join(self.run_block(code, f"{doc} / {heading}") for code in bash_blocks(doc, heading))

    def run_block(self, code: str, where: str = "") -> str:
        script = (
            code.replace("localhost:8080", f"127.0.0.1:{self.server.http_port}")
            .replace("localhost:50051", self.server.target)
            .replace("/var/lib/orchestrator", str(self.state))
            .replace("/var/backups/orchestrator", str(self.backups))
            .replace("/etc/orchestrator", str(self.etc))
        )
        path = [
            str(self.bin),
            str(Path(sys.prefix) / "bin"),
            str(Path(sys.prefix) / "tools"),
            os.environ["PATH"],
        ]
        env = {
            **os.environ,
            "PATH": os.pathsep.join(path),
            "ORCHESTRATOR_TARGET": self.server.target,
            "ORCHESTRATOR_API_KEY": ADMIN_KEY,
            "ORCHESTRATOR_LOG": str(self.root / f"server-{self.server.starts}.log"),
        }
        # bash -eu like test_readme.py: an interactive shell has no pipefail (`curl | grep` is fine).
        completed = subprocess.run(
            ["bash", "-eu", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert completed.returncode == 0, (
            f"{where}:\n{script}\n--- stdout\n{completed.stdout}\n--- stderr\n{completed.stderr}"
        )
        return completed.stdout

    def reload(self) -> None:
        """`systemctl reload orchestrator`: SIGHUP."""
        assert self.server.process is not None
        self.server.process.send_signal(signal.SIGHUP)


def started_host(tmp_path: Path) -> Host:
    tool("sqlite3")
    started = Host(tmp_path).start()
    # A REST agent that takes no tasks, so a created task stays pending with a reason.
    started.post(
        "/agents/register",
        {"name": "cost-agent", "instance_id": "i-1", "type": "cost", "max_concurrent_tasks": 0},
        AGENT_KEY,
    )
    started.post("/tasks/create", {"spec": {"type": "estimate", "payload": {"hours": 3}}}, ADMIN_KEY)
    return started


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    """One host for the blocks that only look, drain and undrain, or take backups."""
    started = started_host(tmp_path_factory.mktemp("ops-host"))
    yield started
    started.server.stop()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    """A host of its own, for the blocks that stop the server or change its keys."""
    started = started_host(tmp_path)
    yield started
    started.server.stop()


def test_every_bash_block_is_run_by_a_test() -> None:
    headings = {(doc, block.heading) for doc in DOCS for block in blocks(doc) if block.language == "bash"}
    assert headings == set(RUN_BY), f"not run: {headings - set(RUN_BY)}; gone: {set(RUN_BY) - headings}"
    languages = {block.language for doc in DOCS for block in blocks(doc)}
    assert languages <= {"bash", "sh", "yaml"}, languages


def test_first_look_and_alert_checks_as_written(shared: Host) -> None:
    host = shared
    output = host.run("OPERATIONS.md", "First look")
    assert '"store_status": "ok"' in output and '{"status":"SERVING"}' in output
    assert 'orchestrator_agents{status="ready"} 1.0' in output and "orchestrator_sessions 0.0" in output
    assert '"status": "SERVING"' in output  # grpcurl's health check
    assert "estimate" in output and "PENDING" in output
    for heading, expected in (
        ("OrchestratorDown", '{"status":"ok"}'),
        ("OrchestratorFailoverPaused", "orchestrator_failover_pauses_total 0.0"),
        ("OrchestratorAgentsDown", ""),
        ("OrchestratorTaskQueueGrowing", "no agent"),
        ("OrchestratorDispatchLatencyHigh", "orchestrator_dispatch_latency_seconds_count"),
        ("OrchestratorStoreCommitErrors", "orchestrator_store_commit_errors_total 0.0"),
        ("OrchestratorHeartbeatsRateLimited", 'orchestrator_rate_limited_total{budget="heartbeats"} 0.0'),
    ):
        assert expected in host.run("OPERATIONS.md", heading), heading


def test_draining_and_the_audit_log_as_written(shared: Host) -> None:
    host = shared
    output = host.run("OPERATIONS.md", "Draining an agent")
    assert "AGENT_STATUS_DRAINING" in output and "AGENT_STATUS_READY" in output
    audit = host.run("OPERATIONS.md", "Reading the audit log")
    assert re.search(r"admin-key:\S+ DrainAgent OK agent_id=agt_\S+ name=cost-agent", audit), audit
    assert re.search(r"agent-key:\S+ RegisterAgent OK", audit), audit


def test_backups_as_written(shared: Host) -> None:
    host = shared
    """Backups are taken while the server keeps committing."""
    writes = [
        subprocess.Popen(
            [
                "curl",
                "-sf",
                "-H",
                f"x-api-key: {ADMIN_KEY}",
                "-d",
                json.dumps({"spec": {"type": f"bulk-{index}"}}),
                f"{host.http}/tasks/create",
            ],
            stdout=subprocess.DEVNULL,
        )
        for index in range(20)
    ]
    version = host.run("DEPLOYMENT.md", "Upgrades and schema migrations").strip()
    output = host.run("DEPLOYMENT.md", "Backups of the SQLite file")
    for process in writes:
        assert process.wait(30) == 0
    assert output.splitlines()[0] == "ok" and int(output.splitlines()[1]) == 1, output
    copies = sorted(host.backups.glob("*.db"))
    assert [path.name.split("-")[0] for path in copies] == ["compact", "from", "orchestrator"], copies
    for copy in copies:
        with sqlite3.connect(copy) as database:
            assert database.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert str(database.execute("PRAGMA user_version").fetchone()[0]) == version
            assert database.execute("SELECT count(*) FROM agents").fetchone() == (1,)


def test_monitoring_checks_as_written(tmp_path: Path) -> None:
    tool("promtool")
    output = Host(tmp_path).run("DEPLOYMENT.md", "Monitoring")  # no server needed
    assert "SUCCESS: 7 rules found" in output and output.rstrip().endswith("SUCCESS"), output


def test_restart_and_restore_as_written(host: Host) -> None:
    # A planned restart: SIGTERM (what systemctl restart sends), start, check.
    assert host.server.terminate() == 0
    host.server.start()
    after_restart = host.run("OPERATIONS.md", "A planned restart")
    assert '{"status":"SERVING"}' in after_restart and "cost-agent" in after_restart
    # A backup, then an agent registered after it, which the restore must not bring back.
    host.run("DEPLOYMENT.md", "Backups of the SQLite file")
    host.post("/agents/register", {"name": "late-agent", "instance_id": "i-9", "type": "cost"}, AGENT_KEY)
    assert host.server.terminate() == 0  # `systemctl stop`
    restore, check = bash_blocks("OPERATIONS.md", "Restoring from a backup")
    host.run_block(restore)
    aside = next(host.state.glob("before-restore-*"))
    assert (aside / "orchestrator.db").stat().st_uid == (host.state / "orchestrator.db").stat().st_uid
    host.server.start()  # `systemctl start`
    assert '"store_status": "ok"' in host.run_block(check)
    listed = subprocess.run(
        [str(Path(sys.prefix) / "bin" / "orchestrator"), "--json", "agents", "list"],
        env={**os.environ, "ORCHESTRATOR_TARGET": host.server.target, "ORCHESTRATOR_API_KEY": ADMIN_KEY},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "cost-agent" in listed and "late-agent" not in listed


def test_key_rotation_as_written(host: Host) -> None:
    def status(key: str) -> int:
        request = urllib.request.Request(f"{host.http}/agents/list", headers={"x-api-key": key})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return error.code

    add, check_and_remove, verify = bash_blocks("OPERATIONS.md", "Rotating keys")
    host.run_block(add)
    new_key = (host.etc / "new-admin-key").read_text().strip()
    host.reload()
    wait_for(lambda: status(new_key) == 200, 10, "the new key accepted")
    assert status(ADMIN_KEY) == 200, "both keys work during the rotation"
    host.run_block(check_and_remove)
    host.reload()
    wait_for(lambda: status(ADMIN_KEY) == 401, 10, "the old key refused")
    assert host.run_block(verify).split() == ["401", "200"]
    assert oct((host.etc / "keys").stat().st_mode & 0o777) == "0o600"


def test_mutual_tls_as_written(tmp_path: Path) -> None:
    """The settings of the TLS block (the server's environment) and the client's grpcurl command,
    with certificates from a throwaway CA (the one of tests/security/test_tls.py)."""
    from tests.security.test_tls import Authority

    host = Host(tmp_path)
    (host.etc / "tls").mkdir()
    authority = Authority("ops test CA")
    server, client = authority.issue("orchestrator", server=True), authority.issue("operator", server=False)
    files = {
        "server.crt": server.cert,
        "server.key": server.key,
        "clients-ca.crt": authority.pem,
        "ca.crt": authority.pem,
        "client.crt": client.cert,
        "client.key": client.key,
    }
    for name, content in files.items():
        (host.etc / "tls" / name).write_bytes(content)
    [settings] = [
        block.code
        for block in blocks("DEPLOYMENT.md")
        if block.heading == "TLS, mutual TLS and keys" and "TLS_CERT_FILE=" in block.code
    ]
    for line in settings.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("=", 1)
            host.server.env[name] = value.replace("/etc/orchestrator", str(host.etc))
    assert {"TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE"} <= host.server.env.keys()
    host.start()
    try:
        assert '"store_status": "ok"' in host.run("DEPLOYMENT.md", "TLS, mutual TLS and keys")
        # Mutual TLS is on: the same command without the client certificate is refused.
        [command] = bash_blocks("DEPLOYMENT.md", "TLS, mutual TLS and keys")
        without = command.replace(
            "-cert /etc/orchestrator/tls/client.crt -key /etc/orchestrator/tls/client.key ", ""
        )
        assert without != command
        with pytest.raises(AssertionError, match="--- stderr"):
            host.run_block(without)
    finally:
        host.server.stop()
