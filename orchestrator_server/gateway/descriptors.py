"""Small typed helpers over protobuf descriptors (whose stubs mark nested types as optional)."""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor


def is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def message_type_of(field: FieldDescriptor) -> Descriptor:
    """The message type of a message field (map fields included: their entry type)."""
    message_type = field.message_type
    if message_type is None:
        raise TypeError(f"{field.full_name} is not a message field")
    return message_type


def enum_type_of(field: FieldDescriptor) -> EnumDescriptor:
    enum_type = field.enum_type
    if enum_type is None:
        raise TypeError(f"{field.full_name} is not an enum field")
    return enum_type


def is_message(field: FieldDescriptor) -> bool:
    return bool(field.type == FieldDescriptor.TYPE_MESSAGE)


def is_map(field: FieldDescriptor) -> bool:
    return is_message(field) and bool(message_type_of(field).GetOptions().map_entry)
