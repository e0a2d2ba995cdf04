"""What keeps hostile HTTP clients from hurting the process: a connection cap, and log redaction.

Timeouts live with the runner (`start_gateway`): aiohttp's `keepalive_timeout` is armed when a
connection opens and re-armed after each response, and closes the connection if no complete request
head has arrived by then (aiohttp 3.14 `RequestHandler._process_keepalive`), so it doubles as the
header timeout that ends slowloris connections. Bodies are read under their own timeout in `app.py`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

_BUSY_BODY = (
    b'{"error":{"code":503,"status":"UNAVAILABLE","message":"too many open connections","details":[]}}'
)
#: The answer to a connection over the cap, written before it is closed.
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


#: How long a refused connection is kept half-closed for its client to read the 503 and close.
_REFUSED_LINGER = 0.5


class _Refused(asyncio.Protocol):
    """A connection over the cap: told 503 and closed, without reading its request.

    Closing a socket with unread input makes the kernel answer RST, which can discard the 503 at
    the client; so the answer is followed by a FIN, and the socket closes when the client does or
    after `_REFUSED_LINGER`."""

    def __init__(self) -> None:
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport instances, only alike (aiohttp casts too).
        stream = cast(asyncio.Transport, transport)
        stream.write(_BUSY)
        if stream.can_write_eof():
            stream.write_eof()
        self._linger = asyncio.get_running_loop().call_later(_REFUSED_LINGER, stream.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request of a refused connection is not read

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()


class _Admission(asyncio.Protocol):
    """Hands the connection to the protocol `CappedTCPSite.admit` picks when it is made."""

    def __init__(self, site: CappedTCPSite) -> None:
        self._site = site
        self._inner: asyncio.Protocol = _Refused()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner = self._site.admit()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class CappedTCPSite(web.BaseSite):
    """`web.TCPSite` with at most `max_connections` open connections; each one over answers 503
    and is closed, so held connections cannot exhaust the process's file descriptors."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        max_connections: int,
        backlog: int = 128,
        sock: socket.socket | None = None,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        # A socket bound (and listening) before the gateway started: see `bind_listener`.
        self._sock = sock
        self.max_connections = max_connections
        #: Connections refused since start (tests and metrics read it).
        self.refused = 0

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    def _protocol(self) -> asyncio.BaseProtocol:
        return _Admission(self)

    def admit(self) -> asyncio.Protocol:
        """The protocol of a connection just made: aiohttp's, or a refusal over the cap. Decided
        when the connection is made, not when its protocol is created: the loop may create several
        protocols before the first is connected (and counted by aiohttp)."""
        server = self._runner.server
        assert server is not None, "runner not set up"
        if len(server.connections) >= self.max_connections:
            self.refused += 1
            return _Refused()
        return server()

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            self._server = await loop.create_server(self._protocol, sock=self._sock, backlog=self._backlog)
            return
        self._server = await loop.create_server(
            self._protocol, self._host, self._port, backlog=self._backlog, reuse_address=True
        )


# -- log redaction -------------------------------------------------------------------------------

#: Values of credential-bearing headers wherever they appear in a log message.
_CREDENTIAL = re.compile(
    r"(?i)((?:authorization|x-api-key|api[_-]?key|agent[_-]?token)['\"]?\s*[:=]?\s*(?:bearer\s+)?|bearer\s+)"
    r"[^\s,'\"}]+"
)
#: aiohttp's loggers that can quote request bytes (a bad request's exception carries its start).
AIOHTTP_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal")


def redact(text: str) -> str:
    return _CREDENTIAL.sub(lambda match: f"{match.group(1)}[redacted]", text)


class RedactingFilter(logging.Filter):
    """Keeps request bytes out of the log.

    A request aiohttp cannot parse (a header over `max_field_size`, a bad request line) is logged by
    aiohttp at ERROR with the parser's exception, whose message quotes the first bytes of the
    offending line: `x-api-key: <key>` plus padding put a key in clear in the log. Such records
    become one WARNING that names the error class and the client, without the quoted bytes; any
    other record has credential-looking values scrubbed from its message and arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "malformed HTTP request from %s: %s (answered %d; its bytes are not logged)"
            record.args = (peer, type(exc).__name__, exc.code or 400)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(arg) for arg in record.args)
        if record.exc_info and record.exc_info[1] is not None:
            # The traceback ends with the exception's message, which may quote input: it is scrubbed
            # into the message itself, since some formatters format `exc_info` on their own.
            traceback = redact(logging.Formatter().formatException(record.exc_info))
            record.msg = f"{record.getMessage()}\n{traceback}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def _redact_arg(arg: Any) -> Any:
    return redact(arg) if isinstance(arg, str) else arg


_FILTER = RedactingFilter()


def install_log_redaction(*loggers: logging.Logger) -> None:
    """Adds the filter to aiohttp's loggers and `loggers` (idempotent)."""
    for logger in (*(logging.getLogger(name) for name in AIOHTTP_LOGGERS), *loggers):
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
