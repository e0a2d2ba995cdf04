"""Request ids, RPC latency metrics and the access log, for every RPC in one place."""

from __future__ import annotations

import contextvars
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_interceptor.server import AsyncServerInterceptor

from orchestrator_server.metrics import RPC_LATENCY

access_log = logging.getLogger("orchestrator.access")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class RequestIdFilter(logging.Filter):
    """Adds the current request id to every log record made while serving a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


def _incoming_request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return secrets.token_hex(8)


class TelemetryInterceptor(AsyncServerInterceptor):
    """Outermost interceptor: sees the final status of every call, whoever set it."""

    async def intercept(
        self,
        method: Callable[..., Any],
        request_or_iterator: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        method_name: str,
    ) -> Any:
        rid = _incoming_request_id(context)
        token = request_id.set(rid)
        started = time.perf_counter()
        try:
            response = method(request_or_iterator, context)
            if hasattr(response, "__aiter__"):
                return self._stream(response, context, method_name, rid, started)
            try:
                return await response
            finally:
                self._record(context, method_name, rid, started)
        finally:
            request_id.reset(token)

    async def _stream(
        self,
        responses: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
        method_name: str,
        rid: str,
        started: float,
    ) -> AsyncIterator[Any]:
        token = request_id.set(rid)
        try:
            async for response in responses:
                yield response
        finally:
            self._record(context, method_name, rid, started)
            request_id.reset(token)

    @staticmethod
    def _record(
        context: grpc.aio.ServicerContext[Any, Any], method_name: str, rid: str, started: float
    ) -> None:
        code = context.code()
        record(method_name, code.name if isinstance(code, grpc.StatusCode) else "OK", rid, started)


@functools.lru_cache(maxsize=1024)
def _latency(method_name: str, code: str) -> Any:
    # `labels()` costs microseconds; methods x codes are few.
    return RPC_LATENCY.labels(method_name.rsplit("/", 1)[-1], code)


def record(method_name: str, code: str, rid: str, started: float) -> None:
    """The latency metric and the access line of one call (also written by the REST gateway for
    the calls it dispatches in process)."""
    elapsed = time.perf_counter() - started
    _latency(method_name, code).observe(elapsed)
    level = logging.DEBUG if code in ("OK", "CANCELLED") else logging.INFO
    if access_log.isEnabledFor(level):
        access_log.log(
            level,
            "%s %s %.1f ms",
            method_name,
            code,
            elapsed * 1000,
            extra={
                "request_id": rid,
                "method": method_name,
                "code": code,
                "duration_ms": round(elapsed * 1000, 3),
            },
        )
