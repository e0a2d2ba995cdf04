"""Request validation shared by every domain class: names, sizes, counts, values, page tokens.

Each check appends (field, problem) to a list so that one answer names every bad field.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable, Mapping

from google.protobuf import duration_pb2, struct_pb2

from orchestrator_server.errors import InvalidArgument

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LABEL_KEY_PATTERN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,126}[A-Za-z0-9])?$")
LABEL_VALUE_PATTERN = re.compile(r"^[A-Za-z0-9._-]{0,128}$")

MAX_LABELS = 64
MAX_CAPABILITIES = 64
MAX_TASK_TYPES = 64
MAX_ENDPOINTS = 32
MAX_ADDRESS_LENGTH = 512
MAX_TEXT_LENGTH = 1024
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
MAX_ID_LENGTH = 128
# Nesting of a google.protobuf.Struct/Value (each object or list is one level). The Python (upb)
# decoder refuses messages nested past its recursion limit (a Struct ~32 objects deep, where every
# level costs two or three message levels), so a value deeper than this would be stored and then be
# unreadable by every Python client: refused at the edge instead.
MAX_VALUE_DEPTH = 16
# Longest accepted timeout (queue or run): 30 days. Beyond that a timestamp computed from it may
# overflow, and no real task waits that long.
MAX_DURATION_SECONDS = 30 * 24 * 3600
# Digits of a numeric page position (an SQLite integer has at most 19).
_POSITION_PATTERN = re.compile(r"^[0-9]{1,18}$")


class Violations:
    """Collects field violations; `raise_if_any` turns them into one InvalidArgument."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, problem: str) -> None:
        self.items.append((field, problem))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)

    def name(self, field: str, value: str, *, required: bool = True) -> None:
        if not value:
            if required:
                self.add(field, "is required")
            return
        if not NAME_PATTERN.match(value):
            self.add(
                field, "must be 1-128 characters of letters, digits, '.', '_' or '-', starting alphanumeric"
            )

    def text(self, field: str, value: str, limit: int = MAX_TEXT_LENGTH) -> None:
        if len(value) > limit:
            self.add(field, f"longer than {limit} characters")

    def identifier(self, field: str, value: str) -> None:
        if not value:
            self.add(field, "is required")
        elif len(value) > MAX_ID_LENGTH or not NAME_PATTERN.match(value):
            self.add(field, "is not a valid identifier")

    def labels(self, field: str, labels: Mapping[str, str]) -> None:
        if len(labels) > MAX_LABELS:
            self.add(field, f"more than {MAX_LABELS} labels")
            return
        for key, value in labels.items():
            if not LABEL_KEY_PATTERN.match(key):
                self.add(f"{field}[{key[:64]}]", "label key must be 1-128 characters of [A-Za-z0-9._/-]")
            elif not LABEL_VALUE_PATTERN.match(value):
                self.add(f"{field}[{key}]", "label value must be at most 128 characters of [A-Za-z0-9._-]")

    def names(self, field: str, values: Iterable[str], limit: int) -> None:
        values = list(values)
        if len(values) > limit:
            self.add(field, f"more than {limit} entries")
            return
        for index, value in enumerate(values):
            self.name(f"{field}[{index}]", value)

    def value(self, field: str, value: struct_pb2.Struct) -> None:
        """A Struct that every reader can decode: at most MAX_VALUE_DEPTH levels deep, and only
        finite numbers (JSON has no NaN or Infinity, so proto3 JSON cannot carry them)."""
        problem = _value_problem(value)
        if problem is not None:
            self.add(field, problem)

    def duration(self, field: str, present: bool, value: duration_pb2.Duration) -> None:
        if not present:
            return
        if value.seconds < 0 or value.nanos < 0:
            self.add(field, "must not be negative")
        elif value.seconds > MAX_DURATION_SECONDS or not 0 <= value.nanos < 1_000_000_000:
            self.add(field, f"must be at most {MAX_DURATION_SECONDS} seconds (30 days)")

    def page_size(self, field: str, value: int) -> int:
        if value < 0:
            self.add(field, "must not be negative")
            return DEFAULT_PAGE_SIZE
        if value > MAX_PAGE_SIZE:
            self.add(field, f"must be at most {MAX_PAGE_SIZE}")
        return value or DEFAULT_PAGE_SIZE


def encode_page_token(position: str) -> str:
    return base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


def decode_page_token(token: str, field: str = "page_token") -> str:
    """The position inside a token made by `encode_page_token`; InvalidArgument if it is not one."""
    if not token:
        return ""
    try:
        position = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument.field(field, "is not a token returned by this server") from None
    if not position or len(position) > 256:
        raise InvalidArgument.field(field, "is not a token returned by this server")
    return position


def decode_position_token(token: str, field: str = "page_token") -> int | None:
    """The numeric position inside a token; None for no token; InvalidArgument for a made-up one
    (`str.isdigit` alone would let through "²" and numbers too large for the store)."""
    if not token:
        return None
    position = decode_page_token(token, field)
    if not _POSITION_PATTERN.match(position):
        raise InvalidArgument.field(field, "is not a token returned by this server")
    return int(position)


def _value_problem(root: struct_pb2.Struct) -> str | None:
    """Walks the value breadth-first (no recursion: the depth is what is being checked)."""
    level: list[struct_pb2.Struct | struct_pb2.ListValue] = [root]
    depth = 1
    while level:
        if depth > MAX_VALUE_DEPTH:
            return f"nested deeper than {MAX_VALUE_DEPTH} levels"
        below: list[struct_pb2.Struct | struct_pb2.ListValue] = []
        for container in level:
            values = (
                container.fields.values() if isinstance(container, struct_pb2.Struct) else container.values
            )
            for item in values:
                kind = item.WhichOneof("kind")
                if kind == "number_value" and not math.isfinite(item.number_value):
                    return "contains a NaN or infinite number"
                if kind == "struct_value":
                    below.append(item.struct_value)
                elif kind == "list_value":
                    below.append(item.list_value)
        level = below
        depth += 1
    return None
