"""Who is calling and what they may do: API keys and roles, agent credentials, the access table, TLS.

Every RPC has exactly one entry in `RULES` (the test suite fails when an RPC of the protos has
none). The interceptors in `grpc_api/interceptors.py` apply it; nothing here knows about contexts.

API keys are never kept in the clear: the key ring holds their SHA-256 digests, configured from
`API_KEYS` (environment) and/or `API_KEYS_FILE`, which is re-read off the event loop when it changes
or on SIGHUP. An agent's credential is the `agent_token` issued by RegisterAgent,
`<agent_id>.<secret>`, so the agent it belongs to is found with one lookup.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from orchestrator.v1 import agent_pb2
from orchestrator_server.agents.credentials import OpenCredential
from orchestrator_server.config import Config, ConfigError
from orchestrator_server.errors import NotFound, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)


class Role(enum.StrEnum):
    ADMIN = "admin"
    AGENT = "agent"
    READER = "reader"


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


# -- the client address of REST calls -------------------------------------------------------------

#: Metadata the in-process gateway adds to each call: the HTTP client's address in `context.peer()`
#: form, and an HMAC of it under a per-process secret. Without a valid signature both are ignored,
#: so a direct gRPC caller cannot pose as another address (and escape its per-peer limits).
CLIENT_ADDRESS_HEADER = "x-orchestrator-client-address"
CLIENT_SIGNATURE_HEADER = "x-orchestrator-client-signature"
_MAX_ADDRESS_LENGTH = 128


def grpc_peer(peername: Any) -> str:
    """A socket's peer name (`transport.get_extra_info("peername")`) as grpc writes `peer()`."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"ipv6:[{host}]:{port}" if ":" in str(host) else f"ipv4:{host}:{port}"
    return f"unix:{peername}" if peername else "unknown"


def sign_client_address(secret: str, address: str) -> str:
    return hmac.new(secret.encode(), address.encode(), hashlib.sha256).hexdigest()


def forwarded_peer(metadata: Iterable[tuple[str, str | bytes]], secret: str, peer: str) -> str:
    """The client address the gateway signed, else `peer` (the connection's own address)."""
    if not secret:
        return peer
    values = {
        name: value for name, value in metadata if name in (CLIENT_ADDRESS_HEADER, CLIENT_SIGNATURE_HEADER)
    }
    address, signature = values.get(CLIENT_ADDRESS_HEADER), values.get(CLIENT_SIGNATURE_HEADER)
    if not isinstance(address, str) or not isinstance(signature, str) or len(address) > _MAX_ADDRESS_LENGTH:
        return peer
    if not hmac.compare_digest(signature, sign_client_address(secret, address)):
        return peer
    return address


@dataclass(frozen=True)
class ApiKey:
    role: Role
    digest: bytes = field(repr=False)
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.digest.hex()[:12]


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


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


# -- key configuration -------------------------------------------------------------------------

MIN_KEY_LENGTH = 16
_HEX_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")


class KeyFormatError(ValueError):
    """A key entry cannot be used; the message says where and why, never the key."""


def parse_keys(text: str) -> list[ApiKey]:
    """Keys from a file's text: JSON (`{"keys": [{"role", "key" | "sha256", "name"?}]}` or the list
    alone), or lines `role:key` / `role:sha256:<hex>` with `#` comments."""
    if text.lstrip().startswith(("{", "[")):
        return _parse_json(text)
    return _parse_entries(
        (f"line {number}", line.strip())
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    )


def parse_key_list(value: str) -> list[ApiKey]:
    """Keys from `API_KEYS`: `role:key` or `role:sha256:<hex>` entries separated by commas."""
    entries = [entry.strip() for entry in value.split(",")]
    return _parse_entries((f"entry {number}", entry) for number, entry in enumerate(entries, 1) if entry)


def _parse_entries(entries: Iterable[tuple[str, str]]) -> list[ApiKey]:
    keys = []
    for where, entry in entries:
        role, _, secret = entry.partition(":")
        if secret.startswith("sha256:"):
            keys.append(_key(where, role, hashed=secret.removeprefix("sha256:")))
        else:
            keys.append(_key(where, role, secret=secret))
    return keys


def _parse_json(text: str) -> list[ApiKey]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise KeyFormatError(f"not valid JSON: {error.msg} at line {error.lineno}") from None
    entries = document.get("keys") if isinstance(document, dict) else document
    if not isinstance(entries, list):
        raise KeyFormatError('JSON must be a list of keys or {"keys": [...]}')
    keys = []
    for index, entry in enumerate(entries):
        where = f"keys[{index}]"
        if not isinstance(entry, dict) or not all(isinstance(value, str) for value in entry.values()):
            raise KeyFormatError(f"{where}: must be an object of strings (role, key or sha256, name)")
        unknown = set(entry) - {"role", "key", "sha256", "name"}
        if unknown:
            raise KeyFormatError(f"{where}: unknown fields {', '.join(sorted(unknown))}")
        if ("key" in entry) == ("sha256" in entry):
            raise KeyFormatError(f"{where}: needs exactly one of key, sha256")
        keys.append(
            _key(
                where,
                entry.get("role", ""),
                secret=entry.get("key"),
                hashed=entry.get("sha256"),
                name=entry.get("name", ""),
            )
        )
    return keys


def _key(
    where: str, role: str, *, secret: str | None = None, hashed: str | None = None, name: str = ""
) -> ApiKey:
    try:
        parsed_role = Role(role.strip().lower())
    except ValueError:
        raise KeyFormatError(
            f"{where}: unknown role {role[:32]!r} (expected {', '.join(role.value for role in Role)})"
        ) from None
    if hashed is not None:
        if not _HEX_DIGEST.match(hashed):
            raise KeyFormatError(f"{where}: sha256 must be 64 hex digits")
        return ApiKey(parsed_role, bytes.fromhex(hashed), name)
    assert secret is not None
    if len(secret) < MIN_KEY_LENGTH or any(character.isspace() for character in secret):
        raise KeyFormatError(f"{where}: a key must be at least {MIN_KEY_LENGTH} characters without spaces")
    return ApiKey(parsed_role, digest(secret), name)


def read_key_file(path: str) -> tuple[list[ApiKey], tuple[int, int, int]]:
    """The keys in `path` and the file's signature (inode, size, mtime), which changes on every
    write and on an atomic replace. Blocking: call it off the event loop."""
    with open(path, encoding="utf-8") as handle:
        stat = os.fstat(handle.fileno())
        text = handle.read()
    return parse_keys(text), _signature(stat)


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _file_signature(path: str) -> tuple[int, int, int] | None:
    try:
        return _signature(os.stat(path))
    except OSError:
        return None


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


def load_configured_keys(config: Config) -> list[ApiKey]:
    """The keys of API_KEYS and API_KEYS_FILE. Reads the file: for startup, before serving."""
    try:
        keys = parse_key_list(config.api_keys)
    except KeyFormatError as error:
        raise ConfigError("API_KEYS", str(error)) from None
    if config.api_keys_file:
        try:
            keys.extend(read_key_file(config.api_keys_file)[0])
        except OSError as error:
            raise ConfigError("API_KEYS_FILE", f"cannot be read: {error.strerror}") from None
        except (KeyFormatError, UnicodeDecodeError) as error:
            raise ConfigError("API_KEYS_FILE", f"{config.api_keys_file}: {error}") from None
    return keys


class KeyRing:
    """The configured API keys by digest. The file's keys are replaced as a whole when it changes:
    checked at most every `reload_interval` seconds as calls come in, and at once on SIGHUP; the
    stat and the read run in a thread so the event loop never waits on the disk."""

    def __init__(self, config: Config) -> None:
        self._path = config.api_keys_file
        self._interval = config.api_keys_reload_interval
        self._static = parse_key_list(config.api_keys)
        file_keys: list[ApiKey] = []
        self._signature: tuple[int, int, int] | None = None
        if self._path:
            # Startup: the file is read once before the server accepts calls.
            file_keys, self._signature = read_key_file(self._path)
        self._keys = self._index(file_keys)
        self._next_check = time.monotonic() + self._interval
        self._reloading: asyncio.Task[None] | None = None
        #: Incremented on every successful reload (tests and operators can watch it).
        self.generation = 0

    @property
    def enabled(self) -> bool:
        """Authentication is on once keys are configured; an emptied key file keeps it on (and
        refuses everyone) rather than silently opening the server."""
        return bool(self._static) or bool(self._path)

    @property
    def reloadable(self) -> bool:
        return bool(self._path)

    def __len__(self) -> int:
        return len(self._keys)

    def _index(self, file_keys: Sequence[ApiKey]) -> dict[bytes, ApiKey]:
        return {key.digest: key for key in (*self._static, *file_keys)}

    def lookup(self, secret: str) -> ApiKey | None:
        presented = digest(secret)
        key = self._keys.get(presented)
        # The dict lookup compares digests, which tells a timing attacker nothing usable about a
        # key (it would have to invert SHA-256); the explicit constant-time compare documents that
        # a match is decided by digest equality only.
        if key is None or not hmac.compare_digest(key.digest, presented):
            return None
        return key

    def maybe_reload(self) -> None:
        """Cheap per-call check: starts a background reload when the interval has passed."""
        if self._path and time.monotonic() >= self._next_check:
            self.request_reload()

    def request_reload(self) -> None:
        if self._reloading is None or self._reloading.done():
            self._next_check = time.monotonic() + self._interval
            self._reloading = asyncio.get_running_loop().create_task(self.reload())

    async def reload(self) -> None:
        """Re-reads the file if it changed. A broken file keeps the previous keys (an operator's
        typo must not lock every caller out) and is logged."""
        signature = await asyncio.to_thread(_file_signature, self._path)
        if signature is not None and signature == self._signature:
            return
        try:
            keys, signature = await asyncio.to_thread(read_key_file, self._path)
        except (OSError, KeyFormatError, UnicodeDecodeError) as error:
            log.error("API_KEYS_FILE %s not reloaded, keeping the previous keys: %s", self._path, error)
            return
        self._keys = self._index(keys)
        self._signature = signature
        self.generation += 1
        log.info("API keys reloaded from %s: %d keys", self._path, len(self._keys))


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


@dataclass
class Listener:
    """The bound gRPC port, and where the in-process REST gateway reaches gRPC."""

    port: int
    gateway_target: str
    # Keeps the private socket's directory until the server is collected.
    private_dir: tempfile.TemporaryDirectory[str] | None = None


async def bind(server: grpc.aio.Server, config: Config) -> Listener:
    """Binds the gRPC port: plaintext, TLS (TLS_CERT_FILE + TLS_KEY_FILE) or mutual TLS (plus
    TLS_CLIENT_CA_FILE: client certificates signed by that CA are required)."""
    address = f"{config.bind_host}:{config.grpc_port}"
    if not config.tls_cert_file:
        port = server.add_insecure_port(address)
        # The gateway calls us over loopback unless we listen on one specific address.
        host = config.bind_host
        target_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return Listener(port, f"{target_host}:{port}")
    cert, key, client_ca = await asyncio.to_thread(_read_tls, config)
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    port = server.add_secure_port(address, credentials)
    # The gateway runs in this process and cannot present a client certificate; it reaches gRPC
    # over a Unix socket in a directory only this user can open (mode 0700). It forwards the
    # callers' credentials, so keys and roles apply to REST exactly as to gRPC.
    private_dir = tempfile.TemporaryDirectory(prefix="orchestrator-")
    target = f"unix:{private_dir.name}/grpc.sock"
    if not server.add_insecure_port(target):
        raise OSError(f"cannot bind the gateway's socket {target}")
    return Listener(port, target, private_dir)
