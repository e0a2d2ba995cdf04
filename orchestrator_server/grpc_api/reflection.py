"""Server reflection under both of its names: `grpc.reflection.v1alpha` and `grpc.reflection.v1`.

grpcio-reflection (1.85) implements only v1alpha, while newer tools (grpcurl >= 1.8.8, Postman,
grpcui) ask for v1 first. The two protocols are the same message for message, field for field,
under another package, so the v1alpha servicer answers v1 calls too: the v1 descriptor is the
v1alpha file with its package renamed (so reflection can describe the v1 service itself), and v1
calls are decoded with the v1alpha messages, which read the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.reflection import aio as reflection_aio  # type: ignore[attr-defined]

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_V1ALPHA_PREFIX = ".grpc.reflection.v1alpha."
_V1_PREFIX = ".grpc.reflection.v1."


def _renamed(type_name: str) -> str:
    return (
        _V1_PREFIX + type_name.removeprefix(_V1ALPHA_PREFIX)
        if type_name.startswith(_V1ALPHA_PREFIX)
        else type_name
    )


def _rename_fields(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for message_field in message.field:
            if message_field.HasField("type_name"):
                message_field.type_name = _renamed(message_field.type_name)
        _rename_fields(message.nested_type)


def add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Adds grpc/reflection/v1/reflection.proto to `pool`, derived from the v1alpha file."""
    try:
        pool.FindServiceByName(V1_SERVICE_NAME)
        return  # already there (a second server in this process, or a newer grpcio-reflection)
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    file.name = "grpc/reflection/v1/reflection.proto"
    file.package = "grpc.reflection.v1"
    _rename_fields(file.message_type)
    for service in file.service:
        for method in service.method:
            method.input_type = _renamed(method.input_type)
            method.output_type = _renamed(method.output_type)
    pool.Add(file)


def v1_service() -> ServiceDescriptor:
    """The descriptor of grpc.reflection.v1.ServerReflection (added to the default pool)."""
    pool = descriptor_pool.Default()
    add_v1_descriptor(pool)
    return pool.FindServiceByName(V1_SERVICE_NAME)


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection for `service_names` (plus both reflection services) on `server`."""
    add_v1_descriptor(descriptor_pool.Default())
    names = (*service_names, V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME)
    servicer: Any = getattr(reflection_aio, "ReflectionServicer")(names)  # noqa: B009 (untyped module)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))
