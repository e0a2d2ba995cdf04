"""Configuration from environment variables; a bad value stops startup naming the variable."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

ENVIRONMENTS = ("development", "production", "test")
POSTGRES_SCHEMES = ("postgresql", "postgres")
SYNCHRONOUS_MODES = ("FULL", "NORMAL", "OFF")
LOG_FORMATS = ("json", "text")
SCHEDULING_STRATEGIES = ("least_loaded", "round_robin", "random", "consistent_hash")


class ConfigError(ValueError):
    """A configuration variable has a value the server cannot use."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"invalid configuration: {variable} {problem}")
        self.variable = variable


@dataclass(frozen=True)
class Config:
    """Every setting of one orchestrator process."""

    grpc_port: int = 50051
    http_port: int = 8080
    bind_host: str = "0.0.0.0"
    environment: str = "development"
    heartbeat_timeout: float = 60.0
    heartbeat_interval: float = 10.0
    failover_grace: float = 10.0
    # Failover pauses when at least this share of live agents drops within `mass_failure_window`.
    mass_failure_threshold: float = 0.5
    mass_failure_window: float = 5.0
    mass_failure_min_agents: int = 4
    database_path: str = "orchestrator.db"
    # A postgresql:// URL selects the PostgreSQL store (DATABASE_PATH is then unused); it may carry
    # a password, so it never appears in the repr.
    database_url: str = field(default="", repr=False)
    database_pool_size: int = 10
    db_synchronous: str = "FULL"
    event_retention: int = 100_000
    gateway_enabled: bool = True
    log_level: str = "INFO"
    log_format: str = "text"
    ready_file: str = ""
    scheduling_strategy: str = "least_loaded"
    default_max_attempts: int = 3
    retry_backoff_base: float = 1.0
    retry_backoff_max: float = 60.0
    keepalive_time: float = 10.0
    keepalive_timeout: float = 5.0
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_streams: int = 20_000
    shutdown_grace: float = 5.0
    # Seconds between SIGTERM (readiness off) and the start of the drain, so load balancers stop
    # sending before anything is refused.
    shutdown_delay: float = 1.0
    # A Heartbeat stream must send its hello within this many seconds.
    hello_timeout: float = 10.0
    # Streams waiting for their hello at once (they carry no identity yet, so no per-principal cap).
    max_pending_hellos: int = 1000
    process_id: str = field(default_factory=lambda: f"{os.uname().nodename}:{os.getpid()}")
    # A replica's membership (and the leader's) lease lasts this long and is renewed every third of
    # it; a replica that cannot renew in time stops serving sessions (cluster.py).
    replica_ttl: float = 5.0
    # Security (auth.py, limits.py; docs/SECURITY.md). Keys never appear in the repr.
    api_keys: str = field(default="", repr=False)
    api_keys_file: str = ""
    api_keys_reload_interval: float = 5.0
    allow_insecure_production: bool = False
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    rate_limit_enabled: bool = True
    rate_limit_api_rate: float = 1000.0
    rate_limit_api_burst: int = 2000
    rate_limit_session_rate: float = 50.0
    rate_limit_session_burst: int = 100
    max_sessions_per_principal: int = 1000
    # Failed authentications per peer host (interceptors.AuthInterceptor), and the REST gateway's
    # defences against held connections (gateway/hardening.py).
    auth_failure_rate: float = 20.0
    auth_failure_burst: int = 200
    gateway_header_timeout: float = 10.0
    gateway_body_timeout: float = 30.0
    gateway_max_connections: int = 4096

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Reads the settings from `env` (default: the process environment). Parsing only: whether
        they are safe to run with (keys in production, readable key and TLS files) is
        auth.check_security_config's question, asked at startup."""
        source = os.environ if env is None else env
        reader = _Reader(source)
        timeout = reader.number("HEARTBEAT_TIMEOUT", cls.heartbeat_timeout, minimum=0.05)
        interval = reader.number("HEARTBEAT_INTERVAL", min(cls.heartbeat_interval, timeout / 3), minimum=0.01)
        if interval >= timeout:
            raise ConfigError("HEARTBEAT_INTERVAL", f"must be shorter than HEARTBEAT_TIMEOUT ({timeout:g} s)")
        return cls(
            grpc_port=reader.integer("GRPC_PORT", cls.grpc_port, minimum=0, maximum=65535),
            http_port=reader.integer("PORT", cls.http_port, minimum=0, maximum=65535),
            bind_host=reader.text("BIND_HOST", cls.bind_host),
            environment=reader.choice("ENVIRONMENT", cls.environment, ENVIRONMENTS),
            heartbeat_timeout=timeout,
            heartbeat_interval=interval,
            failover_grace=reader.number("FAILOVER_GRACE", cls.failover_grace, minimum=0),
            mass_failure_threshold=reader.number(
                "MASS_FAILURE_THRESHOLD", cls.mass_failure_threshold, minimum=0.0, maximum=1.0
            ),
            mass_failure_window=reader.number("MASS_FAILURE_WINDOW", cls.mass_failure_window, minimum=0.0),
            mass_failure_min_agents=reader.integer(
                "MASS_FAILURE_MIN_AGENTS", cls.mass_failure_min_agents, minimum=1
            ),
            database_path=reader.text("DATABASE_PATH", cls.database_path),
            database_url=reader.postgres_url("DATABASE_URL"),
            replica_ttl=reader.number("REPLICA_TTL", cls.replica_ttl, minimum=0.3, maximum=300.0),
            database_pool_size=reader.integer("DATABASE_POOL_SIZE", cls.database_pool_size, minimum=1),
            db_synchronous=reader.choice("DB_SYNCHRONOUS", cls.db_synchronous, SYNCHRONOUS_MODES, upper=True),
            event_retention=reader.integer("EVENT_RETENTION", cls.event_retention, minimum=100),
            gateway_enabled=reader.flag("GATEWAY_ENABLED", cls.gateway_enabled),
            log_level=reader.choice(
                "LOG_LEVEL", cls.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"), upper=True
            ),
            log_format=reader.choice("LOG_FORMAT", cls.log_format, LOG_FORMATS),
            ready_file=reader.text("ORCHESTRATOR_READY_FILE", "", allow_empty=True),
            scheduling_strategy=reader.choice(
                "SCHEDULING_STRATEGY", cls.scheduling_strategy, SCHEDULING_STRATEGIES
            ),
            default_max_attempts=reader.integer("TASK_MAX_ATTEMPTS", cls.default_max_attempts, minimum=1),
            retry_backoff_base=reader.number("TASK_RETRY_BACKOFF", cls.retry_backoff_base, minimum=0.0),
            retry_backoff_max=reader.number("TASK_RETRY_BACKOFF_MAX", cls.retry_backoff_max, minimum=0.0),
            keepalive_time=reader.number("KEEPALIVE_TIME", cls.keepalive_time, minimum=0.1),
            keepalive_timeout=reader.number("KEEPALIVE_TIMEOUT", cls.keepalive_timeout, minimum=0.1),
            max_message_bytes=reader.integer("MAX_MESSAGE_BYTES", cls.max_message_bytes, minimum=1024),
            max_concurrent_streams=reader.integer(
                "MAX_CONCURRENT_STREAMS", cls.max_concurrent_streams, minimum=1
            ),
            shutdown_grace=reader.number("SHUTDOWN_GRACE", cls.shutdown_grace, minimum=0.0),
            shutdown_delay=reader.number("SHUTDOWN_DELAY", cls.shutdown_delay, minimum=0.0),
            hello_timeout=reader.number("HELLO_TIMEOUT", cls.hello_timeout, minimum=0.05),
            max_pending_hellos=reader.integer("MAX_PENDING_HELLOS", cls.max_pending_hellos, minimum=1),
            api_keys=reader.text("API_KEYS", "", allow_empty=True),
            api_keys_file=reader.text("API_KEYS_FILE", "", allow_empty=True),
            api_keys_reload_interval=reader.number(
                "API_KEYS_RELOAD_INTERVAL", cls.api_keys_reload_interval, minimum=0.0
            ),
            allow_insecure_production=reader.flag("ALLOW_INSECURE_PRODUCTION", cls.allow_insecure_production),
            tls_cert_file=reader.text("TLS_CERT_FILE", "", allow_empty=True),
            tls_key_file=reader.text("TLS_KEY_FILE", "", allow_empty=True),
            tls_client_ca_file=reader.text("TLS_CLIENT_CA_FILE", "", allow_empty=True),
            rate_limit_enabled=reader.flag("RATE_LIMIT_ENABLED", cls.rate_limit_enabled),
            rate_limit_api_rate=reader.number("RATE_LIMIT_API_RATE", cls.rate_limit_api_rate, minimum=0.0),
            rate_limit_api_burst=reader.integer("RATE_LIMIT_API_BURST", cls.rate_limit_api_burst, minimum=1),
            rate_limit_session_rate=reader.number(
                "RATE_LIMIT_SESSION_RATE", cls.rate_limit_session_rate, minimum=0.0
            ),
            rate_limit_session_burst=reader.integer(
                "RATE_LIMIT_SESSION_BURST", cls.rate_limit_session_burst, minimum=1
            ),
            max_sessions_per_principal=reader.integer(
                "MAX_SESSIONS_PER_PRINCIPAL", cls.max_sessions_per_principal, minimum=1
            ),
            auth_failure_rate=reader.number("AUTH_FAILURE_RATE", cls.auth_failure_rate, minimum=0.0),
            auth_failure_burst=reader.integer("AUTH_FAILURE_BURST", cls.auth_failure_burst, minimum=1),
            gateway_header_timeout=reader.number(
                "GATEWAY_HEADER_TIMEOUT", cls.gateway_header_timeout, minimum=0.1
            ),
            gateway_body_timeout=reader.number("GATEWAY_BODY_TIMEOUT", cls.gateway_body_timeout, minimum=0.1),
            gateway_max_connections=reader.integer(
                "GATEWAY_MAX_CONNECTIONS", cls.gateway_max_connections, minimum=1
            ),
        )


class _Reader:
    """Parses one variable at a time, raising ConfigError that names it."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def _get(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        raw = self._env.get(name)
        if raw is None or raw.strip() == "":
            return default
        return parse(raw.strip())

    def text(self, name: str, default: str, *, allow_empty: bool = False) -> str:
        value = self._env.get(name, default)
        if not value and not allow_empty:
            raise ConfigError(name, "must not be empty")
        return value

    def postgres_url(self, name: str) -> str:
        """A postgresql:// URL or nothing. Only its shape is checked here; the server's first
        connection says whether the database answers."""

        def parse(raw: str) -> str:
            try:
                parts = urllib.parse.urlsplit(raw)
                parts.port  # noqa: B018 -- raises on a port that is not a number
            except ValueError as exc:
                raise ConfigError(name, f"is not a valid URL ({exc})") from None
            if parts.scheme.lower() not in POSTGRES_SCHEMES:
                raise ConfigError(name, "must be a postgresql:// URL (or unset for SQLite at DATABASE_PATH)")
            return raw

        return self._get(name, "", parse)

    def integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        def parse(raw: str) -> int:
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(name, f"must be an integer, got {raw!r}") from None
            return self._bounded(name, value, minimum, maximum)

        return self._get(name, default, parse)

    def number(
        self, name: str, default: float, *, minimum: float | None = None, maximum: float | None = None
    ) -> float:
        def parse(raw: str) -> float:
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(name, f"must be a number of seconds, got {raw!r}") from None
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(name, f"must be a finite number, got {raw!r}")
            return self._bounded(name, value, minimum, maximum)

        return self._get(name, default, parse)

    def choice(self, name: str, default: str, allowed: tuple[str, ...], *, upper: bool = False) -> str:
        def parse(raw: str) -> str:
            value = raw.upper() if upper else raw.lower()
            if value not in allowed:
                raise ConfigError(name, f"must be one of {', '.join(allowed)}, got {raw!r}")
            return value

        return self._get(name, default, parse)

    def flag(self, name: str, default: bool) -> bool:
        def parse(raw: str) -> bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ConfigError(name, f"must be true or false, got {raw!r}")

        return self._get(name, default, parse)

    @staticmethod
    def _bounded(name: str, value: T, minimum: object, maximum: object) -> T:
        if minimum is not None and value < minimum:  # type: ignore[operator]
            raise ConfigError(name, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:  # type: ignore[operator]
            raise ConfigError(name, f"must be at most {maximum}, got {value}")
        return value
