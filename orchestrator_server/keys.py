"""API keys: their roles, their configuration (`API_KEYS`, `API_KEYS_FILE`) and the key ring that
holds their digests and re-reads the file when it changes. Authentication (`auth.py`) looks a
presented secret up here.

Keys are never kept in the clear: the ring holds their SHA-256 digests. The file is re-read off the
event loop when it changes or on SIGHUP.
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
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from orchestrator_server.config import Config, ConfigError

log = logging.getLogger(__name__)


class Role(enum.StrEnum):
    ADMIN = "admin"
    AGENT = "agent"
    READER = "reader"


@dataclass(frozen=True)
class ApiKey:
    role: Role
    digest: bytes = field(repr=False)
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.digest.hex()[:12]


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
