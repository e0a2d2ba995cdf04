"""ConnectionOptions: keepalive channel arguments, and TLS / mutual TLS over a real handshake."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator_client import AdminClient, ConnectionOptions, Unavailable, read_pem, v1
from orchestrator_client.backoff import NO_RETRY


def test_keepalive_sets_the_ping_timeout_too_and_extra_options_win() -> None:
    options = dict(
        ConnectionOptions(
            keepalive_time=2.0, keepalive_timeout=1.5, extra_options=[("grpc.max_reconnect_backoff_ms", 750)]
        ).channel_options()
    )
    assert options["grpc.keepalive_time_ms"] == 2000
    assert options["grpc.keepalive_timeout_ms"] == 1500
    assert options["grpc.http2.ping_timeout_ms"] == 1500
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.max_reconnect_backoff_ms"] == 750


def test_a_name_for_several_replicas_connects_to_one_at_random_and_a_plain_address_keeps_grpcs_default() -> (
    None
):
    for target in ("dns:///orchestrator-headless.ns.svc:50051", "ipv4:10.0.0.1:50051,10.0.0.2:50051"):
        config = json.loads(str(dict(ConnectionOptions().channel_options(target))["grpc.service_config"]))
        assert config == {"loadBalancingConfig": [{"pick_first": {"shuffleAddressList": True}}]}
    assert "grpc.service_config" not in dict(ConnectionOptions().channel_options("10.0.0.1:50051"))


def test_mutual_tls_needs_both_certificate_and_key() -> None:
    with pytest.raises(ValueError, match="both"):
        ConnectionOptions(client_certificate_chain=b"cert")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for "orchestrator.test" and a client certificate, all throwaway."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=tmp_path)  # fmt: skip
    for name, subject in (("server", "orchestrator.test"), ("client", "agent-1")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={subject}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=tmp_path)  # fmt: skip
        (tmp_path / f"{name}.ext").write_text(f"subjectAltName=DNS:{subject}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=tmp_path)  # fmt: skip
    return tmp_path


class Echo(v1.RegistryServiceServicer):
    async def GetAgent(self, request: Any, context: Any) -> v1.GetAgentResponse:
        peer = context.auth_context().get("x509_common_name", [b""])[0].decode()
        return v1.GetAgentResponse(agent=v1.Agent(agent_id=request.agent_id, name=peer))


@pytest.fixture
async def mtls_target(pki: Path) -> AsyncIterator[str]:
    server = grpc.aio.server()
    v1.add_RegistryServiceServicer_to_server(Echo(), server)
    credentials = grpc.ssl_server_credentials(
        [(read_pem(pki / "server.key"), read_pem(pki / "server.pem"))],
        root_certificates=read_pem(pki / "ca.pem"),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def test_mutual_tls_handshake_presents_the_client_certificate(pki: Path, mtls_target: str) -> None:
    options = ConnectionOptions(
        root_certificates=read_pem(pki / "ca.pem"),
        client_certificate_chain=read_pem(pki / "client.pem"),
        client_private_key=read_pem(pki / "client.key"),
        server_name_override="orchestrator.test",
    )
    async with AdminClient(mtls_target, connection=options, timeout=5.0) as admin:
        agent = await admin.get_agent("agent-1")
    assert agent.name == "agent-1"  # the server saw our certificate's common name


async def test_without_a_client_certificate_the_server_refuses(pki: Path, mtls_target: str) -> None:
    options = ConnectionOptions(
        root_certificates=read_pem(pki / "ca.pem"), server_name_override="orchestrator.test"
    )
    async with AdminClient(mtls_target, connection=options, timeout=5.0, retry=NO_RETRY) as admin:
        with pytest.raises(Unavailable):
            await admin.get_agent("agent-1")
