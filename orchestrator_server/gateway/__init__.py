"""REST gateway: JSON over HTTP for the gRPC API, with routes read from `google.api.http` annotations.

In process (what `orchestrator serve` does):

    gateway = await start_gateway("0.0.0.0", 8080, f"127.0.0.1:{grpc_port}")
    ...
    await gateway.stop()

As its own process: `python -m orchestrator_server.gateway --grpc-target HOST:PORT`.
"""

from orchestrator_server.gateway.app import (
    DEFAULT_SERVICES,
    GatewayOptions,
    ReadinessCheck,
    RunningGateway,
    create_gateway_app,
    start_gateway,
)

__all__ = [
    "DEFAULT_SERVICES",
    "GatewayOptions",
    "ReadinessCheck",
    "RunningGateway",
    "create_gateway_app",
    "start_gateway",
]
