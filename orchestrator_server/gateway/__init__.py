"""REST gateway: JSON over HTTP for the gRPC API, with routes read from `google.api.http` annotations.

In process (what `orchestrator serve` does):

    backend = InProcessBackend(servicers_by_service_name, policy, grpc_health_servicer)
    gateway = await start_in_process_gateway("0.0.0.0", 8080, backend)
    ...
    await gateway.stop()

As its own process toward a gRPC server (`start_gateway` over a channel):
`python -m orchestrator_server.gateway --grpc-target HOST:PORT`.
"""

from orchestrator_server.gateway.app import (
    DEFAULT_SERVICES,
    Gateway,
    GatewayOptions,
    ReadinessCheck,
    create_gateway,
)
from orchestrator_server.gateway.inprocess import InProcessBackend
from orchestrator_server.gateway.serve import RunningGateway, start_gateway, start_in_process_gateway

__all__ = [
    "DEFAULT_SERVICES",
    "Gateway",
    "GatewayOptions",
    "InProcessBackend",
    "ReadinessCheck",
    "RunningGateway",
    "create_gateway",
    "start_gateway",
    "start_in_process_gateway",
]
