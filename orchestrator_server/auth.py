"""Who is calling and what they may do: the access table, principals, authentication by API key
(`keys.py`: roles, configuration and the key ring) or agent credential, and TLS.

Every RPC has exactly one entry in `RULES` (the test suite fails when an RPC of the protos has
none). The policy layer (`policy.py`) applies it for both transports; nothing here knows about
contexts. An agent's credential is the `agent_token` issued by RegisterAgent,
`<agent_id>.<secret>`, so the agent it belongs to is found with one lookup.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from orchestrator.v1 import agent_pb2
from orchestrator_server.agents.credentials import OpenCredential
from orchestrator_server.config import Config, ConfigError
from orchestrator_server.errors import NotFound, PermissionDenied, Unauthenticated
from orchestrator_server.keys import (
    MIN_KEY_LENGTH,
    ApiKey,
    KeyFormatError,
    KeyRing,
    Role,
    digest,
    load_configured_keys,
    parse_key_list,
    parse_keys,
    read_key_file,
)

# Key configuration lives in `keys.py`; these names stay importable from here.
__all__ = [
    "MIN_KEY_LENGTH",
    "RULES",
    "Access",
    "AgentVerifier",
    "ApiKey",
    "Audit",
    "Authenticator",
    "Budget",
    "KeyFormatError",
    "KeyRing",
    "Kind",
    "Principal",
    "Role",
    "Rule",
    "bind",
    "check_security_config",
    "credential",
    "digest",
    "grpc_peer",
    "load_configured_keys",
    "parse_key_list",
    "parse_keys",
    "peer_host",
    "read_key_file",
    "split_agent_token",
]

log = logging.getLogger(__name__)


class Access(enum.Enum):
    """What a caller must be to make a call."""

    #: Anyone, even without a credential (the standard health check, for probes).
    PUBLIC = "public"
    #: Any authenticated principal: reader, agent key, agent credential or admin.
    READ = "read"
    #: An API key of role agent, or admin: registering an agent.
    REGISTER = "register"
    #: The agent itself (its agent credential; `Rule.agent_field` names the agent acted for), or admin.
    AGENT = "agent"
    #: The Heartbeat session: the hello's agent_id + agent_token authenticate it; a credential in the
    #: metadata may add an agent or admin key, or must be the same agent's credential.
    SESSION = "session"
    ADMIN = "admin"


class Budget(enum.Enum):
    """Which token bucket a call draws from, so floods of API calls cannot starve liveness traffic."""

    NONE = "none"
    API = "api"
    SESSION = "session"


class Audit(enum.Enum):
    NEVER = "never"
    ALWAYS = "always"
    #: Audited unless the agent acts for itself: an operator overriding an agent's report is rare
    #: and worth a record; the agent's own reports are the normal, high-volume path.
    OVERRIDE = "override"


@dataclass(frozen=True)
class Rule:
    access: Access
    budget: Budget = Budget.API
    audit: Audit = Audit.NEVER
    #: The request field naming the agent acted for, checked against an agent credential.
    agent_field: str = ""


_REGISTRY = "/orchestrator.v1.RegistryService/"
_HEALTH = "/orchestrator.v1.HealthService/"
_DISCOVERY = "/orchestrator.v1.DiscoveryService/"
_TASKS = "/orchestrator.v1.TasksService/"
_READ = Rule(Access.READ)

#: Every RPC the server serves, by full method name, and who may call it. The one place to look.
RULES: Mapping[str, Rule] = {
    _REGISTRY + "RegisterAgent": Rule(Access.REGISTER, audit=Audit.ALWAYS),
    _REGISTRY + "DeregisterAgent": Rule(Access.AGENT, audit=Audit.ALWAYS, agent_field="agent_id"),
    _REGISTRY + "GetAgent": _READ,
    _REGISTRY + "ListAgents": _READ,
    _REGISTRY + "UpdateAgent": Rule(Access.AGENT, audit=Audit.ALWAYS, agent_field="agent_id"),
    _REGISTRY + "DrainAgent": Rule(Access.ADMIN, audit=Audit.ALWAYS),
    _REGISTRY + "UndrainAgent": Rule(Access.ADMIN, audit=Audit.ALWAYS),
    _REGISTRY + "SendHeartbeat": Rule(Access.AGENT, budget=Budget.SESSION, agent_field="agent_id"),
    _REGISTRY + "Heartbeat": Rule(Access.SESSION, budget=Budget.SESSION),
    _HEALTH + "GetAgentHealth": _READ,
    _HEALTH + "ListAgentHealth": _READ,
    _HEALTH + "GetSystemHealth": _READ,
    _HEALTH + "WatchAgentHealth": _READ,
    _DISCOVERY + "DiscoverAgents": _READ,
    _DISCOVERY + "ListEndpoints": _READ,
    _DISCOVERY + "ResolveAgent": _READ,
    _DISCOVERY + "WatchAgents": _READ,
    _TASKS + "CreateTask": Rule(Access.ADMIN, audit=Audit.ALWAYS),
    _TASKS + "GetTask": _READ,
    _TASKS + "ListTasks": _READ,
    _TASKS + "AssignTask": Rule(Access.ADMIN, audit=Audit.ALWAYS),
    _TASKS + "CancelTask": Rule(Access.ADMIN, audit=Audit.ALWAYS),
    _TASKS + "CompleteTask": Rule(Access.AGENT, audit=Audit.OVERRIDE),
    _TASKS + "FailTask": Rule(Access.AGENT, audit=Audit.OVERRIDE),
    _TASKS + "ReportTaskProgress": Rule(Access.AGENT),
    _TASKS + "WatchTask": _READ,
    # Probes (kubelet, grpc_health_probe) carry no credential; the answer reveals nothing.
    "/grpc.health.v1.Health/Check": Rule(Access.PUBLIC, budget=Budget.NONE),
    "/grpc.health.v1.Health/Watch": Rule(Access.PUBLIC, budget=Budget.NONE),
    "/grpc.health.v1.Health/List": Rule(Access.PUBLIC, budget=Budget.NONE),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _READ,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": _READ,
}


# -- principals --------------------------------------------------------------------------------


class Kind(enum.Enum):
    KEY = "key"
    AGENT = "agent"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Principal:
    """The caller. `name` identifies it in logs, audit records and rate-limit buckets, and never
    contains a secret: keys appear as their role and a fingerprint of their digest."""

    kind: Kind
    name: str
    role: Role | None = None
    agent_id: str = ""

    @classmethod
    def anonymous(cls, peer: str) -> Principal:
        return cls(Kind.ANONYMOUS, f"anonymous:{peer_host(peer)}")

    @classmethod
    def agent(cls, agent_id: str) -> Principal:
        return cls(Kind.AGENT, f"agent:{agent_id}", Role.AGENT, agent_id)


def peer_host(peer: str) -> str:
    """The address of `context.peer()` without the port: one bucket per host, not per connection."""
    scheme, _, rest = peer.partition(":")
    if scheme in ("ipv4", "ipv6"):
        host, _, _ = rest.rpartition(":")
        return host or rest
    return scheme or "unknown"


# -- the client address ----------------------------------------------------------------------


def grpc_peer(peername: Any) -> str:
    """A socket's peer name (`transport.get_extra_info("peername")`) as grpc writes `peer()`."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"ipv6:[{host}]:{port}" if ":" in str(host) else f"ipv4:{host}:{port}"
    return f"unix:{peername}" if peername else "unknown"


class AgentVerifier(Protocol):
    """The registry's check of an agent credential (NotFound / Unauthenticated when it fails;
    `agents.credentials.OpenCredential` when `authenticated_only` and it was issued without authentication)."""

    def verify_token(
        self, agent_id: str, token: str, *, authenticated_only: bool = False
    ) -> agent_pb2.Agent: ...


AGENT_TOKEN_SEPARATOR = "."


def split_agent_token(token: str) -> tuple[str, str] | None:
    """(agent_id, secret) of a credential issued as `<agent_id>.<secret>`, None if it is not one."""
    agent_id, separator, secret = token.partition(AGENT_TOKEN_SEPARATOR)
    if not separator or not agent_id or not secret:
        return None
    return agent_id, secret


def check_security_config(config: Config) -> None:
    """Refuses configurations that would run less safely than asked: production without keys,
    unreadable key or certificate files. Raises ConfigError naming the variable."""
    keys = load_configured_keys(config)
    if config.environment == "production" and not keys and not config.allow_insecure_production:
        raise ConfigError(
            "API_KEYS",
            "(or API_KEYS_FILE) must configure at least one key when ENVIRONMENT=production "
            "(ALLOW_INSECURE_PRODUCTION=true runs without authentication)",
        )
    _tls_files(config)


# -- authentication and authorization ----------------------------------------------------------


def credential(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The secret of `authorization: Bearer <secret>` or `x-api-key: <secret>`, None if neither."""
    api_key: str | None = None
    for name, value in metadata:
        if isinstance(value, bytes):
            continue
        if name == "authorization":
            scheme, _, secret = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not secret.strip():
                raise Unauthenticated("the authorization header must be 'Bearer <key>'")
            return secret.strip()
        if name == "x-api-key":
            api_key = value.strip()
    return api_key


_BAD_HELLO = "invalid credential: unknown agent or agent token"


class Authenticator:
    """Turns a call's metadata into a principal, and decides whether it may make the call."""

    def __init__(self, keys: KeyRing, agents: AgentVerifier) -> None:
        self.keys = keys
        self._agents = agents

    @property
    def enabled(self) -> bool:
        return self.keys.enabled

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]], peer: str) -> Principal:
        """The caller; anonymous when no credential was sent (or authentication is off)."""
        if not self.enabled:
            return Principal.anonymous(peer)
        self.keys.maybe_reload()
        secret = credential(metadata)
        if secret is None:
            return Principal.anonymous(peer)
        key = self.keys.lookup(secret)
        if key is not None:
            return Principal(Kind.KEY, f"{key.role}-key:{key.label}", key.role)
        parts = split_agent_token(secret)
        if parts is not None:
            try:
                self._agents.verify_token(parts[0], secret, authenticated_only=True)
            except OpenCredential:
                raise  # the holder of the right secret is told why it no longer works
            except (NotFound, Unauthenticated):
                pass  # one answer for every bad credential: which part was wrong is not told
            else:
                return Principal.agent(parts[0])
        raise Unauthenticated("invalid credential: unknown API key or agent token")

    def verify_hello(self, agent_id: str, token: str, *, keyed: bool) -> Principal:
        """A session's hello as its credential. For a caller that presented an API key (`keyed`),
        an unknown agent is NOT_FOUND so that the SDK re-registers (the session protocol); without
        one, it is UNAUTHENTICATED like a wrong token, so the answer tells no agent id apart."""
        try:
            self._agents.verify_token(agent_id, token, authenticated_only=True)
        except OpenCredential:
            raise
        except NotFound:
            if keyed:
                raise
            raise Unauthenticated(_BAD_HELLO) from None
        except Unauthenticated:
            raise Unauthenticated(_BAD_HELLO) from None
        return Principal.agent(agent_id)

    def authorize(self, rule: Rule, principal: Principal, request: Any) -> None:
        """Raises Unauthenticated (no credential) or PermissionDenied (not enough) for this call."""
        if not self.enabled or rule.access is Access.PUBLIC:
            return
        if principal.kind is Kind.ANONYMOUS:
            if rule.access is Access.SESSION:
                return  # the hello authenticates the session
            raise Unauthenticated(
                "missing credential: send 'authorization: Bearer <key>' or 'x-api-key: <key>'"
            )
        if principal.role is Role.ADMIN:
            return
        access = rule.access
        if access is Access.READ:
            return
        if access is Access.REGISTER and principal.kind is Kind.KEY and principal.role is Role.AGENT:
            return
        if access is Access.SESSION and principal.role is Role.AGENT:
            return  # an agent key, or the agent's credential (matched against the hello later)
        if access is Access.AGENT and principal.kind is Kind.AGENT:
            if rule.agent_field:
                acted_for = getattr(request, rule.agent_field, "")
                if acted_for != principal.agent_id:
                    raise PermissionDenied(
                        f"{principal.name} may act only as itself, not as agent {str(acted_for)[:128]!r}"
                    )
            return
        if access is Access.AGENT and principal.kind is Kind.KEY and principal.role is Role.AGENT:
            raise PermissionDenied(
                "this call needs the agent's own credential (the agent_token of RegisterAgent)"
            )
        raise PermissionDenied(f"{principal.name} may not make this call (needs {_needs(access)})")


def _needs(access: Access) -> str:
    return {
        Access.READ: "any role",
        Access.REGISTER: "an agent or admin key",
        Access.AGENT: "the agent's credential or an admin key",
        Access.SESSION: "an agent credential, an agent key or an admin key",
        Access.ADMIN: "an admin key",
    }.get(access, access.value)


# -- transport security ------------------------------------------------------------------------


def _tls_files(config: Config) -> tuple[str, str, str]:
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        missing = "TLS_KEY_FILE" if config.tls_cert_file else "TLS_CERT_FILE"
        raise ConfigError(missing, "must be set together with TLS_CERT_FILE / TLS_KEY_FILE")
    if config.tls_client_ca_file and not config.tls_cert_file:
        raise ConfigError(
            "TLS_CLIENT_CA_FILE", "needs TLS_CERT_FILE and TLS_KEY_FILE (mutual TLS is TLS first)"
        )
    for variable, path in (
        ("TLS_CERT_FILE", config.tls_cert_file),
        ("TLS_KEY_FILE", config.tls_key_file),
        ("TLS_CLIENT_CA_FILE", config.tls_client_ca_file),
    ):
        if path and not os.access(path, os.R_OK):
            raise ConfigError(variable, f"cannot read {path}")
    return config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file


def _read_tls(config: Config) -> tuple[bytes, bytes, bytes | None]:
    cert_file, key_file, ca_file = _tls_files(config)
    contents = []
    for variable, path in (
        ("TLS_CERT_FILE", cert_file),
        ("TLS_KEY_FILE", key_file),
        ("TLS_CLIENT_CA_FILE", ca_file),
    ):
        if not path:
            contents.append(b"")
            continue
        try:
            with open(path, "rb") as handle:
                contents.append(handle.read())
        except OSError as error:
            raise ConfigError(variable, f"cannot read {path}: {error.strerror}") from None
    return contents[0], contents[1], contents[2] or None


async def bind(server: grpc.aio.Server, config: Config) -> int:
    """Binds the gRPC port: plaintext, TLS (TLS_CERT_FILE + TLS_KEY_FILE) or mutual TLS (plus
    TLS_CLIENT_CA_FILE: client certificates signed by that CA are required). Returns the port (0
    when it could not be bound)."""
    address = f"{config.bind_host}:{config.grpc_port}"
    if not config.tls_cert_file:
        return server.add_insecure_port(address)
    cert, key, client_ca = await asyncio.to_thread(_read_tls, config)
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    return server.add_secure_port(address, credentials)
