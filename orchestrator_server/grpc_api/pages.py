"""List answers as their wire bytes, written from the items' own bytes.

The in-process REST gateway renders a list answer from its bytes (its rendering is cached by
them). Building `ListAgentsResponse(agents=page)` deep-copies every agent of the page into the
answer, and the gateway then sized and serialized that copy: for 100 agents ~3x what writing the
page's bytes from the items costs (issue 13: the copy alone was ~125 µs of a REST list). gRPC needs
the message, which costs as much to build as these bytes plus a parse, so the gRPC servicer method
builds it as before and both are checked to give the same bytes.

`EncodedMethods` is how a servicer offers such a method to the gateway: by RPC name, a coroutine
taking the request and context like the servicer method, returning the answer's bytes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

EncodedMethod = Callable[[Any, Any], Awaitable[bytes]]
EncodedMethods = Mapping[str, EncodedMethod]

_LENGTH_DELIMITED = 2
ItemT = TypeVar("ItemT", bound=Message)


def _serialize(item: Message) -> bytes:
    return item.SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: FieldDescriptor) -> bytes:
    return _varint((field.number << 3) | _LENGTH_DELIMITED)


class PageEncoder:
    """Writes answers of one page type: a repeated message field of items (`items_field`) and the
    string `next_page_token`, in field-number order as protobuf serializes them."""

    def __init__(self, descriptor: Descriptor, items_field: str = "agents") -> None:
        items = descriptor.fields_by_name[items_field]
        token = descriptor.fields_by_name["next_page_token"]
        if not items.is_repeated or items.type != FieldDescriptor.TYPE_MESSAGE:
            raise ValueError(f"{descriptor.full_name}.{items_field} is not a repeated message field")
        if token.type != FieldDescriptor.TYPE_STRING or items.number > token.number:
            raise ValueError(f"{descriptor.full_name}: expected the items before a string next_page_token")
        self._item_tag = _tag(items)
        self._token_tag = _tag(token)
        # An item's framing (tag and length) by its length, made once per length seen.
        self._frames: dict[int, bytes] = {}

    def encode(
        self, items: Sequence[ItemT], next_page_token: str, wire: Callable[[ItemT], bytes] = _serialize
    ) -> bytes:
        """The answer's bytes; `wire` gives an item's bytes (the registry keeps its agents')."""
        frames = self._frames
        parts: list[bytes] = []
        for item in items:
            data = wire(item)
            frame = frames.get(len(data))
            if frame is None:
                frame = frames[len(data)] = self._item_tag + _varint(len(data))
            parts.append(frame)
            parts.append(data)
        if next_page_token:
            token = next_page_token.encode()
            parts += (self._token_tag, _varint(len(token)), token)
        return b"".join(parts)
