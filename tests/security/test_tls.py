"""TLS and mutual TLS on the gRPC port, with certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from orchestrator.v1 import health_pb2, health_pb2_grpc
from orchestrator_client import AdminClient, Agent, ConnectionOptions, PermissionDenied, TaskContext, v1
from tests.conftest import Running
from tests.security.conftest import ADMIN_KEY, AGENT_KEY, API_KEYS, READER_KEY, bearer


@dataclass
class Issued:
    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Authority:
    """A throwaway certificate authority."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(name)
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage(
                    [
                        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
                        if server
                        else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
                    ]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    authority, stranger = Authority("orchestrator test CA"), Authority("another CA")
    server = authority.issue("orchestrator", server=True)
    files = {"ca": authority.pem, "cert": server.cert, "key": server.key}
    paths = {}
    for name, content in files.items():
        path = tmp_path / f"{name}.pem"
        path.write_bytes(content)
        paths[name] = str(path)
    return {
        "authority": authority,
        "paths": paths,
        "client": authority.issue("agent-1", server=False),
        "stranger": stranger.issue("intruder", server=False),
    }


async def _health(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    channel = (
        grpc.aio.insecure_channel(target)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials)
    )
    async with channel:
        try:
            await health_pb2_grpc.HealthServiceStub(channel).GetSystemHealth(
                health_pb2.GetSystemHealthRequest(), metadata=bearer(ADMIN_KEY), timeout=5
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def test_mutual_tls(servers: Callable[..., Any], pki: dict[str, Any]) -> None:
    paths = pki["paths"]
    running: Running = await servers(
        api_keys=f"admin:{ADMIN_KEY}",
        tls_cert_file=paths["cert"],
        tls_key_file=paths["key"],
        tls_client_ca_file=paths["ca"],
    )
    authority: Authority = pki["authority"]
    target = running.target
    client, stranger = pki["client"], pki["stranger"]
    assert await _health(target, grpc.ssl_channel_credentials(authority.pem)) == grpc.StatusCode.UNAVAILABLE
    assert (
        await _health(target, grpc.ssl_channel_credentials(authority.pem, stranger.key, stranger.cert))
        == grpc.StatusCode.UNAVAILABLE
    )
    assert await _health(target, None) == grpc.StatusCode.UNAVAILABLE
    assert (
        await _health(target, grpc.ssl_channel_credentials(authority.pem, client.key, client.cert))
        == grpc.StatusCode.OK
    )
    # The certificate gets a client onto the wire; the API key still decides what it may do.
    async with grpc.aio.secure_channel(
        target, grpc.ssl_channel_credentials(authority.pem, client.key, client.cert)
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await health_pb2_grpc.HealthServiceStub(channel).GetSystemHealth(
                health_pb2.GetSystemHealthRequest()
            )
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_tls_without_client_certificates(servers: Callable[..., Any], pki: dict[str, Any]) -> None:
    paths = pki["paths"]
    running: Running = await servers(
        api_keys=f"admin:{ADMIN_KEY}", tls_cert_file=paths["cert"], tls_key_file=paths["key"]
    )
    authority: Authority = pki["authority"]
    assert await _health(running.target, grpc.ssl_channel_credentials(authority.pem)) == grpc.StatusCode.OK
    assert await _health(running.target, None) == grpc.StatusCode.UNAVAILABLE
    # A client that does not trust the server's CA refuses it.
    other = Authority("someone else")
    assert (
        await _health(running.target, grpc.ssl_channel_credentials(other.pem)) == grpc.StatusCode.UNAVAILABLE
    )


async def test_sdk_agent_and_admin_client_with_keys_over_mutual_tls(
    servers: Callable[..., Any], pki: dict[str, Any]
) -> None:
    """End to end as a deployment runs it: keys of every role, mutual TLS, the SDK on both sides."""
    paths = pki["paths"]
    running: Running = await servers(
        api_keys=API_KEYS,
        tls_cert_file=paths["cert"],
        tls_key_file=paths["key"],
        tls_client_ca_file=paths["ca"],
    )
    authority: Authority = pki["authority"]
    client: Issued = pki["client"]
    connection = ConnectionOptions(
        root_certificates=authority.pem, client_certificate_chain=client.cert, client_private_key=client.key
    )
    agent = Agent(
        running.target,
        name="sdk",
        type="worker",
        api_key=AGENT_KEY,
        connection=connection,
        handle_signals=False,
    )

    @agent.task("echo")
    async def echo(ctx: TaskContext) -> dict[str, Any]:
        await ctx.report_progress(0.5, "halfway")
        return dict(ctx.payload)

    async with (
        agent,
        AdminClient(running.target, api_key=ADMIN_KEY, connection=connection, timeout=5) as admin,
        AdminClient(running.target, api_key=READER_KEY, connection=connection, timeout=5) as reader,
    ):
        task = await admin.create_task("echo", {"said": "hello"})
        done = await admin.wait_for_result(task.task_id, timeout=10)
        assert done.status == v1.TaskStatus.TASK_STATUS_SUCCEEDED and dict(done.result) == {"said": "hello"}
        assert done.attempts[0].agent_id == agent.agent_id
        with pytest.raises(PermissionDenied):
            await reader.create_task("echo", {})
    await agent.stop(grace=0)
