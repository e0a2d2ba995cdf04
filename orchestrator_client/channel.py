"""How the SDK opens its gRPC channel: TLS / mutual TLS, keepalive and reconnect settings."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from orchestrator_client.targets import resolves_to_several

ChannelOption = tuple[str, int | str]

_SHUFFLED_PICK_FIRST = json.dumps({"loadBalancingConfig": [{"pick_first": {"shuffleAddressList": True}}]})


def read_pem(path: str | Path) -> bytes:
    """Read a PEM file (certificate or key) for `ConnectionOptions`."""
    return Path(path).read_bytes()


@dataclass(frozen=True)
class ConnectionOptions:
    """Transport settings shared by `Agent` and `AdminClient`.

    TLS is on when `tls` is set or any certificate is given; `root_certificates=None` with TLS on
    uses the system roots. A client certificate and key together turn on mutual TLS.
    """

    tls: bool = False
    root_certificates: bytes | None = None
    client_certificate_chain: bytes | None = None
    client_private_key: bytes | None = None
    server_name_override: str | None = None
    """Expected server name in its certificate when it differs from the target host (tests)."""

    keepalive_time: float = 20.0
    """Seconds between HTTP/2 keepalive pings. The server must permit pings this often."""
    keepalive_timeout: float = 10.0
    """Seconds to wait for a ping's answer before the connection counts as dead."""
    max_reconnect_backoff: float = 5.0
    """Cap of grpc core's own reconnect backoff, in seconds. The SDK's backoff decides when calls are
    retried; this only keeps the channel from sitting in a long core backoff (default 120 s) after
    the server is back, which would otherwise dominate the reconnect time."""
    max_message_length: int = 16 * 1024 * 1024
    extra_options: Sequence[ChannelOption] = ()
    """Any further grpc channel arguments; they override the ones derived above."""

    def __post_init__(self) -> None:
        if (self.client_certificate_chain is None) != (self.client_private_key is None):
            raise ValueError("mutual TLS needs both client_certificate_chain and client_private_key")

    @property
    def uses_tls(self) -> bool:
        return (
            self.tls
            or self.root_certificates is not None
            or self.client_certificate_chain is not None
            or self.server_name_override is not None
        )

    def channel_options(self, target: str = "") -> list[ChannelOption]:
        keepalive_time_ms = int(self.keepalive_time * 1000)
        keepalive_timeout_ms = int(self.keepalive_timeout * 1000)
        reconnect_ms = int(self.max_reconnect_backoff * 1000)
        options: dict[str, int | str] = {
            "grpc.keepalive_time_ms": keepalive_time_ms,
            "grpc.keepalive_timeout_ms": keepalive_timeout_ms,
            # Since grpc/grpc#34647 a ping's answer is awaited for
            # http2.ping_timeout_ms (default 60 s), not keepalive_timeout_ms: set both, or a frozen
            # peer takes a minute to notice (measured on these machines: 60 s vs 1.7 s).
            "grpc.http2.ping_timeout_ms": keepalive_timeout_ms,
            "grpc.keepalive_permit_without_calls": 1,
            # The session stream is long-lived and quiet between beats: allow pings without data.
            "grpc.http2.max_pings_without_data": 0,
            "grpc.initial_reconnect_backoff_ms": min(1000, reconnect_ms),
            "grpc.min_reconnect_backoff_ms": min(1000, reconnect_ms),
            "grpc.max_reconnect_backoff_ms": reconnect_ms,
            # Each channel has its own connection rather than sharing grpc's global pool: a new
            # channel then really connects anew, instead of inheriting the reconnect backoff of a
            # closing channel to the same address.
            "grpc.use_local_subchannel_pool": 1,
            "grpc.max_receive_message_length": self.max_message_length,
            "grpc.max_send_message_length": self.max_message_length,
        }
        if self.server_name_override is not None:
            options["grpc.ssl_target_name_override"] = self.server_name_override
        if resolves_to_several(target):
            # Several replicas behind one name (a headless Service): each client connects to one
            # of them, chosen at random (gRFC A62), so a fleet spreads over the replicas; when
            # that connection fails the next session tries the other addresses. round_robin
            # would hold a connection to every replica from every agent.
            options["grpc.service_config"] = _SHUFFLED_PICK_FIRST
        options.update(dict(self.extra_options))
        return list(options.items())

    def create_channel(self, target: str) -> grpc.aio.Channel:
        """Open an asyncio channel to `target` ("host:port", or `dns:///name:port` for several
        replicas behind one name) with these settings."""
        if not self.uses_tls:
            return grpc.aio.insecure_channel(target, options=self.channel_options(target))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.client_private_key,
            certificate_chain=self.client_certificate_chain,
        )
        return grpc.aio.secure_channel(target, credentials, options=self.channel_options(target))
