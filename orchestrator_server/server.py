"""The orchestrator process: store, domain, gRPC server (and the REST gateway) wired together.

`OrchestratorServer` is created, started and stopped by `cli.serve`, by tests in process and by
benchmarks; `serve` apart from creation, as in grpcio_health_checking.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from orchestrator.v1 import (
    discovery_pb2,
    discovery_pb2_grpc,
    event_pb2,
    registry_pb2,
    registry_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)
from orchestrator.v1 import (
    health_pb2 as orchestrator_health_pb2,
)
from orchestrator.v1 import (
    health_pb2_grpc as orchestrator_health_pb2_grpc,
)
from orchestrator_server import metrics
from orchestrator_server.agents import Registry
from orchestrator_server.auth import bind
from orchestrator_server.cluster import Cluster
from orchestrator_server.config import Config
from orchestrator_server.discovery import Discovery
from orchestrator_server.events import RECENT_EVENTS, EventBus
from orchestrator_server.grpc_api.discovery import DiscoveryServicer
from orchestrator_server.grpc_api.errors import ErrorInterceptor
from orchestrator_server.grpc_api.health import HealthServicer
from orchestrator_server.grpc_api.interceptors import PolicyInterceptor
from orchestrator_server.grpc_api.reflection import enable_server_reflection
from orchestrator_server.grpc_api.registry import RegistryServicer
from orchestrator_server.grpc_api.tasks import TasksServicer
from orchestrator_server.grpc_api.telemetry import TelemetryInterceptor
from orchestrator_server.health import HealthReporter, WorkloadSummary
from orchestrator_server.limits import raise_fd_limit
from orchestrator_server.metrics import TRANSITIONS, status_label
from orchestrator_server.policy import Policy
from orchestrator_server.store import Store, open_store
from orchestrator_server.tasks import TaskScheduler

log = logging.getLogger(__name__)

TASKS_SERVICE = tasks_pb2.DESCRIPTOR.services_by_name["TasksService"].full_name
SERVICE_NAMES = (
    registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
    orchestrator_health_pb2.DESCRIPTOR.services_by_name["HealthService"].full_name,
    discovery_pb2.DESCRIPTOR.services_by_name["DiscoveryService"].full_name,
    TASKS_SERVICE,
)


class PortInUse(OSError):
    """A port the server must listen on is taken (another orchestrator is probably running)."""

    def __init__(self, port: int, variable: str) -> None:
        super().__init__(
            errno.EADDRINUSE,
            f"port {port} is in use: stop the process holding it or set {variable} to another port",
        )
        self.port = port
        self.variable = variable


def check_port_free(host: str, port: int, variable: str) -> None:
    """Raises PortInUse when `port` cannot be bound on `host`: checked before anything starts, so
    the answer is one line, not grpc core's bind error and a traceback."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the real listeners do
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise PortInUse(port, variable) from error
            # Anything else (an address not on this host) is reported by the real bind.


class RunningGateway(Protocol):
    port: int

    async def stop(self) -> None: ...


def grpc_server_options(config: Config) -> list[tuple[str, Any]]:
    """Keepalive enforced on our side and permitted from agents, so half-open peers are found in
    seconds; pending-stream limits raised so a reconnect storm is admitted, not refused.

    Since grpc/grpc#34647 a ping's answer is awaited for `grpc.http2.ping_timeout_ms` (default
    60 s), not `keepalive_timeout_ms`: without it a frozen peer stayed READY for a minute at a 1 s
    keepalive (measured: 60 s before, ~2-3 s after, tests/test_session_hardening.py)."""
    keepalive_timeout_ms = int(config.keepalive_timeout * 1000)
    return [
        ("grpc.keepalive_time_ms", int(config.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
        ("grpc.http2.ping_timeout_ms", keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 1000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.server.max_pending_requests", 20_000),
        ("grpc.server.max_pending_requests_hard_limit", 40_000),
        ("grpc.so_reuseport", 0),
    ]


class OrchestratorServer:
    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config = config
        self.store = store or open_store(
            config.database_url or config.database_path,
            synchronous=config.db_synchronous,
            event_retention=config.event_retention,
            pool_size=config.database_pool_size,
        )
        self.cluster = Cluster(config, self.store)
        self.registry = Registry(config, self.store, self.cluster)
        self.tasks = TaskScheduler(config, self.registry, self.store)
        self.discovery = Discovery(self.registry)
        self.bus: EventBus | None = None
        # Other processes' commits the store delivers before the bus exists (while membership
        # starts): published once the projections listen, not lost.
        self._early_events: list[event_pb2.Event] = []
        self.grpc_port = 0
        self.http_port = 0
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._server: grpc.aio.Server | None = None
        self._gateway: RunningGateway | None = None
        self._stopped = asyncio.Event()
        self._draining = False
        self._fd_limit = 0
        self._health_update: asyncio.Future[None] | None = None
        self._restoring: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Connections held open over HTTP must not run the process out of descriptors for gRPC.
        self._fd_limit = raise_fd_limit(log)
        check_port_free(self.config.bind_host, self.config.grpc_port, "GRPC_PORT")
        if self.config.gateway_enabled:
            check_port_free(self.config.bind_host, self.config.http_port, "PORT")
        loaded = await self.store.open(self._publish)
        # Membership first: which replicas are alive decides who times which restored agent.
        await self.cluster.start()
        # The in-memory window never reaches further back than the store's log does.
        self.bus = EventBus(
            self.store,
            loaded.revision,
            loaded.oldest_revision,
            min(RECENT_EVENTS, self.config.event_retention),
        )
        self.bus.seed_agents(loaded.agents)
        self.registry.restore(loaded.agents, loaded.agent_token_hashes)
        self.tasks.load(loaded.active_tasks)  # restored in the background once the process serves
        # The projections follow committed events only (this process's and other processes').
        self.bus.add_listener(self.registry.apply)
        self.bus.add_listener(self.tasks.apply)
        self.registry.observer = self.tasks
        self.cluster.on_change = self._cluster_changed
        early, self._early_events = self._early_events, []
        self.bus.publish(early)
        self.registry.on_transition = lambda agent, _previous: TRANSITIONS.labels(
            status_label(agent.status)
        ).inc()
        metrics.track(self)
        reporter = HealthReporter(
            self.registry, self.store, self.tasks.workload, lambda: self._bus().revision
        )

        # One policy for both transports: the gRPC interceptors and the in-process REST gateway.
        self.policy = Policy(self.config, self.registry)
        server = grpc.aio.server(interceptors=self._interceptors(), options=grpc_server_options(self.config))
        self.sessions = RegistryServicer(self.config, self.registry, self.tasks)
        servicers = (
            self.sessions,
            HealthServicer(reporter, self.bus),
            DiscoveryServicer(self.discovery, self.bus),
            TasksServicer(self.tasks, self.bus),
        )
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicers[0], server)
        orchestrator_health_pb2_grpc.add_HealthServiceServicer_to_server(servicers[1], server)
        discovery_pb2_grpc.add_DiscoveryServiceServicer_to_server(servicers[2], server)
        tasks_pb2_grpc.add_TasksServiceServicer_to_server(servicers[3], server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server
        )
        await self._set_health(serving=True)
        # The REST port is bound (and listening) now, so the ready file can name it; the gateway
        # behind it (aiohttp's import alone takes ~0.5 s) starts after gRPC serves. A REST
        # connection made meanwhile waits in the listen backlog and is answered once it has.
        http_socket = self._bind_http() if self.config.gateway_enabled else None
        self.grpc_port = await bind(server, self.config)
        if self.grpc_port == 0:
            if http_socket is not None:
                http_socket.close()
            raise OSError(f"cannot bind gRPC to {self.config.bind_host}:{self.config.grpc_port}")
        await server.start()
        self._server = server
        if http_socket is not None:
            self.http_port = http_socket.getsockname()[1]
        # Ready as soon as gRPC serves: from here every await lets reconnecting agents' hellos in,
        # and a restart with thousands of them must not push readiness back (figure 7).
        if self.config.ready_file:
            self._write_ready_file()
        # Most of a restart's work, done once the process serves (task calls and sessions wait).
        self._restoring = asyncio.create_task(self._restore_tasks())
        if http_socket is not None:
            self._gateway = await self._start_gateway(
                dict(zip(SERVICE_NAMES, servicers, strict=True)), http_socket
            )
            if self._gateway is None:
                self.http_port = 0
        log.info(
            "orchestrator serving gRPC on %s:%d%s (database %s)",
            self.config.bind_host,
            self.grpc_port,
            f", REST on port {self.http_port}" if self._gateway else "",
            self.config.database_path,
        )

    def _bind_http(self) -> socket.socket:
        host, port = self.config.bind_host, self.config.http_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's listener does
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as error:
            sock.close()
            if error.errno == errno.EADDRINUSE:
                raise PortInUse(port, "PORT") from error
            raise
        return sock

    def _interceptors(self) -> Sequence[Any]:
        # Outermost first: telemetry sees the final status whoever set it; the policy raises
        # domain errors for ErrorInterceptor to turn into statuses.
        return [TelemetryInterceptor(), ErrorInterceptor(), PolicyInterceptor(self.policy)]

    async def _start_gateway(
        self, servicers: dict[str, object], sock: socket.socket
    ) -> RunningGateway | None:
        """The REST gateway on `sock`, calling the servicers in process (no loopback gRPC call)."""
        try:
            gateway_module = importlib.import_module("orchestrator_server.gateway")
        except ImportError:
            sock.close()
            log.info("REST gateway not available in this build")
            return None
        gateway: RunningGateway = await gateway_module.start_in_process_gateway(
            self.config.bind_host,
            self.config.http_port,
            gateway_module.InProcessBackend(servicers, self.policy, self.health),
            readiness_check=self._store_ready,
            options=gateway_module.GatewayOptions(
                header_timeout=self.config.gateway_header_timeout,
                body_timeout=self.config.gateway_body_timeout,
                # At most half the descriptors, whatever is configured: the rest stay for gRPC.
                max_connections=min(self.config.gateway_max_connections, max(1, self._fd_limit // 2)),
            ),
            sock=sock,
        )
        return gateway

    def _cluster_changed(self) -> None:
        """Membership, leadership or the replicas changed (cluster.py): the projections decide
        again who acts on what, and a replica that lost its membership is not ready."""
        self.registry.cluster_changed()
        self.tasks.cluster_changed(self.cluster.leader)
        if self._server is not None and not self._draining:
            self._health_update = asyncio.ensure_future(self._set_health(self.cluster.serving))

    async def _restore_tasks(self) -> None:
        try:
            await self.tasks.start()
        except Exception:
            log.critical(
                "cannot restore the unfinished tasks; task calls and sessions are refused", exc_info=True
            )
        if self._server is not None and not self._draining:
            await self._set_health(self.cluster.serving)

    async def _set_health(self, serving: bool) -> None:
        """grpc.health, per service: TasksService (and with it the whole process, if the tasks could
        not be restored) is NOT_SERVING until the unfinished tasks are restored; meanwhile its calls
        wait, and agents' sessions wait for their welcome."""
        for name in ("", *SERVICE_NAMES):
            up = serving and self.tasks.restore_error is None and (name != TASKS_SERVICE or self.tasks.served)
            await self.health.set(
                name,
                health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING,
            )

    async def _store_ready(self) -> bool:
        if self._draining or not self.cluster.serving or self.tasks.restore_error is not None:
            return False
        try:
            await self.store.ping()
        except Exception:  # any failure means "not ready"; /readyz reports it
            return False
        return True

    def _bus(self) -> EventBus:
        assert self.bus is not None, "server not started"
        return self.bus

    def _publish(self, events: Sequence[event_pb2.Event]) -> None:
        if self.bus is None:
            self._early_events.extend(events)
            return
        self.bus.publish(events)

    def _write_ready_file(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.config.ready_file))
        with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
            json.dump({"grpc_port": self.grpc_port, "http_port": self.http_port, "pid": os.getpid()}, handle)
        os.replace(handle.name, self.config.ready_file)

    async def stop(self, grace: float | None = None, delay: float = 0.0) -> None:
        """Drains: NOT_SERVING and new sessions refused at once; everything else still served for
        `delay` seconds (so load balancers stop sending first); then agents told to reconnect,
        in-flight calls finished within `grace`, state flushed."""
        if self._server is None or self._draining:
            return
        self._draining = True
        grace = self.config.shutdown_grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.sessions.refuse_new_sessions()
        if delay > 0:
            log.info("draining: not ready; still serving for %g s", delay)
            await asyncio.sleep(delay)
        self.registry.shutdown("orchestrator shutting down")
        if self._restoring is not None:
            self._restoring.cancel()
        self.tasks.shutdown()
        self._bus().close()
        # Give the reconnect requests a moment to leave before the streams are cut.
        await asyncio.sleep(min(0.2, grace))
        if self._gateway is not None:
            await self._gateway.stop()
        await self._server.stop(grace)
        self._server = None
        await self.cluster.stop()
        await self.store.close()
        metrics.untrack(self)
        self._stopped.set()

    def agent_statuses(self) -> Iterable[int]:
        return (agent.status for agent in self.registry.agents())

    def workload(self) -> WorkloadSummary:
        return self.tasks.workload()

    def open_sessions(self) -> int:
        return sum(1 for agent in self.registry.agents() if self.registry.session_of(agent.agent_id))

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
