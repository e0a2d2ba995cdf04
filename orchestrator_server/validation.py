"""Request validation shared by every domain class: names, sizes, counts, page tokens.

Each check appends (field, problem) to a list so that one answer names every bad field.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping

from orchestrator_server.errors import InvalidArgument

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LABEL_KEY_PATTERN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,126}[A-Za-z0-9])?$")
LABEL_VALUE_PATTERN = re.compile(r"^[A-Za-z0-9._-]{0,128}$")

MAX_LABELS = 64
MAX_CAPABILITIES = 64
MAX_ENDPOINTS = 32
MAX_ADDRESS_LENGTH = 512
MAX_TEXT_LENGTH = 1024
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
MAX_ID_LENGTH = 128


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
